"""Driver side of `sr-pipeline train`: resolve, check, launch, finish.

Order matters, and every failure before the launch is one clear line:

1. resolve paths to absolute (relative paths break inside Ray workers), read the shard
   manifest (the trainer never scans tars to count), create a local storage path;
2. connect to Ray (``--address`` / ``RAY_ADDRESS``) or start a local instance on 127.0.0.1;
3. **preflight**: enough CPUs/GPUs for ``--workers``; storage, shards and the tracking server
   reachable from *every* node (one probe task pinned to each node), and a node-local storage
   path refused on a multi-node cluster;
4. find or create the MLflow run (the same one on resume) and print where to watch;
5. ``TorchTrainer.fit()``: same ``RunConfig(name, storage_path)`` resumes from the last
   checkpoint, ``FailureConfig(max_failures)`` restarts a dead worker group;
6. upload the best model to MLflow, register it, close the run, shut down a local Ray.

Each step lives in a module named for it (:mod:`~pipeline.train.job`,
:mod:`~pipeline.train.cluster`, :mod:`~pipeline.train.preflight`,
:mod:`~pipeline.train.credentials`, :mod:`~pipeline.train.runs`, :mod:`~pipeline.train.fit`);
this one only puts them in order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline import console, defaults
from pipeline.config import TrainConfig, flatten, to_dict
from pipeline.console import UserError
from pipeline.train import storage
from pipeline.train.cluster import (
    check_gpu_request,
    check_resources,
    cluster_info,
    connect,
    is_elastic,
)
from pipeline.train.credentials import credentials_in_env, uri_credentials
from pipeline.train.fit import fit, training_progress
from pipeline.train.job import JobSpec, resolve_data
from pipeline.train.preflight import check_reachability
from pipeline.train.runs import check_same_model, choose_run
from pipeline.train.sender import DRAIN_ENV, RUN_DIR_ENV


@dataclass
class Outcome:
    run_name: str
    run_dir: str
    mlflow_run_id: str | None
    status: str  # FINISHED | FAILED | KILLED
    best_psnr: float | None = None
    model_version: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, Any] | None = None


def _failure_line(exc: BaseException) -> str:
    """The root cause of a Ray Train failure, in one line."""
    failures = getattr(exc, "worker_failures", None) or {}
    inner: BaseException = next(iter(failures.values()), None) or getattr(exc, "controller_failure", None) or exc
    cause = getattr(inner, "cause", None) or inner
    text = str(cause).strip().splitlines()
    lines = [line.strip() for line in text if line.strip()]
    last = lines[-1] if lines else type(cause).__name__
    return last[:400]


def train(cfg: TrainConfig, dashboard: bool = True) -> Outcome:
    """Everything `sr-pipeline train` does; returns the outcome (raises UserError on failure)."""
    from pipeline.tracking import check_reachable, redact_uri, resolve_uri

    # -- 1. resolve
    storage_path = storage.resolve(cfg.storage_path, defaults.storage_path())
    job = resolve_data(cfg)
    given_uri = resolve_uri(cfg.tracking_uri)
    check_reachable(given_uri)
    # From here on only the redacted URI is used, shown or handed to Ray (the config travels to
    # the workers and into every checkpoint and MLflow param); credentials embedded in the URI go
    # to MLflow through its own variables: the driver's (credentials_in_env), the workers' (the
    # runtime env, see connect).
    tracking_uri = redact_uri(given_uri)
    credentials = uri_credentials(given_uri)
    if credentials:
        console.warn(
            "the tracking URI embeds credentials: the workers get them as MLFLOW_TRACKING_USERNAME/"
            "MLFLOW_TRACKING_PASSWORD in their Ray runtime env (which the Ray dashboard shows); on a "
            "shared cluster set these variables on every node instead and drop them from the URI"
        )
    cfg = dataclasses.replace(cfg, storage_path=storage_path, tracking_uri=tracking_uri)
    if not storage.is_uri(storage_path):
        storage.prepare_local(storage_path)  # before Ray: a bad path is one line, not a traceback
    run_name, record = choose_run(cfg, storage_path)
    if record is not None:
        check_same_model(cfg, record, run_name)
    run_dir = storage.join(storage_path, run_name)
    job.run_dir, job.tracking_uri = run_dir, tracking_uri

    # -- 2. Ray
    import ray

    check_gpu_request(cfg)  # what cannot work on any cluster, before Ray starts
    job_env = {RUN_DIR_ENV: run_dir, DRAIN_ENV: f"{cfg.tracking_drain_s:g}"}
    started, dashboard_url = connect(cfg.address, dashboard, credentials, job_env)
    try:
        with credentials_in_env(given_uri):
            return _train_on_cluster(cfg, job, run_name, record, dashboard_url)
    finally:
        if started:
            ray.shutdown()


def _train_on_cluster(
    cfg: TrainConfig, job: JobSpec, run_name: str, record: dict[str, Any] | None, dashboard_url: str | None
) -> Outcome:
    """Steps 3-6, connected to Ray, with the driver's MLflow credentials in place."""
    import ray.train  # for its exception types below

    from pipeline.device import dist_backend
    from pipeline.tracking import run_url, ui_command
    from pipeline.train import checkpoint, finish, tracking

    storage_path, tracking_uri, run_dir = cfg.storage_path or "", cfg.tracking_uri or "", job.run_dir
    status = "FAILED"
    run_id = None
    finished = False  # the end of the run went to MLflow (or was written down for `sync`)
    try:
        info, nodes = cluster_info()
        use_gpu = {"yes": True, "no": False}.get(cfg.use_gpu, info.gpus > 0)
        if use_gpu and info.gpus == 0:
            raise UserError("use_gpu=yes, but the Ray cluster has no GPUs")
        # -- 3. preflight
        check_gpu_request(cfg, use_gpu, info.gpus)
        check_resources(cfg, use_gpu, nodes)
        backend = dist_backend("cuda" if use_gpu else "cpu")
        check_reachability(cfg, job, storage_path, tracking_uri, nodes)
        if is_elastic(cfg) and cfg.max_failures == 0:
            console.warn(f"--workers {cfg.workers}-{cfg.workers_max} with --max-failures 0: the job resizes only when "
                         "it grows; losing a node ends it (give --max-failures N or -1 to continue on what is left)")
        workers_text = f"{cfg.workers}-{cfg.workers_max}" if is_elastic(cfg) else str(cfg.workers)

        # -- 4. MLflow run (the same one on resume)
        previous_id = record.get("mlflow_run_id") if record and record.get("tracking_uri") == tracking_uri else None
        run_id, exp_id = tracking.open_run(tracking_uri, cfg.experiment, run_name, run_dir, previous_id)
        job.mlflow_run_id = run_id
        params = flatten(dataclasses.replace(cfg, address=cfg.address or os.environ.get("RAY_ADDRESS")))
        params.update(tracking.versions())
        params.update({
            "git.commit": tracking.git_commit() or "none",
            "cluster.nodes": info.nodes, "cluster.cpus": info.cpus, "cluster.gpus": info.gpus,
            "cluster.gpu_type": info.gpu_type, "derived.world_size": workers_text,
            "derived.per_worker_batch": cfg.per_worker_batch, "derived.lr_effective": cfg.effective_lr,
            "derived.use_gpu": use_gpu, "derived.backend": backend,
            "data.train_shards": len(job.train_shards), "data.train_samples": sum(job.train_counts),
            "data.val_images": job.val_count, "ray.run_name": run_name, "ray.storage_path": storage_path,
        })
        tracking.log_params(tracking_uri, run_id, params)
        storage.write_json(storage.join(run_dir, storage.RUN_FILE), {
            "format": "sr-pipeline/run", "run_name": run_name, "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri, "experiment": cfg.experiment,
            "model": to_dict(cfg.model), "created": (record or {}).get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

        url = run_url(tracking_uri, exp_id, run_id)
        console.info(
            f"{'continuing' if record else 'starting'} run {run_name}: {workers_text} worker(s) on "
            f"{info.nodes} node(s), {'GPU' if use_gpu else 'CPU'}/{backend}, global batch {cfg.batch_size} "
            f"(<= {cfg.per_worker_batch} per worker), lr {cfg.effective_lr:g}"
        )
        console.info(f"  MLflow run:    {url or run_id}  (experiment {cfg.experiment!r}, run id {run_id})")
        if not url:
            console.info(f"                browse it with: {ui_command(tracking_uri)}")
        console.info(f"  Ray dashboard: {dashboard_url or 'off'}")
        console.info(f"  storage:       {run_dir}")

        # -- 5. fit
        stop_file = storage.join(run_dir, storage.STOP_FILE)
        storage.delete(stop_file)  # a reason left by an earlier attempt of this run
        storage.delete(storage.join(run_dir, storage.STOP_REQUEST_FILE))  # an earlier Ctrl-C's request
        with training_progress(tracking_uri, run_id, cfg.epochs, cfg.iters_per_epoch):
            result = fit(cfg, job, run_name, storage_path, use_gpu, backend)
        stopped = storage.read_json(stop_file)
        outcome = Outcome(run_name, run_dir, run_id, "FAILED" if stopped else "FINISHED",
                          metrics=dict(result.metrics or {}),
                          checkpoint=result.checkpoint.path if result.checkpoint else None)

        # -- 6. best model -> MLflow artifacts + registry, the run's status (bounded in time)
        meta = checkpoint.read_best_meta(run_dir)
        end = finish.EndOfRun(outcome.status, best_model=meta is not None)
        if meta is not None:
            outcome.best_psnr = meta.get("val_psnr")
            if cfg.register_model and outcome.status == "FINISHED" and outcome.best_psnr is not None:
                end.register = {"scale": cfg.model.scale, "psnr": float(outcome.best_psnr),
                                "step": int(meta.get("step", -1))}
        finished = True
        done = finish.finish(tracking_uri, run_id, run_dir, run_name, storage_path, end, cfg.tracking_drain_s)
        version = done.get("model registration")
        outcome.model_version = str(version) if version else None
        status = outcome.status
        if stopped:
            where = f"last checkpoint {outcome.checkpoint}" if outcome.checkpoint else "no checkpoint yet"
            raise UserError(f"training stopped: {stopped['reason']} ({where}; run {run_name})")
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        console.info(f"stopped; checkpoints are in {run_dir}; continue with: sr-pipeline train ... --run-name {run_name}")
        raise
    except ray.train.TrainingFailedError as exc:
        raise UserError(
            f"training failed ({_failure_line(exc)}); checkpoints stay in {run_dir}; "
            f"continue with --run-name {run_name}"
        ) from None
    finally:
        if run_id is not None and not finished:
            finish.finish(tracking_uri, run_id, run_dir, run_name, storage_path, finish.EndOfRun(status),
                          cfg.tracking_drain_s)
