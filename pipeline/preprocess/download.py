"""`sr-pipeline download div2k|benchmarks`: fetch the official archives, resume, extract safely.

* Official sources by default: the DIV2K HR zips from the DIV2K site, and the ``benchmark.tar``
  (Set5, Set14, B100, Urban100, Manga109) named in the EDSR-PyTorch README. ``--url BASE`` or
  ``$SR_PIPELINE_DOWNLOAD_URL`` replaces the base URL (a mirror, or a local server in tests);
  archive file names stay the same.
* Downloads go to ``DEST/.downloads/<name>.part`` and resume with an HTTP Range request, both
  after a dropped connection (retried automatically) and after a new invocation. The size is
  checked against what the server announced before the ``.part`` is renamed.
* Extraction never writes outside DEST: every member is checked before anything is written
  (absolute paths, ``..``, links pointing outside, device files -> the whole archive is refused),
  files are unpacked into a temporary folder inside DEST and moved into place at the end, and a
  ``DEST/.downloads/<name>.done`` marker records completion so a rerun skips finished archives.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import console
from pipeline.console import UserError
from pipeline.imageio import atomic_write_bytes

URL_ENV = "SR_PIPELINE_DOWNLOAD_URL"
OFFICIAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "div2k": ("https://data.vision.ee.ethz.ch/cvl/DIV2K/", ("DIV2K_train_HR.zip", "DIV2K_valid_HR.zip")),
    "benchmarks": ("https://cv.snu.ac.kr/research/EDSR/", ("benchmark.tar",)),
}
CHUNK = 1 << 20
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
    """Download `url` into `part` (resuming it), check the size, return the part path."""
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


# ---------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------


def _unsafe(archive: Path, name: str, why: str) -> UserError:
    return UserError(f"{archive}: refused, member {name!r} {why}; nothing was extracted")


def _inside(root: Path, target: str) -> bool:
    resolved = os.path.normpath(os.path.join(root, target))
    return resolved == str(root) or resolved.startswith(str(root) + os.sep)


def _check_name(archive: Path, root: Path, name: str) -> str:
    """The member's normalised relative path, or UserError if it could escape `root`."""
    if not name or "\x00" in name:
        raise _unsafe(archive, name, "has an empty or invalid name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _unsafe(archive, name, "has an absolute path")
    parts = re.split(r"[/\\]+", name)
    if ".." in parts:
        raise _unsafe(archive, name, "climbs out of the destination ('..')")
    rel = "/".join(p for p in parts if p not in ("", "."))
    if not _inside(root, rel):
        raise _unsafe(archive, name, "points outside the destination")
    return rel


def _plan_tar(archive: Path, root: Path, tf: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, str]]:
    plan = []
    for m in tf.getmembers():
        rel = _check_name(archive, root, m.name)
        if m.issym() or m.islnk():
            target = m.linkname
            if not target or os.path.isabs(target) or target.startswith("\\"):
                raise _unsafe(archive, m.name, f"is a link to an absolute path ({target!r})")
            base = os.path.dirname(rel) if m.issym() else ""
            if not _inside(root, os.path.join(base, target)):
                raise _unsafe(archive, m.name, f"is a link pointing outside the destination ({target!r})")
        elif not (m.isfile() or m.isdir()):
            raise _unsafe(archive, m.name, "is a device, FIFO or other special file")
        if rel:
            plan.append((m, rel))
    return plan


