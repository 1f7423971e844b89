"""Upscalers: uint8 LR in, uint8 SR out, so every method goes through one evaluation path.

The benchmark loop and ``upscale`` only see ``upscaler(lr, repeat) -> sr``. The bicubic
baseline is MATLAB ``imresize`` on the 8-bit image (grey stays grey, as in MATLAB); a model
gets the image as floats in [0, rgb_range] (grey repeated to 3 channels, as the reference's
data loader does), runs through the chosen tiling, and its output is quantised to 8 bits
exactly as the reference saves it (x255/rgb_range, clamp, round).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_TILE, DEFAULT_TILE_OVERLAP, SCALES, EvalConfig
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


def _ensure_hash_mode(model: Any, mode: str, seed: int) -> None:
    """Put every DNLA layer of ``model`` in ``mode`` unless it already is (keeps the fixed
    projections cached); called before each image, so two upscalers sharing one model each
    run with their own mode instead of the last one built."""
    from pipeline.model import set_hash_mode

    layers = [m for m in model.modules() if hasattr(m, "set_hash_mode")]
    want = [(mode, seed + i if mode == "fixed" else None) for i in range(len(layers))]
    if [(layer.hash_mode, layer.hash_seed) for layer in layers] != want:
        set_hash_mode(model, mode, seed=seed)


@dataclass
class ModelUpscaler:
    """A network with its tiling, ensemble, precision and hash policy.

    ``hash_mode="stochastic"`` reseeds the global torch RNG with ``hash_seed + repeat`` before
    each image, so repeat ``k`` is one reproducible draw of the reference's random projections.
    The hash mode is applied per image, not when the upscaler is built (see
    :func:`_ensure_hash_mode`). Images of any size go through the network as they are: no
    padding (:mod:`pipeline.evaluate.infer`).
    """

    model: Any
    scale: int
    device: Any = None
    tiling: str = "reference"
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_TILE_OVERLAP
    ensemble: bool = False
    hash_mode: str = "fixed"
    hash_seed: int = 0
    precision: str = "fp32"
    name: str = "dnlan"
    label: str = "DNLAN"
    on_tile: Any = None
    _forward: Any = field(default=None, init=False, repr=False)
    _precision: str = field(default="fp32", init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from pipeline.device import resolve_precision
        from pipeline.evaluate.tiling import make_forward

        if self.device is None:
            self.device = torch.device("cpu")
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()
        # resolved per device, the request kept: a copy made for a GPU worker (distributed.py)
        # runs what was asked even when the driver has no GPU
        self._precision = resolve_precision(self.device, self.precision)
        self.rgb_range = float(getattr(getattr(self.model, "config", None), "rgb_range", 1.0))
        self._forward = make_forward(
            self.model,
            self.scale,
            tiling=self.tiling,
            tile=self.tile,
            overlap=self.overlap,
            ensemble=self.ensemble,
            on_tile=self._tile_done,
        )

    def _tile_done(self, done: int, total: int) -> None:
        if self.on_tile is not None:
            self.on_tile(done, total)

    def forward_float(self, lr: np.ndarray, repeat: int = 0, peak: float = 255.0):
        """The unquantised output tensor (1, 3, s*h, s*w) for a uint8 LR image (uint16 with
        ``peak`` 65535)."""
        import torch

        from pipeline.evaluate.infer import sr_float

        _ensure_hash_mode(self.model, self.hash_mode, self.hash_seed)
        if self.hash_mode == "stochastic":
            torch.manual_seed(self.hash_seed + repeat)
        return sr_float(self._forward, lr, self.rgb_range, self.device, self._precision, peak)

    def __call__(self, lr: np.ndarray, repeat: int = 0) -> np.ndarray:
        from pipeline.evaluate.infer import quantize_tensor

        return quantize_tensor(self.forward_float(lr, repeat), self.rgb_range)


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

    from pipeline.evaluate import model_source

    if cfg.checkpoint:
        paths = [model_source.checkpoint_file(c) for c in cfg.checkpoint.split(",") if c.strip()]
    elif cfg.run_id:
        if tracking_uri is None:
            raise UserError(
                "--run-id needs MLflow tracking (drop --no-mlflow or give --tracking-uri)"
            )
        paths = [model_source.download_run_model(cfg.run_id, tracking_uri, workdir)]
    elif cfg.model_uri:
        paths = [model_source.download_mlflow_model(cfg.model_uri, tracking_uri, workdir)]
    else:
        raise UserError(
            "nothing to evaluate: give --checkpoint PATH, --run-id RUN_ID, --model-uri URI or --model bicubic"
        )
    if len(paths) > 1:
        return _one_checkpoint_per_scale(cfg, paths, on_tile)
    path = paths[0]
    source = model_source.read_source(path)  # the only read of the file
    facts = source.facts
    ckpt_scale = facts.scale
    if len(cfg.scales) > 1:
        raise UserError(
            f"{path}: a checkpoint is for one scale (x{ckpt_scale}); --scale asks for "
            f"{','.join(map(str, cfg.scales))} (give one checkpoint per scale: "
            "--checkpoint x2.pt,x3.pt,x4.pt)"
        )
    if cfg.scales and ckpt_scale is not None and cfg.scales[0] != ckpt_scale:
        raise UserError(
            f"{path}: checkpoint is for x{ckpt_scale}, but --scale {cfg.scales[0]} was requested"
        )
    model, desc = model_source.load_model(source, cfg, cfg.scales[0] if cfg.scales else ckpt_scale)
    upscaler = _model_upscaler(cfg, model, on_tile)
    where = f"MLflow run {cfg.run_id} ({desc})" if cfg.run_id and not cfg.checkpoint else desc
    if cfg.model_uri and not (cfg.checkpoint or cfg.run_id):
        where = f"MLflow model {cfg.model_uri}"
    from pipeline.evaluate.provenance import plus_label

    return Method(
        "dnlan", plus_label("DNLAN", cfg.self_ensemble), where, {upscaler.scale: upscaler},
        dataclasses.asdict(model.config), facts.step, checkpoint=str(path),
    )


def _model_upscaler(cfg: EvalConfig, model: Any, on_tile) -> ModelUpscaler:
    from pipeline.device import select_device

    return ModelUpscaler(
        model,
        int(model.config.scale),
        device=select_device(cfg.device),
        tiling=cfg.tiling,
        tile=cfg.tile,
        overlap=cfg.tile_overlap,
        ensemble=cfg.self_ensemble,
        hash_mode=cfg.hash,
        hash_seed=cfg.hash_seed,
        precision=cfg.precision,
        on_tile=on_tile,
    )


def _one_checkpoint_per_scale(cfg: EvalConfig, paths: list[Path], on_tile) -> Method:
    """``--checkpoint x2.pt,x3.pt,x4.pt``: the whole table of a model family in one run."""
    from pipeline.evaluate import model_source

    sources = {}
    for path in paths:
        source = model_source.read_source(path)
        s = source.facts.scale
        if s in sources:
            raise UserError(f"{path}: a second checkpoint for x{s} (first: {sources[s].path})")
        sources[s] = source
    if cfg.scales and set(cfg.scales) != set(sources):
        raise UserError(
            f"--scale {','.join(map(str, cfg.scales))} does not match the checkpoints' scales "
            f"({','.join(map(str, sorted(sources)))})"
        )
    upscalers: dict[int, Upscaler] = {}
    descs, configs = [], {}
    for s in sorted(sources):
        model, desc = model_source.load_model(sources[s], cfg, s)
        upscalers[s] = _model_upscaler(cfg, model, on_tile)
        descs.append(f"x{s}: {desc}")
        configs[s] = dataclasses.asdict(model.config)
    steps = {src.facts.step for src in sources.values()}
    step = steps.pop() if len(steps) == 1 else None
    from pipeline.evaluate.provenance import plus_label

    return Method("dnlan", plus_label("DNLAN", cfg.self_ensemble), "; ".join(descs), upscalers,
                  configs[min(configs)], step, checkpoint=",".join(str(p) for p in paths))
