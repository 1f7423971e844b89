"""What the driver resolves for the workers before anything starts: the :class:`JobSpec`.

Its own module because both sides need it: the driver fills it (:func:`resolve_data`, then
the run's ids) and every worker rebuilds it from the train-loop config. Only the standard
library at import time, so the driver can read the manifest before Ray or torch load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import TrainConfig


@dataclass
class JobSpec:
    """What the driver resolved for the workers (absolute paths, counts, ids)."""

    train_shards: list[str]
    train_counts: list[int]
    val_shards: list[str] = field(default_factory=list)
    val_folder: str | None = None
    val_count: int = 0
    run_dir: str = ""  # <storage>/<run name>, where best_model/ goes
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    lr: float = 1e-4  # effective learning rate (after optional batch scaling)


def resolve_data(cfg: TrainConfig) -> JobSpec:
    """Shard lists and counts from the manifest(s), size-checked; the validation source; clear
    errors (see :func:`pipeline.train.datasource.resolve_job`)."""
    from pipeline.train.datasource import resolve_job

    return resolve_job(cfg)
