"""The evaluation loop: benchmarks x scales x images (x repeats) -> per-image rows and summaries.

Every method (bicubic or a network) goes through :func:`run_benchmarks` with the same data
loading, metrics and bookkeeping, so the bicubic row of a table is a check of the protocol
itself: it must reproduce the literature's bicubic numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import console, defaults
from pipeline.config import EvalConfig
from pipeline.console import UserError
from pipeline.evaluate import metrics
from pipeline.evaluate.benchmarks import (
    Benchmark,
    Sample,
    benchmark_files,
    check_files,
    load_sample,
    resolve_benchmarks,
)
from pipeline.evaluate.methods import Method, Upscaler, method_from_config
from pipeline.evaluate.results import EvalReport, FigureRow, ImageRow, Outcome, Summary

if TYPE_CHECKING:
    from pipeline.evaluate.report import ResultWriter


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from pipeline.preprocess import imresize

    return imresize(image, scale=scale)


def _luma(img: np.ndarray, grey: bool) -> np.ndarray:
    return metrics.rgb_to_gray(img) if grey else metrics.rgb_to_y(img)


def choose_crop(
    hr: np.ndarray, bic: np.ndarray, sr: np.ndarray, size: int, prefer_gain: bool
) -> tuple[int, int]:
    """Top-left of the ``size`` x ``size`` window shown in the figure.

    For a model: where it beats bicubic most (summed squared-error reduction on Y); for the
    bicubic baseline: the most textured window of HR. Chosen on a grid of stride size/4.
    """
    grey = hr.ndim == 2
    y_hr = _luma(hr, grey)
    if prefer_gain:
        score = (_luma(bic, grey) - y_hr) ** 2 - (_luma(sr, grey) - y_hr) ** 2
    else:
        gy, gx = np.gradient(y_hr)
        score = gy * gy + gx * gx
    integral = np.pad(score.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = score.shape
    step = max(1, size // 4)
    best, where = -np.inf, (0, 0)
    for top in range(0, h - size + 1, step):
        for left in range(0, w - size + 1, step):
            s = (
                integral[top + size, left + size]
                - integral[top, left + size]
                - integral[top + size, left]
                + integral[top, left]
            )
            if s > best:
                best, where = s, (top, left)
    return where


def _figure_row(
    sample: Sample, bic: np.ndarray, sr: np.ndarray, psnr: float, bic_psnr: float, prefer_gain: bool
) -> FigureRow:
    h, w = sample.hr.shape[:2]
    size = max(8, min(128, h, w))
    top, left = choose_crop(sample.hr, bic, sr, size, prefer_gain)
    box = (slice(top, top + size), slice(left, left + size))
    return FigureRow(
        image=sample.name,
        gain=psnr - bic_psnr,
        hr=sample.hr[box].copy(),
        bicubic=bic[box].copy(),
        sr=sr[box].copy(),
        psnr=psnr,
        bicubic_psnr=bic_psnr,
    )


@dataclass
class _ImageResult:
    rows: list[ImageRow]
    sr: np.ndarray  # output of the first repeat
    bicubic: np.ndarray
    seconds: float


def _evaluate_image(
    upscaler: Upscaler,
    is_bicubic: bool,
    bench: str,
    sample: Sample,
    scale: int,
    repeats: int,
    label: str,
    protocol: str = "standard",
) -> _ImageResult:
    """Bicubic reference plus ``repeats`` runs of the method on one sample, scored."""
    t0 = time.perf_counter()
    bic = upscaler(sample.lr, 0) if is_bicubic else _resize(sample.lr, scale)
    bic_seconds = time.perf_counter() - t0
    psnr_fn, ssim_fn = metrics.PROTOCOLS[protocol]
    bic_p = psnr_fn(bic, sample.hr, scale)
    bic_s = ssim_fn(bic, sample.hr, scale)
    rows, first, total = [], None, 0.0
    for k in range(repeats):
        if is_bicubic:
            sr, dt = bic, bic_seconds
        else:
            t0 = time.perf_counter()
            sr = upscaler(sample.lr, k)
            dt = time.perf_counter() - t0
        if sr.shape[:2] != sample.hr.shape[:2]:
            raise UserError(
                f"{sample.hr_path}: {label} returned {sr.shape[1]}x{sr.shape[0]}, expected "
                f"{sample.hr.shape[1]}x{sample.hr.shape[0]} (x{scale} of the LR)"
            )
        total += dt
        first = sr if first is None else first
        rows.append(
            ImageRow(
                benchmark=bench,
                scale=scale,
                image=sample.name,
                repeat=k,
                psnr=psnr_fn(sr, sample.hr, scale),
                ssim=ssim_fn(sr, sample.hr, scale),
                bicubic_psnr=bic_p,
                bicubic_ssim=bic_s,
                seconds=dt,
                lr_width=sample.lr.shape[1],
                lr_height=sample.lr.shape[0],
                grey=sample.grey,
                lr_source=str(sample.lr_path) if sample.lr_path else "generated",
            )
        )
    assert first is not None
    return _ImageResult(rows, first, bic, total)


def _summarise(
    bench: str, scale: int, rows: list[ImageRow], repeats: int, seconds: float
) -> Summary:
    """Mean over images per repeat; mean and sample std of those over repeats."""
    psnr = np.array([[r.psnr for r in rows if r.repeat == k] for k in range(repeats)]).mean(axis=1)
    ssim = np.array([[r.ssim for r in rows if r.repeat == k] for k in range(repeats)]).mean(axis=1)
    first = [r for r in rows if r.repeat == 0]
    return Summary(
        benchmark=bench,
        scale=scale,
        psnr=float(psnr.mean()),
        ssim=float(ssim.mean()),
        images=len(first),
        seconds=seconds,
        repeats=repeats,
        psnr_std=float(psnr.std(ddof=1)) if repeats > 1 else 0.0,
        ssim_std=float(ssim.std(ddof=1)) if repeats > 1 else 0.0,
        bicubic_psnr=float(np.mean([r.bicubic_psnr for r in first])),
        bicubic_ssim=float(np.mean([r.bicubic_ssim for r in first])),
    )


ImageSource = Callable[[Benchmark, int, list[Path]], Iterator[tuple[Sample, "_ImageResult"]]]


def evaluate_file(
    upscaler: Upscaler, is_bicubic: bool, bench: Benchmark, path: Path, scale: int, repeats: int,
    label: str, protocol: str = "standard",
) -> tuple[Sample, _ImageResult]:
    """Load one benchmark image and score the method on it: the unit of work of every worker."""
    sample = load_sample(bench, path, scale, _resize)
    return sample, _evaluate_image(
        upscaler, is_bicubic, bench.name, sample, scale, repeats, label, protocol
    )


def local_images(
    upscalers: dict[int, Upscaler], is_bicubic: bool, repeats: int, label: str,
    protocol: str = "standard",
) -> ImageSource:
    """Every image in this process, one after the other."""

    def images(bench: Benchmark, scale: int, files: list[Path]):
        for path in files:
            yield evaluate_file(
                upscalers[scale], is_bicubic, bench, path, scale, repeats, label, protocol
            )

    return images


def run_benchmarks(
    upscalers: dict[int, Upscaler],
    method: str,
    label: str,
    benchmarks: list[Benchmark],
    scales: list[int],
    repeats: int = 1,
    max_images: int = 0,
    figure_images: int = 3,
    save_dir: Path | None = None,
    on_update: Callable[[Outcome, bool], None] | None = None,
    images: ImageSource | None = None,
) -> Outcome:
    """Evaluate ``upscalers[scale]`` on every benchmark and scale with the standard protocol.

    The bicubic comparison (CSV column, figure panel) is computed for every method; for the
    bicubic method it *is* the output, so it runs once. ``on_update(outcome, group_done)`` is
    called after every image with the outcome so far (rows of every scored image, summaries of
    the completed benchmark x scale pairs), so a caller can keep results on disk as they come.
    ``images(bench, scale, files)`` yields ``(sample, result)`` per file in order: here
    (:func:`local_images`) or on Ray workers (:mod:`pipeline.evaluate.distributed`); the
    bookkeeping is the same either way, so the table is too.
    """
    from pipeline.imageio import write_png

    out = Outcome(method=method, label=label)
    is_bicubic = method == "bicubic"
    if images is None:
        images = local_images(upscalers, is_bicubic, repeats, label)
    t_all = time.perf_counter()
    for bench in benchmarks:
        files = benchmark_files(bench, max_images)
        for scale in scales:
            rows: list[ImageRow] = []
            seconds = 0.0
            candidates: list[FigureRow] = []
            total = len(files) * repeats
            t_set = time.perf_counter()
            with console.progress_bar(f"{bench.name} x{scale}", total=total, unit="img") as bar:
                for path, (sample, res) in zip(files, images(bench, scale, files), strict=True):
                    rows += res.rows
                    out.rows += res.rows
                    seconds += res.seconds
                    bar.advance(repeats)
                    if save_dir is not None:
                        folder = save_dir / bench.name / f"x{scale}"
                        folder.mkdir(parents=True, exist_ok=True)
                        write_png(folder / f"{sample.name}_x{scale}.png", res.sr)
                    if figure_images:
                        mean_psnr = float(np.mean([r.psnr for r in res.rows]))
                        bic_psnr = res.rows[0].bicubic_psnr
                        candidates.append(
                            _figure_row(
                                sample, res.bicubic, res.sr, mean_psnr, bic_psnr, not is_bicubic
                            )
                        )
                        # keep the best few (by gain over bicubic; first images on ties)
                        candidates.sort(key=lambda r: -r.gain)
                        del candidates[figure_images:]
                    if on_update is not None and path != files[-1]:
                        on_update(out, False)
            out.summaries.append(_summarise(bench.name, scale, rows, repeats, seconds))
            out.wall_seconds[(bench.name, scale)] = time.perf_counter() - t_set
            if candidates:
                out.figures[(bench.name, scale)] = candidates
            if on_update is not None:
                on_update(out, True)
    out.total_seconds = time.perf_counter() - t_all
    return out


# ---------------------------------------------------------------------------------------------
# from a config to an outcome (the `evaluate` command's body)
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything resolved and checked before the long loop starts, so bad input fails in
    seconds: the benchmark folders; every HR file and every shipped LR file the run will read
    (present, image header readable, LR exactly HR/scale, large enough to score; headers only,
    no pixels decoded); the tracking server and the run given by ``--run-id``; the method.

    A file whose header is fine but whose pixel data is truncated can only fail when the loop
    decodes it; :func:`evaluate` then keeps the results of the images before it.
    """

    benchmarks: list[Benchmark]
    method: Method
    tracking_uri: str | None
    out_dir: Path
    images: int = 0  # images the loop will evaluate per scale, all benchmarks together


