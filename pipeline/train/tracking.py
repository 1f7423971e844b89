"""MLflow for training: one run per job, reused on resume and after worker restarts.

Who logs what:

* the **driver** creates (or finds again) the run before any worker starts, so it can print
  the run's address at once; it logs the params and, at the end, the best model and its
  Model Registry version;
* **rank 0** logs metrics, comparison images and system metrics while training (every rank
  tags the digest of its final weights, see :mod:`pipeline.train.loop`).

No duplicate steps: a restarted worker group resumes from the last *checkpoint*, which can be
behind the last *logged* step. Rank 0 therefore reads, per metric, the highest step already in
the run and skips re-logging steps up to it. The values logged first stay: the resumed group
repeats those steps from the checkpoint's weights but with freshly seeded data (see
:class:`pipeline.train.data.PatchStream`), so its values for them differ slightly; the first
ones are what the run went through. Every call goes through
:func:`pipeline.tracking.with_retries`: a tracking hiccup is logged and survived, never fatal.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import console
from pipeline.tracking import experiment_id, safe_params, with_retries

TAG_RAY_RUN = "sr.ray_run_name"
TAG_STORAGE = "sr.storage_path"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call

# Rank 0 logs between collectives: while it waits on MLflow, every rank waits. MLflow's own HTTP
# retries (7, exponential backoff, 120 s per request) stacked under with_retries' 5 attempts could
# stall the job for tens of minutes and trip the collective timeout (dist_timeout_s) during an
# outage. In the workers, with_retries alone retries (about 2 minutes at worst per call with these
# values); a user's own setting of these variables wins.
WORKER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def bound_worker_http() -> None:
    """Apply WORKER_HTTP_ENV in a training worker's process (MLflow reads it on every request)."""
    for key, value in WORKER_HTTP_ENV.items():
        os.environ.setdefault(key, value)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def open_run(
    uri: str, experiment: str, ray_run_name: str, run_dir: str, run_id: str | None = None
) -> tuple[str, str]:
    """(run id, experiment id): the run recorded for this job (`run_id`), or a new one."""
    client = _client(uri)
    exp_id = experiment_id(experiment, uri)
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage != "deleted":
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                return run_id, run.info.experiment_id
        except Exception as exc:  # run gone (other store, deleted): start a new one, say so
            console.warn(f"MLflow run {run_id} of this job was not found ({type(exc).__name__}); starting a new run")
    tags = {TAG_RAY_RUN: ray_run_name, TAG_STORAGE: run_dir, "mlflow.source.name": "sr-pipeline train"}
    run = client.create_run(exp_id, run_name=ray_run_name, tags=tags)
    return run.info.run_id, exp_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params; on a resumed run keep the first values and tag the ones that changed."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    run = with_retries(client.get_run, run_id, what="MLflow get run")
    existing = run.data.params if run is not None else {}
    params = safe_params(params)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [RunTag(f"resume.changed.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        with_retries(client.log_batch, run_id, params=new[i : i + MAX_PARAMS_PER_BATCH], what="MLflow log params")
    if changed:
        with_retries(client.log_batch, run_id, tags=changed, what="MLflow log tags")


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    """One tag, from any process (the ranks' weight digests)."""
    with_retries(_client(uri).set_tag, run_id, key, value, what="MLflow set tag")


def finish_run(uri: str, run_id: str, status: str) -> None:
    """status: FINISHED | FAILED | KILLED."""
    with_retries(_client(uri).set_terminated, run_id, status, what="MLflow end run")


def log_best_model(uri: str, run_id: str, local_dir: str | Path) -> None:
    """Upload ``best_model/`` (model.pt, state_dict.pt, meta.json) to the run's artifacts, and
    log model.pt as an MLflow Model of the run (see :mod:`pipeline.mlflow_model`)."""
    from pipeline import mlflow_model

    with_retries(_client(uri).log_artifacts, run_id, str(local_dir), "best_model", what="MLflow best model upload")
    with_retries(mlflow_model.log_model, uri, run_id, local_dir, attempts=3, what="MLflow Model logging")


def register_best(uri: str, run_id: str, scale: int, psnr: float, step: int) -> str | None:
    """Register the run's MLflow Model as a new version of ``dnlan-x{scale}``; ``champion``
    follows the best validation PSNR (see :func:`pipeline.mlflow_model.register`)."""
    from pipeline import mlflow_model

    return with_retries(mlflow_model.register, uri, run_id, scale, psnr, step, what="MLflow model registration")


def git_commit() -> str:
    """Commit of the installed source tree (``+dirty`` with local changes), or "" outside git."""
    src = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    import platform

    import mlflow
    import ray
    import torch
    import webdataset

    from pipeline import __version__

    return {
        "version.sr_pipeline": __version__,
        "version.torch": torch.__version__,
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "version.webdataset": getattr(webdataset, "__version__", "?"),
        "version.python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Rank 0 side
# ---------------------------------------------------------------------------------------------


class MetricLogger:
    """Metrics/images of one run, from one process; a no-op on ranks other than 0."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = bool(enabled and uri and run_id)
        self.uri, self.run_id = uri, run_id
        self.floors: dict[str, int] = {}  # per metric: steps <= floor were logged before a restart
        self._system = None
        if not self.enabled:
            return
        self.client = _client(uri)
        run = with_retries(self.client.get_run, run_id, what="MLflow get run")
        # Public API only: the run lists its metric keys; each key's history gives its steps.
        # One call per key, once per worker group (system/* metrics keep their own counter).
        for key in sorted(run.data.metrics) if run is not None else []:
            if key.startswith("system/"):
                continue
            history = with_retries(self.client.get_metric_history, run_id, key, what="MLflow metric history")
            if history:
                self.floors[key] = max(m.step for m in history)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if np.isfinite(v) and step > self.floors.get(k, -1)
        ]
        if batch:
            with_retries(self.client.log_batch, self.run_id, metrics=batch, what="MLflow log metrics")

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        if not self.enabled:
            return
        with_retries(self.client.log_image, self.run_id, image, artifact_file=artifact_file, what="MLflow log image")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            with_retries(self.client.set_tag, self.run_id, key, value, what="MLflow set tag")

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """CPU/memory/disk/network (and GPU when pynvml is present) as ``system/*`` metrics."""
        if not self.enabled:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval, resume_logging=True, tracking_uri=self.uri
            )
            self._system.start()
        except Exception as exc:  # psutil missing or the like: training goes on without them
            console.warn(f"system metrics are off: {exc}")
            self._system = None

    def close(self) -> None:
        if self._system is not None:
            try:
                self._system.finish()
            except Exception:
                pass
            self._system = None


def comparison_image(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int, crop: int = 64) -> np.ndarray:
    """LR-bicubic | SR | HR side by side, for a fixed central crop (``crop`` LR pixels)."""
    from pipeline.preprocess import imresize

    h, w = lr.shape[:2]
    c = min(crop, h, w)
    y, x = (h - c) // 2, (w - c) // 2
    lr_c = lr[y : y + c, x : x + c]
    bic = imresize(lr_c, scale=float(scale))
    s = scale
    sr_c = sr[y * s : (y + c) * s, x * s : (x + c) * s]
    hr_c = hr[y * s : (y + c) * s, x * s : (x + c) * s]
    gap = np.full((c * s, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([bic, gap, sr_c, gap, hr_c], axis=1)
