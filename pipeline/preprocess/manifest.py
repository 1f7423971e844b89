"""``manifest.json``: the index of a shard directory, read by the train stage.

The manifest is written last and atomically, so its presence means every shard it lists was
complete when it was written; readers get per-shard sample counts without opening any tar.
:func:`read_manifest` validates the structure (and that shard names cannot point outside the
directory) so a hand-edited or truncated file fails with one line instead of deep in a loader.

Structure (``format_version`` 1)::

    format            "sr-pipeline/shards"
    format_version    1
    dataset, created, package_version    strings
    params            what shaped the samples (scales, crop, step, shard_samples, encoding,
                      name, ...); ``encoding`` "raw" | "png", absent (older manifests) = "png"
    inputs            where the images came from (folders, holdout)
    splits            {"train": S, "valid": S}, S = {images, samples, min_hr, shards: [
                          {name "<prefix>-<split>-NNNNNN.tar", samples, bytes, sha256}]}
                      min_hr = [smallest sample height, smallest sample width] in HR pixels
                      (null for an empty split; absent in older manifests)
    skipped           [{file, error}] images left out (with --skip-bad, too small, --min-size)

Shard names carry a prefix from the dataset (``div2k``, ``t91``, or ``--name``); shards made
before prefixes existed are all ``div2k-...``. Readers take names from the manifest only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipeline.console import UserError

MANIFEST = "manifest.json"
FORMAT = "sr-pipeline/shards"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
# group 1: the dataset prefix, 2: the split, 3: the index
SHARD_RE = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})-(train|valid)-(\d{6})\.tar$")
LEGACY_PREFIX = "div2k"  # every shard written before prefixes existed
_PREFIX_MAX = 40


def shard_name(split: str, index: int, prefix: str = LEGACY_PREFIX) -> str:
    return f"{prefix}-{split}-{index:06d}.tar"


def sanitize_prefix(name: str) -> str:
    """A shard-name prefix from a dataset or folder name: lower case ``[a-z0-9_-]``, at most
    40 characters, starting with a letter or digit ("DIV2K" -> "div2k", "My Photos" ->
    "my-photos"); "" when nothing usable is left."""
    clean = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return clean[:_PREFIX_MAX].rstrip("-_")


def require_one_encoding(manifests: dict[str, dict[str, Any]]) -> str:
    """The one encoding of several shard sets used together (train and valid shards of one
    training run); UserError naming both when they differ. Keys label each set (its path)."""
    from pipeline.preprocess.encoding import of_manifest

    found = {where: of_manifest(m) for where, m in manifests.items()}
    if len(set(found.values())) > 1:
        desc = ", ".join(f"{where} is {enc}" for where, enc in found.items())
        raise UserError(f"mixed shard encodings ({desc}); preprocess them with the same --encoding")
    return next(iter(found.values()))


def manifest_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / MANIFEST


def _fail(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}")


def validate_manifest(data: Any, path: Path) -> dict[str, Any]:
    """Check the structure described in the module docstring; return the data unchanged."""
    if not isinstance(data, dict):
        raise _fail(path, "not a shard manifest (expected a JSON object)")
    if data.get("format") != FORMAT:
        raise _fail(path, f"not a shard manifest (format is {data.get('format')!r}, expected {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"unsupported manifest format_version {data.get('format_version')!r} (this version reads {FORMAT_VERSION})")
    for field in ("dataset", "created", "package_version"):
        if not isinstance(data.get(field), str):
            raise _fail(path, f"manifest field {field!r} missing or not a string")
    if not isinstance(data.get("params"), dict):
        raise _fail(path, "manifest field 'params' missing")
    splits = data.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise _fail(path, f"manifest 'splits' must have exactly {', '.join(SPLITS)}")
    for split, info in splits.items():
        if not isinstance(info, dict):
            raise _fail(path, f"split {split!r} is not an object")
        for field in ("images", "samples"):
            if not isinstance(info.get(field), int) or info[field] < 0:
                raise _fail(path, f"split {split!r}: {field!r} must be a non-negative integer")
        shards = info.get("shards")
        if not isinstance(shards, list):
            raise _fail(path, f"split {split!r}: 'shards' must be a list")
        total = 0
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict):
                raise _fail(path, f"split {split!r}: shard {i} is not an object")
            name = shard.get("name")
            m = SHARD_RE.match(name) if isinstance(name, str) else None
            if m is None or m.group(2) != split:
                raise _fail(path, f"split {split!r}: bad shard name {name!r}")
            if not isinstance(shard.get("samples"), int) or shard["samples"] <= 0:
                raise _fail(path, f"{name}: 'samples' must be a positive integer")
            if not isinstance(shard.get("bytes"), int) or shard["bytes"] <= 0:
                raise _fail(path, f"{name}: 'bytes' must be a positive integer")
            sha = shard.get("sha256")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise _fail(path, f"{name}: 'sha256' must be 64 hex digits")
            total += shard["samples"]
        if total != info["samples"]:
            raise _fail(path, f"split {split!r}: shards hold {total} samples but 'samples' says {info['samples']}")
        min_hr = info.get("min_hr")
        if min_hr is not None and not (
            isinstance(min_hr, list) and len(min_hr) == 2 and all(isinstance(v, int) and v > 0 for v in min_hr)
        ):
            raise _fail(path, f"split {split!r}: 'min_hr' must be [height, width] in pixels")
    encoding = data["params"].get("encoding", "png")
    if encoding not in ("raw", "png"):
        raise _fail(path, f"unknown shard encoding {encoding!r} in params (this version reads raw and png)")
    skipped = data.get("skipped")
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("error"), str) for s in skipped
    ):
        raise _fail(path, "manifest 'skipped' must be a list of {file, error}")
    return data


def _remote(location: str | Path):
    """A :class:`~pipeline.preprocess.output.RemoteOut` for a URI, else None."""
    from pipeline.preprocess.output import RemoteOut, is_remote

    return RemoteOut(str(location)) if is_remote(str(location)) else None


def shown_location(location: str | Path) -> str:
    """How to name a shard location in messages (a URI without embedded credentials)."""
    from pipeline.preprocess.output import redact

    return redact(str(location))


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The validated manifest of a shard directory or object-storage prefix (``s3://...``);
    UserError if missing or corrupt."""
    remote = _remote(out_dir)
    if remote is not None:
        return remote.read_manifest()
    path = manifest_path(out_dir)
    if not Path(out_dir).is_dir():
        raise UserError(f"{out_dir}: shard folder not found")
    if not path.is_file():
        raise UserError(
            f"{path}: not found (preprocessing never finished here; run `sr-pipeline preprocess --out {out_dir}`)"
        )
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise _fail(path, "corrupt manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"corrupt manifest (invalid JSON at line {exc.lineno} column {exc.colno})") from None
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror})") from None
    return validate_manifest(data, path)


