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
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__, console
from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.output import LocalOut, RemoteOut, is_remote
from pipeline.preprocess.pool import (
    executor,
    ordered_results,
    refuse_unguarded_reentry,
    resolve_jobs,
)
from pipeline.preprocess.sources import Inputs, discover, fingerprint
from pipeline.preprocess.subimages import ImageResult, SampleParams
from pipeline.preprocess.tarwriter import (
    ShardInfo,
    ShardWriter,
    write_error,
)

JOURNAL = ".preprocess-journal.jsonl"
LOCK = ".preprocess.lock"
JOURNAL_VERSION = 1

Pos = tuple[int, int]  # (image index, sample offset within that image)


# ---------------------------------------------------------------------------------------------
# Journal
# ---------------------------------------------------------------------------------------------


class Journal:
    """Append-only JSON-lines record of finished shards and image outcomes."""

    def __init__(self, out: Path, fp: str) -> None:
        self.path = out / JOURNAL
        self.fp = fp
        self.shards: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "valid": {}}
        self.images: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "valid": {}}
        self._f = None

    def load(self) -> bool:
        """Read a previous journal; False (and nothing loaded) unless its fingerprint matches."""
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return False
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash; everything before it is valid
        if not records or records[0].get("type") != "header" or records[0].get("fingerprint") != self.fp:
            return False
        for rec in records[1:]:
            if rec.get("type") == "shard":
                self.shards[rec["split"]][rec["index"]] = rec
            elif rec.get("type") == "image":
                self.images[rec["split"]][rec["index"]] = rec
        return True

    def open(self, fresh: bool) -> None:
        try:
            if fresh:
                self._f = open(self.path, "w")  # noqa: SIM115 - closed in close()
                self._write({"type": "header", "version": JOURNAL_VERSION, "fingerprint": self.fp}, sync=True)
            else:
                self._f = open(self.path, "a")  # noqa: SIM115
                # A torn line from a crash would swallow the next record: end it first.
                if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
                    self._f.write("\n")
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def _write(self, rec: dict[str, Any], sync: bool) -> None:
        assert self._f is not None
        try:
            self._f.write(json.dumps(rec, sort_keys=True) + "\n")
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def image(self, res: ImageResult) -> None:
        rec = {
            "type": "image", "split": res.split, "index": res.index, "source": res.source,
            "samples": len(res.samples), "error": res.error, "skipped": res.skipped, "note": res.note,
            "min_hr": list(res.min_hr) if res.min_hr else None,
        }
        self.images[res.split][res.index] = rec
        self._write(rec, sync=False)  # made durable by the next shard record's fsync

    def shard(self, split: str, index: int, info: ShardInfo, start: Pos, end: Pos) -> None:
        rec = {
            "type": "shard", "split": split, "index": index, "name": info.name, "samples": info.samples,
            "bytes": info.bytes, "sha256": info.sha256, "start": list(start), "end": list(end),
        }
        self.shards[split][index] = rec
        self._write(rec, sync=True)

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run:
    cfg: PreprocessConfig
    out: Path
    inputs: Inputs
    params: SampleParams
    journal: Journal
    jobs: int
    skip_bad: bool
    prefix: str = mf.LEGACY_PREFIX
    dest: LocalOut | RemoteOut | None = None
    manifest_removed: bool = False
    converted: int = 0
    fresh_images: int = 0

    # -- bookkeeping ---------------------------------------------------------------------------

    def _before_first_write(self) -> None:
        """A manifest must never describe shards that are being replaced."""
        if not self.manifest_removed:
            assert self.dest is not None
            self.dest.remove_manifest()
            self.manifest_removed = True

    def _consume(self, res: ImageResult) -> None:
        self.journal.image(res)
        self.fresh_images += 1
        if res.error is not None:
            if not self.skip_bad:
                raise UserError(res.error)
            console.warn(f"{res.error} (skipped: --skip-bad)")
        elif res.skipped is not None:
            console.warn(res.skipped)
        elif res.note is not None:
            self.converted += 1
            if self.converted == 1:
                console.warn(f"{res.source}: {res.note} (DIV2K-style data is 8-bit RGB; further conversions are only counted)")

    # -- producing shards ----------------------------------------------------------------------

    def produce(
        self, ex, split: str, start: Pos, first_index: int, stop: Pos | None, bar, expected: int | None = None
    ) -> None:
        """Write shards first_index, ... from stream position `start` up to `stop` (exclusive)
        or, when `stop` is None, to the end of the split (the last shard may be short).
        Rebuilding one recorded shard passes its `stop` and `expected` sample count."""
        tasks = self.inputs.tasks[split]
        n = self.cfg.shard_samples
        last_img = len(tasks) if stop is None else (stop[0] + 1 if stop[1] else stop[0])
        todo = tasks[start[0] : last_img]
        writer: ShardWriter | None = None
        index, shard_start = first_index, start
        try:
            for res in ordered_results(ex, todo, self.params, window=self.jobs + 4):
                self._consume(res)
                bar.advance()
                count = len(res.samples)
                lo = start[1] if res.index == start[0] else 0
                hi = stop[1] if stop is not None and stop[1] and res.index == stop[0] else count
                for j in range(lo, min(hi, count)):
                    if writer is None:
                        self._before_first_write()
                        writer = ShardWriter(self.out / mf.shard_name(split, index, self.prefix))
                        shard_start = (res.index, j)
                    writer.add_sample(res.samples[j][1])
                    if writer.samples == n:
                        end = (res.index, j + 1) if j + 1 < count else (res.index + 1, 0)
                        self._finish(split, index, writer, shard_start, end)
                        writer, index = None, index + 1
                res.samples = []  # free the encoded bytes now
            if writer is not None:
                if stop is not None and writer.samples != expected:
                    raise UserError(
                        f"{self.out}: shard {mf.shard_name(split, index, self.prefix)} could not be rebuilt with its recorded "
                        "samples (inputs changed?); delete the folder's contents and rerun"
                    )
                self._finish(split, index, writer, shard_start, stop or (len(tasks), 0))
                writer = None
        finally:
            if writer is not None:
                writer.abort()

    def _finish(self, split: str, index: int, writer: ShardWriter, start: Pos, end: Pos) -> None:
        old = self.journal.shards[split].get(index)
        info = writer.finish()
        assert self.dest is not None
        self.dest.publish(info.name)  # object storage: upload, then drop the local copy
        self.journal.shard(split, index, info, start, end)
        self.dest.sync_journal(self.journal.path)
        if old is not None and old["sha256"] != info.sha256:
            console.warn(f"{info.name}: rebuilt shard differs from the previous run's bytes (library versions changed?)")


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


