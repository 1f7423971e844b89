"""The per-worker training loop that Ray Train runs on every DDP rank.

:func:`train_loop_per_worker` reads top to bottom: setup (:mod:`.setup`), the step loop, and
at agreed steps the end-of-interval work (:mod:`.intervals`); one step is
:func:`pipeline.train.step.train_step`. Rules it keeps, because breaking any of them hangs,
stalls or corrupts a multi-node job:

* **No host synchronisation in a step.** Loss, gradient norm and the non-finite check stay
  on the device (see :mod:`.step`): a non-finite loss on any rank poisons that rank's
  gradients, DDP's all-reduce spreads the poison, and every rank skips the step on the device
  from the same reduced gradients. Nothing of a step is read on the host.
* **One host round trip per log interval** (every ``log_every`` steps): the device sums are
  read and one small all-reduce carries the loss, data wait, rank 0's view of the driver's
  stop request (Ctrl-C) and any rank's SIGTERM; Ray's preemption notice is its own collective
  there. Every decision that changes control flow (stop, too many skipped steps, checkpoint
  now) is taken from these agreed values, so every rank takes the same branch after the same
  step. A stop request is therefore honoured at the next log point.
* **Checkpoints at agreed steps**: every ``checkpoint_every`` steps (``0``: about
  ``checkpoint_minutes`` of training, measured, see
  :func:`.intervals.decide_checkpoint_interval`), on a stop request or SIGTERM (then the job
  ends), on Ray's preemption notice (then training goes on), and at the end. Every rank calls
  ``ray.train.report`` at each of them; uploads of periodic ones run in the background, and a
  periodic checkpoint due while the previous upload is still running (or retrying a storage
  outage) is skipped by every rank (see :func:`.intervals.save_and_report`).
* **Exact resume**: a checkpoint holds model, optimizer, schedule, EMA, loss scaler, every
  rank's own RNG states and the step (the loader's position); the RNG states are put back
  after the setup has drawn what it draws, so the continuation is the uninterrupted run's, bit
  for bit on the CPU (tests/test_train_resume.py). (On a GPU, cuDNN autotuning picks kernels
  per process: close, not bit-identical.)
* only rank 0 writes checkpoints, the best model and MLflow entries (plus one tag per rank
  at the end: the digest of the weights that rank holds, an outside check that DDP kept the
  ranks identical).
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.train.job import JobSpec
from pipeline.train.step import ema_update  # noqa: F401 - part of this module's interface


def say(message: str) -> None:
    """Status line from a worker (Ray Train's patched print would duplicate it)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def rank_batch(global_batch: int, rank: int, world: int) -> int:
    """Split the global batch; ranks differ by at most one sample."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def param_spread(model: torch.nn.Module, device: torch.device) -> float:
    """Largest difference between ranks of any per-tensor parameter sum (0.0 when in sync)."""
    import torch.distributed as dist

    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    hi, lo = sums.clone(), sums.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max().item())


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state: every entry's name and raw bytes, in state_dict order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def agree_on_precision(requested: str, device: torch.device, rank: int) -> str:
    """The precision every rank runs in: resolved once per rank, fp32 unless all ranks agree.

    A loss scaler on some ranks only would mix scaled and unscaled gradients in the all-reduce;
    one collective here keeps the ranks on the same path. Only rank 0 warns (once per worker
    group: a restarted group decides again).
    """
    from pipeline.device import resolve_precision

    def warn(message: str) -> None:  # say(), not console.warn: Ray Train's print shows it twice
        say(f"warning: {message}")

    precision = resolve_precision(device, requested, warn=warn if rank == 0 else None)
    code = float(("fp32", "bf16", "fp16").index(precision))
    highest, neg_lowest = all_reduce_sum([code, -code], device, op="max")
    if highest != -neg_lowest:  # the ranks resolved differently (mixed GPUs)
        if rank == 0:
            say(f"warning: the ranks cannot all run --precision {requested}; every rank runs in fp32")
        return "fp32"
    return precision


def count_nodes() -> int:
    """Distinct Ray nodes the ranks run on (by node id: two nodes may share an IP address)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    ids: list = [None] * dist.get_world_size()
    dist.all_gather_object(ids, node)
    return len(set(ids))


def all_reduce_sum(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO (full metrics dict and checkpoint path) on every
    rank; our own epoch line says the same once. Its logger is named after its file."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


@dataclass
class Worker:
    """Who this worker is and what it trains (resolved once, read everywhere)."""

    cfg: Any  # TrainConfig
    job: JobSpec
    rank: int
    world: int
    device: torch.device
    local_batch: int
    precision: str = "fp32"
    flops_per_sample: float | None = None  # training FLOPs per sample, for train/mfu (rank 0, CUDA)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.cfg.iters_per_epoch


@dataclass
class Interval:
    """Host-side state of the current log interval and of the run's time accounting."""

    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0  # seconds in next(loader)
    steps: int = 0
    train_s: float = 0.0  # stepping time of the run so far (validation and checkpoints excluded)
    val_s: float = 0.0
    windows_timed: int = 0  # log intervals measured (the first one, warm-up, is not used)
    last_checkpoint: int = -1  # step of the last checkpoint written
    checkpoint_now: bool = False  # Ray announced a preemption: checkpoint at this step
    upload: Any = None  # rank 0: the RetryingUpload of the last checkpoint uploaded in the background
    last_print: float = 0.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: setup, resume, the step loop, the end-of-interval work, the end."""
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train import storage
    from pipeline.train import tracking as run_tracking
    from pipeline.train.intervals import (
        checkpoint_due,
        end_of_epoch,
        finish,
        log_point,
        save_and_report,
        validate_and_track,
    )
    from pipeline.train.setup import (
        build_training,
        data_to_device,
        resume,
        setup_worker,
        start_loader,
        start_tracking,
    )
    from pipeline.train.step import Timer, Window, train_step
    from pipeline.train.stops import StopSignals
    from pipeline.train.tracking import MetricLogger
    from pipeline.train.validation import ValPlan

    quiet_ray_train_reports()
    w = setup_worker(config)
    cfg, job = w.cfg, w.job
    parts, scheduler = build_training(w)
    progress, saved_rng = resume(w, parts, scheduler)
    batches, loader = start_loader(w, progress.step)
    run_tracking.bound_worker_http()  # with_retries is the one retry policy in the workers
    log = MetricLogger(job.tracking_uri, job.mlflow_run_id, enabled=w.rank == 0, run_dir=job.run_dir,
                       drain_s=cfg.tracking_drain_s)
    start_tracking(w, log, progress)
    if w.rank == 0:  # train/mfu: FLOPs counted once, on CUDA GPUs with a known peak only
        from pipeline.model.flops import training_flops_if_measurable

        w.flops_per_sample = training_flops_if_measurable(cfg.model, cfg.patch_size, w.device, w.precision)
    stop_request = storage.join(job.run_dir, storage.STOP_REQUEST_FILE) if job.run_dir else None
    stops = StopSignals(w.rank, stop_request, warn=lambda m: say(f"warning: {m}"))
    plan = ValPlan.from_config(cfg, job.val_count, folder=bool(job.val_folder))
    # last: the setup above drew from the RNGs (loader seeds); the steps continue the saved ones
    ckpt_io.restore_rank_rng(saved_rng, w.rank, cfg.seed, progress.step, w.device)

    window, timer, interval = Window(w.device), Timer(w.device), Interval()
    interval.last_checkpoint = progress.step if saved_rng is not None else -1
    leaving: str | None = None  # "stop" (Ctrl-C / SIGTERM: checkpoint, then return) | "fail"
    parts.net.train()
    while progress.step < w.total_steps and leaving is None:
        t0 = time.perf_counter()
        lr_u8, hr_u8 = next(batches)
        interval.wait += time.perf_counter() - t0
        train_step(parts, data_to_device(lr_u8, w), data_to_device(hr_u8, w), window, timer)
        progress.step += 1
        interval.steps += 1

        if progress.step % cfg.iters_per_epoch == 0:
            end_of_epoch(w, parts, scheduler, progress, log)
        if progress.step % cfg.log_every == 0 or progress.step == w.total_steps:
            leaving = log_point(w, parts, window, timer, interval, progress, stops, log)
        if leaving == "fail":
            break
        subset_due, full_due = plan.due(progress.step)
        if subset_due or full_due:
            validate_and_track(w, parts, plan, progress, interval, log, subset_due, full_due)
        if leaving == "stop" or checkpoint_due(w, progress, interval):
            save_and_report(w, parts, scheduler, progress, interval,
                            final=leaving == "stop" or progress.step >= w.total_steps)

    if progress.step >= w.total_steps and interval.last_checkpoint != progress.step and leaving is None:
        save_and_report(w, parts, scheduler, progress, interval, final=True)
    finish(w, parts, progress, log, stops)
    del batches, loader


