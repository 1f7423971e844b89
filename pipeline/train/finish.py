"""The end of a run in MLflow, bounded in time: the job never waits hours on a tracking server.

After ``fit()`` the driver has four things for MLflow: the journal's points MLflow lacks
(a server that was away, or what the queue bound forced out), the best model, its
registration, the run's final status. They run in order in a daemon thread with one overall
time limit (``tracking_drain_s``); MLflow's own HTTP retries are turned off for them (the
retries here are :func:`pipeline.tracking.with_retries`', quiet). What is not done by then is
written to ``<run dir>/tracking/pending.json`` and summed up in ONE line that says how to
finish it (`sr-pipeline sync`), and the command ends.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from pipeline import console
from pipeline.train import sender, storage, sync


@dataclass
class EndOfRun:
    """What the end of the run should record in MLflow."""

    status: str  # FINISHED | FAILED | KILLED
    best_model: bool = False  # upload <run dir>/best_model
    register: dict[str, Any] | None = None  # {"scale", "psnr", "step"}: register it


def sync_command(run_name: str, storage_path: str) -> str:
    return f"sr-pipeline sync --run-name {run_name} --storage-path {storage_path}"


def complete(uri: str, run_id: str, run_dir: str, end: EndOfRun) -> tuple[dict[str, Any], list[str]]:
    """Do every step (no time limit): (results by step, steps that failed)."""
    results: dict[str, Any] = {}
    failed: list[str] = []
    run_steps(uri, run_id, run_dir, end, results, failed)
    return results, failed


def run_steps(uri: str, run_id: str, run_dir: str, end: EndOfRun, results: dict[str, Any], failed: list[str]) -> None:
    """The steps in order; each records its result (or its name in `failed`) as it ends."""
    from pipeline.tracking import quiet_retries, with_retries
    from pipeline.train import tracking

    def step(name: str, fn: Any) -> None:
        try:
            value = fn()
        except Exception:
            value = None
        if value in (None, False):
            failed.append(name)
        else:
            results[name] = value

    with quiet_retries():
        step("metrics", lambda: with_retries(sync.replay, run_dir, uri, run_id))
        if end.best_model:
            step("best model", lambda: sync.upload_best(uri, run_id, run_dir))
        if end.register is not None:
            if "best model" in failed:
                failed.append("model registration")
            else:
                r = end.register
                step("model registration",
                     lambda: tracking.register_best(uri, run_id, int(r["scale"]), float(r["psnr"]), int(r["step"])))
        step("run status", lambda: tracking.finish_run(uri, run_id, end.status))


def finish(uri: str, run_id: str, run_dir: str, run_name: str, storage_path: str, end: EndOfRun,
           timeout: float) -> dict[str, Any]:
    """Run the end-of-run steps for at most `timeout` s; returns the results of those done."""
    from pipeline.tracking import redact_uri
    from pipeline.train.tracking import bound_worker_http

    bound_worker_http()  # one HTTP attempt per retry from here on (a user's own setting wins)
    results: dict[str, Any] = {}
    failed: list[str] = []
    thread = threading.Thread(target=run_steps, args=(uri, run_id, run_dir, end, results, failed),
                              name="sr-finish-run", daemon=True)
    thread.start()
    thread.join(timeout)
    wanted = ["metrics"] + (["best model"] if end.best_model else []) + (
        ["model registration"] if end.register is not None else []) + ["run status"]
    missing = [name for name in wanted if name not in results]
    if not missing:
        try:
            sync.clear_records(run_dir)
        except Exception:
            pass
        return results

    pending = asdict(end)
    pending["best_model"] = end.best_model and "best model" in missing
    pending["register"] = end.register if "model registration" in missing else None
    try:
        storage.write_json(sender.tracking_path(run_dir, sender.PENDING_FILE), pending)
    except Exception as exc:
        console.warn(f"cannot record the pending end of the run: {exc}")
    what = []
    if "metrics" in missing:
        points = images = tags = 0
        try:
            for _, record in sync.unsent_records(run_dir):
                points += int(record.get("metric_points", 0)) + int(record.get("dropped_points", 0))
                images += int(record.get("images", 0))
                tags += len(record.get("tags") or {})
        except Exception:
            pass
        what.append(f"{points} metric points" if points else "metric points not yet confirmed")
        if tags:
            what.append(f"{tags} tag(s)")
        if images:
            what.append(f"{images} validation image(s) (not kept)")
    what += [f"the run status {end.status}" if name == "run status" else f"the {name}"
             for name in missing if name != "metrics"]
    reason = "did not answer" if thread.is_alive() else "refused or failed"
    console.warn(
        f"MLflow {redact_uri(uri)} {reason} at the end of the run; not logged: {', '.join(what)}; "
        f"all kept in {sender.tracking_path(run_dir, '')}: run `{sync_command(run_name, storage_path)}` "
        "when the server is back"
    )
    return results
