"""`sr-pipeline preprocess`: images -> sub-image samples -> equal-size WebDataset shards.

How it stays correct when interrupted
-------------------------------------
Each split is one deterministic stream: images in name order, each image's samples in raster
order, skipping bad images (with ``--skip-bad``). Shard ``k`` holds samples
``k * shard_samples ...`` of that stream, so the assignment never depends on timing or on the
number of worker processes. Workers only decode/resize/encode; the parent consumes their
results in order and is the only writer.

A shard is written under a temporary name and renamed when complete (:mod:`.tarwriter`). After
each rename the parent appends one line to ``.preprocess-journal.jsonl``: the shard's name,
sha256, and the stream positions where it starts and ends (image index, sample offset). Each
image's outcome (sample count, bad-file error, conversion note) is journaled as it is consumed.
The journal's first line is a fingerprint of every parameter and input file (name, size,
mtime) plus the package version; a rerun trusts it only if that matches.

A rerun then keeps every journaled shard whose file still hashes to the journaled sha256,
regenerates journaled shards that are missing or damaged from their recorded positions, and
continues the stream after the last journaled shard. Output is byte-identical to an
uninterrupted run because sample bytes and tar headers are deterministic. ``manifest.json`` is
written last, atomically; it is removed before the first shard of a changed dataset is written,
so a manifest never describes shards that are not there. Because of that, a finished dataset
made with other settings (parameters, input folders, holdout) is only replaced when asked to
(``--force``): an interrupted replacement would leave neither dataset.

Where the work runs and where shards land are separate concerns: :mod:`.pool` runs images in
local worker processes or as Ray tasks (``--address``), :mod:`.output` publishes finished
shards to the local folder or to object storage (``s3://...``). Neither changes a byte.

This module is the run itself: checks, the lock, reading the journal and planning what to
keep, rebuild and continue, running the plan, then the manifest. The journal and the checks
against it live in :mod:`.journal`, the writing of shards from the ordered image results in
:mod:`.producer`, the manifest's contents and the settings comparison in
:mod:`.manifest_build`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import __version__, console
from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.journal import (
    JOURNAL,
    Journal,
    Pos,
    complete_shards,
    drop_temp_shards,
    valid_journaled,
)
from pipeline.preprocess.manifest_build import (
    build_manifest,
    inputs_record,
    params_record,
    remove_stale,
    settings_changes,
    shard_prefix,
)
from pipeline.preprocess.output import LocalOut, RemoteOut, is_remote
from pipeline.preprocess.pool import executor, refuse_unguarded_reentry, resolve_jobs
from pipeline.preprocess.producer import ShardProducer
from pipeline.preprocess.sources import Inputs, discover, fingerprint
from pipeline.preprocess.subimages import SampleParams
from pipeline.preprocess.tarwriter import write_error

LOCK = ".preprocess.lock"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{out}: output path exists and is not a folder") from None
    except OSError as exc:
        raise UserError(f"{out}: cannot create output folder ({exc.strerror})") from None
    if not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a folder")
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{out}: output folder is not writable ({exc.strerror})") from None


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One preprocess per output folder: two writers would interleave shards."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, documented
        yield
        return
    try:
        f = open(out / LOCK, "a")  # noqa: SIM115
    except OSError as exc:
        raise write_error(out / LOCK, exc) from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out}: another `sr-pipeline preprocess` is writing here") from None
        yield
    finally:
        f.close()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same clean path as Ctrl-C (temporary shard removed, workers stopped)."""
    if sys.platform == "win32":
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_preprocess(cfg: PreprocessConfig, force: bool = False) -> dict[str, Any]:
    """Run (or resume) preprocessing; returns the manifest written to ``cfg.out``.

    A finished dataset in ``cfg.out`` made with other settings is only replaced with
    ``force``: replacing starts by removing its manifest, so an interruption would otherwise
    leave neither the old dataset nor the new one. Ctrl-C (or SIGTERM) says how many complete
    shards are kept, then propagates as KeyboardInterrupt.
    """
    refuse_unguarded_reentry()
    if not cfg.out:
        raise UserError("--out is required: the folder that receives the shards and manifest.json")
    inputs = discover(cfg)
    if inputs.ignored:
        first = inputs.ignored[0]
        more = f" and {len(inputs.ignored) - 1} more" if len(inputs.ignored) > 1 else ""
        console.warn(f"ignored non-image file {first}{more}")
    prefix = shard_prefix(cfg, inputs)
    dest: LocalOut | RemoteOut
    if is_remote(cfg.out):
        dest = RemoteOut(cfg.out)
        dest.check()  # one line for a bad URL, missing bucket, no credentials, unreachable
    else:
        dest = LocalOut(Path(cfg.out))
    out = dest.staging_dir()
    _check_writable(out)
    params = SampleParams(
        tuple(cfg.scales), cfg.crop, cfg.step, cfg.png_compress_level, encoding=cfg.encoding, min_size=cfg.min_size
    )
    fp = fingerprint(inputs, params_record(params, cfg, prefix), __version__)
    journal = Journal(out, fp)
    try:
        return _run_locked(cfg, force, dest, inputs, params, journal, prefix)
    except KeyboardInterrupt:
        console.info(
            f"interrupted: {complete_shards(dest, journal)} complete shard(s) kept in {dest.shown}; "
            "rerun the same command to resume"
        )
        raise


