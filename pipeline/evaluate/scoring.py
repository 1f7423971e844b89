"""One benchmark image, scored: the unit of work of every evaluation worker.

:func:`evaluate_file` loads an image (HR, and its LR shipped or generated), runs the method
``repeats`` times, times it, and scores each output and the bicubic reference with the
protocol's PSNR/SSIM. It is the only code that touches pixels during an evaluation, and it runs
the same in this process (:func:`pipeline.evaluate.runner.local_images`) and on Ray actors
(:mod:`pipeline.evaluate.distributed`), which is why both give the same table. Kept apart from
the loop's bookkeeping (:mod:`pipeline.evaluate.runner`) so that a worker imports only this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.console import UserError
from pipeline.evaluate import metrics
from pipeline.evaluate.benchmarks import Benchmark, Sample, load_sample
from pipeline.evaluate.methods import Upscaler
from pipeline.evaluate.results import ImageRow


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from pipeline.preprocess import imresize

    return imresize(image, scale=scale)


@dataclass
class ImageResult:
    """One image's rows (one per repeat) and what the loop keeps for the figure and the PNG."""

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
) -> ImageResult:
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
    return ImageResult(rows, first, bic, total)


def evaluate_file(
    upscaler: Upscaler, is_bicubic: bool, bench: Benchmark, path: Path, scale: int, repeats: int,
    label: str, protocol: str = "standard",
) -> tuple[Sample, ImageResult]:
    """Load one benchmark image and score the method on it: the unit of work of every worker."""
    sample = load_sample(bench, path, scale, _resize)
    return sample, _evaluate_image(
        upscaler, is_bicubic, bench.name, sample, scale, repeats, label, protocol
    )
