"""Upscalers: uint8 LR in, uint8 SR out, so every method goes through one evaluation path.

The benchmark loop and ``upscale`` only see ``upscaler(lr, repeat) -> sr``. The bicubic
baseline is MATLAB ``imresize`` on the 8-bit image (grey stays grey, as in MATLAB); a model
gets the image as floats in [0, rgb_range] (grey repeated to 3 channels, as the reference's
data loader does), runs through the chosen tiling, and its output is quantised to 8 bits
exactly as the reference saves it (x255/rgb_range, clamp, round).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import SCALES, EvalConfig
from pipeline.console import UserError

Upscaler = Callable[[np.ndarray, int], np.ndarray]


@dataclass
class BicubicUpscaler:
    scale: int
    name: str = "bicubic"
    label: str = "Bicubic"

    def __call__(self, lr: np.ndarray, repeat: int = 0) -> np.ndarray:
        from pipeline.preprocess import imresize

        return imresize(lr, scale=self.scale)


def min_side_for(model: Any) -> int:
    """Smallest LR side the model accepts (DNLA needs chunk_size/2 tokens, spec quirk Q7)."""
    cfg = getattr(model, "config", None)
    chunk = getattr(cfg, "chunk_size", None)
    if not chunk:
        return 1
    return math.isqrt(max(0, (chunk + 1) // 2 - 1)) + 1


@dataclass
class ModelUpscaler:
    """A network with its tiling, ensemble and hash policy.

    ``hash_mode="stochastic"`` reseeds the global torch RNG with ``hash_seed + repeat`` before
    each image, so repeat ``k`` is one reproducible draw of the reference's random projections.
    """

    model: Any
    scale: int
    device: Any = None
    tiling: str = "reference"
    tile: int = 96
    overlap: int = 16
    ensemble: bool = False
    hash_mode: str = "fixed"
    hash_seed: int = 0
    name: str = "dnlan"
    label: str = "DNLAN"
    on_tile: Any = None
    _forward: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from pipeline.evaluate.tiling import make_forward

        if self.device is None:
            self.device = torch.device("cpu")
        self.model = self.model.to(self.device).eval()
        if hasattr(self.model, "attention_layers"):
            from pipeline.model import set_hash_mode

            set_hash_mode(self.model, self.hash_mode, seed=self.hash_seed)
        self.rgb_range = float(getattr(getattr(self.model, "config", None), "rgb_range", 1.0))
        min_side = min_side_for(self.model)
        if self.tiling == "overlap" and self.tile < min_side:
            raise UserError(
                f"tile {self.tile} is too small for this model: DNLA needs tiles of at least "
                f"{min_side}x{min_side} LR px (chunk_size {self.model.config.chunk_size})"
            )
        self._forward = make_forward(
            self.model,
            self.scale,
            tiling=self.tiling,
            tile=self.tile,
            overlap=self.overlap,
            ensemble=self.ensemble,
            min_side=min_side,
            on_tile=self._tile_done,
        )

    def _tile_done(self, done: int, total: int) -> None:
        if self.on_tile is not None:
            self.on_tile(done, total)

    def forward_float(self, lr: np.ndarray, repeat: int = 0):
        """The unquantised output tensor (1, 3, s*h, s*w) for a uint8 LR image."""
        import torch

        rgb = np.repeat(lr[:, :, None], 3, axis=2) if lr.ndim == 2 else lr
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        x = x.to(self.device, torch.float32).mul_(self.rgb_range / 255.0)
        if self.hash_mode == "stochastic":
            torch.manual_seed(self.hash_seed + repeat)
        with torch.no_grad():
            return self._forward(x)

    def __call__(self, lr: np.ndarray, repeat: int = 0) -> np.ndarray:
        import torch

        y = self.forward_float(lr, repeat)
        with torch.no_grad():
            q = y[0].mul(255.0 / self.rgb_range).clamp_(0, 255).round_().to(torch.uint8)
        return q.permute(1, 2, 0).cpu().numpy()


@dataclass
class Method:
    """What is being evaluated: one upscaler per scale, and how to name it in reports."""

    name: str  # "bicubic" | "dnlan"
    label: str  # shown in tables and figures
    source: str  # where the weights came from (or "bicubic")
    upscalers: dict[int, Upscaler]
    model_config: dict[str, Any] | None = None  # the loaded network's config (None: bicubic)
    step: int | None = None  # training step of the weights, when the checkpoint records it
    checkpoint: str | None = None  # the weights file evaluated (its sha256 goes into provenance)

    @property
    def scales(self) -> list[int]:
        return list(self.upscalers)


def method_from_config(
    cfg: EvalConfig,
    workdir: Path,
    tracking_uri: str | None,
    on_tile: Callable[[int, int], None] | None = None,
) -> Method:
    """Bicubic, or the network behind --checkpoint / --run-id, checked against --scale."""
    if cfg.method == "bicubic":
        if cfg.checkpoint or cfg.run_id or cfg.model_uri:
            raise UserError("--model bicubic takes no --checkpoint, --run-id or --model-uri")
        scales = list(cfg.scales) or list(SCALES)
        return Method("bicubic", "Bicubic", "bicubic", {s: BicubicUpscaler(s) for s in scales})

    from pipeline.device import select_device
    from pipeline.evaluate import model_source

    if cfg.checkpoint:
        path = model_source.checkpoint_file(cfg.checkpoint)
    elif cfg.run_id:
        if tracking_uri is None:
            raise UserError(
                "--run-id needs MLflow tracking (drop --no-mlflow or give --tracking-uri)"
            )
        path = model_source.download_run_model(cfg.run_id, tracking_uri, workdir)
    elif cfg.model_uri:
        path = model_source.download_mlflow_model(cfg.model_uri, tracking_uri, workdir)
    else:
        raise UserError(
            "nothing to evaluate: give --checkpoint PATH, --run-id RUN_ID, --model-uri URI or --model bicubic"
        )
    facts = model_source.checkpoint_facts(path)
    ckpt_scale = facts.scale
    if len(cfg.scales) > 1:
        raise UserError(
            f"{path}: a checkpoint is for one scale (x{ckpt_scale}); --scale asks for "
            f"{','.join(map(str, cfg.scales))}"
        )
    if cfg.scales and ckpt_scale is not None and cfg.scales[0] != ckpt_scale:
        raise UserError(
            f"{path}: checkpoint is for x{ckpt_scale}, but --scale {cfg.scales[0]} was requested"
        )
    model, desc = model_source.load_model(path, cfg, cfg.scales[0] if cfg.scales else ckpt_scale)
    scale = int(model.config.scale)
    upscaler = ModelUpscaler(
        model,
        scale,
        device=select_device(cfg.device),
        tiling=cfg.tiling,
        tile=cfg.tile,
        overlap=cfg.tile_overlap,
        ensemble=cfg.self_ensemble,
        hash_mode=cfg.hash,
        hash_seed=cfg.hash_seed,
        on_tile=on_tile,
    )
    source = f"MLflow run {cfg.run_id} ({desc})" if cfg.run_id and not cfg.checkpoint else desc
    if cfg.model_uri and not (cfg.checkpoint or cfg.run_id):
        source = f"MLflow model {cfg.model_uri}"
    from pipeline.evaluate.provenance import plus_label

    return Method(
        "dnlan", plus_label("DNLAN", cfg.self_ensemble), source, {scale: upscaler},
        dataclasses.asdict(model.config), facts.step, checkpoint=str(path),
    )
