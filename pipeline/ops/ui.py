"""`sr-pipeline ui`: the MLflow UI over the same store that `train`, `evaluate` and `demo` write.

Why a wrapper rather than telling users to type `mlflow server ...`:

- the store is decided in ONE place (:mod:`pipeline.defaults`); a bare `mlflow ui` started in
  another directory would open an empty ``./mlflow.db`` and users would think their runs are lost;
- the MLflow server has no authentication, so it binds loopback unless the user insists, and
  then we say loudly what that means;
- a busy port is one line, not a uvicorn traceback; Ctrl-C (or SIGTERM to our pid) stops the
  whole server process group, so no orphan keeps the port.

The server is MLflow's own (`mlflow server`, a subprocess); nothing here re-implements it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import console, defaults, tracking
from pipeline.console import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
# A first start on a new store runs MLflow's schema migrations: allow time on a slow machine.
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass
class UiPlan:
    """What `sr-pipeline ui` will do, decided before anything starts (pure, testable)."""

    url: str  # where a browser goes
    store_uri: str  # the tracking store shown (credentials redacted when printed)
    remote: bool  # True: the store is already an HTTP server, nothing to start
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it resolves to something reachable from outside


def _url_host(host: str) -> str:
    """Host as it appears in a URL; a wildcard bind is browsed through loopback."""
    if host in {"0.0.0.0", "::", "[::]"}:
        return "127.0.0.1"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def plan_ui(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tracking_uri: str | None = None,
    workers: int = 1,
) -> UiPlan:
    """Decide the server command for the tracking store in effect (see :mod:`pipeline.defaults`)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    uri = tracking.resolve_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        return UiPlan(url=tracking.redact_uri(uri).rstrip("/"), store_uri=uri, remote=True)
    if uri.startswith("databricks"):
        raise UserError(f"tracking URI {uri!r} is a Databricks workspace: open it in Databricks, there is no UI to start")
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 no longer serves by default; "
            "use a database URI (e.g. sqlite:////abs/path/mlflow.db)"
        )
    env = dict(os.environ)
    # The backend URI goes through the environment, not argv: a database password must not
    # show up in `ps` output for every user on the machine.
    env["MLFLOW_BACKEND_STORE_URI"] = uri
    # Job execution starts a Huey consumer pool (10 processes, ~2 GB) that browsing never
    # needs; the user can still opt in by exporting the variable.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server must not talk to itself as a client
    artifacts = defaults.artifact_root()
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        # Experiments created by sr-pipeline carry absolute artifact locations under
        # artifact_root(); experiments created from the UI land in the same directory.
        "--artifacts-destination", str(artifacts),
    ]
    log_dir = defaults.home() / "logs"
    return UiPlan(
        url=f"http://{_url_host(host)}:{port}",
        store_uri=uri,
        remote=False,
        command=command,
        env=env,
        log_path=log_dir / f"mlflow-ui-{port}.log",
    )


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound (None when it can).

    SO_REUSEADDR is set like the real server sets it, so a port that only has connections in
    TIME_WAIT is not mistaken for a busy one.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is already in use"
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges (below 1024)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return exc.strerror or str(exc)
    return None


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _last_line(path: Path | None) -> str:
    """The most telling line of a server log (the last non-empty one) for a one-line error."""
    if path is None or not path.exists():
        return ""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def start_server(plan: UiPlan) -> subprocess.Popen:
    """Start `mlflow server` in a session of its own, so that stopping it stops all its workers."""
    assert plan.log_path is not None
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.log_path, "ab") as log:
        return subprocess.Popen(
            plan.command,
            env=plan.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until_healthy(plan: UiPlan, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    probe_url = plan.url
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = _last_line(plan.log_path)
            raise UserError(
                f"the MLflow server exited with code {proc.returncode} before it was ready"
                + (f": {detail}" if detail else "")
                + f" (log: {plan.log_path})"
            )
        if _healthy(probe_url):
            return
        time.sleep(0.3)
    raise UserError(f"the MLflow server did not answer {probe_url}/health within {timeout:.0f}s (log: {plan.log_path})")


def stop_server(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group; SIGKILL whatever is left after `grace` seconds."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Stop(Exception):
    """Raised by our signal handler so the main loop unwinds into the cleanup path."""


def _install_stop_handlers() -> Callable[[], None]:
    """SIGTERM/SIGHUP behave like Ctrl-C; returns a function restoring the old handlers."""

    def handler(signum, frame):  # noqa: ARG001 - signal API
        raise _Stop(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def warn_if_exposed(host: str) -> None:
    if is_loopback(host):
        return
    console.warn(
        f"binding the MLflow UI to {host}: the MLflow server has NO authentication; anyone who "
        "can reach this address can read and delete every run, artifact and model. Prefer "
        "127.0.0.1 with an SSH tunnel (ssh -L 5000:127.0.0.1:5000 host), or a team server "
        "behind authentication (cluster/README.md)."
    )


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tracking_uri: str | None = None,
    workers: int = 1,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the UI until Ctrl-C/SIGTERM (or the server dies); returns the exit code."""
    plan = plan_ui(host, port, tracking_uri, workers)
    if plan.remote:
        tracking.check_reachable(plan.store_uri)
        echo(f"MLflow UI: {plan.url}")
        console.info("the tracking store is a server already; nothing to start here")
        return 0
    warn_if_exposed(host)
    busy = port_in_use(host, port)
    if busy:
        raise UserError(f"cannot serve the MLflow UI on {host}:{port}: {busy}; choose another --port or --host")
    restore = _install_stop_handlers()
    proc: subprocess.Popen | None = None
    try:
        proc = start_server(plan)
        console.info(f"starting the MLflow UI over {tracking.redact_uri(plan.store_uri)} (log: {plan.log_path})")
        wait_until_healthy(plan, proc)
        echo(f"MLflow UI: {plan.url}")
        console.info("press Ctrl-C to stop")
        code = proc.wait()
        detail = _last_line(plan.log_path)
        raise UserError(f"the MLflow server stopped on its own with code {code}" + (f": {detail}" if detail else ""))
    except (KeyboardInterrupt, _Stop):
        console.info("stopping the MLflow UI")
        return 0
    finally:
        if proc is not None:
            stop_server(proc)
        restore()
