"""Per-image work of one preprocess run: ordered image results in, finished shards out.

:class:`ShardProducer` consumes the worker results in stream order (journaling each image's
outcome, warning about bad or converted images), cuts the sample stream into shards of
``shard_samples`` at fixed positions, and finishes each one: rename, publish (local folder or
object storage, :mod:`.output`), then journal it (:mod:`.journal`). It is separate from
:mod:`.run`, which decides *what* to produce (the plan from the journal) and owns the lock,
the executor and the manifest; this module is only the writing of one planned range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import console
from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.journal import Journal, Pos
from pipeline.preprocess.output import LocalOut, RemoteOut
from pipeline.preprocess.pool import ordered_results
from pipeline.preprocess.sources import Inputs
from pipeline.preprocess.subimages import ImageResult, SampleParams
from pipeline.preprocess.tarwriter import ShardWriter


@dataclass
class ShardProducer:
    """One run's shard writing, and the counts it reports at the end (converted, fresh images)."""

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
