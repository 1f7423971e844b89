"""Setting up one DDP rank: who it is, what it trains with, where it resumes, what it reads.

Called in this order by :func:`pipeline.train.loop.train_loop_per_worker`; every function
here runs once per worker group (again after a restart).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from pipeline.train.job import JobSpec
from pipeline.train.loop import (
    Worker,
    agree_on_precision,
    all_reduce_sum,
    count_nodes,
    rank_batch,
    say,
)


def setup_worker(config: dict[str, Any]) -> Worker:
    import ray.train
    import ray.train.torch

    from pipeline.config import TrainConfig, from_mapping

    cfg: TrainConfig = from_mapping(TrainConfig, config["train"])
    job = JobSpec(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Ray starts actors with OMP_NUM_THREADS=1 unless told otherwise: use the CPUs we reserved.
    torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: autotune each conv once
    # Identical seeds on every rank: identical init (and a resumed rank gets its own states back).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    w = Worker(cfg, job, rank, world, device, rank_batch(cfg.batch_size, rank, world))
    # Decided once (one warning, on rank 0), not per step: the value every step runs in.
    w.precision = agree_on_precision(cfg.precision, device, rank)
    return w


def build_training(w: Worker):
    """Model (channels_last on CUDA), EMA, fused/foreach Adam, schedule, scaler, DDP, compile."""
    import ray.train.torch

    from pipeline.model import build_from_config
    from pipeline.train.step import StepParts, build_optimizer

    cfg = w.cfg
    channels_last = w.device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_from_config(cfg.model).to(w.device, memory_format=fmt)
    ema = build_from_config(cfg.model).to(w.device, memory_format=fmt) if cfg.ema > 0 else None
    if ema is not None:
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, w.device, w.job.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    # fp16 gradients underflow without loss scaling; a no-op for fp32/bf16 and on CPU
    scaler = torch.amp.GradScaler("cuda", enabled=w.device.type == "cuda" and w.precision == "fp16")
    # DDP when world > 1 (gloo on CPU, NCCL on GPU); gradients live in the all-reduce buckets
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    net = compiled(ddp, w) if cfg.compile else ddp
    parts = StepParts(
        model=model, net=net, optimizer=optimizer, scaler=scaler, ema=ema, ema_decay=cfg.ema,
        grad_clip=cfg.grad_clip, precision=w.precision, device=w.device,
        # DDP averages gradients over ranks; weighting by the rank's share of the global batch
        # makes the result the gradient of the global-batch mean loss.
        loss_weight=w.local_batch * w.world / cfg.batch_size, local_batch=w.local_batch,
        zero_to_none=w.world == 1, channels_last=channels_last, trainable=trainable,
    )
    return parts, scheduler


def compiled(net: torch.nn.Module, w: Worker) -> torch.nn.Module:
    """``torch.compile`` of the (DDP-wrapped) model, or `net` itself with one warning (on rank
    0) when the compiler cannot run here; every rank takes the same choice.

    Compiling the DDP wrapper lets the compiler split the graph at DDP's buckets, so gradient
    all-reduces still overlap the backward pass. The wrapper shares the model's parameters;
    validation, EMA and checkpoints use the plain model (whole images of every size would
    recompile, and the state_dict keys stay those of the model)."""
    why = ""
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2.0)
        probe(torch.ones(4, device=w.device))  # inductor builds a kernel now: no compiler -> error
    except Exception as exc:  # noqa: BLE001 - any failure means "no compiler here"
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    works = all_reduce_sum([0.0 if why else 1.0], w.device)[0] == w.world
    if not works:
        if w.rank == 0:
            say(f"warning: --compile: torch.compile cannot run on every worker ({why or 'another rank failed'}); "
                "training runs eagerly")
        return net
    return torch.compile(net)


def resume(w: Worker, parts, scheduler):
    """Progress and the per-rank RNG states of the run's last checkpoint (or a fresh start)."""
    import ray.train

    from pipeline.train import checkpoint as ckpt_io

    progress, saved_rng = ckpt_io.Progress(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress, state = ckpt_io.load(directory, parts.model, parts.optimizer, scheduler, ema=parts.ema,
                                           scaler=parts.scaler, restore_rng=False)
        saved_rng = ckpt_io.rng_states(state)
        progress.restarts.append(progress.step)
        if w.rank == 0:
            say(f"resumed from checkpoint at epoch {progress.epoch}, step {progress.step}")
    best_meta = ckpt_io.read_best_meta(w.job.run_dir) if w.rank == 0 and w.job.run_dir else None
    if best_meta and best_meta.get("val_psnr") is not None and float(best_meta["val_psnr"]) > progress.best_psnr:
        # a best model written after the checkpoint we resumed from (only rank 0 uses best_psnr)
        progress.best_psnr, progress.best_step = float(best_meta["val_psnr"]), int(best_meta.get("step", -1))
    return progress, saved_rng


def start_loader(w: Worker, start_step: int):
    """This rank's endless patch stream from `start_step` on (the exact continuation)."""
    from pipeline.train import data

    cfg = w.cfg
    stream = data.PatchStream(
        w.job.train_shards, w.job.train_counts, cfg.model.scale, cfg.patch_size, w.local_batch,
        rank=w.rank, world_size=w.world, seed=cfg.seed, start_step=start_step,
        augment=cfg.augment, patches_per_sample=cfg.patches_per_sample, shuffle_buffer=cfg.shuffle_buffer,
        global_batch=cfg.batch_size, skip_bad_shards=cfg.skip_bad_shards,
    )
    loader = data.make_train_loader(stream, cfg.loader_workers, pin_memory=w.device.type == "cuda")
    return iter(loader), loader  # iter() forks the loader processes now, before our own threads


def data_to_device(batch: torch.Tensor, w: Worker) -> torch.Tensor:
    from pipeline.train import data

    return data.to_model_range(batch, w.device, w.cfg.model.rgb_range)


def start_tracking(w: Worker, log, progress) -> None:
    from pipeline.train import tracking as run_tracking

    cfg, job = w.cfg, w.job
    log.start_system_metrics()
    if w.rank == 0 and w.device.type == "cuda":
        log.set_tag("sr.gpu_name", torch.cuda.get_device_name(w.device))
    if w.rank == 0 and job.tracking_uri and job.mlflow_run_id:
        # what the run really computes in; the `precision` param is what was asked for
        run_tracking.log_params(job.tracking_uri, job.mlflow_run_id, {"derived.precision": w.precision})
    log.set_tag("sr.nodes_used", str(count_nodes()))
    log.set_tag("sr.world_size", str(w.world))
    if w.rank == 0 and progress.restarts:
        log.set_tag("sr.restarts_at_steps", ",".join(map(str, progress.restarts)))
    if w.rank == 0 and progress.step >= w.total_steps:
        say(f"nothing to do: the run already trained {progress.epoch} of {cfg.epochs} epochs (raise --epochs to go on)")


