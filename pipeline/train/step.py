"""One training step that never waits for the device, and the interval sums it feeds.

Why a step has no host synchronisation (issue 14): a GPU step is queued by the host and runs
later; any ``.item()``, ``float(tensor)`` or Python ``if`` on a device value makes the host wait
until the GPU has drained its queue, and the GPU then idles while the host prepares the next
step. So everything a step decides stays a device tensor:

* **Non-finite steps are skipped on the device, identically on every rank.** A non-finite
  local loss multiplies that rank's backward by NaN, so every gradient it contributes is NaN;
  DDP's gradient all-reduce hands the NaN to every rank, and every rank computes the same
  gradient norm from the same reduced gradients. ``found_inf = not isfinite(norm)`` is
  therefore the same on every rank without a collective of its own, and it is computed on
  the device. The optimizer step is skipped on the device: fused Adam (CUDA) takes
  ``found_inf`` and leaves weights, moments and its step count untouched; a loss scaler
  (fp16) finds the same non-finite gradients and skips the same way. On the CPU, where the
  "device" is the host, the foreach Adam is skipped by a plain ``if``: reading a CPU tensor
  costs no synchronisation. The EMA moves by ``(1 - decay) * (1 - found_inf)``, so a skipped
  step leaves it as it was.
* **Loss, gradient norm and skip counters are summed on the device** (:class:`Window`) and
  read once per log interval, where the loop also all-reduces its own small vector (stop
  requests, data wait) in the same single host round trip.
* **Step times** are CUDA events on a GPU (read at the log point, after the round trip has
  synchronised anyway) and ``perf_counter`` on the CPU, where every op is synchronous.
  Measurable: data wait (host time in ``next(loader)``), forward+backward, optimizer (with
  clipping, EMA and zeroing). The gradient all-reduce is not separately measurable: DDP
  overlaps it with the backward pass, so it is inside forward+backward.

With fp16, the loss scaler's own overflow steps count as skipped steps too (the gradients are
non-finite either way); ``max_bad_steps`` bounds skipped steps in a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepParts:
    """What one step touches (built once by the loop)."""

    model: torch.nn.Module  # the raw model (EMA source)
    net: torch.nn.Module  # what the step calls: DDP and/or compiled wrapper of `model`
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (disabled unless fp16 on CUDA)
    ema: torch.nn.Module | None
    ema_decay: float
    grad_clip: float
    precision: str
    device: torch.device
    loss_weight: float  # this rank's share of the global batch times world size (DDP averages)
    local_batch: int
    zero_to_none: bool = True  # False under DDP's gradient_as_bucket_view (keep the bucket views)
    channels_last: bool = False
    trainable: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.trainable:
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._nan = torch.tensor(float("nan"), device=self.device)
        self._weight = torch.tensor(self.loss_weight, device=self.device)


def build_optimizer(params: list[torch.nn.Parameter], device: torch.device, lr: float, betas, eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Adam, fused on CUDA (one kernel for every tensor, skips on a device flag), foreach on CPU."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kind)


class Timer:
    """Forward+backward and optimizer time of each step, summed over a log interval."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any, Any]] = []
        self.fwd_bwd = self.opt = 0.0
        self._marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def end_step(self) -> None:
        a, b, c = self._marks
        self._marks = []
        if self.cuda:
            self.events.append((a, b, c))
        else:
            self.fwd_bwd += b - a
            self.opt += c - b

    def read(self) -> tuple[float, float]:
        """(forward+backward s, optimizer s) since the last read; call after a synchronisation."""
        for a, b, c in self.events:
            self.fwd_bwd += a.elapsed_time(b) / 1000.0
            self.opt += b.elapsed_time(c) / 1000.0
        out = (self.fwd_bwd, self.opt)
        self.events, self.fwd_bwd, self.opt = [], 0.0, 0.0
        return out


