"""Bring a run's MLflow record up to date from what training kept beside its checkpoints.

Used two ways: by the driver at the end of every `train` (bounded in time, see
:mod:`pipeline.train.finish`) and by `sr-pipeline sync` once a tracking server that was away
is back. Idempotent: metric points MLflow already has (same key and step) are skipped, a tag
is set only when its value differs, params keep their first values, the best model is
uploaded only when the run has none, registration is skipped when that step is registered.

Sources, all under ``<run dir>/tracking/`` (see :mod:`pipeline.train.sender`):
``journal.jsonl`` (rank 0's metrics, tags, params), ``unsent-rank<R>.json`` (tags a rank
could not deliver), ``pending.json`` (end-of-run steps the driver could not do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.train import sender, storage

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call


@dataclass
class Replayed:
    metric_points: int = 0
    tags: int = 0
    params: int = 0
    steps_done: list[str] = field(default_factory=list)


def unsent_records(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, record) of every ``unsent-rank*.json`` of the run."""
    import pyarrow.fs as pafs

    folder = storage.join(run_dir, sender.TRACKING_DIR)
    if not storage.exists(folder):
        return []
    fs, p = storage._fs(folder)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=False)):
        if info.base_name.startswith("unsent-rank") and info.base_name.endswith(".json"):
            path = storage.join(folder, info.base_name)
            record = storage.read_json(path)
            if record is not None:
                out.append((path, record))
    return sorted(out)


def replay(run_dir: str, uri: str, run_id: str) -> Replayed:
    """Send what the journal (and the unsent records) hold and MLflow lacks; raises on failure."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.train.tracking import log_params_once

    client = MlflowClient(tracking_uri=uri)
    records = sender.read_journal(sender.tracking_path(run_dir, sender.JOURNAL_FILE))
    done = Replayed()

    points: dict[str, dict[int, Metric]] = {}
    tags: dict[str, str] = {}
    params: dict[str, Any] = {}
    for r in records:
        kind = r.get("kind")
        if kind == "metric":
            key, step = str(r["key"]), int(r["step"])
            points.setdefault(key, {}).setdefault(step, Metric(key, float(r["value"]), int(r["ts"]), step))
        elif kind == "tag":
            tags[str(r["key"])] = str(r["value"])
        elif kind == "params":
            for k, v in (r.get("params") or {}).items():
                params.setdefault(k, v)
    for _, record in unsent_records(run_dir):
        tags.update({str(k): str(v) for k, v in (record.get("tags") or {}).items()})

    for key, by_step in sorted(points.items()):
        have = {m.step for m in client.get_metric_history(run_id, key)}
        missing = [by_step[s] for s in sorted(by_step) if s not in have]
        for i in range(0, len(missing), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=missing[i : i + MAX_METRICS_PER_BATCH])
        done.metric_points += len(missing)
    run = client.get_run(run_id)
    changed = [RunTag(k, v) for k, v in sorted(tags.items()) if run.data.tags.get(k) != v]
    if changed:
        client.log_batch(run_id, tags=changed)
        done.tags = len(changed)
    new_params = {k: v for k, v in params.items() if k not in run.data.params}
    if new_params:
        log_params_once(client, run_id, new_params)
        done.params = len(new_params)
    return done


def has_best_model(uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    return bool(MlflowClient(tracking_uri=uri).list_artifacts(run_id, "best_model"))


def upload_best(uri: str, run_id: str, run_dir: str) -> bool:
    """The run's ``best_model/`` into MLflow unless it is there already; True when done."""
    from pipeline.train import tracking

    if has_best_model(uri, run_id):
        return True
    tmp = storage.download_dir(storage.join(run_dir, storage.BEST_DIR))
    try:
        tracking.log_best_model(uri, run_id, tmp.name)
    finally:
        tmp.cleanup()
    return has_best_model(uri, run_id)


def clear_records(run_dir: str) -> None:
    """Forget the unsent and pending records once MLflow holds everything."""
    for path, _ in unsent_records(run_dir):
        storage.delete(path)
    storage.delete(sender.tracking_path(run_dir, sender.PENDING_FILE))


def sync_run(run_name: str | None, storage_path: str | None, tracking_uri: str | None = None) -> str:
    """`sr-pipeline sync`: the whole catch-up for one run; returns a one-line summary."""
    from pipeline import defaults
    from pipeline.console import UserError
    from pipeline.tracking import check_reachable, redact_uri
    from pipeline.train import finish
    from pipeline.train.credentials import credentials_in_env

    storage_path = storage.resolve(storage_path, defaults.storage_path())
    if not run_name:
        runs = storage.list_runs(storage_path)
        if not runs:
            raise UserError(f"no run under {storage_path} (give --storage-path and --run-name)")
        run_name = runs[-1][1]
    run_dir = storage.join(storage_path, run_name)
    record = storage.read_json(storage.join(run_dir, storage.RUN_FILE))
    if record is None or not record.get("mlflow_run_id"):
        raise UserError(f"{run_dir}: not a run of `sr-pipeline train` (no {storage.RUN_FILE} with an MLflow run id)")
    given = tracking_uri or record.get("tracking_uri") or ""
    check_reachable(given)  # a server still away: one line, nothing changed
    uri, run_id = redact_uri(given), str(record["mlflow_run_id"])
    pending = storage.read_json(sender.tracking_path(run_dir, sender.PENDING_FILE))
    with credentials_in_env(given):
        if pending:
            end = finish.EndOfRun(status=pending["status"], best_model=bool(pending.get("best_model")),
                                  register=pending.get("register"))
        else:  # nothing pending at the end: the points only (the status stays as it is)
            end = None
        results, failed = finish.complete(uri, run_id, run_dir, end) if end else _replay_only(uri, run_id, run_dir)
    if failed:
        raise UserError(f"sync of run {run_name} incomplete: {', '.join(failed)} failed; run it again")
    clear_records(run_dir)
    replayed: Replayed = results["metrics"]
    parts = [f"{replayed.metric_points} metric points, {replayed.tags} tags, {replayed.params} params added"]
    if "best model" in results:
        parts.append("best model uploaded")
    if results.get("model registration"):
        parts.append(f"registered version {results['model registration']}")
    if end is not None and "run status" in results:
        parts.append(f"status {end.status}")
    return f"synced run {run_name} (MLflow run {run_id}): " + "; ".join(parts)


def _replay_only(uri: str, run_id: str, run_dir: str) -> tuple[dict[str, Any], list[str]]:
    from pipeline.tracking import with_retries

    result = with_retries(replay, run_dir, uri, run_id, what="MLflow replay")
    return ({"metrics": result}, []) if result is not None else ({}, ["metrics"])
