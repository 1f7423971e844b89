"""Device and precision selection, shared by train, evaluate and upscale.

GPU paths are chosen automatically and fall back cleanly: CUDA when present, else CPU;
bf16/fp16 autocast only where the hardware supports it, otherwise full precision with a
warning (never a crash). Hashing inside DNLA stays float32 regardless (see the model).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pipeline import console
from pipeline.console import UserError

if TYPE_CHECKING:
    import torch


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a clear error."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available (torch sees none)")
    return torch.device(preference)


def dist_backend(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def autocast(device: torch.device, precision: str):
    """Autocast context for ``fp32`` | ``bf16`` | ``fp16``.

    fp32 is a no-op. bf16/fp16 autocast is used on CUDA; on CPU the request falls back to
    fp32 with a warning, since CPU autocast is slower than fp32 for these convolutions.
    """
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise UserError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type != "cuda":
        console.warn(f"--precision {precision} needs a CUDA GPU; running in fp32 on {device.type}")
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        console.warn("this GPU does not support bf16; running in fp32")
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)
