"""`sr-pipeline evaluate`'s config (:class:`EvalConfig`): the benchmark protocol, tiling,
self-ensemble, hashing, where results go and how the work is spread.

Separate from training: evaluation reads a finished model (a checkpoint, run or MLflow model)
and shares only the model hyper-parameters and the preset names with a training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.base import (
    DEFAULT_TILE,
    DEFAULT_TILE_OVERLAP,
    ConfigError,
    check_positive,
    check_scale,
)
from pipeline.config.model import ModelConfig
from pipeline.config.presets import PRESETS


@dataclass
class EvalConfig:
    """`sr-pipeline evaluate`: the standard benchmark protocol (spec section 5).

    ``scales`` empty means automatic: the checkpoint's own scale for a model, 2, 3 and 4 for
    bicubic. ``preset`` and ``model`` only matter for official (plain state_dict) checkpoints;
    ours carry their config.
    """

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Literal["dnlan", "bicubic"] = "dnlan"
    checkpoint: str | None = None
    run_id: str | None = None
    model_uri: str | None = None  # an MLflow Model of ours, e.g. models:/dnlan-x2@champion
    use_ema: bool = True  # evaluate the EMA weights when the checkpoint holds them
    # Official state_dicts: read n_feats/depth/scale from the tensor shapes unless a preset or
    # model option is imposed (the CLI sets this false when --preset is given).
    official_from_shapes: bool = True
    data_dir: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["Set5", "Set14", "B100", "Urban100", "Manga109"])
    scales: list[int] = field(default_factory=list)
    max_images: int = 0  # 0 = all images of each benchmark
    tiling: Literal["none", "reference", "overlap"] = "reference"
    tile: int = DEFAULT_TILE  # overlap tiling, LR pixels (see DEFAULT_TILE)
    tile_overlap: int = DEFAULT_TILE_OVERLAP
    self_ensemble: bool = False
    hash: Literal["fixed", "stochastic"] = "fixed"
    hash_seed: int = 0
    repeats: int = 1
    save_images: bool = False
    figure_images: int = 3  # rows of the comparison figure per benchmark and scale
    out: str | None = None  # folder for CSV, JSON, figures, images (default: under the home)
    json_path: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "dnlan-eval"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast for the network (auto: bf16 on a GPU that has it, else fp32); hashing stays fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # standard: MATLAB-style Y, SSIM on the valid region (what papers report); official: the
    # reference repository's own Python evaluation, for comparison (README "Evaluation protocol")
    protocol: Literal["standard", "official"] = "standard"
    workers: int = 1  # > 1: images spread over that many Ray actors (one GPU each if any)
    address: str | None = None  # Ray cluster for workers > 1 (default: RAY_ADDRESS or local)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        self.model.validate()
        for s in self.scales:
            check_scale(s, "scale")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"scale lists a value twice: {self.scales}")
        if not self.benchmarks:
            raise ConfigError("benchmarks must name at least one benchmark")
        check_positive(self.tile, "tile")
        if self.tile_overlap < 0 or 2 * self.tile_overlap >= self.tile:
            raise ConfigError(
                f"tile_overlap must be >= 0 and less than half the tile ({self.tile}), got {self.tile_overlap}"
            )
        check_positive(self.repeats, "repeats")
        check_positive(self.workers, "workers")
        if self.repeats > 1 and self.hash != "stochastic":
            raise ConfigError(
                "repeats > 1 needs hash=stochastic (fixed hashing gives the same number every time)"
            )
        if self.max_images < 0:
            raise ConfigError(f"max_images must be >= 0 (0 = all), got {self.max_images}")
        if self.figure_images < 0:
            raise ConfigError(f"figure_images must be >= 0, got {self.figure_images}")
