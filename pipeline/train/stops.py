"""Why a training job stops early, seen from the workers: Ctrl-C, SIGTERM, preemption.

Every source is turned into a local flag that the loop reads at its next log point and
reduces across ranks there, so every rank leaves after the same step, writes the same
checkpoint and returns:

* **Ctrl-C in the driver** writes a stop request file into the run's storage. Rank 0 polls it
  in a background thread (a storage call can take a while on object stores; the step loop
  never waits for it) and raises its flag.
* **SIGTERM to a worker** (a node shutting down, ``kill``, a scheduler's eviction): Ray's own
  handler would end the process at once. Python lets only a process's main thread install a
  signal handler, and the training function runs in a thread of Ray Train's worker actor, so
  the handler is installed by a call on the actor itself, which Ray runs on that main thread.
  The first SIGTERM raises the flag; a second one gets Ray's handler (exit now).
* **Ray's preemption notice** (a node being drained, e.g. a spot reclaim, Ray >= 2.5x):
  ``ray.train.get_preemption_info()`` is a collective, called by every rank at every log
  point; on the first notice the loop writes a checkpoint and trains on, as Ray recommends:
  when the node goes, Ray Train restarts the group from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_POLL_S = 1.0  # rank 0 looks for the driver's stop request at most this often

_terminated = threading.Event()  # set by our SIGTERM handler (same process, any thread reads it)
_active = threading.Event()  # a training loop runs in this process: SIGTERM means "checkpoint, stop"
_previous: dict[str, Any] = {}


def _on_sigterm(signum: int, frame: Any) -> None:
    if _active.is_set() and not _terminated.is_set():
        _terminated.set()
        return
    previous = _previous.get("handler")
    if callable(previous):
        previous(signum, frame)
    else:
        raise SystemExit(128 + signum)


def install_sigterm_handler() -> bool:
    """Runs on the worker process's main thread (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous["handler"] = current
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _install_on_actor_main_thread() -> str | None:
    """Ask our own Ray Train worker actor to install the handler; None, or why it could not.

    ``RayTrainWorker.execute(fn)`` is how Ray Train itself runs setup functions on its workers
    (an internal method: on a Ray without it, SIGTERM keeps Ray's behaviour and we say so)."""
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        ok = ray.get(actor.execute.remote(install_sigterm_handler), timeout=30)
    except Exception as exc:  # noqa: BLE001 - any failure leaves Ray's handler in place
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return None if ok else "the actor's call did not run on its main thread"


class StopSignals:
    """The flags one worker contributes at a log point (see the module docstring)."""

    def __init__(self, rank: int, stop_request: str | None, warn) -> None:
        self.rank = rank
        self._asked = threading.Event()
        self._quit = threading.Event()
        self._thread: threading.Thread | None = None
        self.preempted_once = False
        _terminated.clear()
        _active.set()
        why = _install_on_actor_main_thread()
        if why is not None and rank == 0:
            warn(f"SIGTERM to a worker ends it without a checkpoint here ({why})")
        if rank == 0 and stop_request:
            self._thread = threading.Thread(target=self._poll, args=(stop_request,), name="sr-stop-poll", daemon=True)
            self._thread.start()

    def _poll(self, path: str) -> None:
        from pipeline.train import storage

        while not self._quit.wait(STOP_POLL_S):
            try:
                if storage.exists(path):
                    self._asked.set()
                    return
            except Exception:  # noqa: BLE001 - a storage hiccup is not a stop request; ask again
                continue

    def local(self) -> tuple[float, float]:
        """(driver asked to stop, this process got SIGTERM) as 0/1."""
        return float(self._asked.is_set()), float(_terminated.is_set())

    def preemption_notice(self) -> bool:
        """Ray's preemption notice, the same on every rank (a collective: call it everywhere)."""
        import ray.train

        get = getattr(ray.train, "get_preemption_info", None)
        if get is None:
            return False
        try:
            return get() is not None
        except Exception:  # noqa: BLE001 - outside a Ray Train worker (unit tests)
            return False

    def close(self) -> None:
        self._quit.set()
        _active.clear()
        if self._thread is not None:
            self._thread.join(timeout=STOP_POLL_S + 1)
