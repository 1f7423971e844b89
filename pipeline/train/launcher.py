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
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline import console, defaults
from pipeline.config import TrainConfig, flatten, to_dict
from pipeline.console import UserError
from pipeline.train import storage
from pipeline.train.loop import JobSpec

# Settings workers take from the driver's environment. The driver's own credential variables
# are NOT passed: a job's runtime environment is shown by the Ray dashboard; every node needs its
# own (cluster/README.md), and the preflight probe checks that each node's credentials are
# accepted. A tracking URI reaches Ray (runtime env, job spec, config, checkpoints, logs) without
# its user:password part; credentials embedded in it, which no node can have, travel instead as
# the variables MLflow reads (CREDENTIAL_ENV), in the runtime env only (see _worker_env).
PROPAGATED_ENV_PREFIXES = ("MLFLOW_", "NCCL_", "GLOO_", "SR_PIPELINE_")
SECRET_MARKERS = ("PASSWORD", "TOKEN", "SECRET", "USERNAME", "KEY", "CREDENTIAL")
URI_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


# ---------------------------------------------------------------------------------------------
# 1. data
# ---------------------------------------------------------------------------------------------


def resolve_data(cfg: TrainConfig) -> JobSpec:
    """Shard lists and counts from the manifest(s), size-checked; validation source; clear errors."""
    from pipeline.train.datasource import resolve_job

    return resolve_job(cfg)


# ---------------------------------------------------------------------------------------------
# 2. Ray
# ---------------------------------------------------------------------------------------------


