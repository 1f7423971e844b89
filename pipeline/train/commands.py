"""`sr-pipeline train`: thin option parsing over :func:`pipeline.train.launcher.train`.

Only typer, the standard library and pipeline.config are imported here; Ray, torch and MLflow
load inside the command so `sr-pipeline --help` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

# typer needs typing.Optional on Python 3.10
# ruff: noqa: UP045


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("sync")(sync_cmd)


def sync_cmd(
    run_name: Annotated[Optional[str], typer.Option(help="Run to sync (default: the latest under the storage path).")] = None,
    storage_path: Annotated[Optional[str], typer.Option(help="Where the run's checkpoints are (as given to train).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: the one the run was trained with).")] = None,
) -> None:
    """Bring a run's MLflow record up to date after the tracking server was away.

    Training keeps its metric points, tags and params in a journal beside the checkpoints (<storage>/<run>/tracking/); this replays what MLflow lacks and finishes what the end of `train` could not (best model upload, registration, run status). Safe to repeat.
    """
    from pipeline import console
    from pipeline.train.sync import sync_run

    console.info(sync_run(run_name, storage_path, tracking_uri))


def parse_workers(text: str) -> dict[str, int]:
    """``--workers 4`` or ``--workers 4-8`` (elastic) as TrainConfig values."""
    from pipeline.console import UserError

    low, sep, high = text.strip().partition("-")
    try:
        lo = int(low)
        hi = int(high) if sep else 0
    except ValueError:
        raise UserError(f"--workers {text!r}: give a number (4) or a range MIN-MAX (4-8)") from None
    if sep and hi < lo:
        raise UserError(f"--workers {text}: the maximum is below the minimum")
    return {"workers": lo, "workers_max": hi if hi > lo else 0}


def train_cmd(
    shards: Annotated[Optional[str], typer.Option(help="Shard folder written by `sr-pipeline preprocess` (holds manifest.json).")] = None,
    scale: Annotated[Optional[int], typer.Option(help="Upscaling factor: 2, 3 or 4.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="paper | paper128 | tiny (model + recipe).")] = None,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file of option: value pairs.")] = None,
    workers: Annotated[Optional[str], typer.Option(help="DDP workers (one per GPU on a GPU cluster), or a range MIN-MAX (e.g. 4-8): elastic, starts with what the cluster has and resizes when nodes leave or join (with --max-failures >= 1).")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs reserved per worker.")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per worker (when GPUs are used).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on CPU (gloo) even if the cluster has GPUs.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to use (else RAY_ADDRESS, else a local instance).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (an epoch is --iters-per-epoch steps).")] = None,
    iters_per_epoch: Annotated[Optional[int], typer.Option(help="Steps per epoch (paper: 1000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="GLOBAL batch, split across workers (paper: 16).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (paper: 1e-4).")] = None,
    scale_lr: Annotated[Optional[bool], typer.Option("--scale-lr/--no-scale-lr", help="Multiply lr by batch/16.")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="HR patch side (paper: 96).")] = None,
    loader_workers: Annotated[Optional[str], typer.Option(help="DataLoader processes per worker, or auto (the worker's CPUs minus one).")] = None,
    skip_bad_shards: Annotated[bool, typer.Option("--skip-bad-shards", help="Leave out shards that differ from the manifest (counted and warned) instead of stopping.")] = False,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of weights, e.g. 0.999 (0 = off).")] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the global gradient norm (0 = off).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (default: bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16 (autocast on GPU only).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate on the small fixed subset every N steps (0 = at every epoch end).")] = None,
    val_subset: Annotated[Optional[int], typer.Option(help="Images in the validation subset (default 10; --val-data is the subset).")] = None,
    val_full_every: Annotated[Optional[int], typer.Option(help="Validate on the whole valid set every N steps (0 = only at the end).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps, a multiple of log_every (0 = about checkpoint_minutes, 5, of training).")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (eager, with a warning, where no compiler runs).")] = None,
    val_data: Annotated[Optional[str], typer.Option(help="Validate on a folder of HR images (e.g. Set5/HR) instead of the valid shards.")] = None,
    val_shards: Annotated[Optional[str], typer.Option(help="Shard folder whose valid split is used for validation.")] = None,
    val_max_images: Annotated[Optional[int], typer.Option(help="Validate on at most N images (0 = all).")] = None,
    storage_path: Annotated[Optional[str], typer.Option(help="Checkpoint storage: a local dir (one node), a shared mount, s3:// or gs://.")] = None,
    shared_storage: Annotated[bool, typer.Option("--shared-storage", help="The local --storage-path is a mount shared by all nodes.")] = False,
    run_name: Annotated[Optional[str], typer.Option(help="Name of the run; an existing name continues that run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest run (or --run-name) from its last checkpoint.")] = False,
    max_failures: Annotated[Optional[int], typer.Option(help="Worker-group restarts allowed after a failure (-1 = unlimited).")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Keep the last K checkpoints (the best model is kept apart).")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment name.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (else MLFLOW_TRACKING_URI, else the local store).")] = None,
    register: Annotated[Optional[bool], typer.Option("--register/--no-register", help="Register the best model as dnlan-x{scale}.")] = None,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard", help="Start the Ray dashboard with a local instance.")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any TrainConfig value: KEY=VALUE.")] = None,
) -> None:
    """Train DNLAN with Ray Train (DDP) on WebDataset shards, tracked in MLflow.

    Rerunning with the same --run-name continues that run from its last checkpoint, in the same MLflow run. Ctrl-C (or SIGTERM to a worker) stops at the next log point and writes a checkpoint there.

    val/psnr is measured on the valid shards, whose images preprocess cropped to a multiple of 12; `evaluate` crops to a multiple of the scale, so its PSNR can differ slightly.
    """
    from pipeline import console
    from pipeline.config import TrainConfig, load_config, parse_sets

    overrides: dict[str, object] = {
        "shards": shards, "model.scale": scale, "cpus_per_worker": cpus_per_worker,
        "gpus_per_worker": gpus_per_worker, "address": address, "epochs": epochs,
        "iters_per_epoch": iters_per_epoch, "batch_size": batch_size, "lr": lr, "scale_lr": scale_lr,
        "patch_size": patch_size, "loader_workers": loader_workers, "ema": ema, "grad_clip": grad_clip,
        "precision": precision, "seed": seed, "val_every": val_every, "val_data": val_data,
        "val_subset": val_subset, "val_full_every": val_full_every, "checkpoint_every": checkpoint_every,
        "compile": compile_,
        "val_shards": val_shards, "val_max_images": val_max_images, "storage_path": storage_path,
        "run_name": run_name, "max_failures": max_failures, "keep_checkpoints": keep_checkpoints,
        "experiment": experiment, "tracking_uri": tracking_uri, "register_model": register,
    }
    if workers is not None:
        overrides.update(parse_workers(workers))
    if cpu:
        overrides["use_gpu"] = "no"
    if loader_workers is not None and loader_workers.strip().lower() == "auto":
        overrides["loader_workers"] = -1
    if skip_bad_shards:
        overrides["skip_bad_shards"] = True
    if shared_storage:
        overrides["shared_storage"] = True
    if resume:
        overrides["resume"] = True
    overrides.update(parse_sets(set_))
    cfg = load_config(TrainConfig, preset=preset, yaml_path=config, overrides=overrides)

    from pipeline.train.launcher import train

    outcome = train(cfg, dashboard=dashboard)
    best = f"{outcome.best_psnr:.3f} dB" if outcome.best_psnr is not None else "n/a"
    console.info(f"done: run {outcome.run_name}, best validation PSNR {best}")
    if outcome.best_psnr is not None and not cfg.val_data:
        console.info("  (val/psnr: valid shards cropped to a multiple of 12; `evaluate` crops to a "
                     "multiple of the scale, so its PSNR can differ slightly)")
    if outcome.model_version:
        console.info(f"  registered model dnlan-x{cfg.model.scale} version {outcome.model_version}")
    if outcome.checkpoint:
        console.info(f"  last checkpoint: {outcome.checkpoint}")
    if outcome.mlflow_run_id:
        console.info(f"  evaluate it:     sr-pipeline evaluate --run-id {outcome.mlflow_run_id}")
    typer.echo(outcome.mlflow_run_id or "")
