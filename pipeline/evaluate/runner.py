"""The evaluation loop: benchmarks x scales x images (x repeats) -> per-image rows and summaries.

Every method (bicubic or a network) goes through :func:`run_benchmarks` with the same data
loading, metrics and bookkeeping, so the bicubic row of a table is a check of the protocol
itself: it must reproduce the literature's bicubic numbers.

Each image is scored by :func:`pipeline.evaluate.scoring.evaluate_file`, here or on Ray
workers; what this module adds is the bookkeeping around it (rows, summaries, figure crops,
saved images, updates for the result writer). The `evaluate` command's body (checks before
the loop, writing and logging after it) is :mod:`pipeline.evaluate.driver`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline import console
from pipeline.evaluate import metrics
from pipeline.evaluate.benchmarks import Benchmark, Sample, benchmark_files
from pipeline.evaluate.methods import Upscaler
from pipeline.evaluate.results import FigureRow, ImageRow, Outcome, Summary
from pipeline.evaluate.scoring import ImageResult, evaluate_file


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


ImageSource = Callable[[Benchmark, int, list[Path]], Iterator[tuple[Sample, ImageResult]]]


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