class Window:
    """Device-side sums of one log interval, plus the skip counters that span intervals."""

    def __init__(self, device: torch.device) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.loss_sum, self.norm_sum, self.good, self.skipped = z(), z(), z(), z()
        self.bad_run, self.worst_run = z(), z()  # skipped in a row now / the longest run so far

    def add(self, loss_sum: torch.Tensor, norm: torch.Tensor, found_inf: torch.Tensor) -> None:
        ok = 1.0 - found_inf.double()
        self.loss_sum += torch.where(ok > 0, loss_sum.double(), 0.0)  # this rank's samples, steps taken only
        self.norm_sum += torch.where(ok > 0, norm.double(), 0.0)
        self.good += ok
        self.skipped += found_inf.double()
        self.bad_run.mul_(found_inf.double()).add_(found_inf.double())
        torch.maximum(self.worst_run, self.bad_run, out=self.worst_run)

    def values(self) -> list[torch.Tensor]:
        """[loss_sum, norm_sum, good, skipped, bad_run, worst_run] (device tensors)."""
        return [self.loss_sum, self.norm_sum, self.good, self.skipped, self.bad_run, self.worst_run]

    def reset(self) -> None:
        """New interval; the run counters carry on (a run of skips may span intervals)."""
        for t in (self.loss_sum, self.norm_sum, self.good, self.skipped):
            t.zero_()
        self.worst_run.copy_(self.bad_run)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, found_inf: torch.Tensor | None = None) -> None:
    """EMA towards the model; by ``(1 - decay) * (1 - found_inf)``, so a skipped step moves nothing."""
    with torch.no_grad():
        e = [p for p in ema.parameters() if p.dtype.is_floating_point]
        m = [p for p in model.parameters() if p.dtype.is_floating_point]
        if found_inf is None:
            torch._foreach_lerp_(e, m, 1.0 - decay)
        else:
            torch._foreach_lerp_(e, m, (1.0 - decay) * (1.0 - found_inf.float()))


def grad_norm(parts: StepParts) -> torch.Tensor:
    """Global L2 norm of the (all-reduced) gradients, on the device; clips when asked."""
    grads = [p.grad for p in parts.trainable if p.grad is not None]
    if parts.grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(parts.trainable, parts.grad_clip, foreach=True)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def optimizer_step(parts: StepParts, found_inf: torch.Tensor) -> None:
    """The optimizer step, skipped when ``found_inf`` is 1 (see the module docstring)."""
    opt = parts.optimizer
    if parts.scaler.is_enabled():  # fp16: the scaler saw the same non-finite gradients
        parts.scaler.step(opt)
        parts.scaler.update()
    elif getattr(opt, "_step_supports_amp_scaling", False):  # fused: skipped inside the kernel
        opt.found_inf = found_inf.float()
        opt.step()
    elif not bool(found_inf):  # CPU (foreach): the flag is host memory already
        opt.step()


def train_step(parts: StepParts, lr_img: torch.Tensor, hr_img: torch.Tensor, window: Window, timer: Timer) -> None:
    """Forward, backward (DDP reduces the gradients), norm, optimizer, EMA: no host round trip."""
    import torch.nn.functional as F

    from pipeline.device import autocast

    if parts.channels_last:
        lr_img = lr_img.contiguous(memory_format=torch.channels_last)
    timer.mark()
    with autocast(parts.device, parts.precision):
        sr = parts.net(lr_img)
    loss = F.l1_loss(sr.float(), hr_img)
    # A non-finite loss poisons every gradient of this rank (NaN times anything is NaN), so
    # the all-reduced gradients, and with them every rank's norm, say "skip" together.
    weight = torch.where(torch.isfinite(loss), parts._weight, parts._nan)
    parts.scaler.scale(loss * weight).backward()
    timer.mark()
    if parts.scaler.is_enabled():
        parts.scaler.unscale_(parts.optimizer)
    norm = grad_norm(parts)
    found_inf = (~torch.isfinite(norm)).float()
    optimizer_step(parts, found_inf)
    if parts.ema is not None:
        ema_update(parts.ema, parts.model, parts.ema_decay, found_inf)
    parts.optimizer.zero_grad(set_to_none=parts.zero_to_none)
    timer.mark()
    timer.end_step()
    window.add(loss.detach() * parts.local_batch, norm.detach(), found_inf)
