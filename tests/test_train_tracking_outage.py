"""A tracking server frozen under a running job (issue 12, item 1), for real.

One job (local Ray, 2 CPU workers, tiny preset) against the session's real MLflow server:
the server is frozen (SIGSTOP) mid-run and resumed (SIGCONT) a while later, then frozen again
before the end and left frozen until the command has ended. The speed during the freeze is
measured in benchmarks/tracking_outage.py; here the functional parts: the job finishes with its
checkpoints, what was queued during the first freeze arrives (in step order) after SIGCONT,
the never-returning server costs a bounded wait and ONE line, and `sr-pipeline sync` later
completes the run in MLflow with every step exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from fixtures_train import metric_steps, runs_named, start_cli, tiny_args, train_shards  # noqa: F401
from helpers import run_cli, stop_session

pytestmark = pytest.mark.slow


def _journal_step(journal: Path) -> int:
    """The last train/loss step rank 0 wrote to its journal (0 before the first)."""
    try:
        lines = journal.read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("key") == "train/loss":
            steps.append(int(r["step"]))
    return max(steps)


def _wait_for_step(journal: Path, step: int, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _journal_step(journal) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before step {step}")
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} not reached in {timeout:.0f}s")
        time.sleep(0.1)


def _run_id(uri: str) -> str:
    return runs_named(uri, "train-outage", "outage")[0].info.run_id


def test_a_frozen_tracking_server_costs_the_job_nothing_and_sync_completes_the_run(
    mlflow_server, train_shards, tmp_path  # noqa: F811
):
    from mlflow.tracking import MlflowClient

    uri, store = mlflow_server.uri, tmp_path / "store"
    args = tiny_args(train_shards, store, epochs=4, iters=8,
                     extra=("--cpus-per-worker", "0.5", "--run-name", "outage", "--experiment", "train-outage",
                            "--tracking-uri", uri, "--set", "tracking_drain_s=5"))
    journal = store / "outage" / "tracking" / "journal.jsonl"
    proc = start_cli(args, tmp_path / "train.log")
    frozen = False
    try:
        _wait_for_step(journal, 4, proc)
        os.killpg(mlflow_server.pgid, signal.SIGSTOP)
        frozen = True
        frozen_at = _journal_step(journal)
        _wait_for_step(journal, frozen_at + 8, proc)  # four log calls, at least, while frozen
        thawed_at = _journal_step(journal)
        os.killpg(mlflow_server.pgid, signal.SIGCONT)
        frozen = False
        queued = list(range(frozen_at + 2, thawed_at + 1, 2))
        deadline = time.monotonic() + 120
        while not set(queued) <= set(metric_steps(uri, _run_id(uri), "train/loss")):
            assert time.monotonic() < deadline, "what was queued during the freeze did not arrive"
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before the second freeze"
        os.killpg(mlflow_server.pgid, signal.SIGSTOP)  # and it never comes back while the job runs
        frozen = True
        rc = proc.wait(timeout=240)
    finally:
        if frozen:
            os.killpg(mlflow_server.pgid, signal.SIGCONT)
        stop_session(proc)
    log = (tmp_path / "train.log").read_text()
    assert rc == 0, log[-4000:]

    # the checkpoints are intact: the last one is the end of training
    ckpts = sorted(p for p in (store / "outage").glob("checkpoint_*") if p.is_dir())
    assert torch.load(ckpts[-1] / "train_state.pt", weights_only=True)["progress"]["step"] == 32
    # one line says what was not logged and how to finish it
    said = [line for line in log.splitlines() if "at the end of the run; not logged:" in line]
    assert len(said) == 1, log[-3000:]
    assert "the run status FINISHED" in said[0]
    assert f"sr-pipeline sync --run-name outage --storage-path {store}" in said[0]

    # what was queued during the first freeze arrived after SIGCONT (waited for above), once
    # each and in step order
    run_id = _run_id(uri)
    steps = metric_steps(uri, run_id, "train/loss")
    assert [s for s in steps if frozen_at < s <= thawed_at] == queued, (frozen_at, thawed_at, steps)
    assert steps == sorted(set(steps))

    # later, with the server back: sync completes the run, every step once; again: nothing new
    proc = run_cli("sync", "--run-name", "outage", "--storage-path", str(store), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "status FINISHED" in proc.stderr and "best model uploaded" in proc.stderr
    assert metric_steps(uri, run_id, "train/loss") == list(range(2, 33, 2))
    assert metric_steps(uri, run_id, "val/psnr") == [8, 16, 24, 32]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "best_model")} >= {"best_model/model.pt"}
    assert [v for v in client.search_model_versions("name='dnlan-x2'") if v.run_id == run_id]
    again = run_cli("sync", "--run-name", "outage", "--storage-path", str(store), timeout=120)
    assert again.returncode == 0 and "0 metric points, 0 tags, 0 params added" in again.stderr
    assert metric_steps(uri, run_id, "train/loss") == list(range(2, 33, 2))
