"""Where a training run lives: a local directory, a shared mount, or object storage.

Ray Train writes checkpoints under ``<storage_path>/<run_name>/``; we keep two more things
there, next to them: ``sr_run.json`` (the run's identity: MLflow run id, model config) and
``best_model/`` (the best weights by validation PSNR). Everything goes through pyarrow's
filesystem layer, as Ray's own storage does, so ``s3://`` and ``gs://`` work the same as a
local path.

Node-local storage on a multi-node cluster is the classic silent failure (each node writes its
own checkpoints; a restarted worker on another node finds nothing), hence the checks here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.console import UserError

RUN_FILE = "sr_run.json"
STOP_FILE = "stopped.json"  # why the workers stopped on their own (non-finite losses)
STOP_REQUEST_FILE = "stop_request.json"  # the driver asks the workers to stop (Ctrl-C)
BEST_DIR = "best_model"

# Filesystem types (from /proc/mounts) that are shared between machines.
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
    "glusterfs", "9p", "virtiofs", "afs", "ocfs2", "gfs2", "wekafs", "panfs", "orangefs",
}


def is_uri(path: str) -> bool:
    """``s3://bucket/x`` and the like (anything with a scheme except plain files)."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str | None, default: Path) -> str:
    """Absolute local path or URI (relative paths would break inside Ray workers)."""
    if not path:
        return str(default)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if is_uri(path):
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _fs(path: str):
    """(pyarrow filesystem, path inside it)."""
    import pyarrow.fs as pafs

    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as exc:
            raise UserError(f"storage {path}: cannot open ({' '.join(str(exc).split())})") from None
    return pafs.LocalFileSystem(), path


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON file, or None when it does not exist."""
    if not exists(path):
        return None
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        try:
            return json.loads(f.read().decode())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: corrupt JSON ({exc})") from None


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write JSON; on a local filesystem atomically (temp name + rename)."""
    payload = json.dumps(data, indent=2, sort_keys=True).encode()
    if not is_uri(path):
        from pipeline.imageio import atomic_write_bytes

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, payload)
        return
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:  # single-object PUT: atomic on object stores
        f.write(payload)


def prepare_local(path: str) -> None:
    """Create a local storage directory and prove it writable, as one clear line on failure.

    Runs before Ray starts, so a bad ``--storage-path`` costs nothing and shows no traceback.
    """
    where = Path(path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sr-pipeline-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"--storage-path {path}: cannot create or write it ({reason})") from None


def upload_dir(local_dir: str | Path, dest: str) -> None:
    """Copy the files of `local_dir` into `dest`, each file replaced atomically when local."""
    local_dir = Path(local_dir)
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        for f in sorted(local_dir.iterdir()):
            tmp = Path(dest) / f".{f.name}.tmp-{os.getpid()}"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, Path(dest) / f.name)
        return
    import pyarrow.fs as pafs

    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(local_dir), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str) -> tempfile.TemporaryDirectory:
    """A temporary local copy of directory `src` (the caller cleans it up)."""
    import pyarrow.fs as pafs

    tmp = tempfile.TemporaryDirectory(prefix="sr-best-")
    fs, p = _fs(src)
    pafs.copy_files(p, tmp.name, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def delete(path: str) -> None:
    """Remove a file if it exists."""
    if exists(path):
        fs, p = _fs(path)
        fs.delete_file(p)


def filesystem_type(path: str) -> str:
    """Type of the filesystem holding local `path` (nearest existing parent), from /proc/mounts."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    best, fstype = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (str(p) == mount or str(p).startswith(mount.rstrip("/") + "/") or mount == "/") and len(mount) >= len(best):
            best, fstype = mount, fields[2]
    return fstype


def is_shared_fstype(fstype: str) -> bool:
    return fstype in NETWORK_FS or fstype.startswith("fuse.")  # fuse: s3fs, gcsfuse, juicefs...


def list_runs(storage: str) -> list[tuple[float, str]]:
    """(modification time, run name) of the runs under a storage path, newest last."""
    import pyarrow.fs as pafs

    if not exists(storage):
        return []
    fs, p = _fs(storage)
    runs = []
    for entry in fs.get_file_info(pafs.FileSelector(p, recursive=False)):
        if entry.type != pafs.FileType.Directory:
            continue
        info = fs.get_file_info(entry.path + "/" + RUN_FILE)
        if info.type == pafs.FileType.File:
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            runs.append((mtime, entry.base_name))
    return sorted(runs)
