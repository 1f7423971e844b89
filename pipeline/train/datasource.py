"""Driver-side data checks for `sr-pipeline train`, before Ray starts, and on every node.

Everything here turns a data problem into one line before any worker exists: a shard folder
(local or object storage) without a readable manifest, shards whose size differs from the
manifest (truncated, replaced, missing), a patch that does not fit the smallest sub-image.
Object-store problems (no credentials, unreachable endpoint, missing bucket) surface here as
the manifest read failing, named with the URL (its query string left out).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import console
from pipeline.config import TrainConfig
from pipeline.console import UserError
from pipeline.train import shardio
from pipeline.train.job import JobSpec


def resolve_location(given: str) -> str:
    """An absolute local path (relative ones break inside Ray workers) or the URL as given."""
    if given.startswith("file://"):
        given = given[len("file://") :]
    if shardio.is_url(given):
        return given.rstrip("/")
    return str(Path(given).expanduser().resolve())


def listed_sizes(folder: str) -> dict[str, int]:
    """{file name: size} of the files directly in a folder (one listing call on object stores)."""
    if not shardio.is_url(folder):
        try:
            return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
        except OSError:
            return {}
    import pyarrow.fs as pafs

    fs, path = shardio._fs(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except Exception as exc:
        raise UserError(f"cannot list shards {shardio.object_error(folder, exc)}") from None
    return {i.base_name: int(i.size) for i in infos if i.type == pafs.FileType.File}


def size_problems(entries: list[shardio.ShardEntry]) -> list[tuple[shardio.ShardEntry, str]]:
    """Shards missing or of another size than the manifest says."""
    listings: dict[str, dict[str, int]] = {}
    problems = []
    for e in entries:
        folder = shardio.parent(e.location)
        if folder not in listings:
            listings[folder] = listed_sizes(folder)
        size = listings[folder].get(shardio.shown(e.location).rsplit("/", 1)[-1])
        if size is None:
            problems.append((e, f"{shardio.shown(e.location)}: shard listed in the manifest is missing"))
        elif size != e.bytes:
            problems.append((e, f"{shardio.shown(e.location)}: size {size} bytes, manifest says {e.bytes} "
                                "(truncated or replaced)"))
    return problems


def checked_entries(folder: str, split: str, manifest: dict[str, Any], skip_bad: bool) -> list[shardio.ShardEntry]:
    """The split's shards after the size check: a bad one stops here, or is left out (counted
    and warned) with ``--skip-bad-shards``."""
    entries = shardio.entries_for(folder, split, manifest)
    problems = size_problems(entries)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more bad shard(s))" if len(problems) > 1 else ""
        raise UserError(f"{problems[0][1]}{more}; rerun `sr-pipeline preprocess` to restore it, "
                        "or train without it with --skip-bad-shards")
    if problems:
        console.warn(f"--skip-bad-shards: leaving out {len(problems)} of {len(entries)} {split} shard(s), "
                     f"e.g. {problems[0][1]}")
        bad = {id(e) for e, _ in problems}
        entries = [e for e in entries if id(e) not in bad]
    return entries


def check_patch_fits(cfg: TrainConfig, manifest: dict[str, Any], where: str) -> None:
    """Refuse a patch larger than the smallest training sub-image (``splits.train.min_hr``;
    older manifests only know ``params.crop``, and the loader replaces smaller samples)."""
    smallest = shardio.min_hr(manifest, "train")
    if smallest is not None:
        side = min(smallest)
        if cfg.patch_size > side:
            raise UserError(
                f"--patch-size {cfg.patch_size} does not fit the smallest training sub-image of {where} "
                f"({smallest[1]}x{smallest[0]} px HR): use --patch-size {side // cfg.model.scale * cfg.model.scale} "
                f"or less, or preprocess again with --min-size {cfg.patch_size} to drop the smaller images"
            )
        return
    crop = manifest.get("params", {}).get("crop")
    if crop and cfg.patch_size > int(crop):
        raise UserError(f"--patch-size {cfg.patch_size} is larger than the shards' sub-images ({crop} px)")


def resolve_job(cfg: TrainConfig) -> JobSpec:
    """Shard lists and counts from the manifest(s), checked; the validation source."""
    if not cfg.shards:
        raise UserError("--shards is required: the folder written by `sr-pipeline preprocess` (or an s3:// URL)")
    folder = resolve_location(cfg.shards)
    manifest = shardio.load_manifest(folder)
    where = shardio.shown(folder)
    scales = [int(s) for s in manifest.get("params", {}).get("scales", [])]
    scale = cfg.model.scale
    if scales and scale not in scales:
        raise UserError(f"{where}: shards hold scales {scales}, not x{scale} (rerun preprocess with --scales {scale})")
    entries = checked_entries(folder, "train", manifest, cfg.skip_bad_shards)
    if not entries:
        raise UserError(f"{where}: the manifest lists no (usable) train shards")
    check_patch_fits(cfg, manifest, where)
    job = JobSpec(train_shards=[e.location for e in entries], train_counts=[e.samples for e in entries],
                  lr=cfg.effective_lr)
    if cfg.val_data:
        from pipeline.imageio import list_images

        val_folder = Path(cfg.val_data).expanduser().resolve()
        n = len(list_images(val_folder))  # one-line error when missing/empty
        job.val_folder = str(val_folder)
        job.val_count = min(n, cfg.val_max_images) if cfg.val_max_images else n
        return job
    val_dir = resolve_location(cfg.val_shards) if cfg.val_shards else folder
    val_manifest = manifest if val_dir == folder else shardio.load_manifest(val_dir)
    if val_dir != folder:  # one run reads one encoding: a mix is a preprocessing mistake
        from pipeline.preprocess.manifest import require_one_encoding

        require_one_encoding({where: manifest, shardio.shown(val_dir): val_manifest})
    valid = val_manifest["splits"].get("valid") or {}
    val_entries = checked_entries(val_dir, "valid", val_manifest, cfg.skip_bad_shards) if valid.get("shards") else []
    job.val_shards = [e.location for e in val_entries]
    n = sum(e.samples for e in val_entries)
    job.val_count = min(n, cfg.val_max_images) if cfg.val_max_images else n
    if not job.val_shards or job.val_count == 0:
        raise UserError(
            f"{shardio.shown(val_dir)}: no validation images (the manifest's valid split is empty); "
            "give --val-data FOLDER (e.g. a Set5/HR folder) or --val-shards DIR"
        )
    return job


def skipped_shards(cfg: TrainConfig, job: JobSpec) -> int:
    """Train shards of the manifest that the job leaves out (``--skip-bad-shards`` at preflight),
    for the run's parameters; shards skipped later by the loader are ``PatchStream.skipped_shards``."""
    manifest = shardio.load_manifest(resolve_location(cfg.shards))
    return len(manifest["splits"]["train"]["shards"]) - len(job.train_shards)


def node_data_problems(files: list[str]) -> list[str]:
    """Runs on every node (launcher preflight): each shard present with its manifest size (the
    node reads the manifest itself, so its own credentials are tested too); other paths exist."""
    problems: list[str] = []
    shards: dict[str, list[str]] = {}
    for f in files:
        if shardio.shown(f).endswith(".tar"):
            shards.setdefault(shardio.parent(f), []).append(f)
        elif not shardio.is_url(f) and not os.path.exists(f):
            problems.append(f"{f}: missing on this node")
    for folder, locations in shards.items():
        try:
            entries = {e.location: e for split in ("train", "valid")
                       for e in shardio.entries_for(folder, split)}
            wanted = [entries[loc] for loc in locations if loc in entries]
            problems.extend(p for _, p in size_problems(wanted))
        except UserError as exc:
            problems.append(str(exc))
    return problems
