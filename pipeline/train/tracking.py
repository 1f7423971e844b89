"""MLflow for training: one run per job, reused on resume and after worker restarts.

Who logs what:

* the **driver** creates (or finds again) the run before any worker starts, so it can print
  the run's address at once; it logs the params and, at the end, the best model and its
  Model Registry version;
* **rank 0** logs metrics, comparison images and system metrics while training (every rank
  tags the digest of its final weights, see :mod:`pipeline.train.loop`).

Tracking never blocks training (:mod:`pipeline.train.sender`): in the workers, metrics,
params, tags and images go to a bounded queue that a background thread delivers to MLflow;
rank 0 also writes them to the run's journal beside the checkpoints. No duplicate steps: a
resumed worker group skips the (key, step) pairs the journal already holds (the resumed steps
repeat the same computation). The driver's calls (before the workers start, and at the end,
bounded in time by :mod:`pipeline.train.finish`) go through
:func:`pipeline.tracking.with_retries`.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import console
from pipeline.tracking import experiment_id, safe_params, with_retries
from pipeline.train import sender

TAG_RAY_RUN = "sr.ray_run_name"
TAG_STORAGE = "sr.storage_path"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call

# In the workers the sender thread retries on its own schedule; MLflow's own HTTP retries
# (7, exponential backoff, 120 s per request) under it would only hide an outage for minutes
# per entry and delay the end-of-run drain. A user's own setting of these variables wins.
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
    """Log params; on a resumed run keep the first values and tag the ones that changed.

    In a training worker (a :class:`MetricLogger` of the run is open in the process) the
    params are queued, never waited for."""
    logger = _open_logger(uri, run_id)
    if logger is not None:
        logger.log_params(params)
        return
    client = _client(uri)
    with_retries(log_params_once, client, run_id, params, what="MLflow log params")


def log_params_once(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """One attempt of :func:`log_params` (the sender retries it as a whole)."""
    from mlflow.entities import Param, RunTag

    existing = client.get_run(run_id).data.params
    params = safe_params(params)
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = [RunTag(f"resume.changed.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])
    if changed:
        client.log_batch(run_id, tags=changed)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    """One tag, from any process (the ranks' weight digests); queued in a training worker."""
    logger = _open_logger(uri, run_id)
    if logger is not None:
        logger.queue_tag(key, value)
        return
    with_retries(_client(uri).set_tag, run_id, key, value, what="MLflow set tag")


def finish_run(uri: str, run_id: str, status: str) -> bool:
    """status: FINISHED | FAILED | KILLED. True once MLflow took it."""
    client = _client(uri)

    def end() -> bool:
        client.set_terminated(run_id, status)
        return True

    return bool(with_retries(end, what="MLflow end run"))


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


_OPEN: dict[tuple[str, str], MetricLogger] = {}  # this process's open loggers, by (uri, run id)
_OPEN_LOCK = threading.Lock()


def _open_logger(uri: str | None, run_id: str | None) -> MetricLogger | None:
    with _OPEN_LOCK:
        return _OPEN.get((uri or "", run_id or ""))


class MetricLogger:
    """Metrics, images, tags and params of one run, from one training process, never blocking.

    Only rank 0's logger (``enabled``) logs and keeps the journal; every rank's logger, enabled
    or not, carries that process's direct :func:`set_tag` / :func:`log_params` calls for the run
    (the ranks' weight digests) through its sender, so no rank waits on MLflow either.

    ``run_dir`` (where the journal lives) defaults to what the driver put in the job's runtime
    env (:data:`~pipeline.train.sender.RUN_DIR_ENV`); without one there is no journal and no
    resume de-duplication. ``drain_s`` bounds :meth:`close`.
    """

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool, run_dir: str | None = None,
                 drain_s: float | None = None, max_entries: int = sender.DEFAULT_MAX_ENTRIES) -> None:
        self.enabled = bool(enabled and uri and run_id)
        self.uri, self.run_id = uri, run_id
        self.rank = _rank()
        self.run_dir = run_dir if run_dir is not None else os.environ.get(sender.RUN_DIR_ENV, "")
        self.drain_s = drain_s if drain_s is not None else float(os.environ.get(sender.DRAIN_ENV, sender.DEFAULT_DRAIN_S))
        self.journal: sender.Journal | None = None
        self.seen: set[tuple[str, int]] = set()
        self._system = None
        self._world_logged = False
        self._sender: sender.Sender | None = None
        if not (uri and run_id):
            return
        if self.enabled and self.run_dir:
            try:
                self.journal = sender.Journal(self.run_dir)
                self.seen = self.journal.seen()
            except Exception as exc:  # storage hiccup: log without a journal rather than not train
                console.warn(f"tracking journal in {self.run_dir} unavailable, logging without it: {exc}")
                self.journal = None
        self._sender = sender.Sender(uri, run_id, max_entries=max_entries,
                                     on_idle=self.journal.upload if self.journal is not None else None)
        with _OPEN_LOCK:
            _OPEN[(uri, run_id)] = self

    @property
    def floors(self) -> dict[str, int]:
        """Per metric, the highest step an earlier attempt of the run logged (from the journal)."""
        out: dict[str, int] = {}
        for key, step in self.seen:
            out[key] = max(out.get(key, -1), step)
        return out

    def _journal(self, records: list[dict[str, Any]]) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(records)
        except Exception as exc:  # a full disk must not stop training; MLflow still gets it
            console.warn(f"tracking journal write failed, journal off: {exc}")
            self.journal = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._sender is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = any((k, step) not in self.seen for k in metrics)
        if not self._world_logged and fresh and os.environ.get("WORLD_SIZE", "").isdigit():
            # The worker count over time (elastic jobs resize, restarts may too): one point at
            # the first step each worker group logs anew (a restarted group first repeats steps
            # the journal already holds; those are skipped, and its count waits for a new one).
            metrics = {**metrics, "train/workers": float(os.environ["WORLD_SIZE"])}
            self._world_logged = True
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if np.isfinite(v) and (k, step) not in self.seen
        ]
        if not batch:
            return
        self.seen.update((m.key, step) for m in batch)
        self._journal([{"kind": "metric", "key": m.key, "value": m.value, "step": step, "ts": now} for m in batch])
        self._sender.put("metrics", batch)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        if self.enabled and self._sender is not None:
            self._sender.put("image", (np.array(image, copy=True), artifact_file))

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.queue_tag(key, value)

    def queue_tag(self, key: str, value: str) -> None:
        """A tag from this process, whether or not it is rank 0 (see :func:`set_tag`)."""
        if self._sender is None:
            return
        from mlflow.entities import RunTag

        if self.enabled:
            self._journal([{"kind": "tag", "key": key, "value": str(value)}])
        self._sender.put("tags", [RunTag(key, str(value))])

    def log_params(self, params: dict[str, Any]) -> None:
        if self._sender is None:
            return
        if self.enabled:
            self._journal([{"kind": "params", "params": safe_params(params)}])
        self._sender.put("params", dict(params))

    def start_system_metrics(self) -> None:
        """This node's system metrics (CPU, memory, disk, network; GPU where NVML works), keyed
        by node id. Called on every rank: the first worker on each node runs the monitor
        (:mod:`pipeline.train.sysmetrics`), so multi-node jobs report every node, not rank 0's."""
        from pipeline.train import sysmetrics

        try:
            self._system = sysmetrics.start(self.uri, self.run_id)
        except Exception as exc:  # psutil missing or the like: training goes on without them
            console.warn(f"system metrics are off: {exc}")
            self._system = None

    def close(self) -> sender.Unsent | None:
        """Send what is queued, waiting at most ``drain_s``; write down what was not sent."""
        if self._system is not None:
            try:  # its last flush talks to MLflow: bounded like the rest
                sender.bounded(self._system.stop, 10.0)
            except Exception:
                pass
            self._system = None
        with _OPEN_LOCK:
            if _OPEN.get((self.uri or "", self.run_id or "")) is self:
                del _OPEN[(self.uri or "", self.run_id or "")]
        if self._sender is None:
            return None
        unsent = self._sender.drain(self.drain_s)
        self._sender = None
        if self.journal is not None:
            try:
                self.journal.close()
            except Exception as exc:
                console.warn(f"tracking journal upload failed: {exc}")
            self.journal = None
        # Written down for the driver's one-line summary and for `sync`; said here only when
        # it cannot be written down.
        if not unsent.empty and not (self.run_dir and self._write_unsent(unsent)):
            sender.say(f"warning: not sent to MLflow (rank {self.rank}): {unsent.describe()}")
        return unsent

    def _write_unsent(self, unsent: sender.Unsent) -> bool:
        from pipeline.train import storage

        try:
            storage.write_json(sender.tracking_path(self.run_dir, sender.unsent_name(self.rank)), {
                "metric_points": unsent.metric_points, "dropped_points": unsent.dropped_points,
                "images": unsent.images, "params": unsent.params, "tags": unsent.tags,
                "run_id": self.run_id,
            })
            return True
        except Exception as exc:
            console.warn(f"cannot write the unsent-tracking record: {exc}")
            return False


def _rank() -> int:
    """This process's training rank (0 outside Ray Train)."""
    for key in ("RANK", "WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


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