def _plan_zip(archive: Path, root: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    plan = []
    for m in zf.infolist():
        rel = _check_name(archive, root, m.filename)
        kind = stat.S_IFMT(m.external_attr >> 16)  # 0 when the zip carries no Unix file type
        if kind == stat.S_IFLNK:
            raise _unsafe(archive, m.filename, "is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _unsafe(archive, m.filename, "is a special file")
        if rel:
            plan.append((m, rel))
    return plan


def _no_links_on_path(root: Path, rel: str) -> None:
    """Refuse to write through a symlink that an earlier member created (defence in depth)."""
    cur = root
    for part in rel.split("/")[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise UserError(f"refused to write {rel!r} through the symbolic link {cur}")


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a zip or tar archive under `dest`; returns the top-level names it created."""
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(dest, f".extract-{archive.name}.tmp").resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zplan = _plan_zip(archive, work, zf)
                _check_space(archive, dest, sum(m.file_size for m, _ in zplan))
                with console.progress_bar(f"extract {archive.name}", total=len(zplan), unit="file") as bar:
                    for m, rel in zplan:
                        target = work / rel
                        _no_links_on_path(work, rel)
                        if m.is_dir():
                            target.mkdir(parents=True, exist_ok=True)
                        else:
                            target.parent.mkdir(parents=True, exist_ok=True)
                            with zf.open(m) as src, open(target, "wb") as dst:
                                shutil.copyfileobj(src, dst, CHUNK)
                        bar.advance()
        else:
            try:
                tf = tarfile.open(archive)  # noqa: SIM115 - closed below
            except tarfile.TarError:
                raise UserError(f"{archive}: not a zip or tar archive (corrupt download?)") from None
            with tf:
                tplan = _plan_tar(archive, work, tf)
                _check_space(archive, dest, sum(m.size for m, _ in tplan if m.isfile()))
                links = []
                with console.progress_bar(f"extract {archive.name}", total=len(tplan), unit="file") as bar:
                    for m, rel in tplan:
                        target = work / rel
                        _no_links_on_path(work, rel)
                        if m.isdir():
                            target.mkdir(parents=True, exist_ok=True)
                        elif m.isfile():
                            target.parent.mkdir(parents=True, exist_ok=True)
                            src = tf.extractfile(m)
                            assert src is not None
                            with src, open(target, "wb") as dst:
                                shutil.copyfileobj(src, dst, CHUNK)
                        else:
                            links.append((m, rel))  # after all files, so targets exist
                        bar.advance()
                for m, rel in links:
                    target = work / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if m.issym():
                        os.symlink(m.linkname, target)
                    else:  # hard link: a copy of the (already extracted, inside) file
                        source = work / _check_name(archive, work, m.linkname)
                        if not source.is_file():
                            raise _unsafe(archive, m.name, "is a hard link to a missing file")
                        shutil.copyfile(source, target)
        top = sorted(p.name for p in work.iterdir())
        for name in top:
            if name == ".downloads" or name.startswith(".extract-"):
                raise _unsafe(archive, name, "would overwrite sr-pipeline's own download state")
        for name in top:
            final = dest / name
            if final.is_symlink() or final.is_file():
                final.unlink()
            elif final.exists():
                shutil.rmtree(final)
            os.replace(work / name, final)
        return top
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{archive}: corrupt archive ({exc})") from None
    except OSError as exc:
        raise UserError(f"{dest}: extraction failed ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_space(archive: Path, dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise UserError(f"{archive}: needs {needed / 1e9:.2f} GB to extract but {dest} has {free / 1e9:.2f} GB free")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def sources(what: str, base_url: str | None = None) -> list[tuple[str, str]]:
    """[(archive name, URL)] for a dataset, honouring --url / $SR_PIPELINE_DOWNLOAD_URL."""
    if what not in OFFICIAL:
        raise UserError(f"unknown dataset {what!r} (choose from {', '.join(OFFICIAL)})")
    official, names = OFFICIAL[what]
    base = base_url or os.environ.get(URL_ENV) or official
    if not base.endswith("/"):
        base += "/"
    return [(name, base + name) for name in names]


def download(what: str, dest: Path, base_url: str | None = None, keep_archive: bool = False) -> list[Path]:
    """Fetch and extract every archive of `what` into `dest`; returns the extracted folders."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        cache = dest / ".downloads"
        cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{dest}: cannot create destination folder ({exc.strerror})") from None
    created: list[Path] = []
    for name, url in sources(what, base_url):
        marker = cache / f"{name}.done"
        if marker.is_file():
            with contextlib.suppress(ValueError, OSError):
                done = json.loads(marker.read_text())
                console.info(f"{name}: already downloaded and extracted ({', '.join(done.get('extracted', []))})")
                created += [dest / n for n in done.get("extracted", [])]
                continue
        archive = cache / name
        if not archive.is_file():
            part = fetch(url, cache / f"{name}.part", name)
            os.replace(part, archive)
        size = archive.stat().st_size
        top = safe_extract(archive, dest)
        atomic_write_bytes(marker, json.dumps({"url": url, "bytes": size, "extracted": top}).encode())
        if not keep_archive:
            archive.unlink()
        console.info(f"{name}: {size / 1e6:.1f} MB, extracted {', '.join(top)} into {dest}")
        created += [dest / n for n in top]
    return created
