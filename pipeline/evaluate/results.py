"""What an evaluation produces, as plain records: per-image rows, summaries, figures, the report.

Kept apart from the loop (runner.py) and from the writers (report.py, mlflow_log.py) so that
each of those imports the records without importing the others: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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
    seconds: float  # time in the method for this image (no file reading, no metrics)
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
    seconds: float  # time in the method, summed over images and repeats
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
    step: int | None = None  # training step of the evaluated weights, when known
    # wall-clock seconds per (benchmark, scale) and for the whole run (reading, method, metrics)
    wall_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    total_seconds: float = 0.0
    provenance: dict[str, Any] | None = None  # settings behind the numbers (evaluate/provenance.py)

    @property
    def images_done(self) -> int:
        return sum(1 for r in self.rows if r.repeat == 0)


@dataclass
class EvalReport:
    outcome: Outcome
    out_dir: Path
    csv_path: Path
    json_path: Path
    figure_paths: list[Path]
    run_id: str | None = None
    run_link: str | None = None
