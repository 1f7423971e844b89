"""The per-worker training loop that Ray Train runs on every DDP rank.

:func:`train_loop_per_worker` reads top to bottom: setup, resume, the epoch/step loop,
validation, checkpoint. Rules it keeps, because breaking any of them hangs or corrupts a
multi-node job:

* every rank takes the same number of batches per epoch (the data streams are endless) and
  calls ``ray.train.report`` once per epoch, never conditionally;
* decisions that change control flow (skip a non-finite step, stop the job) are taken from
  values all-reduced across ranks, so every rank takes the same branch;
* only rank 0 writes checkpoints, the best model and MLflow entries (plus one tag per rank
  at the end: the digest of the weights that rank holds, an outside check that DDP kept the
  ranks identical);
* a stop request from the driver (Ctrl-C) is read by rank 0 and travels in the per-step
  all-reduce, so every rank leaves the loop after the same step.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

STOP_POLL_S = 2.0  # rank 0 looks for the driver's stop request at most this often


@dataclass
class JobSpec:
    """What the driver resolved for the workers (absolute paths, counts, ids)."""

    train_shards: list[str]
    train_counts: list[int]
    val_shards: list[str] = field(default_factory=list)
    val_folder: str | None = None
    val_count: int = 0
    run_dir: str = ""  # <storage>/<run name>, where best_model/ goes
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    lr: float = 1e-4  # effective learning rate (after optional batch scaling)


def say(message: str) -> None:
    """Status line from a worker (Ray Train's patched print would duplicate it)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def rank_batch(global_batch: int, rank: int, world: int) -> int:
    """Split the global batch; ranks differ by at most one sample."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        e = [p for p in ema.parameters() if p.dtype.is_floating_point]
        m = [p for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(e, m, 1.0 - decay)


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


def stop_requested(path: str) -> bool:
    """Whether the driver asked the workers to stop (a file in the run's storage)."""
    from pipeline.train import storage

    try:
        return storage.exists(path)
    except Exception:  # a storage hiccup is not a stop request; the next poll asks again
        return False


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


def train_loop_per_worker(config: dict[str, Any]) -> None:  # noqa: C901 - one readable loop by design
    import ray.train
    import ray.train.torch
    import torch.nn.functional as F

    from pipeline.config import TrainConfig, from_mapping
    from pipeline.device import autocast
    from pipeline.model import build_from_config
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train import data, storage
    from pipeline.train import tracking as run_tracking
    from pipeline.train.tracking import MetricLogger, comparison_image
    from pipeline.train.validation import validate

    quiet_ray_train_reports()

    # ---- who am I, what do I train ------------------------------------------------------
    cfg: TrainConfig = from_mapping(TrainConfig, config["train"])
    job = JobSpec(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    scale, rgb_range = cfg.model.scale, cfg.model.rgb_range
    local_batch = rank_batch(cfg.batch_size, rank, world)
    # Ray starts actors with OMP_NUM_THREADS=1 unless told otherwise: use the CPUs we reserved.
    torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
    # Identical seeds on every rank: identical init and identical stochastic hash draws.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # Decided once (one warning, on rank 0), not per step: the value every step runs in.
    precision = agree_on_precision(cfg.precision, device, rank)

    # ---- model, EMA, optimiser, LR schedule (spec section 4) -----------------------------
    model = build_from_config(cfg.model).to(device)
    ema = build_from_config(cfg.model).to(device) if cfg.ema > 0 else None
    if ema is not None:
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=job.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    # fp16 gradients underflow without loss scaling; a no-op for fp32/bf16 and on CPU
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")

    # ---- resume: after a restart (worker died) or a rerun with the same run name --------
    progress = ckpt_io.Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress, _ = ckpt_io.load(directory, model, optimizer, scheduler, ema=ema)
        progress.restarts.append(progress.step)
        if rank == 0:
            say(f"resumed from checkpoint at epoch {progress.epoch}, step {progress.step}")
    best_meta = ckpt_io.read_best_meta(job.run_dir) if rank == 0 and job.run_dir else None
    if best_meta and best_meta.get("val_psnr") is not None and float(best_meta["val_psnr"]) > progress.best_psnr:
        # a best model written after the checkpoint we resumed from (only rank 0 uses best_psnr)
        progress.best_psnr, progress.best_step = float(best_meta["val_psnr"]), int(best_meta.get("step", -1))

    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPU, NCCL on GPU)

    # ---- data: an endless stream of this rank's patches ----------------------------------
    stream = data.PatchStream(
        job.train_shards, job.train_counts, scale, cfg.patch_size, local_batch,
        rank=rank, world_size=world, seed=cfg.seed, start_step=progress.step,
        augment=cfg.augment, patches_per_sample=cfg.patches_per_sample, shuffle_buffer=cfg.shuffle_buffer,
    )
    loader = data.make_train_loader(stream, cfg.loader_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)  # forks the loader processes now, before our own threads start

    run_tracking.bound_worker_http()  # with_retries is the one retry policy in the workers
    log = MetricLogger(job.tracking_uri, job.mlflow_run_id, enabled=rank == 0)
    from pipeline.train import sysmetrics  # one worker per node monitors its node
    node_metrics = sysmetrics.start(job.tracking_uri, job.mlflow_run_id)
    if rank == 0 and device.type == "cuda":
        log.set_tag("sr.gpu_name", torch.cuda.get_device_name(device))
    if rank == 0 and job.tracking_uri and job.mlflow_run_id:
        # what the run really computes in; the `precision` param is what was asked for
        run_tracking.log_params(job.tracking_uri, job.mlflow_run_id, {"derived.precision": precision})
    nodes_used = count_nodes()
    log.set_tag("sr.nodes_used", str(nodes_used))
    log.set_tag("sr.world_size", str(world))
    if rank == 0 and progress.restarts:
        log.set_tag("sr.restarts_at_steps", ",".join(map(str, progress.restarts)))
    if rank == 0 and progress.epoch >= cfg.epochs:
        say(f"nothing to do: the run already trained {progress.epoch} of {cfg.epochs} epochs (raise --epochs to go on)")

    def val_samples():
        if job.val_folder:
            return data.validation_from_folder(job.val_folder, scale, rank, world, cfg.val_max_images)
        return data.validation_from_shards(job.val_shards, scale, rank, world, cfg.val_max_images)

    # ---- the loop --------------------------------------------------------------------------
    stop_reason: str | None = None
    interrupted = False
    stop_request = storage.join(job.run_dir, storage.STOP_REQUEST_FILE) if job.run_dir else None
    next_poll = 0.0
    steps_run = 0
    bad_in_a_row = 0
    total_steps = cfg.epochs * cfg.iters_per_epoch
    last_print = time.monotonic()
    ddp_model.train()
    for epoch in range(progress.epoch, cfg.epochs):
        window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0}
        for _ in range(cfg.iters_per_epoch):
            t0 = time.perf_counter()
            lr_u8, hr_u8 = next(batches)
            t_data = time.perf_counter() - t0
            lr_img = data.to_model_range(lr_u8, device, rgb_range)
            hr_img = data.to_model_range(hr_u8, device, rgb_range)
            with autocast(device, precision):
                sr = ddp_model(lr_img)
            loss = F.l1_loss(sr.float(), hr_img)

            asked = 0.0
            if rank == 0 and stop_request and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + STOP_POLL_S
                asked = float(stop_requested(stop_request))
            # One collective gives every rank the global mean loss (so all agree on whether it
            # is finite), the mean data-wait time and rank 0's view of a stop request.
            loss_sum, wait_sum, asked_sum = all_reduce_sum([loss.item() * local_batch, t_data, asked], device)
            if asked_sum > 0:
                interrupted = True
                break
            global_loss = loss_sum / cfg.batch_size
            progress.step += 1
            steps_run += 1
            if not math.isfinite(global_loss):
                bad_in_a_row += 1
                progress.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if rank == 0:
                    say(f"warning: non-finite loss at step {progress.step}: step skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    stop_reason = (
                        f"{bad_in_a_row} non-finite losses in a row (last at step {progress.step}, epoch "
                        f"{epoch + 1}); stopped, the last good checkpoint is kept"
                    )
                    break
                continue
            bad_in_a_row = 0

            # DDP averages gradients over ranks; weighting by the rank's share of the global
            # batch makes the result the gradient of the global-batch mean loss.
            scaler.scale(loss * (local_batch * world / cfg.batch_size)).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, model, cfg.ema)

            step_time = time.perf_counter() - t0
            window["loss"] += global_loss
            window["steps"] += 1
            window["wait"] += wait_sum / world
            window["time"] += step_time
            if progress.step % cfg.log_every == 0 and window["steps"]:
                metrics = {
                    "train/loss": window["loss"] / window["steps"],
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/samples_per_s": cfg.batch_size * window["steps"] / window["time"],
                    "train/data_wait": window["wait"] / window["time"],
                    "train/epoch": progress.step / cfg.iters_per_epoch,
                }
                log.log(metrics, progress.step)
                now = time.monotonic()
                if rank == 0 and now - last_print >= 15:
                    last_print = now
                    say(
                        f"step {progress.step}/{total_steps} epoch {epoch + 1}/{cfg.epochs} "
                        f"loss {metrics['train/loss']:.4f} {metrics['train/samples_per_s']:.1f} samples/s "
                        f"data-wait {100 * metrics['train/data_wait']:.0f}%"
                    )
                window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0}

        if interrupted:
            # Asked by the driver (Ctrl-C): no report and no checkpoint mid-epoch (an epoch is
            # the unit a resume restarts from); the last checkpoint stays the one to resume.
            if rank == 0:
                say(f"stopped on request after step {progress.step}; the last checkpoint is kept")
            break
        if stop_reason is not None:
            # Every rank stops here (the decision came from all-reduced values), without a report
            # or checkpoint: the last checkpoint stays the good one. The driver reads the reason.
            if rank == 0:
                say(f"error: {stop_reason}")
                storage.write_json(storage.join(job.run_dir, storage.STOP_FILE), {"reason": stop_reason, "step": progress.step})
            break

        # ---- end of epoch: schedule, validation, best model, checkpoint ---------------------
        scheduler.step()
        progress.epoch = epoch + 1
        report: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step, "skipped_steps": progress.skipped_steps}
        spread = param_spread(model, device)
        report["param_spread"] = spread
        log.log({"train/param_spread": spread}, progress.step)
        if spread != 0.0:
            raise RuntimeError(f"DDP ranks hold different parameters after epoch {progress.epoch} (spread {spread})")

        if progress.epoch % cfg.val_every == 0 or progress.epoch == cfg.epochs:
            net = ema if ema is not None else model
            result = validate(net, val_samples(), scale, rgb_range, device, cfg.hash_seed)
            psnr_sum, count = all_reduce_sum([result.psnr_sum, result.count], device)
            psnr = psnr_sum / max(count, 1)
            report["val/psnr"] = psnr
            log.log({"val/psnr": psnr}, progress.step)
            if rank == 0 and result.first is not None:
                image = comparison_image(*result.first, scale=scale)
                log.log_image(image, f"validation/step_{progress.step:08d}.png")
            if psnr > progress.best_psnr:
                progress.best_psnr, progress.best_step = psnr, progress.step
                if rank == 0 and job.run_dir:
                    ckpt_io.write_best(job.run_dir, net, psnr, progress.step, progress.epoch, job.mlflow_run_id)
            report["best/psnr"] = progress.best_psnr
            if rank == 0:
                say(
                    f"epoch {progress.epoch}/{cfg.epochs} step {progress.step}: val PSNR {psnr:.3f} dB "
                    f"(best {progress.best_psnr:.3f} at step {progress.best_step})"
                )

        with tempfile.TemporaryDirectory(prefix="sr-ckpt-") as tmp:
            if rank == 0:
                ckpt_io.save(tmp, model, optimizer, scheduler, progress, ema=ema,
                             run_id=job.mlflow_run_id, config=config["train"])
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)

    if steps_run and job.tracking_uri and job.mlflow_run_id:
        # Each rank's own account of its weights, compared from outside (tests, audits)
        # with each other and with the checkpoint.
        run_tracking.set_tag(job.tracking_uri, job.mlflow_run_id, f"sr.params_sha256.rank{rank}", param_digest(model))
    log.close()
    sysmetrics.stop(node_metrics)
    del batches, loader
