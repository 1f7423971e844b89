"""The end-of-interval work of the training loop: log points, epochs, validation, checkpoints.

Each function runs at a step every rank agrees on (a log point, an epoch end, a validation or
checkpoint step), so the collectives inside them line up across ranks. The step itself is in
:mod:`pipeline.train.step`; the loop that calls both is :mod:`pipeline.train.loop`.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from pipeline.train.loop import Interval, Worker, all_reduce_sum, param_digest, param_spread, say


def end_of_epoch(w: Worker, parts, scheduler, progress, log) -> None:
    """LR schedule (milestones are epochs), and the check that DDP kept the ranks identical."""
    scheduler.step()
    progress.epoch = progress.step // w.cfg.iters_per_epoch
    spread = param_spread(parts.model, w.device)
    log.log({"train/param_spread": spread}, progress.step)
    if spread != 0.0:
        raise RuntimeError(f"DDP ranks hold different parameters after epoch {progress.epoch} (spread {spread})")


def log_point(w: Worker, parts, window, timer, interval: Interval, progress, stops, log) -> str | None:
    """The one host round trip of a log interval: read the device sums, agree, log, decide.

    Returns None (train on), "stop" (Ctrl-C / SIGTERM: checkpoint, then leave) or "fail"
    (too many skipped steps in a row: leave without a checkpoint)."""
    import torch.distributed as dist

    cfg = w.cfg
    asked, term = stops.local()
    elapsed = time.perf_counter() - interval.start
    local = torch.stack([*window.values()]).double()
    extra = torch.tensor([interval.wait, asked, term, elapsed], dtype=torch.float64, device=w.device)
    vector = torch.cat([local, extra])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vector)
    loss_sum, norm_sum, good, skipped, bad_run, worst_run, wait, asked, term, elapsed = vector.tolist()
    n = w.world  # values every rank holds identically were summed n times
    good, skipped, bad_run, worst_run, elapsed = good / n, skipped / n, bad_run / n, worst_run / n, elapsed / n
    fwd_bwd, opt = timer.read()
    steps = max(interval.steps, 1)
    progress.skipped_steps += round(skipped)
    metrics = {
        "train/loss": loss_sum / (cfg.batch_size * good) if good else float("nan"),  # steps taken
        "train/grad_norm": norm_sum / good if good else float("nan"),
        "train/lr": parts.optimizer.param_groups[0]["lr"],
        "train/samples_per_s": cfg.batch_size * steps / elapsed,
        "train/data_wait": wait / n / elapsed,
        "train/time_fwd_bwd": fwd_bwd / steps,  # s per step, this rank (rank 0 logs)
        "train/time_optimizer": opt / steps,
        "train/step_time": elapsed / steps,
        "train/epoch": progress.step / cfg.iters_per_epoch,
        "train/skipped_steps": progress.skipped_steps,
    }
    if w.flops_per_sample:
        from pipeline.model.flops import mfu

        metrics["train/mfu"] = mfu(metrics["train/samples_per_s"], w.flops_per_sample, w.device, w.precision)
    log.log(metrics, progress.step)
    report_progress(w, interval, progress, metrics)
    decide_checkpoint_interval(w, interval, progress, elapsed / steps)
    interval.train_s += elapsed
    interval.start, interval.wait, interval.steps = time.perf_counter(), 0.0, 0
    window.reset()

    if worst_run >= cfg.max_bad_steps:
        reason = (f"{int(worst_run)} non-finite losses in a row (by step {progress.step}, epoch "
                  f"{progress.step // cfg.iters_per_epoch + 1}; those steps were skipped); stopped, the last checkpoint is kept")
        if w.rank == 0:
            from pipeline.train import storage

            say(f"error: {reason}")
            storage.write_json(storage.join(w.job.run_dir, storage.STOP_FILE), {"reason": reason, "step": progress.step})
        return "fail"
    if asked or term:
        if w.rank == 0:
            why = "on the driver's request (Ctrl-C or SIGTERM)" if asked else "on SIGTERM to a worker"
            say(f"stopping {why} after step {progress.step}: writing a checkpoint")
            if term and not asked:
                from pipeline.train import storage

                storage.write_json(storage.join(w.job.run_dir, storage.STOP_FILE), {
                    "reason": f"a worker received SIGTERM; checkpoint written at step {progress.step}",
                    "step": progress.step})
        return "stop"
    if stops.preemption_notice() and not stops.preempted_once:
        stops.preempted_once = True
        if w.rank == 0:
            say(f"Ray announced a preemption: checkpoint at step {progress.step}, training goes on")
        interval.checkpoint_now = True
    return None


def report_progress(w: Worker, interval: Interval, progress, metrics: dict[str, float]) -> None:
    now = time.monotonic()
    if w.rank == 0 and now - interval.last_print >= 15:
        interval.last_print = now
        say(
            f"step {progress.step}/{w.total_steps} epoch {progress.step // w.cfg.iters_per_epoch + 1}/{w.cfg.epochs} "
            f"loss {metrics['train/loss']:.4f} {metrics['train/samples_per_s']:.1f} samples/s "
            f"data-wait {100 * metrics['train/data_wait']:.0f}%"
        )


def decide_checkpoint_interval(w: Worker, interval: Interval, progress, step_s: float) -> None:
    """``--checkpoint-every 0``: the steps of about ``checkpoint_minutes`` of training.

    Measured on the second log interval (the first holds warm-up: compilation, autotuning,
    loader start), from the step time all ranks agreed on, rounded to a multiple of
    ``log_every`` (a resume then starts on a log point); kept in the checkpoint so that a
    resumed run checkpoints at the same steps."""
    cfg = w.cfg
    if cfg.checkpoint_every:
        progress.checkpoint_every = cfg.checkpoint_every
        return
    interval.windows_timed += 1
    if progress.checkpoint_every or interval.windows_timed < 2:
        return
    steps = cfg.checkpoint_minutes * 60.0 / max(step_s, 1e-6)
    progress.checkpoint_every = max(1, round(steps / cfg.log_every)) * cfg.log_every
    if w.rank == 0:
        say(f"checkpoints every {progress.checkpoint_every} steps (about {cfg.checkpoint_minutes:g} min at "
            f"{step_s:.3f} s/step)")


def checkpoint_due(w: Worker, progress, interval: Interval) -> bool:
    every = progress.checkpoint_every
    return interval.checkpoint_now or bool(every and progress.step % every == 0)


def validate_and_track(w: Worker, parts, plan, progress, interval: Interval, log, subset_due: bool, full_due: bool) -> None:
    """Subset and/or whole-set validation, the best model, and validation's share of the time."""
    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.tracking import comparison_image
    from pipeline.train.validation import validate

    cfg, job = w.cfg, w.job
    t0 = time.perf_counter()
    net = parts.ema if parts.ema is not None else parts.model
    if plan.subset_is_full:  # one pass serves both series
        passes = [(plan.subset_images, subset_due, full_due)]
    else:
        passes = [(plan.subset_images, True, False)] * subset_due + [(plan.full_images, False, True)] * full_due
    for images, as_subset, as_full in passes:
        result = validate(net, val_samples(w, images), cfg.model.scale, cfg.model.rgb_range, w.device, cfg.hash_seed)
        psnr_sum, count = all_reduce_sum([result.psnr_sum, result.count], w.device)
        psnr = psnr_sum / max(count, 1)
        log.log(dict.fromkeys(["val/psnr"] * as_subset + ["val_full/psnr"] * as_full, psnr), progress.step)
        if not as_subset:
            continue
        if w.rank == 0 and result.first is not None:
            log.log_image(comparison_image(*result.first, scale=cfg.model.scale), f"validation/step_{progress.step:08d}.png")
        if psnr > progress.best_psnr:  # the best model is chosen on the subset, always the same images
            progress.best_psnr, progress.best_step = psnr, progress.step
            if w.rank == 0 and job.run_dir:
                try:  # the storage path failing must not end training (the checkpoints say so too)
                    ckpt_io.write_best(job.run_dir, net, psnr, progress.step, progress.epoch, job.mlflow_run_id)
                except Exception as exc:  # noqa: BLE001 - written again at the next improvement
                    say(f"warning: best model of step {progress.step} not saved to the storage path "
                        f"({' '.join(str(exc).split())[:200]}); saved again at the next improvement")
        if w.rank == 0:
            say(
                f"epoch {progress.epoch}/{cfg.epochs} step {progress.step}: val PSNR {psnr:.3f} dB "
                f"(best {progress.best_psnr:.3f} at step {progress.best_step})"
            )
    spent = time.perf_counter() - t0
    interval.val_s += spent
    interval.start += spent  # the interval's step time leaves validation out
    trained = interval.train_s + (time.perf_counter() - interval.start)
    log.log({"train/val_share": interval.val_s / max(trained, 1e-9)}, progress.step)


