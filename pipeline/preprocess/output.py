"""Where finished shards go: the ``--out`` folder itself, or object storage (``s3://``, ``gs://``,
any URI pyarrow's filesystem layer opens, the layer checkpoints already use:
:mod:`pipeline.train.storage`).

Writing always happens in a local folder first (the shard writer, the journal and the lock
need a real filesystem). For a local ``--out`` that folder *is* the output. For a URI it is a
staging folder under ``$SR_PIPELINE_HOME/preprocess-staging/``; each finished shard is then
uploaded under a hidden temporary key ``<prefix>/.<name>.tmp``, checked for its size, and
moved to ``<prefix>/<name>``, so no partial object ever sits under a final name; the local
copy is then deleted. The journal is uploaded after each shard (one PUT) so a rerun on
another machine resumes too, and ``manifest.json`` is written last.

Resuming against object storage keeps a journaled shard when its object has the journaled
size (objects are written whole, and a replaced one almost never keeps its exact size);
``preprocess --verify`` re-hashes them for certain.

Credentials come from the environment or the node (pyarrow's usual chain: AWS_* variables,
profiles, instance roles; GOOGLE_APPLICATION_CREDENTIALS...), never from us: messages only
ever show the URI with any ``user:secret@`` part removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from pipeline.console import UserError

STAGING = "preprocess-staging"


def redact(uri: str) -> str:
    """The URI without credentials embedded in its authority (``s3://KEY:SECRET@bucket``)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


def is_remote(out: str) -> bool:
    from pipeline.train.storage import is_uri

    return is_uri(out)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    return text[:300]


def _explain(exc: BaseException, where: str) -> UserError:
    """One line for a failed object-store call: names the URI and the likely cause."""
    text = _one_line(exc)
    low = text.lower()
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return UserError(f"{where}: bucket not found ({text})")
    if any(k in low for k in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch",
                              "forbidden", "403", "credentials", "expiredtoken")):
        return UserError(
            f"{where}: access denied: no valid credentials for it in this environment or node "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role, ...) ({text})"
        )
    if any(k in low for k in ("network_connection", "could not connect", "couldn't connect", "timed out",
                              "timeout", "resolve host", "unreachable")):
        return UserError(f"{where}: object store unreachable ({text})")
    return UserError(f"{where}: {text}")


MANIFEST = "manifest.json"


class LocalOut:
    """A local ``--out`` folder: shards are written in place, so publishing is the writer's
    rename and a kept shard must still hash to its journaled sha256."""

    remote = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shown = str(folder)

    def staging_dir(self) -> Path:
        return self.folder

    def check(self) -> None:
        pass  # _check_writable in shards does the local checks

    def size(self, name: str) -> int | None:
        try:
            return (self.folder / name).stat().st_size
        except OSError:
            return None

    def shard_ok(self, name: str, size: int, sha256: str) -> bool:
        from pipeline.preprocess.tarwriter import sha256_file

        path = self.folder / name
        return path.is_file() and path.stat().st_size == size and sha256_file(path)[0] == sha256

    def publish(self, name: str) -> None:
        pass  # ShardWriter.finish already renamed it into place

    def sync_journal(self, journal: Path) -> None:
        pass

    def read_manifest(self) -> dict:
        from pipeline.preprocess import manifest as mf

        return mf.read_manifest(self.folder)

    def write_manifest(self, data: bytes) -> None:
        from pipeline.imageio import atomic_write_bytes
        from pipeline.preprocess.tarwriter import fsync_dir, write_error

        path = self.folder / MANIFEST
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise write_error(path, exc) from None
        fsync_dir(self.folder)

    def remove_manifest(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / MANIFEST)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file())

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / name)