def _worker_env(address: str | None, credentials: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment variables: the driver's settings, never its credentials, plus
    `credentials` (those of a user:password@ tracking URI, see :func:`uri_credentials`)."""
    from pipeline.tracking import redact_uri

    env = {
        k: redact_uri(v) if k in URI_ENV_VARS else v
        for k, v in os.environ.items()
        if k.startswith(PROPAGATED_ENV_PREFIXES) and not any(m in k for m in SECRET_MARKERS)
    }
    env.update({k: v for k, v in (credentials or {}).items() if k in CREDENTIAL_ENV})
    if address:  # Ray Train's helper actors look the cluster up by address (several may run here)
        env["RAY_ADDRESS"] = address
    return env


def connect(
    address: str | None, dashboard: bool, credentials: dict[str, str] | None = None
) -> tuple[bool, str | None]:
    """(started_locally, dashboard URL). Local instances bind 127.0.0.1 only."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": _worker_env(address, credentials)}
    try:
        if address:
            ctx = ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=True)
            started = False
        else:
            ctx = ray.init(
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                logging_level="WARNING",
                log_to_driver=True,
            )
            started = True
    except ConnectionError as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") from None
    url = getattr(ctx, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return started, url


# ---------------------------------------------------------------------------------------------
# 3. preflight
# ---------------------------------------------------------------------------------------------


@dataclass
class ClusterInfo:
    nodes: int
    cpus: float
    gpus: float
    gpu_type: str


def cluster_info() -> tuple[ClusterInfo, list[dict[str, Any]]]:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    types = sorted({k.split(":", 1)[1] for n in nodes for k in n["Resources"] if k.startswith("accelerator_type:")})
    return ClusterInfo(len(nodes), cpus, gpus, ",".join(types) or ("none" if not gpus else "unknown")), nodes


def check_resources(cfg: TrainConfig, use_gpu: bool, nodes: list[dict[str, Any]]) -> None:
    """Enough room for ``workers`` bundles of (CPU, GPU) on the nodes as they are."""
    need_cpu = cfg.cpus_per_worker
    need_gpu = cfg.gpus_per_worker if use_gpu else 0.0

    def fits(res: dict[str, float]) -> int:
        limits = []
        if need_cpu > 0:
            limits.append(math.floor(res.get("CPU", 0.0) / need_cpu + 1e-9))
        if need_gpu > 0:
            limits.append(math.floor(res.get("GPU", 0.0) / need_gpu + 1e-9))
        return min(limits) if limits else cfg.workers

    capacity = sum(fits(n["Resources"]) for n in nodes)
    if capacity < cfg.workers:
        total_cpu = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
        total_gpu = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
        what = f"{need_cpu:g} CPU" + (f" + {need_gpu:g} GPU" if need_gpu else "")
        raise UserError(
            f"--workers {cfg.workers} needs {cfg.workers} x ({what}) but the cluster ({len(nodes)} node(s), "
            f"{total_cpu:g} CPUs, {total_gpu:g} GPUs) fits only {capacity}; lower --workers or "
            "--cpus-per-worker/--gpus-per-worker, or add nodes"
        )


def _probe_node(checks: dict[str, Any]) -> dict[str, Any]:
    """Runs ON each node: can it see the storage token, the shards, the tracking server?"""
    import socket
    import urllib.error
    import urllib.request

    out: dict[str, Any] = {"host": socket.gethostname(), "errors": []}
    token_path, token = checks["token_path"], checks["token"]
    try:
        fs, p = storage._fs(token_path)
        with fs.open_input_stream(p) as f:
            if f.read().decode() != token:
                out["errors"].append(f"storage {checks['storage']} holds a different probe file (not the same storage)")
    except Exception as exc:
        out["errors"].append(f"storage {checks['storage']} is not visible ({type(exc).__name__}: {' '.join(str(exc).split())[:150]})")
    from pipeline.train.datasource import node_data_problems

    problems = node_data_problems(checks["files"])  # sizes against the manifest, not only existence
    if problems:
        out["errors"].append(f"{len(problems)} data problem(s), e.g. {problems[0]}")
    uri = checks.get("tracking_uri")
    if uri and uri.startswith(("http://", "https://")):
        # An authenticated API call with THIS node's credentials (as rank 0 will make them).
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            import base64

            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        elif token:
            request.add_header("Authorization", f"Bearer {token}")
        shown = checks["tracking_shown"]
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                out["errors"].append(
                    f"tracking server {shown} refused this node's credentials (HTTP {exc.code}); set "
                    "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) on every node"
                )
            else:
                out["errors"].append(f"tracking server {shown} answered HTTP {exc.code}")
        except Exception as exc:
            out["errors"].append(f"tracking server {shown} not reachable ({getattr(exc, 'reason', exc)})")
    return out


def check_reachability(
    cfg: TrainConfig, job: JobSpec, storage_path: str, tracking_uri: str, nodes: list[dict[str, Any]]
) -> None:
    """Storage/shards/tracking from every node; node-local storage refused on multi-node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.tracking import redact_uri

    multi = len(nodes) > 1
    if multi and not storage.is_uri(storage_path) and not cfg.shared_storage:
        fstype = storage.filesystem_type(storage_path)
        if not storage.is_shared_fstype(fstype):
            raise UserError(
                f"storage path {storage_path} is on a node-local filesystem ({fstype}) but the cluster has "
                f"{len(nodes)} nodes: checkpoints written on other nodes would be lost. Use --storage-path "
                "s3://bucket/dir (or gs://...), or a mount shared by all nodes (add --shared-storage if "
                f"{storage_path} is one)"
            )
    if multi and (tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri):
        raise UserError(
            f"the MLflow store {redact_uri(tracking_uri)} is a file on this machine, but rank 0 may run on "
            f"another of the {len(nodes)} nodes; start a tracking server and pass --tracking-uri http://HOST:PORT"
        )
    # A token written here must be readable on every node: that is what "shared" means.
    token = secrets.token_hex(8)
    token_path = storage.join(storage_path, ".sr-pipeline-probe", f"{token}.txt")
    try:
        fs, p = storage._fs(token_path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(token.encode())
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"storage path {storage_path} is not writable: {' '.join(str(exc).split())[:200]}") from None
    files = list(job.train_shards) + list(job.val_shards) + ([job.val_folder] if job.val_folder else [])
    checks = {
        "token_path": token_path, "token": token, "storage": storage_path, "files": files,
        "tracking_uri": tracking_uri, "tracking_shown": redact_uri(tracking_uri),
    }
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(checks)
        for n in nodes
    }
    try:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
        if len(ready) < len(refs):
            late = [name for name, ref in refs.items() if ref not in ready]
            raise UserError(f"preflight: node(s) {', '.join(late)} did not answer within 120 s")
        for name, ref in refs.items():
            result = ray.get(ref)
            if result["errors"]:
                raise UserError(f"preflight on node {name}: {result['errors'][0]}")
    finally:
        try:
            fs.delete_file(p)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# 4. run identity and credentials
# ---------------------------------------------------------------------------------------------


def uri_credentials(uri: str) -> dict[str, str]:
    """MLflow's credential variables for the user:password embedded in `uri` ({} when none)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return {}
    return {
        "MLFLOW_TRACKING_USERNAME": unquote(parts.username or ""),
        "MLFLOW_TRACKING_PASSWORD": unquote(parts.password or ""),
    }


@contextmanager
def credentials_in_env(uri: str) -> Iterator[None]:
    """While the driver talks to MLflow: the URI's credentials as MLflow's variables.

    The driver then uses the redacted URI like the workers do, so an MLflow error message
    (which quotes the request URL) can never show the password. Entered after Ray is up:
    a local Ray instance must not inherit them either. The previous values come back after.
    """
    values = uri_credentials(uri)
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def choose_run(cfg: TrainConfig, storage_path: str) -> tuple[str, dict[str, Any] | None]:
    """(run name, stored run record or None for a fresh run)."""
    if cfg.run_name:
        if "/" in cfg.run_name or cfg.run_name in {".", ".."}:
            raise UserError(f"--run-name {cfg.run_name!r}: use a plain name, without '/'")
        record = storage.read_json(storage.join(storage_path, cfg.run_name, storage.RUN_FILE))
        if cfg.resume and record is None:
            raise UserError(f"--resume: no run named {cfg.run_name!r} under {storage_path}")
        return cfg.run_name, record
    if cfg.resume:
        runs = storage.list_runs(storage_path)
        if not runs:
            raise UserError(f"--resume: no run to resume under {storage_path}")
        name = runs[-1][1]
        return name, storage.read_json(storage.join(storage_path, name, storage.RUN_FILE))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"dnlan-x{cfg.model.scale}-{stamp}-{uuid.uuid4().hex[:4]}", None


def check_same_model(cfg: TrainConfig, record: dict[str, Any], run_name: str) -> None:
    stored = record.get("model") or {}
    for key, value in to_dict(cfg.model).items():
        if key in stored and stored[key] != value:
            raise UserError(
                f"run {run_name!r} was trained with model.{key}={stored[key]}, not {value}; "
                "use another --run-name for a different model"
            )


# ---------------------------------------------------------------------------------------------
# 5-6. launch and finish
# ---------------------------------------------------------------------------------------------


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

    started, dashboard_url = connect(cfg.address, dashboard, credentials)
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
    from pipeline.train import tracking

    storage_path, tracking_uri, run_dir = cfg.storage_path or "", cfg.tracking_uri or "", job.run_dir
    status = "FAILED"
    run_id = None
    try:
        info, nodes = cluster_info()
        use_gpu = {"yes": True, "no": False}.get(cfg.use_gpu, info.gpus > 0)
        if use_gpu and info.gpus == 0:
            raise UserError("use_gpu=yes, but the Ray cluster has no GPUs")
        # -- 3. preflight
        check_resources(cfg, use_gpu, nodes)
        backend = dist_backend("cuda" if use_gpu else "cpu")
        check_reachability(cfg, job, storage_path, tracking_uri, nodes)
        # -- 4. MLflow run (the same one on resume)
        previous_id = record.get("mlflow_run_id") if record and record.get("tracking_uri") == tracking_uri else None
        run_id, exp_id = tracking.open_run(tracking_uri, cfg.experiment, run_name, run_dir, previous_id)
        job.mlflow_run_id = run_id
        params = flatten(dataclasses.replace(cfg, address=cfg.address or os.environ.get("RAY_ADDRESS")))
        params.update(tracking.versions())
        params.update({
            "git.commit": tracking.git_commit() or "none",
            "cluster.nodes": info.nodes, "cluster.cpus": info.cpus, "cluster.gpus": info.gpus,
            "cluster.gpu_type": info.gpu_type, "derived.world_size": cfg.workers,
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
            f"{'continuing' if record else 'starting'} run {run_name}: {cfg.workers} worker(s) on "
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

        # -- 6. best model -> MLflow artifacts + registry
        meta = read_best(tracking_uri, run_id, run_dir)
        if meta is not None:
            outcome.best_psnr = meta.get("val_psnr")
            if cfg.register_model and outcome.status == "FINISHED" and outcome.best_psnr is not None:
                outcome.model_version = tracking.register_best(
                    tracking_uri, run_id, cfg.model.scale, float(outcome.best_psnr), int(meta.get("step", -1))
                )
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
        if run_id is not None:
            tracking.finish_run(tracking_uri, run_id, status)


@contextmanager
def training_progress(tracking_uri: str, run_id: str, epochs: int, iters: int) -> Iterator[None]:
    """A progress bar in the driver, fed from the run's latest ``train/epoch`` metric.

    The workers log to MLflow; polling the run every few seconds keeps the driver free of any
    coupling to Ray Train internals (and shows resumed runs at their real position).
    """
    import threading

    from mlflow.tracking import MlflowClient

    stop = threading.Event()
    client = MlflowClient(tracking_uri=tracking_uri)
    with console.progress_bar("training", total=epochs * iters, unit="step") as bar:

        def update() -> None:
            try:
                metrics = client.get_run(run_id).data.metrics
            except Exception:  # a tracking hiccup only delays the bar
                return
            step = min(round(metrics.get("train/epoch", 0.0) * iters), epochs * iters)
            if step > bar.done:
                bar.advance(step - bar.done)

        def poll() -> None:
            while not stop.wait(5.0):
                update()

        thread = threading.Thread(target=poll, name="train-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)
            update()


def read_best(tracking_uri: str, run_id: str, run_dir: str) -> dict[str, Any] | None:
    """Upload ``<run dir>/best_model`` to the MLflow run; returns its meta (or None)."""
    from pipeline.train import checkpoint, tracking

    meta = checkpoint.read_best_meta(run_dir)
    if meta is None:
        return None
    tmp = storage.download_dir(storage.join(run_dir, storage.BEST_DIR))
    try:
        tracking.log_best_model(tracking_uri, run_id, tmp.name)
    finally:
        tmp.cleanup()
    return meta


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during fit(): the workers were asked to stop (or abandoned); checkpoints are kept."""


def fit(cfg: TrainConfig, job: JobSpec, run_name: str, storage_path: str, use_gpu: bool, backend: str):
    """Build the TorchTrainer and run it (a rerun with the same name resumes).

    Ctrl-C: the first one writes a stop request into the run's storage; the workers see it
    within seconds, leave after the same step on every rank and return (the last checkpoint
    stays the one to resume from), and :class:`Interrupted` is raised once fit() is back. A
    second one stops waiting at once.

    Why fit() runs in a thread: in the main thread, Ray Train installs its own SIGINT handler
    (it aborts the run, then exits the process on the third Ctrl-C, without saying what to do
    next). Python lets only the main thread install signal handlers, so from another thread
    Ray cannot, and Ctrl-C reaches this function as KeyboardInterrupt, through public APIs
    only (no Ray internals to override).
    """
    import threading

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "job": dataclasses.asdict(job)},
        torch_config=TorchConfig(backend=backend, timeout_s=cfg.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray's per-report INFO lines drown ours
        ),
    )
    ended: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            ended["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            ended["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="sr-pipeline-fit", daemon=True).start()
    asked = False
    # Wait in time.sleep, not Thread.join: a Ctrl-C that interrupts join() can leave the thread
    # marked as stopped while it still runs (CPython's bpo-45274 handling), losing the result.
    while not done.is_set():
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:
            if asked:
                raise Interrupted() from None
            asked = True
            request_stop(job.run_dir)
    if "error" in ended:
        raise ended["error"]
    result = ended["result"]
    if asked and (result.metrics or {}).get("epoch") != cfg.epochs:  # not finished before it stopped
        raise Interrupted()
    return result


def request_stop(run_dir: str) -> None:
    """Ask the workers to stop (see :func:`fit`); if the request cannot be written, stop now."""
    try:
        storage.write_json(storage.join(run_dir, storage.STOP_REQUEST_FILE), {"requested": time.time()})
    except Exception as exc:
        console.warn(f"cannot write the stop request ({' '.join(str(exc).split())[:200]}): stopping at once")
        raise Interrupted() from None
    console.info("stopping (Ctrl-C): the workers stop after their current step and keep the last checkpoint; "
                 "Ctrl-C again to stop at once")
