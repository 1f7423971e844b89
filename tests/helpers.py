"""Process and network helpers shared by fixtures and tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def in_loopback_namespace() -> bool:
    """True when the only network interface is `lo` (as scripts/netns.sh arranges).

    Reads /proc/net/dev, which follows the process's network namespace (/sys/class/net
    does not unless sysfs is remounted).
    """
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout:.0f}s")


def pids_with(stat_field: int, value: int) -> list[int]:
    """PIDs whose /proc/<pid>/stat field (counted after the command name: 1 = parent pid,
    3 = session id) equals `value`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[stat_field]) == value:
            pids.append(int(entry))
    return pids


def _session_pids(sid: int) -> list[int]:
    """PIDs in session `sid` (what a `start_new_session` leader spawned, however deep)."""
    return pids_with(3, sid)


def stop_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything in its session.

    SIGTERM to the group first; whatever is left after `grace` seconds (Ray's `--block`
    leader can wait on its children for a long time, and workers sit in their own process
    groups) gets SIGKILL, found by session id so nothing escapes.
    """
    sid = proc.pid
    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    _kill_all(sid)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a session started with start_new_session=True, all of it at once: a machine
    that goes away (no SIGTERM first, so nothing in it gets to act on a shutdown)."""
    _kill_all(proc.pid)
    proc.wait(10)


def _kill_all(sid: int) -> None:
    """SIGKILL whatever is left in session `sid` (a few rounds: a dying parent may spawn)."""
    for _ in range(3):
        survivors = _session_pids(sid)
        if not survivors:
            break
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, check: bool = False):
    """Run the installed `sr-pipeline` console script for real (a separate process)."""
    proc = subprocess.run(
        [str(BIN / "sr-pipeline"), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sr-pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
