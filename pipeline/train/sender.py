"""Tracking that never blocks training: a background sender and the run's own journal.

Why: rank 0 logs between collectives, so any time it spends waiting on MLflow every rank
spends too. A closed port, a hung server or a slow one used to cost 15 s to minutes per call,
hours per epoch. Here the step loop only appends to a bounded in-memory queue (and, on rank 0,
a line to the journal); one daemon thread per process delivers the queue to MLflow, in order,
retrying transient failures for as long as the process lives.

* **Order**: entries leave the queue head first and the head is retried until it is accepted
  (or refused for good: an HTTP 4xx other than 408/429), so once a server is back the queued
  steps arrive in step order. A retried batch carries its original timestamps, which MLflow's
  store deduplicates, so a request the server did process before the client gave up on it
  does not become a duplicate point.
* **Bound**: at most ``max_entries`` entries wait. Past that the oldest metric batch is
  forced out (what is oldest is also in the journal, so ``sr-pipeline sync`` can still send
  it); the count is tagged on the run when the server is back and printed at the end.
* **Journal**: rank 0 appends every metric point, tag and param it logs to
  ``<run dir>/tracking/journal.jsonl``, beside the checkpoints. It is the training's own
  record: a resumed worker group skips the (key, step) pairs it holds (resumed steps repeat
  the same values, so MLflow gets each step once), and :mod:`pipeline.train.sync` replays it
  into MLflow when the server was away.
* **End**: :meth:`Sender.drain` waits a bounded time, then gives up; what was not sent is
  counted (and tags written down) in ``<run dir>/tracking/unsent-rank<R>.json`` for the
  driver's one-line summary and for ``sync``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACKING_DIR = "tracking"
JOURNAL_FILE = "journal.jsonl"
PENDING_FILE = "pending.json"  # end-of-run work the driver could not do (see pipeline.train.sync)
MAX_BACKOFF_S = 10.0
DEFAULT_MAX_ENTRIES = 10_000

# How the driver tells the workers' loggers where the run lives and how long to drain at the
# end, without changing the loop's calls (the runtime env of the job carries them).
RUN_DIR_ENV = "SR_PIPELINE_RUN_DIR"
DRAIN_ENV = "SR_PIPELINE_TRACKING_DRAIN_S"
DEFAULT_DRAIN_S = 45.0


def say(message: str) -> None:
    """A status line (stderr; Ray forwards a worker's to the driver)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def tracking_path(run_dir: str, name: str) -> str:
    from pipeline.train import storage

    return storage.join(run_dir, TRACKING_DIR, name)


def unsent_name(rank: int) -> str:
    return f"unsent-rank{rank}.json"


def is_permanent(exc: BaseException) -> bool:
    """A refusal that no retry changes (bad request, run deleted, forbidden)."""
    from mlflow.exceptions import RestException

    if not isinstance(exc, RestException):
        return False  # network errors, timeouts, 5xx: the server may come back
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


# ---------------------------------------------------------------------------------------------
# The journal (rank 0)
# ---------------------------------------------------------------------------------------------


class Journal:
    """Append-only JSONL of what rank 0 logged, in the run's storage directory.

    Local (or mounted) storage is appended to in place, one flushed line per call: a few
    microseconds. Object storage cannot be appended to, so there the lines go to a local spool
    that :meth:`upload` copies over whole (the sender thread calls it now and then, and
    :meth:`close` at the end).
    """

    def __init__(self, run_dir: str) -> None:
        from pipeline.train import storage

        self.path = tracking_path(run_dir, JOURNAL_FILE)
        self.remote = storage.is_uri(self.path)
        self._lock = threading.Lock()
        self._dirty = False
        if self.remote:
            fd, self.local = tempfile.mkstemp(prefix="sr-journal-", suffix=".jsonl")
            os.close(fd)
            if storage.exists(self.path):
                fs, p = storage._fs(self.path)
                with fs.open_input_stream(p) as f:
                    Path(self.local).write_bytes(f.read())
        else:
            self.local = self.path
            Path(self.local).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.local, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def seen(self) -> set[tuple[str, int]]:
        """(metric key, step) pairs already logged by earlier attempts of this run."""
        return {(r["key"], int(r["step"])) for r in read_journal(self.local) if r.get("kind") == "metric"}

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock:
            self._file.write(text)
            self._file.flush()
            self._dirty = True

    def upload(self) -> None:
        """Copy the spool to object storage (a no-op on a local path)."""
        if not self.remote or not self._dirty:
            return
        from pipeline.train import storage

        with self._lock:
            data = Path(self.local).read_bytes()
            self._dirty = False
        fs, p = storage._fs(self.path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)

    def close(self) -> None:
        with self._lock:
            self._file.close()
        if self.remote:
            try:
                self.upload()
            finally:
                os.unlink(self.local)


def read_journal(path: str) -> list[dict[str, Any]]:
    """Records of a journal (local path or URI); a torn last line (a crash mid-write) is skipped."""
    from pipeline.train import storage

    if not storage.exists(path):
        return []
    fs, p = storage._fs(path)
    with fs.open_input_stream(p) as f:
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---------------------------------------------------------------------------------------------
# The sender
# ---------------------------------------------------------------------------------------------


@dataclass
class Unsent:
    """What did not reach MLflow: points forced out by the bound, entries left at the end."""

    dropped_points: int = 0  # forced out of the queue by the bound (they are in the journal)
    metric_points: int = 0  # still queued when the drain gave up
    images: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    params: int = 0
    refused: int = 0  # refused for good by the server (4xx)

    @property
    def empty(self) -> bool:
        return not (self.dropped_points or self.metric_points or self.images or self.tags or self.params)

    def describe(self) -> str:
        parts = []
        if self.metric_points or self.dropped_points:
            parts.append(f"{self.metric_points + self.dropped_points} metric points")
        if self.images:
            parts.append(f"{self.images} image(s)")
        if self.tags:
            parts.append(f"{len(self.tags)} tag(s)")
        if self.params:
            parts.append(f"{self.params} param(s)")
        return ", ".join(parts)


class Sender:
    """One daemon thread delivering a queue of MLflow entries for one run, in order."""

    def __init__(self, uri: str, run_id: str, max_entries: int = DEFAULT_MAX_ENTRIES,
                 on_idle: Any = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.max_entries = max(1, max_entries)
        self.on_idle = on_idle  # called by the thread now and then (the journal's upload)
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False
        self._down_since: float | None = None
        self._dropped = 0  # metric points forced out by the bound
        self._dropped_images = 0
        self._dropped_reported = 0
        self.refused = 0
        self.sent = 0

    # -- producer side: never blocks on the network -----------------------------------------
    def put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._queue) >= self.max_entries:
                self._make_room()
            self._queue.append((kind, payload))
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sr-tracking-sender", daemon=True)
            self._thread.start()

    def _make_room(self) -> None:
        """Force out the oldest metric batch (it is in the journal); never a tag or param."""
        for i, (kind, payload) in enumerate(self._queue):
            if kind == "metrics" and (i > 0 or not self._busy):
                del self._queue[i]
                self._dropped += len(payload)
                return
        # only tags/params/images queued: drop the oldest image, else let the queue grow by one
        for i, (kind, _) in enumerate(self._queue):
            if kind == "image" and (i > 0 or not self._busy):
                del self._queue[i]
                self._dropped_images += 1
                return

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        delay = 1.0
        next_idle = time.monotonic() + 30.0
        while True:
            with self._cond:
                if not self._queue:
                    if self._closing:
                        return
                    self._cond.wait(timeout=5.0)
                item = self._queue[0] if self._queue else None
                self._busy = item is not None
            if time.monotonic() >= next_idle:
                next_idle = time.monotonic() + 30.0
                self._idle()
            if item is None:
                continue
            attempt_start = time.monotonic()
            try:
                self._deliver(client, *item)
            except Exception as exc:
                if is_permanent(exc):
                    self.refused += 1
                    say(f"warning: MLflow refused a {item[0]} entry, dropped: {' '.join(str(exc).split())[:200]}")
                else:
                    if self._down_since is None:
                        self._down_since = attempt_start
                        say(
                            f"warning: MLflow tracking server not answering ({' '.join(str(exc).split())[:160]}); "
                            f"training goes on, entries wait here (up to {self.max_entries}) and in the run's journal"
                        )
                    # Back off (new entries do not shorten the wait; closing does).
                    until = time.monotonic() + delay
                    with self._cond:
                        self._busy = False
                        while not self._closing and time.monotonic() < until:
                            self._cond.wait(timeout=until - time.monotonic())
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
            delay = 1.0
            with self._cond:
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()
                self._busy = False
                self.sent += 1
                self._cond.notify_all()
            if self._down_since is not None:
                self._recovered(client)

    def _recovered(self, client: Any) -> None:
        outage = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = None
        with self._cond:
            waiting, dropped = len(self._queue), self._dropped
        message = f"MLflow tracking server back after {outage:.0f}s: sending {waiting} queued entries"
        if dropped > self._dropped_reported:
            message += f"; {dropped} metric points were forced out by the queue bound (in the journal: sr-pipeline sync)"
            try:
                client.set_tag(self.run_id, "sr.tracking.dropped_points", str(dropped))
                self._dropped_reported = dropped
            except Exception:
                pass
        say(message)

    def _idle(self) -> None:
        if self.on_idle is not None:
            try:
                self.on_idle()
            except Exception as exc:  # storage hiccup: the next round tries again
                say(f"warning: tracking journal upload failed, retried later: {' '.join(str(exc).split())[:160]}")

    def _deliver(self, client: Any, kind: str, payload: Any) -> None:
        if kind == "metrics":
            client.log_batch(self.run_id, metrics=payload)
        elif kind == "tags":
            client.log_batch(self.run_id, tags=payload)
        elif kind == "params":
            from pipeline.train.tracking import log_params_once

            log_params_once(client, self.run_id, payload)
        elif kind == "image":
            image, artifact_file = payload
            client.log_image(self.run_id, image, artifact_file=artifact_file)
        else:  # pragma: no cover - a programming error, not an outage
            raise ValueError(f"unknown tracking entry {kind!r}")

    # -- the end ---------------------------------------------------------------------------------
    def drain(self, timeout: float) -> Unsent:
        """Wait up to `timeout` s for the queue to empty; return what was left (the thread,
        a daemon, may go on trying until the process exits)."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            self._closing = True
            self._cond.notify_all()
            left = list(self._queue)
            self._queue.clear()
        unsent = Unsent(dropped_points=self._dropped, refused=self.refused,
                        images=self._dropped_images)
        for kind, payload in left:
            if kind == "metrics":
                unsent.metric_points += len(payload)
            elif kind == "image":
                unsent.images += 1
            elif kind == "tags":
                unsent.tags.update({t.key: t.value for t in payload})
            elif kind == "params":
                unsent.params += len(payload)
        if not left and self._dropped_reported >= self._dropped:
            unsent.dropped_points = 0  # reported to the run already
        return unsent


def bounded(fn: Any, timeout: float, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(finished, result) of `fn` run in a daemon thread for at most `timeout` s.

    For calls that must not hold up the end of a job (an MLflow request against a hung
    server, a monitor's join): after the timeout the thread is abandoned, not killed.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="sr-bounded-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box.get("result")
