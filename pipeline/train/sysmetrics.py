"""System metrics from every node of a training job, GPU figures included where NVML works.

Why not MLflow's run-level switch: it monitors the process that starts the run (the driver,
which does no work) or, from rank 0, only rank 0's machine. Here one worker per Ray node runs
a :class:`mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` with a node id,
so the run holds ``system/node-1a2b3c4d/cpu_utilization_percentage``,
``system/node-5e6f7a8b/gpu_0_utilization_percentage`` ... side by side, and the run's tags
``sr.node.node-1a2b3c4d`` say which host each id is.

Which worker: the first one on its Ray node to take a lock file named after the run and the
node (an OS lock, released when that process ends, so a restarted worker group elects
again). Ray Train's own local rank groups workers by IP address, which would merge two Ray
nodes sharing a host into one; the lock needs no collective and no coordination.

GPU: MLflow's monitor reads utilisation, memory and power through NVML (the ``nvidia-ml-py``
package, a dependency of ours). Without a GPU, or when NVML fails to initialise, that monitor
is skipped quietly and the CPU/memory/disk/network figures remain.

A job shorter than one sampling interval would log nothing (MLflow publishes after the first
interval): :func:`stop` then publishes the sample it has, so every node shows up in every run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline import console

DEFAULT_INTERVAL_S = 10.0


def node_label(ray_node_id: str) -> str:
    """Key part of a node: short, stable for the node's lifetime, valid in a metric key."""
    return f"node-{ray_node_id[:8]}"


class NodeMetrics:
    """The monitor of one node (see :func:`start`)."""

    def __init__(self, monitor: Any, lock_fd: int, lock_path: Path) -> None:
        self.monitor = monitor
        self.lock_fd, self.lock_path = lock_fd, lock_path
        self.start_step = monitor._logging_step if hasattr(monitor, "_logging_step") else None

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
            if self.start_step is not None and getattr(monitor, "_logging_step", None) == self.start_step:
                # nothing published yet (a job shorter than one interval): log this sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as exc:  # the job's result matters more than its last sample
            console.warn(f"system metrics of this node: last sample not logged ({exc})")
        finally:
            self.lock_path.unlink(missing_ok=True)
            os.close(self.lock_fd)


def _lock_path(run_id: str, label: str) -> Path:
    return Path(tempfile.gettempdir()) / f"sr-pipeline-sysmetrics-{run_id}-{label}.lock"


def _take_node_lock(run_id: str, label: str) -> int | None:
    """An open fd holding this node's monitor lock for the run, or None when another has it."""
    import fcntl

    path = _lock_path(run_id, label)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def start(tracking_uri: str | None, run_id: str | None, interval: float = DEFAULT_INTERVAL_S) -> NodeMetrics | None:
    """Start this node's monitor if this worker is the first on its node; else None.

    Called by every worker of a Ray Train job (see :mod:`pipeline.train.loop`).
    """
    if not (tracking_uri and run_id):
        return None
    try:
        import socket

        import ray

        label = node_label(ray.get_runtime_context().get_node_id())
        lock_fd = _take_node_lock(run_id, label)
        if lock_fd is None:
            return None
    except Exception as exc:  # no lock possible here: rather no node metrics than a failed job
        console.warn(f"system metrics of this node are off: {exc}")
        return None
    # MLflow says at INFO level that it found no GPU, on every node of every CPU job: keep the
    # workers' logs to what matters (its warnings still pass).
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from pipeline.train.tracking import set_tag

        host = socket.gethostname()
        set_tag(tracking_uri, run_id, f"sr.node.{label}", f"{host} ({ray.util.get_node_ip_address()})")
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=interval, resume_logging=True, node_id=label, tracking_uri=tracking_uri
        )
        monitor.start()
    except Exception as exc:  # psutil missing, tracking hiccup: training goes on without them
        console.warn(f"system metrics of node {label} are off: {exc}")
        os.close(lock_fd)
        return None
    return NodeMetrics(monitor, lock_fd, _lock_path(run_id, label))


def stop(metrics: NodeMetrics | None) -> None:
    if metrics is not None:
        metrics.stop()


def gpu_available() -> bool:
    """Whether NVML initialises here (what decides if GPU figures are logged)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False