def _run_locked(
    cfg: PreprocessConfig, force: bool, dest: LocalOut | RemoteOut, inputs: Inputs, params: SampleParams,
    journal: Journal, prefix: str,
) -> dict[str, Any]:
    jobs = resolve_jobs(cfg.jobs)
    t0 = time.monotonic()
    out, shown = dest.staging_dir(), dest.shown
    with _locked(out), _sigterm_as_interrupt():
        if dest.remote and not journal.path.exists():  # resuming on another machine
            remote_journal = dest.get_bytes(JOURNAL)  # type: ignore[union-attr]
            if remote_journal is not None:
                journal.path.write_bytes(remote_journal)
        resumed = journal.load()
        if not resumed:
            changes = settings_changes(dest, params_record(params, cfg, prefix), inputs_record(inputs, cfg))
            if changes and not force:
                raise UserError(
                    f"{shown}: holds a finished dataset made with other settings ({'; '.join(changes)}); "
                    "rerun with --force to replace it, or choose another --out"
                )
            if journal.path.exists():
                console.info(f"{shown}: starting over (the earlier run there used other settings or input files)")
        drop_temp_shards(dest, out)
        old_manifest = None
        with contextlib.suppress(UserError):
            old_manifest = dest.read_manifest()
        ours = {rec["name"] for split in mf.SPLITS for rec in journal.shards[split].values()}
        if old_manifest is not None:
            ours |= {s["name"] for split in mf.SPLITS for s in old_manifest["splits"][split]["shards"]}
        if not resumed:
            old_manifest = None
        run = ShardProducer(cfg, out, inputs, params, journal, jobs, cfg.skip_bad, prefix, dest)
        if not cfg.skip_bad:  # a previous --skip-bad run must not silently pass now
            for split in mf.SPLITS:
                for rec in journal.images[split].values():
                    if rec["error"]:
                        raise UserError(rec["error"])
        plan: list[tuple[str, Pos, int, Pos | None, int | None]] = []
        kept_total = 0
        for split in mf.SPLITS:
            kept, redo = valid_journaled(dest, journal, split) if resumed else ([], [])
            kept_total += len(kept)
            for index in redo:
                rec = journal.shards[split][index]
                plan.append((split, tuple(rec["start"]), index, tuple(rec["end"]), rec["samples"]))
            last = max(journal.shards[split], default=None)
            tail_start: Pos = tuple(journal.shards[split][last]["end"]) if last is not None else (0, 0)
            tail_index = 0 if last is None else last + 1
            if tail_start[0] < len(inputs.tasks[split]):
                plan.append((split, tail_start, tail_index, None, None))
        n_images = sum((stop[0] + (1 if stop[1] else 0) if stop else len(inputs.tasks[s])) - start[0]
                       for s, start, _, stop, _ in plan)
        journal.open(fresh=not resumed)
        try:
            if kept_total:
                console.info(f"resuming: {kept_total} complete shard(s) kept in {shown}")
            if plan:
                address = cfg.address or os.environ.get("RAY_ADDRESS") or None
                with executor(jobs, address) as (ex, slots), console.progress_bar(
                    "preprocess", total=n_images, unit="img"
                ) as bar:
                    run.jobs = slots
                    for split, start, index, stop, expected in plan:
                        run.produce(ex, split, start, index, stop, bar, expected)
        finally:
            journal.close()
        manifest = build_manifest(run)
        if not plan and old_manifest is not None:
            same = {k: v for k, v in old_manifest.items() if k != "created"} == {
                k: v for k, v in manifest.items() if k != "created"}
            if same:
                manifest = old_manifest
        if manifest.get("splits", {}).get("train", {}).get("samples", 0) == 0:
            raise UserError(f"{next(iter(inputs.roots.values()))}: no usable training images (see the warnings above)")
        if manifest is not old_manifest:
            dest.write_manifest((json.dumps(manifest, indent=1) + "\n").encode())
        removed = remove_stale(dest, manifest, ours)
    elapsed = time.monotonic() - t0
    if run.converted > 1:
        console.info(f"{run.converted} images were converted to 8-bit RGB")
    if removed:
        console.info(f"removed {removed} shard(s) left from an earlier run with other settings")
    if cfg.min_size:
        small = sum(1 for split in mf.SPLITS for rec in journal.images[split].values()
                    if rec["skipped"] and "--min-size" in rec["skipped"])
        console.info(f"{small} image(s) with a side below --min-size {cfg.min_size} px dropped (listed in the manifest)")
    tr, va = manifest["splits"]["train"], manifest["splits"]["valid"]
    rate = f", {run.fresh_images / elapsed:.2f} img/s" if run.fresh_images and elapsed > 0 else ""
    console.info(
        f"{shown}: train {tr['samples']} samples in {len(tr['shards'])} shards from {tr['images']} images; "
        f"valid {va['samples']} samples in {len(va['shards'])} shards; "
        f"{len(manifest['skipped'])} skipped; {elapsed:.1f}s{rate}"
    )
    return manifest


def verify(out: str | Path) -> int:
    """`--verify`: re-hash every shard; raises UserError listing the first problem."""
    count, size, problems = mf.verify_shards(out)
    out = mf.shown_location(out)
    for p in problems:
        console.info(f"bad shard: {p}")
    if problems:
        raise UserError(f"{out}: {len(problems)} of {count} shards do not match the manifest (first: {problems[0]})")
    console.info(f"{out}: all {count} shards match the manifest ({size / 1e6:.1f} MB checked)")
    return count