def shard_paths(out_dir: str | Path, split: str) -> list[Path]:
    """Absolute paths of a split's shards, in manifest order; UserError if any is missing."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    manifest = read_manifest(out_dir)
    root = Path(out_dir).resolve()
    paths = [root / s["name"] for s in manifest["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: shard listed in {MANIFEST} is missing (rerun `sr-pipeline preprocess` to restore it)")
    return paths


def shard_urls(out_dir: str | Path, split: str) -> list[str]:
    """A split's shards in manifest order, as absolute paths (local) or URIs (object storage:
    ``s3://bucket/prefix/<name>``); UserError if any is missing. The readers' entry point for
    both kinds of location."""
    remote = _remote(out_dir)
    if remote is None:
        return [str(p) for p in shard_paths(out_dir, split)]
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    manifest = remote.read_manifest()
    present = set(remote.names())
    urls = []
    for s in manifest["splits"][split]["shards"]:
        if s["name"] not in present:
            raise UserError(f"{remote.shown}/{s['name']}: shard listed in {MANIFEST} is missing "
                            "(rerun `sr-pipeline preprocess` to restore it)")
        urls.append(f"{remote.uri}/{s['name']}")
    return urls


def _hash_remote(remote, name: str) -> tuple[str, int] | None:
    import hashlib

    if remote.size(name) is None:
        return None
    sha, size = hashlib.sha256(), 0
    with remote.fs.open_input_stream(remote.key(name)) as f:
        while block := f.read(8 << 20):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size


def verify_shards(out_dir: str | Path) -> tuple[int, int, list[str]]:
    """Re-hash every shard against the manifest: (shards checked, bytes, problems)."""
    from pipeline.console import progress_bar
    from pipeline.preprocess.tarwriter import sha256_file

    manifest = read_manifest(out_dir)
    remote = _remote(out_dir)
    root = Path(out_dir) if remote is None else None
    entries = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]
    problems: list[str] = []
    total = 0
    with progress_bar("verify", total=len(entries), unit="shard") as bar:
        for entry in entries:
            if remote is not None:
                path = f"{remote.shown}/{entry['name']}"
                found = _hash_remote(remote, entry["name"])
            else:
                path = root / entry["name"]  # type: ignore[operator]
                found = sha256_file(path) if path.is_file() else None
            if found is None:
                problems.append(f"{path}: missing")
            else:
                sha, size = found
                total += size
                if size != entry["bytes"]:
                    problems.append(f"{path}: size {size} bytes, manifest says {entry['bytes']}")
                elif sha != entry["sha256"]:
                    problems.append(f"{path}: sha256 mismatch (corrupt or modified)")
            bar.advance()
    return len(entries), total, problems
