"""Tracking that never blocks training, without Ray: the sender, the journal, `sync`.

A real MLflow server (the session fixture) and a real closed port stand for a healthy and
an absent tracking server; the end-to-end freeze (SIGSTOP) of a server under a running job
is in test_train_tracking_outage.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import free_port

from pipeline.train import finish, sender, storage, sync
from pipeline.train.tracking import MetricLogger


def _run(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import experiment_id

    client = MlflowClient(tracking_uri=uri)
    return client.create_run(experiment_id("sender-tests", uri), run_name=name).info.run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def test_resumed_logger_sends_each_step_once_and_the_journal_says_what_was_logged(mlflow_server, tmp_path):
    uri, run_dir = mlflow_server.uri, str(tmp_path / "run")
    run_id = _run(uri, "resume")
    first = MetricLogger(uri, run_id, enabled=True, run_dir=run_dir, drain_s=30)
    for step in range(1, 6):
        first.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
    first.set_tag("sr.world_size", "2")
    first.log_params({"derived.precision": "fp32"})
    assert first.close().empty
    # a resumed worker group repeats steps 4-5 (from the checkpoint at step 3) and goes on
    second = MetricLogger(uri, run_id, enabled=True, run_dir=run_dir, drain_s=30)
    assert second.floors == {"train/loss": 5, "train/lr": 5}
    for step in range(4, 8):
        second.log({"train/loss": 1.0 / step}, step)
    second.close()

    assert _history(uri, run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 8)]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.tags["sr.world_size"] == "2" and run.data.params["derived.precision"] == "fp32"
    journal = [json.loads(line) for line in (tmp_path / "run/tracking/journal.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in journal if r["kind"] == "metric" and r["key"] == "train/loss"]
    assert steps == list(range(1, 8))
    # nothing left to replay: sync adds nothing, however often it runs
    assert sync.replay(run_dir, uri, run_id).metric_points == 0


def test_the_worker_count_is_logged_at_the_first_new_step_of_each_worker_group(mlflow_server, tmp_path, monkeypatch):
    uri, run_dir = mlflow_server.uri, str(tmp_path / "run")
    run_id = _run(uri, "workers")
    monkeypatch.setenv("WORLD_SIZE", "3")
    first = MetricLogger(uri, run_id, enabled=True, run_dir=run_dir, drain_s=30)
    for step in range(2, 12, 2):
        first.log({"train/loss": 1.0 / step}, step)
    first.close()
    # an elastic group of 2 resumes from the checkpoint at step 6: steps 8-10 repeat, 12 is new
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = MetricLogger(uri, run_id, enabled=True, run_dir=run_dir, drain_s=30)
    for step in range(8, 16, 2):
        second.log({"train/loss": 1.0 / step}, step)
    second.close()
    assert _history(uri, run_id, "train/workers") == [(2, 3.0), (12, 2.0)]
    assert [s for s, _ in _history(uri, run_id, "train/loss")] == list(range(2, 16, 2))


def test_a_closed_port_costs_nothing_and_sync_replays_everything_later(mlflow_server, tmp_path, capsys, monkeypatch):
    """The run exists on the real server; the workers only ever see a port nobody listens on
    (the server "away"); afterwards `sync` against the real server completes the run."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.tracking import WORKER_HTTP_ENV

    for key, value in WORKER_HTTP_ENV.items():  # as in a worker; finish() would set them for good
        monkeypatch.setenv(key, value)

    away = f"http://127.0.0.1:{free_port()}"
    run_id = _run(mlflow_server.uri, "away")
    store = tmp_path / "store"
    run_dir = str(store / "away")
    storage.write_json(storage.join(run_dir, storage.RUN_FILE),
                       {"run_name": "away", "mlflow_run_id": run_id, "tracking_uri": away})
    rank0 = MetricLogger(away, run_id, enabled=True, run_dir=run_dir, drain_s=0.5)
    rank1 = MetricLogger(away, run_id, enabled=False, run_dir=run_dir, drain_s=0.5)
    rank1.rank = 1
    for step in range(2, 21, 2):
        rank0.log({"train/loss": 10.0 - step / 4}, step)
    rank0.set_tag("sr.nodes_used", "1")
    from pipeline.train import tracking

    tracking.set_tag(away, run_id, "sr.params_sha256.rank1", "abc")  # routed through rank1's sender
    # (each logger registers itself per (uri, run): the last one opened carries direct calls)
    left0, left1 = rank0.close(), rank1.close()
    assert left0.metric_points + left1.metric_points == 10
    records = {Path(p).name: r for p, r in sync.unsent_records(run_dir)}
    assert sum(r["metric_points"] for r in records.values()) == 10
    assert {k for r in records.values() for k in r["tags"]} == {"sr.nodes_used", "sr.params_sha256.rank1"}

    # the driver's end of the run against the absent server: bounded, ONE line, pending kept
    capsys.readouterr()
    done = finish.finish(away, run_id, run_dir, "away", str(store), finish.EndOfRun("FINISHED"), timeout=5)
    assert "run status" not in done
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "not logged: 10 metric points, 2 tag(s), the run status FINISHED" in err[0]
    assert f"sr-pipeline sync --run-name away --storage-path {store}" in err[0]
    assert storage.read_json(str(store / "away/tracking/pending.json"))["status"] == "FINISHED"

    line = sync.sync_run("away", str(store), mlflow_server.uri)
    assert "10 metric points, 2 tags" in line and "status FINISHED" in line
    run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sr.params_sha256.rank1"] == "abc" and run.data.tags["sr.nodes_used"] == "1"
    assert [s for s, _ in _history(mlflow_server.uri, run_id, "train/loss")] == list(range(2, 21, 2))
    assert not list((store / "away/tracking").glob("unsent-*")) and not (store / "away/tracking/pending.json").exists()
    # again: nothing new, no duplicate
    assert "0 metric points, 0 tags" in sync.sync_run("away", str(store), mlflow_server.uri)
    assert len(_history(mlflow_server.uri, run_id, "train/loss")) == 10


