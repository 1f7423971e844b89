"""Elastic workers (issue 12, item 4): `--workers MIN-MAX` on a real multi-node Ray cluster.

A third node joins the session's two-node cluster for this test only, and the test waits until
all three CPUs are free (earlier tests' workers gone), so the job starts with a worker on each
node. Then the third node is killed at once (SIGKILL to its raylet and workers, as when a machine
goes away): the job goes on with two workers, in the same run, from its last checkpoint, at the
same global batch. The node comes back: within the resize check (`elastic_check_s`, 5 s here)
the job grows to three workers again, from its newest checkpoint. Ctrl-C ends it. MLflow
records the worker count over time (3, 2, 3), and every step's loss exactly once.

Each phase waits on what the job itself reports (the `train/workers` metric, a registered
checkpoint), never on a fixed time, so a slow machine only makes it slower.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from fixtures_train import (
    cluster_args,
    metric_steps,
    registered_checkpoints,
    runs_named,
    start_cli,
    tiny_args,
    train_shards,  # noqa: F401 - fixture
    wait_for_checkpoint,
)
from helpers import BIN, kill_session, stop_session

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PHASE_TIMEOUT_S = 300


def _join_node(cluster, log_path) -> subprocess.Popen:
    from conftest import _wait_for_nodes

    env = dict(os.environ, RAY_TMPDIR=str(cluster.temp_dir), **cluster.node_env)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", "--object-store-memory=150000000", "--block"],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_nodes(cluster.address, 3, timeout=90)
    except BaseException:
        stop_session(proc)
        raise
    return proc


def _wait_for_free_cpus(address: str, count: int, timeout: float = 120) -> None:
    """Until `count` CPUs of the cluster are unreserved (workers of earlier tests have gone)."""
    code = (
        "import ray,sys,time\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline=time.time()+{timeout}\n"
        f"while ray.available_resources().get('CPU',0)<{count}:\n"
        "    time.sleep(0.5)\n"
        "    if time.time()>deadline: sys.exit(f'CPUs still reserved: {ray.available_resources()}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout + 60)


def _workers_over_time(uri: str, experiment: str, name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    runs = runs_named(uri, experiment, name)
    if not runs:
        return []
    history = MlflowClient(uri).get_metric_history(runs[0].info.run_id, "train/workers")
    return [int(m.value) for m in sorted(history, key=lambda m: m.step)]


def _wait_for_workers(uri: str, name: str, expected: list[int], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen = _workers_over_time(uri, "train-elastic", name)
        if seen == expected:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) with workers {seen}, waiting for {expected}")
        time.sleep(0.5)
    raise AssertionError(f"workers over time {seen}, waited {PHASE_TIMEOUT_S}s for {expected}")


def test_an_elastic_job_shrinks_when_a_node_leaves_and_grows_back_when_it_returns(
    ray_cluster, mlflow_server, train_shards, tmp_path  # noqa: F811
):
    store, name, uri = tmp_path / "store", "elastic", mlflow_server.uri
    node = _join_node(ray_cluster, tmp_path / "node3.log")
    procs = [node]
    try:
        _wait_for_free_cpus(ray_cluster.address, 3)
        # Far more steps than the test needs: it ends the job with Ctrl-C once it has grown back.
        args = tiny_args(train_shards, store, epochs=1, iters=100_000, workers=2,
                         extra=(*cluster_args(ray_cluster, uri), "--workers", "2-3", "--max-failures", "4",
                                "--checkpoint-every", "4", "--experiment", "train-elastic", "--run-name", name,
                                "--set", "elastic_check_s=5"))
        proc = start_cli(args, tmp_path / "train.log")
        procs.append(proc)

        _wait_for_workers(uri, name, [3], proc)  # started with every node
        wait_for_checkpoint(store / name, proc)
        kill_session(node)  # the third machine goes away (killed at once, as a lost machine)
        _wait_for_workers(uri, name, [3, 2], proc)  # went on with two, in the same run
        shrunk = len(registered_checkpoints(store / name))
        wait_for_checkpoint(store / name, proc, count=shrunk + 1)  # two workers made progress

        node = _join_node(ray_cluster, tmp_path / "node3.log")  # the machine is back
        procs.append(node)
        _wait_for_workers(uri, name, [3, 2, 3], proc)  # and the job grew again

        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=PHASE_TIMEOUT_S)
    finally:
        for p in reversed(procs):
            stop_session(p)
    log = (tmp_path / "train.log").read_text()
    assert rc == 130, log[-4000:]  # Ctrl-C: stopped at a log point with a checkpoint
    assert "starting run elastic: 2-3 worker(s)" in log
    assert log.count("resumed from checkpoint at epoch") >= 2, log[-4000:]  # after shrinking and growing

    runs = runs_named(uri, "train-elastic", name)
    assert len(runs) == 1  # one run through both resizes
    run_id = runs[0].info.run_id
    assert _workers_over_time(uri, "train-elastic", name) == [3, 2, 3]
    steps = metric_steps(uri, run_id, "train/loss")
    assert steps == list(range(2, steps[-1] + 1, 2)), steps  # each step once, none missing
    # Ctrl-C wrote a checkpoint at the step where every rank stopped
    assert max(int(c["metrics"]["step"]) for c in registered_checkpoints(store / name)) == steps[-1]
    params = runs[0].data.params
    assert params["batch_size"] == "4" and params["derived.world_size"] == "2-3"