def _drop_temp_shards(dest: LocalOut | RemoteOut, out: Path) -> None:
    """Temporary shard files (and, for object storage, temporary keys) of a killed run."""

    def is_temp(name: str) -> bool:
        return name.startswith(".") and name.endswith(".tar.tmp") and bool(mf.SHARD_RE.match(name[1:-4]))

    for p in out.iterdir():
        if is_temp(p.name):
            p.unlink()
    if dest.remote:
        for name in dest.names():
            if is_temp(name):
                dest.delete(name)


def _valid_journaled(dest: LocalOut | RemoteOut, journal: Journal, split: str) -> tuple[list[int], list[int]]:
    """(kept shard indices, journaled shards to rebuild): a local shard is kept iff its file
    hashes to the journaled sha256 (a full re-read: cheap next to regenerating it); an object
    iff it has the journaled size (see :mod:`.output`)."""
    kept, redo = [], []
    indices = sorted(journal.shards[split])
    for index in console.track(indices, f"check {split} shards", unit="shard") if indices else []:
        rec = journal.shards[split][index]
        (kept if dest.shard_ok(rec["name"], rec["bytes"], rec["sha256"]) else redo).append(index)
    return kept, redo


def _build_manifest(run: _Run) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    skipped = []
    for split in mf.SPLITS:
        tasks = run.inputs.tasks[split]
        outcomes = run.journal.images[split]
        missing = [t.source for t in tasks if t.index not in outcomes]
        if missing:
            raise UserError(f"{run.out / JOURNAL}: resume state lacks {missing[0]}; delete that file and rerun")
        images = sum(1 for t in tasks if outcomes[t.index]["samples"] > 0)
        for t in tasks:
            o = outcomes[t.index]
            if o["error"] or o["skipped"]:
                skipped.append({"file": t.path, "error": o["error"] or o["skipped"]})
        shards = [
            {k: rec[k] for k in ("name", "samples", "bytes", "sha256")}
            for _, rec in sorted(run.journal.shards[split].items())
        ]
        sizes = [outcomes[t.index].get("min_hr") for t in tasks if outcomes[t.index]["samples"] > 0]
        sizes = [hw for hw in sizes if hw]
        min_hr = [min(h for h, _ in sizes), min(w for _, w in sizes)] if sizes else None
        splits[split] = {
            "images": images, "samples": sum(s["samples"] for s in shards), "min_hr": min_hr, "shards": shards,
        }
    return {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "dataset": run.inputs.dataset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "params": _params_record(run.params, run.cfg, run.prefix),
        "inputs": _inputs_record(run.inputs, run.cfg),
        "splits": splits,
        "skipped": skipped,
    }


def _params_record(params: SampleParams, cfg: PreprocessConfig, prefix: str) -> dict[str, Any]:
    """The manifest's ``params`` (also fingerprinted): everything that shapes the shards."""
    return {**params.as_dict(), "shard_samples": cfg.shard_samples, "name": prefix}


