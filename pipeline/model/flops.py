"""FLOP count of DNLAN and model FLOP utilisation (MFU) against a GPU's dense peak.

Why count on a real forward/backward instead of a formula: DNLA's cost depends on the token
count through padding and chunking, and its custom autograd function does its own matrix
products in backward; counting the aten matrix products and convolutions that really run
(``torch.utils.flop_counter.FlopCounterMode``) follows the code as it changes. Element-wise
work (softmax, normalisation, sort, gathers) is not counted, as is usual for MFU: it is a
small part of the FLOPs, though not of the time.

MFU = achieved model FLOP/s / the GPU's dense peak for the precision the step computes in.
The peak table holds vendor datasheet numbers (dense, no sparsity); ``SR_PEAK_TFLOPS`` (or the
``peak_tflops`` argument) overrides it for a GPU not listed or a different clock. fp32 runs are
measured against the TF32 tensor-core peak when cuDNN may use TF32 (PyTorch's default for
convolutions, which are most of this model's FLOPs), else against the plain fp32 peak.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipeline.config import ModelConfig

PEAK_ENV = "SR_PEAK_TFLOPS"

# name fragment (matched in this order against torch.cuda.get_device_name) ->
# dense TFLOP/s (bf16, fp16, tf32, fp32); bf16/fp16 are tensor-core peaks with fp32 accumulate
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("H200", (989.0, 989.0, 494.0, 67.0)),
    ("H100 PCIe", (756.0, 756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 835.0, 418.0, 60.0)),
    ("H100", (989.0, 989.0, 494.0, 67.0)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", (989.0, 989.0, 494.0, 67.0)),
    ("A100", (312.0, 312.0, 156.0, 19.5)),
    ("L40S", (362.0, 362.0, 183.0, 91.6)),
    ("L40", (181.0, 181.0, 90.5, 90.5)),
    ("L4", (121.0, 121.0, 60.0, 30.3)),
    ("A10G", (70.0, 70.0, 35.0, 31.2)),
    ("A10", (125.0, 125.0, 62.5, 31.2)),
    ("RTX 4090", (165.0, 165.0, 82.6, 82.6)),
    ("RTX 3090", (71.0, 71.0, 35.6, 35.6)),
)
_PRECISION_COLUMN = {"bf16": 0, "fp16": 1, "tf32": 2, "fp32": 3}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per sample (one LR patch) of one forward and of the backward that follows it."""

    forward: float
    backward: float

    @property
    def train(self) -> float:
        """Forward + backward: the work of one training step per sample (optimizer excluded)."""
        return self.forward + self.backward


def count_flops(model: torch.nn.Module, lr_shape: tuple[int, int, int, int], scale: int) -> FlopCount:
    """FLOPs of a real forward and L1-loss backward of ``model`` on a random ``lr_shape`` batch.

    Runs on the model's device, in train mode with the model's hash mode; returns per-sample
    numbers. The count does not depend on the hash draw: chunk sizes depend only on the shape.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    n, c, h, w = lr_shape
    was_training = model.training
    model.train()
    x = torch.rand(lr_shape, device=device)
    target = torch.rand((n, c, scale * h, scale * w), device=device)
    try:
        with FlopCounterMode(display=False) as fwd:
            loss = F.l1_loss(model(x), target)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return FlopCount(fwd.get_total_flops() / n, bwd.get_total_flops() / n)


@functools.lru_cache(maxsize=16)
def _config_flops(fields: tuple, lr_h: int, lr_w: int, device: str) -> FlopCount:
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model import attention
    from pipeline.model.dnlan import build_from_config

    cfg = ModelConfig(*fields)
    gpus = [torch.device(device)] if device.startswith("cuda") else []
    # the stochastic hash draws from the global RNG, which DDP ranks keep in lockstep: fork it
    # count the model's math, not the fused GPU kernel's padding and sink column: the blocked
    # attention runs exactly the products of spec section 2
    saved, attention.SDPA_MODE = attention.SDPA_MODE, "off"
    try:
        with torch.random.fork_rng(devices=gpus, device_type="cuda"):
            torch.manual_seed(0)
            model = build_from_config(cfg).to(device)
            return count_flops(model, (1, 3, lr_h, lr_w), cfg.scale)
    finally:
        attention.SDPA_MODE = saved


def model_flops(cfg: ModelConfig, hr_patch: int, device: str = "cpu") -> FlopCount:
    """Per-patch FLOPs of the model ``cfg`` at HR patch ``hr_patch`` (LR ``hr_patch // scale``).

    Counted once per (config, size, device) with batch 1 on a fresh model (seconds for the
    paper model on CPU, instant on a GPU); the caller's RNG streams are left untouched.
    """
    lr = hr_patch // cfg.scale
    return _config_flops(dataclasses.astuple(cfg), lr, lr, str(device))


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a GPU named ``device_name`` for ``precision``; None if unknown.

    ``precision`` is bf16, fp16, tf32 or fp32. ``SR_PEAK_TFLOPS`` overrides the table.
    """
    if precision not in _PRECISION_COLUMN:
        raise ValueError(f"precision must be one of {sorted(_PRECISION_COLUMN)}, got {precision!r}")
    override = os.environ.get(PEAK_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{PEAK_ENV} must be a number of TFLOP/s, got {override!r}") from None
        return value if value > 0 else None
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks[_PRECISION_COLUMN[precision]]
    return None


def peak_precision(precision: str) -> str:
    """The peak column a run in ``precision`` (fp32/bf16/fp16) is measured against."""
    if precision == "fp32":
        import torch

        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return precision


def mfu(
    samples_per_s: float,
    flops_per_sample: float,
    device: torch.device | str,
    precision: str = "bf16",
    peak: float | None = None,
) -> float | None:
    """Model FLOP utilisation in [0, 1]: ``samples_per_s * flops_per_sample / peak``.

    ``peak`` (TFLOP/s) wins over the table; without it the CUDA device's name is looked up.
    None on CPU or for a GPU whose peak is unknown (never a guess).
    """
    import torch

    device = torch.device(device)
    if peak is None:
        if device.type != "cuda":
            return None
        peak = peak_tflops(torch.cuda.get_device_name(device), peak_precision(precision))
        if peak is None:
            return None
    return samples_per_s * flops_per_sample / (peak * 1e12)


def training_flops_if_measurable(
    cfg: ModelConfig, hr_patch: int, device: torch.device, precision: str
) -> float | None:
    """Per-sample training FLOPs when an MFU can be reported on ``device``, else None.

    For the training loop: counted once at startup (on the GPU itself, a fraction of a
    second), only on CUDA devices whose peak is known, so CPU jobs pay nothing.
    """
    import torch

    if device.type != "cuda":
        return None
    if peak_tflops(torch.cuda.get_device_name(device), peak_precision(precision)) is None:
        return None
    return model_flops(cfg, hr_patch, str(device)).train
