"""Connecting to Ray and sizing the job against the cluster as it is.

Settings workers take from the driver's environment (:func:`worker_env`): the driver's own
credential variables are NOT passed, because a job's runtime environment is shown by the Ray
dashboard; every node needs its own (cluster/README.md), and the preflight probe checks that
each node's credentials are accepted. Credentials embedded in a tracking URI, which no node
can have, are the exception (see :mod:`pipeline.train.credentials`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from pipeline.config import TrainConfig
from pipeline.console import UserError
from pipeline.train.credentials import CREDENTIAL_ENV, URI_ENV_VARS

PROPAGATED_ENV_PREFIXES = ("MLFLOW_", "NCCL_", "GLOO_", "SR_PIPELINE_")
SECRET_MARKERS = ("PASSWORD", "TOKEN", "SECRET", "USERNAME", "KEY", "CREDENTIAL")


def worker_env(address: str | None, credentials: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment variables: the driver's settings, never its credentials, plus
    `credentials` (those of a user:password@ tracking URI, see :func:`pipeline.train.credentials.uri_credentials`)."""
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
    address: str | None, dashboard: bool, credentials: dict[str, str] | None = None,
    job_env: dict[str, str] | None = None,
) -> tuple[bool, str | None]:
    """(started_locally, dashboard URL). Local instances bind 127.0.0.1 only.

    `job_env`: variables for this job's workers only (where the run lives, see
    :mod:`pipeline.train.sender`)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": {**worker_env(address, credentials), **(job_env or {})}}
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
        return min(limits) if limits else workers

    workers = min_workers(cfg)
    capacity = sum(fits(n["Resources"]) for n in nodes)
    if capacity < workers:
        total_cpu = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
        total_gpu = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
        what = f"{need_cpu:g} CPU" + (f" + {need_gpu:g} GPU" if need_gpu else "")
        raise UserError(
            f"--workers {workers} needs {workers} x ({what}) but the cluster ({len(nodes)} node(s), "
            f"{total_cpu:g} CPUs, {total_gpu:g} GPUs) fits only {capacity}; lower --workers or "
            "--cpus-per-worker/--gpus-per-worker, or add nodes"
        )


def local_gpus() -> int:
    """GPUs a local Ray instance started here would have (Ray counts the same CUDA devices)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu_request(cfg: TrainConfig, use_gpu: bool | None = None, gpus: float | None = None) -> None:
    """Refuse, in one line, GPU requests that cannot work with NCCL.

    * a fractional ``--gpus-per-worker`` (0.5 puts two ranks on one GPU; NCCL refuses to
      start a communicator with two ranks on one device, after the job started);
    * more GPU workers than the cluster has GPUs (the job would wait for resources forever).

    Called before Ray starts with what is known then (``use_gpu=yes``, or a local instance,
    whose GPUs are this machine's), and again once the cluster's resources are known.
    """
    if use_gpu is None:
        local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
        if cfg.use_gpu == "yes":
            use_gpu = True
        elif cfg.use_gpu == "auto" and local:
            gpus = float(local_gpus())
            use_gpu = gpus > 0
        if local and use_gpu and gpus is None:
            gpus = float(local_gpus())
    if not use_gpu:
        return
    per = cfg.gpus_per_worker
    if per <= 0 or per != int(per):
        raise UserError(
            f"--gpus-per-worker {per:g}: each NCCL rank needs whole GPUs of its own (two ranks on one "
            "GPU fail at start); use 1 (or 2, ...), or --cpu to train on CPUs"
        )
    need = min_workers(cfg) * int(per)
    if gpus is not None and need > gpus:
        elastic = f" (the minimum of --workers {cfg.workers}-{cfg.workers_max})" if is_elastic(cfg) else ""
        raise UserError(
            f"--workers {min_workers(cfg)}{elastic} x --gpus-per-worker {per:g} needs {need} GPUs but the "
            f"cluster has {gpus:g}; lower --workers, give a range (--workers 1-{min_workers(cfg)}) to start "
            "with what is there, or add GPU nodes"
        )


def is_elastic(cfg: TrainConfig) -> bool:
    return cfg.workers_max > cfg.workers


def min_workers(cfg: TrainConfig) -> int:
    return cfg.workers
