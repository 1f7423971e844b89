"""Which run a `train` command continues or starts (by name, ``--resume``, or a fresh name)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pipeline.config import TrainConfig, to_dict
from pipeline.console import UserError
from pipeline.train import storage


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
