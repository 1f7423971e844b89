"""Exact resume, for real: a local Ray instance, 2 CPU workers, the tiny preset, log_every 1.

An uninterrupted run is the reference. A second run of the same job is stopped with Ctrl-C
(the driver's stop request: both ranks finish the same step and write a checkpoint), rerun
with the same --run-name, and one of its workers is SIGKILLed mid-run
(--max-failures 1: Ray restarts the group from it). Every step's `train/loss` must equal the
reference's bit for bit: model, optimizer, EMA, schedule, each rank's own RNG states and the
loader position all came back exactly.
"""

from __future__ import annotations

import os
import signal

import pytest
from fixtures_train import (
    losses,
    registered_checkpoints,
    runs_named,
    session_workers,
    start_cli,
    tiny_args,
    train_shards,  # noqa: F401 - fixture
    wait_for_line,
)
from helpers import run_cli, stop_session

pytestmark = pytest.mark.slow


# The exact continuation of the data stream is the loader's part: PatchStream(start_step=k)
# yields the batches of an uninterrupted stream from step k on.
def test_ctrl_c_and_a_killed_worker_resume_bit_for_bit(train_shards, tmp_path):  # noqa: F811
    from pipeline import defaults

    store = tmp_path / "store"
    common = ("--cpus-per-worker", "0.5", "--experiment", "train-exact", "--max-failures", "1",
              "--ema", "0.9", "--set", "log_every=1", "--set", "checkpoint_every=8")
    uri = defaults.default_tracking_uri()

    ref = run_cli(*tiny_args(train_shards, store, epochs=2, iters=32, extra=(*common, "--run-name", "ref")), timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = losses(uri, ref.stdout.strip().splitlines()[-1])
    assert sorted(expected) == list(range(1, 65))

    args = tiny_args(train_shards, store, epochs=2, iters=32, extra=(*common, "--run-name", "cut"))
    first = start_cli(args, tmp_path / "first.log")
    try:
        wait_for_line(tmp_path / "first.log", "step 1/64 epoch", first)  # the first log point
        first.send_signal(signal.SIGINT)
        rc = first.wait(180)
    finally:
        stop_session(first)
    log = (tmp_path / "first.log").read_text()
    assert rc == 130, log[-3000:]
    assert "continue with: sr-pipeline train ... --run-name cut" in log
    stopped_at = max(int(c["metrics"]["step"]) for c in registered_checkpoints(store / "cut"))
    run = runs_named(uri, "train-exact", "cut")[0]
    assert run.info.status == "KILLED"
    # the stop wrote a checkpoint at the step where both ranks stopped (not only the periodic ones)
    assert stopped_at == max(losses(uri, run.info.run_id)), (stopped_at, sorted(losses(uri, run.info.run_id)))

    second = start_cli(args, tmp_path / "second.log")
    try:
        # the rerun's first log point, then a worker dies: Ray restarts from the last checkpoint
        wait_for_line(tmp_path / "second.log", "/64 epoch ", second, after="resumed from checkpoint")
        victims = session_workers(second)
        assert len(victims) == 2, victims
        os.kill(victims[-1], signal.SIGKILL)
        rc = second.wait(300)
    finally:
        stop_session(second)
    log = (tmp_path / "second.log").read_text()
    assert rc == 0, log[-3000:]
    assert f"resumed from checkpoint at epoch {stopped_at // 32}, step {stopped_at}" in log
    assert log.count("resumed from checkpoint") == 2, log[-3000:]  # the rerun, then Ray's restart

    run = runs_named(uri, "train-exact", "cut")[0]
    assert run.info.status == "FINISHED"
    got = losses(uri, run.info.run_id)
    assert got == expected  # every step, bit for bit (float equality of the logged values)
