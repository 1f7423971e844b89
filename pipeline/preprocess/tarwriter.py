"""Deterministic, atomic WebDataset shard writer.

Two runs over the same inputs must produce byte-identical shards (that is how a resumed run is
checked against an uninterrupted one), so every tar header field that normally leaks the
environment is fixed: mtime, uid/gid, user/group names, mode, and member order (the caller's).
A shard is written under a hidden temporary name in the same directory, fsynced, and renamed:
a crash, a full disk or Ctrl-C never leaves a partial file under a final ``<name>-*.tar`` name.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.console import UserError

# 2020-01-01T00:00:00Z: any constant works; a plausible date keeps `tar -tv` output readable.
MEMBER_MTIME = 1577836800


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


class _HashingFile:
    """File wrapper that hashes what tarfile writes, so finishing needs no second read."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()


def write_error(path: Path, exc: OSError) -> UserError:
    """One line for a failed write; a full disk is named as such."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{path}: disk full while writing ({exc.strerror}); nothing partial was kept")
    return UserError(f"{path}: cannot write ({exc.strerror or exc})")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Collects samples into ``<dir>/.<name>.tmp``; :meth:`finish` publishes ``<dir>/<name>``."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = temp_name(final)
        self.samples = 0
        try:
            self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        except OSError as exc:
            raise write_error(self.tmp, exc) from None
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.TarFile(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        try:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = MEMBER_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            self.abort()
            raise write_error(self.final, exc) from None
        self.samples += 1

    def finish(self) -> ShardInfo:
        try:
            self._tar.close()  # end-of-archive blocks and record padding
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise write_error(self.final, exc) from None
        fsync_dir(self.final.parent)
        return ShardInfo(self.final.name, self.samples, self._hashing.size, self._hashing.sha.hexdigest())

    def abort(self) -> None:
        """Drop the temporary file (idempotent; never raises)."""
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError):
                pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size
