"""The evaluation loop: benchmarks x scales x images (x repeats) -> per-image rows and summaries.

Every method (bicubic or a network) goes through :func:`run_benchmarks` with the same data
loading, metrics and bookkeeping, so the bicubic row of a table is a check of the protocol
itself: it must reproduce the literature's bicubic numbers.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import console, defaults
from pipeline.config import EvalConfig
from pipeline.console import UserError
from pipeline.evaluate import metrics
from pipeline.evaluate.benchmarks import Benchmark, Sample, load_sample, resolve_benchmarks
from pipeline.evaluate.upscalers import Method, Upscaler, method_from_config


@dataclass
class ImageRow:
    benchmark: str
    scale: int
    image: str
    repeat: int
    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    seconds: float
    lr_width: int
    lr_height: int
    grey: bool
    lr_source: str  # file path or "generated"


@dataclass
class Summary:
    benchmark: str
    scale: int
    psnr: float
    ssim: float
    images: int
    seconds: float
    repeats: int = 1
    psnr_std: float = 0.0
    ssim_std: float = 0.0
    bicubic_psnr: float = float("nan")
    bicubic_ssim: float = float("nan")


@dataclass
class FigureRow:
    """One row of a comparison figure: crops of HR, bicubic and the method's output."""

    image: str
    gain: float
    hr: np.ndarray
    bicubic: np.ndarray
    sr: np.ndarray
    psnr: float
    bicubic_psnr: float


@dataclass
class Outcome:
    method: str
    label: str
    summaries: list[Summary] = field(default_factory=list)
    rows: list[ImageRow] = field(default_factory=list)
    figures: dict[tuple[str, int], list[FigureRow]] = field(default_factory=dict)
    source: str = ""
    model_config: dict[str, Any] | None = None


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
) -> _ImageResult:
    """Bicubic reference plus ``repeats`` runs of the method on one sample, scored."""
    t0 = time.perf_counter()
    bic = upscaler(sample.lr, 0) if is_bicubic else _resize(sample.lr, scale)
    bic_seconds = time.perf_counter() - t0
    bic_p = metrics.psnr(bic, sample.hr, scale)
    bic_s = metrics.ssim(bic, sample.hr, scale)
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
                psnr=metrics.psnr(sr, sample.hr, scale),
                ssim=metrics.ssim(sr, sample.hr, scale),
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
) -> Outcome:
    """Evaluate ``upscalers[scale]`` on every benchmark and scale with the standard protocol.

    The bicubic comparison (CSV column, figure panel) is computed for every method; for the
    bicubic method it *is* the output, so it runs once.
    """
    from pipeline.imageio import write_png

    out = Outcome(method=method, label=label)
    is_bicubic = method == "bicubic"
    for bench in benchmarks:
        files = bench.images()
        if max_images:
            files = files[:max_images]
        for scale in scales:
            rows: list[ImageRow] = []
            seconds = 0.0
            candidates: list[FigureRow] = []
            total = len(files) * repeats
            with console.progress_bar(f"{bench.name} x{scale}", total=total, unit="img") as bar:
                for path in files:
                    sample = load_sample(bench, path, scale, _resize)
                    res = _evaluate_image(
                        upscalers[scale], is_bicubic, bench.name, sample, scale, repeats, label
                    )
                    rows += res.rows
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
            out.rows += rows
            out.summaries.append(_summarise(bench.name, scale, rows, repeats, seconds))
            if candidates:
                out.figures[(bench.name, scale)] = candidates
    return out


# ---------------------------------------------------------------------------------------------
# from a config to an outcome (the `evaluate` command's body)
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything resolved before the long loop starts (so bad input fails in seconds)."""

    benchmarks: list[Benchmark]
    method: Method
    tracking_uri: str | None
    out_dir: Path


def _default_out_dir(method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return defaults.home() / "evaluations" / f"{stamp}-{method}"


def prepare(cfg: EvalConfig, workdir: Path) -> Prepared:
    """Resolve benchmarks and tracking first (cheap checks), then the method to evaluate."""
    benches = resolve_benchmarks(cfg.benchmarks, cfg.data_dir or defaults.data_dir())
    uri = None
    if cfg.mlflow or cfg.run_id:
        from pipeline.tracking import check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking_uri)
        check_reachable(uri)
    method = method_from_config(cfg, workdir, uri)
    out_dir = Path(cfg.out).expanduser() if cfg.out else _default_out_dir(method.name)
    return Prepared(benches, method, uri, out_dir)


@dataclass
class EvalReport:
    outcome: Outcome
    out_dir: Path
    csv_path: Path
    json_path: Path
    figure_paths: list[Path]
    run_id: str | None = None
    run_link: str | None = None


def evaluate(cfg: EvalConfig) -> EvalReport:
    """Run the whole `evaluate` command: resolve, loop, write files, log to MLflow."""
    from pipeline.evaluate import report

    with tempfile.TemporaryDirectory(prefix="sr-eval-") as tmp:
        prep = prepare(cfg, Path(tmp))
        prep.out_dir.mkdir(parents=True, exist_ok=True)
        m = prep.method
        console.info(
            f"evaluating {m.source} on {', '.join(b.name for b in prep.benchmarks)} "
            f"at x{', x'.join(map(str, m.scales))}"
            + (f" (tiling {cfg.tiling}, hash {cfg.hash})" if m.name != "bicubic" else "")
        )
        outcome = run_benchmarks(
            m.upscalers,
            m.name,
            m.label,
            prep.benchmarks,
            m.scales,
            repeats=cfg.repeats if m.name != "bicubic" else 1,
            max_images=cfg.max_images,
            figure_images=cfg.figure_images,
            save_dir=prep.out_dir / "images" if cfg.save_images else None,
        )
        outcome.source = m.source
        outcome.model_config = m.model_config
        csv_path = report.write_csv(prep.out_dir / "per_image.csv", outcome.rows)
        json_path = report.write_json(prep.out_dir / "summary.json", outcome.summaries)
        if cfg.json_path:
            report.write_json(Path(cfg.json_path).expanduser(), outcome.summaries)
        figures = report.write_figures(prep.out_dir / "figures", outcome)
        result = EvalReport(outcome, prep.out_dir, csv_path, json_path, figures)
        if prep.tracking_uri is not None and cfg.mlflow:
            from pipeline.evaluate.mlflow_log import log_evaluation

            result.run_id, result.run_link = log_evaluation(cfg, result, prep.tracking_uri)
        return result
