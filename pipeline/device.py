"""Device and precision selection, shared by train, evaluate and upscale.

GPU paths are chosen automatically and fall back cleanly: CUDA when present, else CPU;
bf16/fp16 autocast only where the hardware supports it, otherwise full precision (never a
crash). The fallback is decided once per process by :func:`resolve_precision`, which says so
in one warning; :func:`autocast` is then called every step with the resolved value and stays
silent. Hashing inside DNLA stays float32 regardless (see the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline import console
from pipeline.console import UserError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a clear error."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available (torch sees none)")
    return torch.device(preference)


def dist_backend(device: torch.device | str) -> str:
    """NCCL for GPUs, gloo for CPUs (`device` may be a device or a type name: "cuda", "cpu")."""
    kind = device if isinstance(device, str) else device.type
    return "nccl" if kind.startswith("cuda") else "gloo"


def _usable(device: torch.device, precision: str) -> str | None:
    """None when `precision` runs as asked on `device`, else why it cannot."""
    import torch

    if precision not in PRECISIONS:
        raise UserError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision in ("fp32", "auto"):
        return None
    if device.type != "cuda":
        # CPU autocast exists but is slower than fp32 for these convolutions
        return f"--precision {precision} needs a CUDA GPU"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    if precision == "fp16" and torch.cuda.get_device_capability(device) < (5, 3):
        # half arithmetic needs compute capability 5.3 (Maxwell GM20B and every GPU since Pascal)
        major, minor = torch.cuda.get_device_capability(device)
        return f"this GPU (compute capability {major}.{minor}) does not support fp16"
    return None


def resolve_precision(
    device: torch.device, requested: str, warn: Callable[[str], None] | None = console.warn
) -> str:
    """The precision a job really runs in on `device`: `requested`, or ``fp32`` (one warning).

    ``auto`` picks bf16 on a GPU that supports it (no loss scaling needed) and fp32 elsewhere,
    silently: nothing specific was asked for. Call it once, before the step loop: its result
    is what to log (the requested value is only a wish) and what to pass to :func:`autocast`
    and to a loss scaler. ``warn(message)`` shows the one fallback warning; None stays quiet
    (the other ranks of a job); a Ray worker passes its own writer.
    """
    if requested == "auto":
        return "bf16" if _usable(device, "bf16") is None else "fp32"
    why = _usable(device, requested)
    if why is None:
        return requested
    if warn is not None:
        warn(f"{why}; running in fp32 on {device.type}")
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for a precision resolved by :func:`resolve_precision`.

    fp32 is a no-op. An unresolved request (``auto``, or bf16/fp16 that the device cannot run)
    is resolved here too, silently: this is called on every step, and the one warning belongs to
    :func:`resolve_precision`.
    """
    import torch

    precision = resolve_precision(device, precision, warn=None)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
