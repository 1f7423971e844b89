"""The resume state of `sr-pipeline preprocess`: ``.preprocess-journal.jsonl`` and what it keeps.

The journal is the only thing a rerun trusts (see :mod:`.run` for the whole scheme). Its first
line is the fingerprint of the run's parameters and input files; after it, one line per
consumed image (its outcome) and one per renamed shard (name, sha256, and the stream positions
it starts and ends at). Lines are only ever appended; a torn last line from a crash is ignored.

Besides the journal itself this module holds the checks a rerun makes against it before any
new work: which journaled shards are still intact (kept) and which must be rebuilt, how many
complete shards an interruption leaves, and the temporary shard files of a killed run to
remove. It is separate from the run because it is the on-disk contract between two runs;
the run only plans from it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline import console
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.output import LocalOut, RemoteOut
from pipeline.preprocess.subimages import ImageResult
from pipeline.preprocess.tarwriter import ShardInfo, write_error

JOURNAL = ".preprocess-journal.jsonl"
JOURNAL_VERSION = 1

Pos = tuple[int, int]  # (image index, sample offset within that image)


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


def drop_temp_shards(dest: LocalOut | RemoteOut, out: Path) -> None:
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


def valid_journaled(dest: LocalOut | RemoteOut, journal: Journal, split: str) -> tuple[list[int], list[int]]:
    """(kept shard indices, journaled shards to rebuild): a local shard is kept iff its file
    hashes to the journaled sha256 (a full re-read: cheap next to regenerating it); an object
    iff it has the journaled size (see :mod:`.output`)."""
    kept, redo = [], []
    indices = sorted(journal.shards[split])
    for index in console.track(indices, f"check {split} shards", unit="shard") if indices else []:
        rec = journal.shards[split][index]
        (kept if dest.shard_ok(rec["name"], rec["bytes"], rec["sha256"]) else redo).append(index)
    return kept, redo


def complete_shards(dest: LocalOut | RemoteOut, journal: Journal) -> int:
    """Journaled shards still there at their recorded size: what a rerun will keep."""
    count = 0
    for split in mf.SPLITS:
        for rec in journal.shards[split].values():
            with contextlib.suppress(OSError, UserError):
                count += dest.size(rec["name"]) == rec["bytes"]
    return count