def _default_out_dir(method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return defaults.home() / "evaluations" / f"{stamp}-{method}"


def check_inputs(benchmarks: list[Benchmark], scales: list[int], max_images: int = 0) -> int:
    """Check every file the loop will read (see :class:`Prepared`); returns the image count."""
    work = [(b, p) for b in benchmarks for p in benchmark_files(b, max_images)]
    for bench, path in console.track(work, "checking benchmark files", unit="img"):
        check_files(bench, path, scales)
    return len(work)


def prepare(cfg: EvalConfig, workdir: Path) -> Prepared:
    """Resolve benchmarks and tracking first (cheap checks), then the method to evaluate, then
    every input file for the method's scales (which a checkpoint decides)."""
    benches = resolve_benchmarks(cfg.benchmarks, cfg.data_dir or defaults.data_dir())
    uri = None
    if cfg.mlflow or cfg.run_id or cfg.model_uri:
        from pipeline.tracking import check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking_uri)
        check_reachable(uri)
        if cfg.run_id and cfg.checkpoint and cfg.mlflow:
            # results go to that run: make sure it exists before hours of evaluation
            # (without --checkpoint the run's model is downloaded, which checks it anyway)
            from pipeline.evaluate.model_source import require_run

            require_run(cfg.run_id, uri)
    method = method_from_config(cfg, workdir, uri)
    images = check_inputs(benches, method.scales, cfg.max_images)
    out_dir = Path(cfg.out).expanduser() if cfg.out else _default_out_dir(method.name)
    return Prepared(benches, method, uri, out_dir, images)


