"""Output conventions shared by every command.

- Errors the user can fix are raised as :class:`UserError` and printed by the CLI as a single
  line (``error: <file>: <problem>``), never as a traceback.
- Long loops show a rich progress bar, unless quiet mode is on (``--quiet``, ``SR_PIPELINE_QUIET=1``,
  or stderr is not a terminal, as in CI logs), in which case only sparse plain-text lines appear.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_quiet: bool | None = None


class UserError(Exception):
    """A problem with the user's input or environment; shown as one line, exit code 1."""


def set_quiet(value: bool | None) -> None:
    global _quiet
    _quiet = value


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    if os.environ.get("SR_PIPELINE_QUIET", "").lower() in {"1", "true", "yes"}:
        return True
    return not sys.stderr.isatty()


def info(message: str) -> None:
    """Status line on stderr (stdout stays clean for tables and JSON)."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def error_line(exc: BaseException) -> str:
    """Collapse an exception to one line for display."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {text}"


class _Tracker:
    """Progress handle with one API whether a bar is drawn or not."""

    def __init__(self, desc: str, total: int | None, unit: str, progress=None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self._progress = progress
        self._task = progress.add_task(desc, total=total) if progress is not None else None
        self._start = time.monotonic()
        self._last_log = self._start

    def advance(self, n: int = 1, **fields: object) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)
            return
        now = time.monotonic()
        # In quiet mode, one plain line every 30 s keeps CI logs alive without flooding them.
        if now - self._last_log >= 30:
            self._last_log = now
            of = f"/{self.total}" if self.total else ""
            info(f"{self.desc}: {self.done}{of} {self.unit}")

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._progress is not None:
            self._progress.update(self._task, description=desc)


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> Iterator[_Tracker]:
    """A progress bar showing count, throughput and ETA; silent in quiet mode."""
    if is_quiet():
        tracker = _Tracker(desc, total, unit)
        yield tracker
        elapsed = time.monotonic() - tracker._start
        info(f"{desc}: {tracker.done} {unit} in {elapsed:.1f}s")
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task) -> Text:  # type: ignore[override]
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s")

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=False) as prog:
        yield _Tracker(desc, total, unit, prog)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (see :func:`progress_bar`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress_bar(desc, total=total, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.advance()
