"""`pipeline.tracking.with_retries` and the workers' logger: a tracking hiccup costs the job
nothing (the driver's calls retry; the workers' entries queue, see pipeline.train.sender).
"""

from __future__ import annotations

import pytest

from pipeline.tracking import with_retries


class Flaky:
    """Fails `failures` times with a network-like error, then returns its arguments."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"connection refused (call {self.calls})")
        return args, kwargs


def test_a_hiccup_is_retried_and_the_call_goes_through(capsys):
    fn = Flaky(failures=1)
    assert with_retries(fn, "run", 3, attempts=3, what="MLflow log metrics", key="v") == (("run", 3), {"key": "v"})
    assert fn.calls == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: MLflow log metrics failed (attempt 1/3), retrying in 1s: connection refused (call 1)"]


def test_an_outage_is_survived_without_the_call(capsys):
    fn = Flaky(failures=10)
    assert with_retries(fn, attempts=2, what="MLflow log image") is None  # training goes on
    assert fn.calls == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "warning: MLflow log image failed after 2 attempts, continuing without it: connection refused (call 2)"


def test_no_retry_when_the_first_call_works(capsys):
    fn = Flaky(failures=0)
    assert with_retries(fn, 1) == ((1,), {})
    assert fn.calls == 1 and capsys.readouterr().err == ""


def test_a_dead_tracking_server_does_not_stop_rank_0s_logging(monkeypatch: pytest.MonkeyPatch, capsys):
    """A real MLflow client against a port nobody listens on: rank 0 starts and logs anyway,
    nothing waits on the server, and the end says what was not sent."""
    from helpers import free_port

    from pipeline.train.tracking import WORKER_HTTP_ENV, MetricLogger

    for key, value in WORKER_HTTP_ENV.items():  # what a training worker runs with
        monkeypatch.setenv(key, value)
    logger = MetricLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, enabled=True, run_dir="", drain_s=0.5)
    assert logger.floors == {}  # no journal: nothing is skipped
    logger.log({"train/loss": 0.5}, 10)
    logger.set_tag("sr.world_size", "2")
    left = logger.close()
    assert left.metric_points == 1 and left.tags == {"sr.world_size": "2"}
    err = capsys.readouterr().err
    assert "warning: not sent to MLflow (rank 0): 1 metric points, 1 tag(s)" in err


def test_workers_leave_retrying_to_the_sender_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default (7 retries, 120 s timeout) would hide an outage and delay the end."""
    import os

    from pipeline.train.tracking import WORKER_HTTP_ENV, bound_worker_http

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")  # recorded: undone after the test
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's choice
    bound_worker_http()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" == WORKER_HTTP_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