def evaluate(cfg: EvalConfig, flush_seconds: float = 30.0) -> EvalReport:
    """Run the whole `evaluate` command: resolve and check, loop, write files, log to MLflow.

    Results are kept on disk while the loop runs (:class:`report.ResultWriter`); when the loop
    fails, the images scored so far are written before the error propagates, with a warning
    saying where. The ``--json`` table, which scripts take as the complete answer, is written
    only by a complete run, and nothing is logged to MLflow for a failed one.
    """
    from pipeline.evaluate import report

    with tempfile.TemporaryDirectory(prefix="sr-eval-") as tmp:
        prep = prepare(cfg, Path(tmp))
        m = prep.method
        console.info(
            f"evaluating {m.source} on {', '.join(b.name for b in prep.benchmarks)} "
            f"at x{', x'.join(map(str, m.scales))}"
            + (f" (tiling {cfg.tiling}, hash {cfg.hash})" if m.name != "bicubic" else "")
            + (" with the official repository's protocol" if cfg.protocol == "official" else "")
        )
        from pipeline.evaluate import provenance

        prov = provenance.build(cfg, m)
        writer = report.ResultWriter(prep.out_dir, flush_seconds, provenance=prov)
        repeats = cfg.repeats if m.name != "bicubic" else 1
        try:
            with _image_source(cfg, m, repeats) as images:
                outcome = run_benchmarks(
                    m.upscalers,
                    m.name,
                    m.label,
                    prep.benchmarks,
                    m.scales,
                    repeats=repeats,
                    max_images=cfg.max_images,
                    figure_images=cfg.figure_images,
                    save_dir=prep.out_dir / "images" if cfg.save_images else None,
                    on_update=writer.update,
                    images=images,
                )
        except BaseException:
            _keep_partial(writer, prep.images * len(m.scales))
            raise
        outcome.source = m.source
        outcome.model_config = m.model_config
        outcome.step = m.step
        outcome.provenance = prov
        written = writer.write(outcome, figures=True)
        if cfg.json_path:
            report.write_json(Path(cfg.json_path).expanduser(), outcome.summaries, prov)
        result = EvalReport(
            outcome, prep.out_dir, written.csv_path, written.json_path, written.figure_paths
        )
        if prep.tracking_uri is not None and cfg.mlflow:
            from pipeline.evaluate.mlflow_log import log_evaluation

            result.run_id, result.run_link = log_evaluation(cfg, result, prep.tracking_uri)
        return result


