"""`sr-pipeline ui`: a real MLflow server over the default store, on loopback, stopped cleanly."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fixtures_ops import (
    LOOPBACK_V4_HEX,
    alive,
    group_alive,
    listening_addresses,
    log_validation_run,
    running_ui,
)
from helpers import free_port, run_cli

from pipeline import defaults
from pipeline.ops import ui


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ---------------------------------------------------------------------------------------------
# Planning (no server): one store, loopback, light server, no secrets on the command line
# ---------------------------------------------------------------------------------------------


def test_plan_uses_the_default_store_on_loopback() -> None:
    plan = ui.plan_ui()
    assert not plan.remote
    assert plan.store_uri == defaults.default_tracking_uri()
    assert plan.env["MLFLOW_BACKEND_STORE_URI"] == defaults.default_tracking_uri()
    assert plan.command[plan.command.index("--host") + 1] == "127.0.0.1"
    assert plan.command[plan.command.index("--artifacts-destination") + 1] == str(defaults.artifact_root())
    assert plan.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_TRACKING_URI" not in plan.env
    assert plan.url == "http://127.0.0.1:5000"


def test_plan_keeps_database_passwords_out_of_argv() -> None:
    plan = ui.plan_ui(tracking_uri="postgresql://alice:s3cr3t@db.internal/mlflow", port=5123)
    assert not any("s3cr3t" in part for part in plan.command)
    assert plan.env["MLFLOW_BACKEND_STORE_URI"].endswith("@db.internal/mlflow")


def test_plan_remote_server_is_only_a_url() -> None:
    plan = ui.plan_ui(tracking_uri="https://bob:pw@mlflow.example.org/")
    assert plan.remote and plan.command == []
    assert plan.url == "https://mlflow.example.org"  # credentials never printed


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
     ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("ui.example.org", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert ui.is_loopback(host) is loopback


def test_bad_port_is_one_line() -> None:
    proc = run_cli("ui", "--port", "70000", timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: --port must be between 1 and 65535, got 70000"]


# ---------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------


def test_ui_serves_default_store_on_loopback_refuses_busy_port_and_stops_by_pid(tmp_path: Path) -> None:
    run = log_validation_run(tmp_path)
    with running_ui(tmp_path) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as resp:
            assert resp.status == 200 and resp.read().strip() == b"OK"

        # Bound to loopback only (nothing on 0.0.0.0 or another interface).
        addresses = listening_addresses(server.port)
        assert addresses and set(addresses) == {LOOPBACK_V4_HEX}, addresses

        # The REST API sees the run logged by the tracking code into the default store.
        api = f"{server.url}/api/2.0/mlflow"
        found = _post(f"{api}/runs/search", {"experiment_ids": [run.experiment_id]})
        assert [r["info"]["run_id"] for r in found["runs"]] == [run.run_id]
        query = urllib.parse.urlencode({"run_id": run.run_id, "metric_key": "val/psnr"})
        history = _get(f"{api}/metrics/get-history?{query}")["metrics"]
        assert [(m["step"], m["value"]) for m in history] == list(enumerate(run.psnr))
        query = urllib.parse.urlencode({"run_id": run.run_id, "path": "validation"})
        listed = _get(f"{api}/artifacts/list?{query}")
        assert [f["path"] for f in listed["files"]] == [run.image_path]
        query = urllib.parse.urlencode({"run_uuid": run.run_id, "path": run.image_path})
        with urllib.request.urlopen(f"{server.url}/get-artifact?{query}", timeout=10) as resp:
            assert resp.read() == run.image_bytes

        # A second UI on the same port: one line, exit 1, the first one unharmed.
        busy = run_cli("ui", "--port", str(server.port), timeout=60)
        assert busy.returncode == 1
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), busy.stderr
        assert f"port {server.port} is already in use" in lines[0]
        assert server.proc.poll() is None

        # Stop by pid (SIGTERM to the `sr-pipeline ui` process only): the server goes too.
        assert server.server_pids and all(alive(pid) for pid in server.server_pids)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(group_alive(p) for p in server.server_pids):
            time.sleep(0.2)
        assert not any(group_alive(p) for p in server.server_pids)
        assert _port_closed(server.port)
        assert "stopping the MLflow UI" in server.stderr()


def test_ui_ctrl_c_stops_the_server(tmp_path: Path) -> None:
    with running_ui(tmp_path) as server:
        assert server.server_pids
        server.proc.send_signal(signal.SIGINT)  # what a terminal sends on Ctrl-C
        assert server.proc.wait(30) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(group_alive(p) for p in server.server_pids):
            time.sleep(0.2)
        assert not any(group_alive(p) for p in server.server_pids)
        assert _port_closed(server.port)


def test_ui_non_loopback_host_warns_loudly(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning is printed, then the
    # bind check fails in one line, so nothing is ever exposed by this test.
    proc = run_cli("ui", "--host", "192.0.2.1", "--port", str(free_port()), timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("warning: ") and "NO authentication" in lines[0]
    assert len(lines) == 2, proc.stderr
    assert lines[1].startswith("error: ") and "192.0.2.1 is not an address of this machine" in lines[1]


def test_ui_with_a_remote_server_prints_its_url(mlflow_server) -> None:
    proc = run_cli("ui", "--tracking-uri", mlflow_server.uri, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"MLflow UI: {mlflow_server.uri}"
    assert "nothing to start" in proc.stderr


def test_ui_with_an_unreachable_remote_server_is_one_line() -> None:
    port = free_port()
    proc = run_cli("ui", "--tracking-uri", f"http://127.0.0.1:{port}", timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not reachable" in lines[0], proc.stderr


def test_ui_server_failure_is_reported_in_one_line(tmp_path: Path) -> None:
    # A backend URI MLflow cannot open (a driver that is not installed): the server exits
    # and `ui` says so in one line, exit 1, instead of hanging.
    proc = run_cli(
        "ui", "--port", str(free_port()), "--tracking-uri", "mssql+nosuchdriver://u@127.0.0.1:1/db", timeout=180
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the MLflow server exited"), proc.stderr