def shard_prefix(cfg: PreprocessConfig, inputs: Inputs) -> str:
    """``--name`` or the dataset's folder name, sanitized for shard file names."""
    given = cfg.name if cfg.name else inputs.dataset
    prefix = mf.sanitize_prefix(given)
    if not prefix:
        what = f"--name {cfg.name!r}" if cfg.name else f"dataset name {inputs.dataset!r}"
        raise UserError(f"{what}: no letters or digits to name the shards with; give --name (e.g. --name photos)")
    return prefix


def _remove_stale(dest: LocalOut | RemoteOut, manifest: dict[str, Any], ours: set[str]) -> int:
    """Delete our own shard files that the new manifest does not list (older parameters).

    "Our own" means a shard-shaped name with this run's prefix or one an earlier manifest or
    journal here listed: another dataset's shards that happen to share the folder are kept."""
    listed = {s["name"] for split in mf.SPLITS for s in manifest["splits"][split]["shards"]}
    prefix = manifest["params"]["name"]
    removed = 0
    for name in dest.names():
        m = mf.SHARD_RE.match(name)
        if m and name not in listed and (m.group(1) == prefix or name in ours):
            dest.delete(name)
            removed += 1
    return removed


def _inputs_record(inputs: Inputs, cfg: PreprocessConfig) -> dict[str, Any]:
    """The manifest's ``inputs``: the folders, and the holdout that split them."""
    record: dict[str, Any] = dict(inputs.roots)
    if cfg.holdout:
        record["holdout"] = cfg.holdout
    return record


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_changes(dest: LocalOut | RemoteOut, params: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
    """How this run's settings differ from those of the finished dataset in `dest` ([] when
    there is none, or it was made with the same settings)."""
    try:
        old = dest.read_manifest()
    except UserError:  # nothing finished here (or an unreadable manifest, replaced anyway)
        return []
    new = json.loads(json.dumps({"params": params, "inputs": inputs}))  # lists, as stored
    changes = []
    for section in ("params", "inputs"):
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        if section == "params":  # what older manifests meant by leaving a field out
            before = {"encoding": "png", "name": mf.LEGACY_PREFIX, **before}
        after = new[section]
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                changes.append(f"{key} {_show(before.get(key))} -> {_show(after.get(key))}")
    return changes


def _complete_shards(dest: LocalOut | RemoteOut, journal: Journal) -> int:
    """Journaled shards still there at their recorded size: what a rerun will keep."""
    count = 0
    for split in mf.SPLITS:
        for rec in journal.shards[split].values():
            with contextlib.suppress(OSError, UserError):
                count += dest.size(rec["name"]) == rec["bytes"]
    return count


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
    fp = fingerprint(inputs, _params_record(params, cfg, prefix), __version__)
    journal = Journal(out, fp)
    try:
        return _run_locked(cfg, force, dest, inputs, params, journal, prefix)
    except KeyboardInterrupt:
        console.info(
            f"interrupted: {_complete_shards(dest, journal)} complete shard(s) kept in {dest.shown}; "
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
            changes = settings_changes(dest, _params_record(params, cfg, prefix), _inputs_record(inputs, cfg))
            if changes and not force:
                raise UserError(
                    f"{shown}: holds a finished dataset made with other settings ({'; '.join(changes)}); "
                    "rerun with --force to replace it, or choose another --out"
                )
            if journal.path.exists():
                console.info(f"{shown}: starting over (the earlier run there used other settings or input files)")
        _drop_temp_shards(dest, out)
        old_manifest = None
        with contextlib.suppress(UserError):
            old_manifest = dest.read_manifest()
        ours = {rec["name"] for split in mf.SPLITS for rec in journal.shards[split].values()}
        if old_manifest is not None:
            ours |= {s["name"] for split in mf.SPLITS for s in old_manifest["splits"][split]["shards"]}
        if not resumed:
            old_manifest = None
        run = _Run(cfg, out, inputs, params, journal, jobs, cfg.skip_bad, prefix, dest)
        if not cfg.skip_bad:  # a previous --skip-bad run must not silently pass now
            for split in mf.SPLITS:
                for rec in journal.images[split].values():
                    if rec["error"]:
                        raise UserError(rec["error"])
        plan: list[tuple[str, Pos, int, Pos | None, int | None]] = []
        kept_total = 0
        for split in mf.SPLITS:
            kept, redo = _valid_journaled(dest, journal, split) if resumed else ([], [])
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
        manifest = _build_manifest(run)
        if not plan and old_manifest is not None:
            same = {k: v for k, v in old_manifest.items() if k != "created"} == {
                k: v for k, v in manifest.items() if k != "created"}
            if same:
                manifest = old_manifest
        if manifest.get("splits", {}).get("train", {}).get("samples", 0) == 0:
            raise UserError(f"{next(iter(inputs.roots.values()))}: no usable training images (see the warnings above)")
        if manifest is not old_manifest:
            dest.write_manifest((json.dumps(manifest, indent=1) + "\n").encode())
        removed = _remove_stale(dest, manifest, ours)
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