@contextlib.contextmanager
def _image_source(cfg: EvalConfig, m: Method, repeats: int) -> Iterator[ImageSource]:
    """This process for one worker; Ray actors for ``--workers N`` (N > 1)."""
    if cfg.workers <= 1:
        yield local_images(m.upscalers, m.name == "bicubic", repeats, m.label, cfg.protocol)
        return
    from pipeline.evaluate.distributed import ray_images

    with ray_images(
        m.upscalers, m.name == "bicubic", repeats, m.label, cfg.workers, cfg.address, cfg.device,
        cfg.protocol,
    ) as images:
        yield images


def _keep_partial(writer: ResultWriter, total: int) -> None:
    """After a failure: write what was scored (if anything) and say where, in one line."""
    done = writer.latest
    if done is None or not done.rows:
        return
    try:
        writer.write(done, figures=True)
    except Exception as exc:  # the original error matters more than this one
        console.warn(f"could not keep the partial results in {writer.out_dir}: {exc}")
        return
    pairs = len(done.summaries)
    console.warn(
        f"evaluation stopped after {done.images_done} of {total} images; their scores are in "
        f"{writer.csv_path} ({pairs} complete benchmark/scale pair{'' if pairs == 1 else 's'} "
        f"in {writer.json_path.name})"
    )
