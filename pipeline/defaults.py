"""The one place that decides where runs, artifacts and checkpoints live by default.

`train`, `evaluate`, `demo` and `ui` all call these functions, so a run written by one command
is always visible to the others without any flag. Everything sits under one home directory
(``$SR_PIPELINE_HOME``, default ``~/.sr-pipeline``) rather than the current directory, so that
`sr-pipeline ui` started anywhere shows the runs made anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SR_PIPELINE_HOME"


def home() -> Path:
    """Root of everything sr-pipeline writes when the user gives no location."""
    raw = os.environ.get(HOME_ENV)
    return Path(raw).expanduser().resolve() if raw else Path.home() / ".sr-pipeline"


def default_tracking_uri() -> str:
    """The embedded MLflow store (sqlite) used when nothing else is configured."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def tracking_uri(explicit: str | None = None) -> str:
    """Tracking URI in effect: an explicit value, then ``MLFLOW_TRACKING_URI``, then ours."""
    if explicit:
        return explicit
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def is_default_local_store(uri: str) -> bool:
    return uri == default_tracking_uri()


def artifact_root() -> Path:
    """Artifact directory paired with the embedded store (the UI serves it from here)."""
    return home() / "mlartifacts"


def storage_path() -> Path:
    """Default Ray Train storage path for checkpoints (node-local: fine on one machine only)."""
    return home() / "ray_results"


def data_dir() -> Path:
    """Default download / shard location."""
    return home() / "data"
