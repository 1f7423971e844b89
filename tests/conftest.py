"""Shared fixtures: a real two-node Ray cluster, a real MLflow server, the real images.

Everything started here is stopped by process group (never `ray stop`, which would also kill
clusters that other people on the machine started). Run the suite through `scripts/test.sh` so
that it sits in a loopback-only network namespace; see scripts/netns.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures_s3 import s3_env, s3_server  # noqa: F401 - fixtures for every test module
from helpers import BIN, free_port, stop_session, wait_for_port

REPO = Path(__file__).resolve().parents[1]

# Settings every Ray process (driver or node) of the suite inherits; see spec/PLATFORM.md.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("SR_PIPELINE_QUIET", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


# ---------------------------------------------------------------------------------------------
# Isolation: nothing a test writes lands in the user's home
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def sr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("sr_home")
    monkeypatch.setenv("SR_PIPELINE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


# ---------------------------------------------------------------------------------------------
# Real two-node Ray cluster
# ---------------------------------------------------------------------------------------------


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    temp_dir: Path
    procs: list[subprocess.Popen]
    node_env: dict[str, str]  # what every node has in its own environment beyond the suite's


def _wait_for_nodes(address: str, count: int, timeout: float) -> None:
    code = (
        "import ray,sys,time\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline=time.time()+{timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes())<{count}:\n"
        "    time.sleep(0.5)\n"
        "    if time.time()>deadline: sys.exit('nodes did not join')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout + 60)


def _node_s3_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The S3 fixture server's variables (key, endpoint), as a real node has its own: the
    launcher never forwards the driver's credentials, so a job reading ``s3://`` works on the
    cluster only through these. {} where moto is not installed (the S3 tests skip then)."""
    try:
        return dict(request.getfixturevalue("s3_server").env)
    except pytest.skip.Exception:
        return {}


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[RayCluster]:
    """A real local Ray cluster: a head and a second node joined with `ray start --address`.

    Each node has 1 CPU and the S3 fixture server's credentials in its environment. Yields the
    address; both nodes are stopped afterwards, even when the test failed or the fixture itself
    failed half-way.
    """
    node_env = _node_s3_env(request)  # started first, so it outlives the nodes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    port, dash_port = free_port(), free_port()
    env = dict(os.environ, RAY_TMPDIR=str(temp_dir), **node_env)
    common = ["--num-cpus=1", "--object-store-memory=150000000", "--block"]
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        log = open(temp_dir / "head.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={dash_port}", *common],
                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
            )
        )
        wait_for_port(port, 90, procs[0])
        address = f"127.0.0.1:{port}"
        log = open(temp_dir / "worker.log", "w")  # noqa: SIM115
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common],
                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
            )
        )
        _wait_for_nodes(address, 2, timeout=90)
        yield RayCluster(address, f"http://127.0.0.1:{dash_port}", temp_dir, procs, node_env)
    finally:
        for proc in reversed(procs):
            stop_session(proc)
        for log in logs:
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Real MLflow tracking server
# ---------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    uri: str
    root: Path
    pgid: int = 0  # its process group: a test may freeze it (SIGSTOP) and must resume it (SIGCONT)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 and a free port, sqlite backend, local artifact root."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("mlflow server did not become healthy in 120 s")
                time.sleep(0.5)
            yield MlflowServer(uri, root, proc.pid)
        finally:
            stop_session(proc)


# ---------------------------------------------------------------------------------------------
# Real images (read-only, never copied into the project)
# ---------------------------------------------------------------------------------------------


def _shared_data_dir() -> Path | None:
    candidates = [os.environ.get("SR_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "benchmark").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real images (benchmark/Set5|Set14/HR, train/T91); skips when absent."""
    root = _shared_data_dir()
    if root is None:
        pytest.skip("real images not found (set SR_SHARED_DATA to the folder holding benchmark/ and train/)")
    return root


@pytest.fixture(scope="session")
def set5_dir(shared_data: Path) -> Path:
    return shared_data / "benchmark" / "Set5" / "HR"


@pytest.fixture(scope="session")
def set14_dir(shared_data: Path) -> Path:
    return shared_data / "benchmark" / "Set14" / "HR"


@pytest.fixture(scope="session")
def t91_dir(shared_data: Path) -> Path:
    path = shared_data / "train" / "T91"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


# ---------------------------------------------------------------------------------------------
# The demo, run once per session (the main job: tests of the demo and of the UI browse it)
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoRun:
    home: Path
    result: dict
    stdout: str
    stderr: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`sr-pipeline demo` exactly as `make demo` runs it, in a home of its own.

    Evaluates on Set5 too when the real images are present (as a user's downloaded
    benchmarks would be). A failure here fails every test that needs the demo's run.
    """
    import json

    from helpers import run_cli

    home = tmp_path_factory.mktemp("demo_home")
    out = home / "demo.json"
    args = ["demo", "--json", str(out)]
    shared = _shared_data_dir()
    if shared is not None:
        args += ["--benchmark-dir", str(shared)]
    proc = run_cli(*args, env={"SR_PIPELINE_HOME": str(home)}, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"sr-pipeline demo failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return DemoRun(home, json.loads(out.read_text()), proc.stdout, proc.stderr)