def val_samples(w: Worker, max_images: int):
    from pipeline.train import validation

    job, scale = w.job, w.cfg.model.scale
    if job.val_folder:
        return validation.validation_from_folder(job.val_folder, scale, w.rank, w.world, max_images)
    return validation.validation_from_shards(job.val_shards, scale, w.rank, w.world, max_images)


def save_and_report(w: Worker, parts, scheduler, progress, interval: Interval, final: bool) -> None:
    """Every rank's RNG states to rank 0, rank 0 writes the checkpoint, every rank reports.

    Periodic checkpoints are uploaded in the background (Ray Train's ASYNC mode: the step loop
    goes on while the files travel to the storage path; the local copy is deleted after the
    upload); the last one (end of training, stop) and one on Ray's preemption notice wait for
    their upload. Either way the upload is :class:`~pipeline.train.upload.RetryingUpload`: a
    storage outage is retried for up to ``upload_retry_s`` instead of failing the job.

    While rank 0's previous background upload is still running (slow or retrying storage), a
    periodic checkpoint is skipped rather than waited for: the step loop never stalls on the
    storage, and the local disk never queues copies. Every rank agrees on the skip (one
    all-reduce) and then none of them reports: Ray Train pairs the ranks' reports by their
    count, so every rank must call ``ray.train.report`` the same number of times, and a
    metrics-only report would wait in line behind the pending upload."""
    import ray.train

    from pipeline.train import checkpoint as ckpt_io
    from pipeline.train.upload import RetryingUpload

    t0 = time.perf_counter()
    must = final or interval.checkpoint_now
    pending = w.rank == 0 and interval.upload is not None and not interval.upload.done.is_set()
    if all_reduce_sum([float(pending)], w.device)[0] and not must:  # every rank agrees
        if w.rank == 0:
            failures = interval.upload.failures
            doing = f"retrying (failed attempts: {failures})" if failures else "in progress"
            say(f"warning: checkpoint at step {progress.step} skipped: the upload of step {interval.upload.step} "
                f"is still {doing}")
        interval.start += time.perf_counter() - t0
        return
    states = gather_objects(ckpt_io.rng_state(w.device), w.world)
    report: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step, "skipped_steps": progress.skipped_steps}
    if math.isfinite(progress.best_psnr):
        report["best/psnr"] = progress.best_psnr
    checkpoint, upload = None, None
    if w.rank == 0:
        directory = tempfile.mkdtemp(prefix="sr-ckpt-")
        ckpt_io.save(directory, parts.model, parts.optimizer, scheduler, progress, ema=parts.ema,
                     scaler=parts.scaler, rng=states, run_id=w.job.mlflow_run_id, config=to_plain(w.cfg))
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        upload = RetryingUpload(progress.step, w.cfg.upload_retry_s, w.cfg.upload_timeout_s, say)
    mode = ray.train.CheckpointUploadMode.SYNC if must else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report(report, checkpoint=checkpoint, checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)
    if not must:
        interval.upload = upload
    interval.last_checkpoint, interval.checkpoint_now = progress.step, False
    interval.start += time.perf_counter() - t0  # the interval's step time leaves checkpoints out


def gather_objects(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def to_plain(cfg) -> dict[str, Any]:
    from pipeline.config import to_dict

    return to_dict(cfg)


def finish(w: Worker, parts, progress, log, stops) -> None:
    from pipeline.train import tracking as run_tracking

    stops.close()
    if progress.step and w.job.tracking_uri and w.job.mlflow_run_id:
        # Each rank's own account of its weights, compared from outside (tests, audits)
        # with each other and with the checkpoint.
        run_tracking.set_tag(w.job.tracking_uri, w.job.mlflow_run_id, f"sr.params_sha256.rank{w.rank}",
                             param_digest(parts.model))
    log.close()
