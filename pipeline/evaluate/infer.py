"""The one LR-to-SR path: uint8 LR image in, uint8 SR image out.

Training validation, `evaluate` and `upscale` all call :func:`lr_to_sr`, so the three cannot
drift apart (an earlier version had two copies, and only one of them padded small inputs).
What happens, in order, and why:

* grey (HxW) is repeated to 3 channels, as the reference's data loader does;
* pixels are scaled to [0, rgb_range] in float32;
* ``forward`` (whole image, a tiling, the self-ensemble: see ``tiling.make_forward``) runs
  under the requested autocast precision; the network hashes in float32 whatever the
  precision (the attention module casts), and the output is taken back to float32;
* the output is quantised exactly as the reference saves it: x255/rgb_range, clamp to
  [0, 255], round, in float32 torch arithmetic.

No padding of any kind: DNLAN runs on any token count (see ``model/attention.py``), so a 1x1
icon or a 3x40 strip goes through the network as it is and equals whole-image inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

Forward = Callable[["torch.Tensor"], "torch.Tensor"]


def lr_tensor(
    lr: np.ndarray, rgb_range: float, device: torch.device | str = "cpu", peak: float = 255.0
) -> torch.Tensor:
    """uint8 (or uint16 with ``peak`` 65535) HxW or HxWx3 -> float32 (1, 3, h, w) in
    [0, rgb_range] on ``device``."""
    import torch

    rgb = np.repeat(lr[:, :, None], 3, axis=2) if lr.ndim == 2 else lr
    if rgb.dtype == np.uint16:  # torch has no uint16 arithmetic on every version
        rgb = rgb.astype(np.int32)
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    return x.to(device, torch.float32).mul_(rgb_range / peak)


def quantize_tensor(y: torch.Tensor, rgb_range: float) -> np.ndarray:
    """(1, 3, H, W) in [0, rgb_range] -> uint8 HxWx3, as the reference's ``quantize``."""
    import torch

    q = y[0].float().mul(255.0 / rgb_range).clamp_(0, 255).round_().to(torch.uint8)
    return q.permute(1, 2, 0).cpu().numpy()


def sr_float(
    forward: Forward,
    lr: np.ndarray,
    rgb_range: float,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    peak: float = 255.0,
) -> torch.Tensor:
    """The unquantised float32 output (1, 3, s*h, s*w) of ``forward`` for a uint8 LR image
    (uint16 with ``peak`` 65535)."""
    import torch

    from pipeline.device import autocast

    dev = torch.device(device)
    x = lr_tensor(lr, rgb_range, dev, peak)
    with torch.no_grad(), autocast(dev, precision):
        y = forward(x)
    return y.float()


def lr_to_sr(
    forward: Forward,
    lr: np.ndarray,
    rgb_range: float,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """uint8 LR -> uint8 SR (HxWx3) through ``forward``; see the module docstring."""
    return quantize_tensor(sr_float(forward, lr, rgb_range, device, precision), rgb_range)
