"""Resumable HTTP(S) download of one file, checked by the size the server announces.

A download goes to a ``.part`` file and resumes with an HTTP Range request, both after a
dropped connection (retried automatically, with backoff, up to :data:`ATTEMPTS` times) and
after a new invocation. The only integrity check is the size: the ``.part`` is complete once it
holds exactly the byte count the server announced (Content-Length, or the total of a
Content-Range); the official sites publish no checksums, and a server that announces no size
is trusted at a clean end of stream. A server that ignores Range is read again from the start.

Separate from :mod:`.extract` (what is done with an archive once it is here) and from
:mod:`.download` (which archives, where, and the command's bookkeeping): this is only HTTP.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline import console
from pipeline.console import UserError

CHUNK = 1 << 20  # read size, and the progress bar's unit (MiB)
ATTEMPTS = 5
TIMEOUT = 60.0


@dataclass
class _Response:
    status: int
    total: int | None  # full size of the file, when the server says
    start: int  # byte offset the body starts at


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _open(url: str, offset: int):
    req = urllib.request.Request(url, headers={"User-Agent": "sr-pipeline", "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=TIMEOUT)  # noqa: S310 - http(s) URLs only, checked


def fetch(url: str, part: Path, label: str) -> Path:
    """Download `url` into `part` (resuming it), return the part path once its size equals the
    size the server announced (Content-Length or Content-Range: the only check available)."""
    if not re.match(r"^https?://", url):
        raise UserError(f"{url}: only http:// and https:// URLs are supported")
    part.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    total: int | None = None
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        try:
            resp = _open(url, have)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: complete already, or too long
                if total is None:
                    total = _remote_size(url)
                if total is not None and have == total:
                    return part
                part.unlink()
                continue
            if exc.code in (500, 502, 503, 504) and attempt + 1 < ATTEMPTS:
                last_error = f"HTTP {exc.code}"
                time.sleep(_backoff(attempt))
                continue
            raise UserError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            last_error = str(getattr(exc, "reason", exc))
            if attempt + 1 < ATTEMPTS:
                time.sleep(_backoff(attempt))
                continue
            raise UserError(f"{url}: cannot connect ({last_error})") from None
        with resp:
            info = _response_info(resp, have)
            if info.start != have:  # server ignored the Range header: start over
                have = 0
            total = info.total if info.total is not None else total
            mode = "ab" if have else "wb"
            lost: BaseException | None = None
            try:
                f = open(part, mode)  # noqa: SIM115 - closed below
            except OSError as exc:
                raise UserError(f"{part}: cannot write ({exc.strerror})") from None
            with f, console.progress_bar(
                f"download {label}", total=(total or 0) // CHUNK or None, unit="MiB"
            ) as bar:
                bar.advance(have // CHUNK)
                got = have
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        lost = exc
                        break
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as exc:
                        raise UserError(f"{part}: cannot write ({exc.strerror}); rerun to resume") from None
                    if (got + len(block)) // CHUNK > got // CHUNK:
                        bar.advance((got + len(block)) // CHUNK - got // CHUNK)
                    got += len(block)
        size = part.stat().st_size
        if total is not None and size == total:
            return part
        if total is None and lost is None:  # no announced size: a clean end of stream is all we have
            return part
        if total is not None and size > total:
            part.unlink()
            last_error = f"received {size} bytes, more than the announced {total}"
            continue
        if lost is not None:
            last_error = f"connection lost at {size} of {total or '?'} bytes ({type(lost).__name__})"
        else:
            last_error = f"server closed the connection at {size} of {total} bytes"
        if attempt + 1 < ATTEMPTS:
            time.sleep(_backoff(attempt))
    raise UserError(
        f"{url}: download incomplete after {ATTEMPTS} attempts ({last_error}); "
        f"rerun to resume from {part}"
    )


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 8.0)


def _response_info(resp, have: int) -> _Response:
    status = resp.status
    if status == 206:
        parsed = _parse_content_range(resp.headers.get("Content-Range"))
        if parsed is None:
            raise UserError(f"{resp.url}: bad Content-Range header {resp.headers.get('Content-Range')!r}")
        return _Response(206, parsed[1], parsed[0])
    length = resp.headers.get("Content-Length")
    return _Response(status, int(length) if length and length.isdigit() else None, 0)


def _remote_size(url: str) -> int | None:
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "sr-pipeline"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None
