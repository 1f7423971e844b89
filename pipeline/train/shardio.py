"""Where shards live and what the manifest promises about them.

Locations are local paths or any URL pyarrow's filesystem layer understands (``s3://``,
``gs://``, with query options such as ``?endpoint_override=...``), through
:mod:`pipeline.train.storage`; files are read in place with positioned (ranged) reads, never
copied whole. The manifest is read from the same place, so a folder in object storage needs no
local copy at all. Problems are one line naming the location without its query string (which
may carry options).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.console import UserError

MANIFEST = "manifest.json"
ENCODINGS = ("raw", "png")


class BadShard(UserError):
    """A shard that does not match its manifest entry (one line: which shard, what differs)."""


# ---------------------------------------------------------------------------------------------
# Locations: local paths or filesystem URLs
# ---------------------------------------------------------------------------------------------


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def join(base: str, name: str) -> str:
    """``base/name``; a URL keeps its query string (``s3://b/p?endpoint_override=...``) last."""
    if is_url(base) and "?" in base:
        path, query = base.split("?", 1)
        return f"{path.rstrip('/')}/{name}?{query}"
    return f"{base.rstrip('/')}/{name}"


def parent(location: str) -> str:
    """The folder holding a shard (where its manifest lives)."""
    if is_url(location) and "?" in location:
        path, query = location.split("?", 1)
        return f"{path.rsplit('/', 1)[0]}?{query}"
    return location.rsplit("/", 1)[0]


def shown(location: str) -> str:
    """A location for messages: without the query string (it may carry options or keys)."""
    return location.split("?", 1)[0] if is_url(location) else location


_FILESYSTEMS: dict[str, Any] = {}


def _fs(location: str):
    """(pyarrow filesystem, path) for a URL. Object-store filesystems are reused per bucket and
    options: creating one per file would cost a client (and a credential lookup) per read."""
    from urllib.parse import urlsplit

    from pipeline.train import storage

    parts = urlsplit(location)
    if parts.scheme not in ("s3", "gs", "gcs"):
        return storage._fs(location)
    # per process (a filesystem's client must not cross a fork) and per credentials in the env
    creds = hash(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_")))))
    cache_key = f"{os.getpid()}:{creds}:{parts.scheme}://{parts.netloc}?{parts.query}"
    if cache_key not in _FILESYSTEMS:
        _FILESYSTEMS[cache_key] = storage._fs(location)[0]
    return _FILESYSTEMS[cache_key], parts.netloc + parts.path


def object_error(location: str, exc: BaseException) -> str:
    """The first informative line of a filesystem error (pyarrow's are long and multi-line)."""
    text = " ".join(str(exc).split())
    return f"{shown(location)}: {text[:240] or type(exc).__name__}"


def read_bytes(location: str) -> bytes:
    """A whole (small) file: a manifest, or a validation shard."""
    if not is_url(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def file_size(location: str) -> int | None:
    """Size in bytes, None when missing."""
    if not is_url(location):
        try:
            return os.stat(location).st_size
        except FileNotFoundError:
            return None
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else int(info.size)


class _RandomAccess:
    """An open file with positioned reads: ``os.pread`` locally, ranged GETs on object stores."""

    def __init__(self, location: str) -> None:
        self.location = location
        if is_url(location):
            fs, path = _fs(location)
            self._file = fs.open_input_file(path)
            self._fd = None
            self.size = int(self._file.size())
        else:
            self._fd = os.open(location, os.O_RDONLY)
            self._file = None
            self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, n: int):
        if self._fd is not None:
            return os.pread(self._fd, n, offset)
        return self._file.read_at(n, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        elif self._file is not None:
            self._file.close()


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def load_manifest(folder: str) -> dict[str, Any]:
    """The validated manifest of a shard folder, local or remote; one line on any failure."""
    from pipeline.preprocess.manifest import validate_manifest

    where = join(folder, MANIFEST)
    try:
        raw = read_bytes(where)
    except FileNotFoundError:
        if not is_url(folder) and not os.path.isdir(folder):
            raise UserError(f"{folder}: shard folder not found") from None
        if is_url(folder) and not _bucket_exists(folder):
            bucket = shown(folder).split("://", 1)[1].split("/", 1)[0]
            raise UserError(f"{shown(folder)}: bucket {bucket!r} not found (or not visible with this node's credentials)") from None
        raise UserError(f"{shown(where)}: not found (preprocessing never finished here; run `sr-pipeline preprocess`)") from None
    except UserError:
        raise
    except Exception as exc:  # pyarrow: credentials, network, missing bucket
        hint = ""
        if where.startswith("s3://") and not any(k in os.environ for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")):
            hint = " [no AWS credentials in this environment: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the node a role]"
        raise UserError(f"cannot read the shard manifest {object_error(where, exc)}{hint}") from None
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{shown(where)}: corrupt manifest (not valid JSON)") from None
    return validate_manifest(data, shown(where))  # type: ignore[arg-type]


def _bucket_exists(folder: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = _fs(folder)
    try:
        return fs.get_file_info(path.split("/", 1)[0]).type != pafs.FileType.NotFound
    except Exception:
        return False


def encoding_of(manifest: dict[str, Any]) -> str:
    """``params.encoding``: "raw" or "png" (absent in manifests written before raw existed)."""
    encoding = manifest.get("params", {}).get("encoding", "png")
    if encoding not in ENCODINGS:
        raise UserError(f"shard manifest: unknown encoding {encoding!r} (this version reads {', '.join(ENCODINGS)})")
    return encoding


def min_hr(manifest: dict[str, Any], split: str) -> tuple[int, int] | None:
    """The split's smallest HR sub-image (height, width), or None for older manifests."""
    value = manifest.get("splits", {}).get(split, {}).get("min_hr")
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


@dataclass(frozen=True)
class ShardEntry:
    """What the manifest promises about one shard."""

    location: str
    samples: int
    bytes: int
    sha256: str
    encoding: str


def entries_for(folder: str, split: str, manifest: dict[str, Any] | None = None) -> list[ShardEntry]:
    manifest = manifest if manifest is not None else load_manifest(folder)
    encoding = encoding_of(manifest)
    return [
        ShardEntry(join(folder, s["name"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]), encoding)
        for s in manifest["splits"][split]["shards"]
    ]


def entries_for_locations(locations: Sequence[str]) -> list[ShardEntry]:
    """The manifest entry of each shard, from the manifest in the shard's folder."""
    manifests: dict[str, dict[str, ShardEntry]] = {}
    out = []
    for loc in locations:
        folder = parent(loc)
        if folder not in manifests:
            manifest = load_manifest(folder)
            manifests[folder] = {
                shown(e.location).rsplit("/", 1)[-1]: e
                for split in ("train", "valid") for e in entries_for(folder, split, manifest)
            }
        name = shown(loc).rsplit("/", 1)[-1]
        entry = manifests[folder].get(name)
        if entry is None:
            raise UserError(f"{shown(loc)}: not listed in {shown(join(folder, MANIFEST))}")
        out.append(replace(entry, location=loc))
    return out


class InMemory(_RandomAccess):
    def __init__(self, data: bytes) -> None:  # noqa: D107 - a buffer with read_at
        self.location, self._fd, self._file, self.size = "<memory>", None, None, len(data)
        self._buf = io.BytesIO(data).getbuffer()

    def read_at(self, offset: int, n: int):
        return bytes(self._buf[offset : offset + n])

    def close(self) -> None:
        pass