class RemoteOut:
    """Shards, journal and manifest in object storage under one prefix."""

    remote = True

    def __init__(self, uri: str) -> None:
        self.shown = redact(uri)
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]", uri):
            raise UserError(f"--out {self.shown}: no bucket in the URI (expected s3://BUCKET/PREFIX)")
        self.uri = uri.rstrip("/")
        self.shown = redact(self.uri)
        from pipeline.train.storage import _fs

        try:
            self.fs, self.root = _fs(self.uri)
        except UserError:
            raise UserError(f"--out {self.shown}: not a storage URI this installation can open "
                            "(s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, ...)") from None
        self.root = self.root.rstrip("/")
        if not self.root or self.root.startswith("/"):
            raise UserError(f"--out {self.shown}: no bucket in the URI (expected s3://BUCKET/PREFIX)")
        self.bucket = self.root.split("/", 1)[0]

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def staging_dir(self) -> Path:
        """The local folder this URI's shards are written in before upload (stable per URI)."""
        from pipeline import defaults

        tag = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return defaults.home() / STAGING / tag

    # -- checks before any work ------------------------------------------------------------

    def check(self) -> None:
        """Bucket reachable, present and writable with this environment's credentials: one
        line otherwise, before any image is read. A tiny probe object is written and deleted."""
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self.bucket)
        except Exception as exc:  # pyarrow raises OSError/ArrowException subclasses
            raise _explain(exc, f"--out {self.shown}") from None
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"--out {self.shown}: bucket {self.bucket!r} not found (create it first)")
        probe = self.key(f".write-test-{os.getpid()}")
        try:
            with self.fs.open_output_stream(probe) as f:
                f.write(b"")
            self.fs.delete_file(probe)
        except Exception as exc:
            raise _explain(exc, f"--out {self.shown}") from None

    # -- what the shard writer calls (same interface as LocalOut) -------------------------

    def shard_ok(self, name: str, size: int, sha256: str) -> bool:  # noqa: ARG002 - see module doc
        return self.size(name) == size

    def publish(self, name: str) -> None:
        local = self.staging_dir() / name
        self.put_file(local, name)
        local.unlink()

    def sync_journal(self, journal: Path) -> None:
        self.put_bytes(journal.name, journal.read_bytes())

    def read_manifest(self) -> dict:
        import json

        from pipeline.preprocess import manifest as mf

        data = self.get_bytes(MANIFEST)
        where = f"{self.shown}/{MANIFEST}"
        if data is None:
            raise UserError(f"{where}: not found (preprocessing never finished here)")
        try:
            return mf.validate_manifest(json.loads(data.decode()), where)  # type: ignore[arg-type]
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{where}: corrupt manifest (not valid JSON)") from None

    def write_manifest(self, data: bytes) -> None:
        self.put_bytes(MANIFEST, data)

    def remove_manifest(self) -> None:
        self.delete(MANIFEST)

    # -- objects -------------------------------------------------------------------------------

    def size(self, name: str) -> int | None:
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self.key(name))
        except Exception as exc:
            raise _explain(exc, f"{self.shown}/{name}") from None
        return None if info.type != pafs.FileType.File else info.size

    def put_file(self, local: Path, name: str) -> None:
        """Upload a complete local file under a temporary key, check it, move it into place."""
        tmp = self.key(f".{name}.tmp")
        size = local.stat().st_size
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(tmp) as dst:
                while block := src.read(8 << 20):
                    dst.write(block)
            got = self.size(f".{name}.tmp")
            if got != size:
                raise UserError(f"{self.shown}/{name}: upload incomplete ({got} of {size} bytes); rerun to retry")
            self.fs.move(tmp, self.key(name))
        except UserError:
            self._forget(tmp)
            raise
        except Exception as exc:
            self._forget(tmp)
            raise _explain(exc, f"{self.shown}/{name}") from None

    def put_bytes(self, name: str, data: bytes) -> None:
        """One small object in one PUT (visible whole or not at all)."""
        try:
            with self.fs.open_output_stream(self.key(name)) as f:
                f.write(data)
        except Exception as exc:
            raise _explain(exc, f"{self.shown}/{name}") from None

    def get_bytes(self, name: str) -> bytes | None:
        if self.size(name) is None:
            return None
        try:
            with self.fs.open_input_stream(self.key(name)) as f:
                return f.read()
        except Exception as exc:
            raise _explain(exc, f"{self.shown}/{name}") from None

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.key(name))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _explain(exc, f"{self.shown}/{name}") from None

    def names(self) -> list[str]:
        """Object names directly under the prefix."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))
        except Exception as exc:
            raise _explain(exc, self.shown) from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def _forget(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.delete_file(key)