def test_the_bound_forces_out_the_oldest_metric_batches_and_counts_them():
    away = f"http://127.0.0.1:{free_port()}"
    s = sender.Sender(away, "0" * 32, max_entries=3)
    from mlflow.entities import Metric, RunTag

    s.put("tags", [RunTag("a", "1")])
    for step in range(10):
        s.put("metrics", [Metric("train/loss", 1.0, 0, step), Metric("train/lr", 1.0, 0, step)])
    left = s.drain(0.2)
    # tags are never forced out; at most 3 entries wait; 2 points per forced-out batch
    assert left.tags == {"a": "1"}
    assert left.metric_points + left.dropped_points == 20
    assert left.dropped_points >= 14 and left.metric_points <= 4


def test_sync_says_plainly_when_the_server_is_still_away(tmp_path):
    from helpers import run_cli

    storage.write_json(str(tmp_path / "r" / storage.RUN_FILE),
                       {"run_name": "r", "mlflow_run_id": "1" * 32, "tracking_uri": f"http://127.0.0.1:{free_port()}"})
    proc = run_cli("sync", "--run-name", "r", "--storage-path", str(tmp_path))
    assert proc.returncode == 1
    assert "is not reachable" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("per,workers,gpus,ok", [(1, 2, 2, True), (0.5, 2, 4, False), (1, 4, 2, False), (2, 1, 2, True)])
def test_gpu_requests_that_cannot_work_with_nccl_are_refused(per, workers, gpus, ok):
    from pipeline.config import TrainConfig, load_config
    from pipeline.console import UserError
    from pipeline.train.cluster import check_gpu_request

    cfg = load_config(TrainConfig, overrides={"gpus_per_worker": per, "workers": workers, "batch_size": 16})
    if ok:
        check_gpu_request(cfg, True, gpus)
    else:
        with pytest.raises(UserError, match="--gpus-per-worker 0.5: each NCCL rank|needs 4 GPUs but the cluster has 2"):
            check_gpu_request(cfg, True, gpus)
    check_gpu_request(cfg, False, 0)  # CPU training: gpus_per_worker does not apply


def test_sigterm_while_fit_waits_acts_like_ctrl_c():
    """The driver's SIGTERM (a scheduler, a spot node going away) takes the Ctrl-C path."""
    import signal

    from pipeline.train.fit import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
    assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # restored after fit()
