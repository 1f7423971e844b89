"""Training data: each rank's endless stream of patch batches from WebDataset shards (raw or
PNG), locally or remotely, and the DataLoader over it.

Why it is built this way:

* **Equal steps on every rank.** DDP hangs if one rank runs out of batches before the others.
  Each rank's stream is therefore *endless* and the training loop takes exactly
  ``iters_per_epoch`` batches per epoch from it. An "epoch" is a number of steps, as in the
  reference (1000 iterations of batch 16), not a pass over the data.
* **Samples, not shards, are dealt out.** A seeded permutation of all samples per pass
  (:class:`~pipeline.train.sampling.Schedule`) decides which sample fills which slot of each
  global batch, and each rank fills its own slots. Every sample is drawn once per pass whatever the shard sizes and
  the number of ranks or loader processes, and a batch of 16 is a uniform draw from the whole
  dataset (about 15.9 distinct source images out of 16 on DIV2K), where streaming shards in
  order through a shuffle buffer mixed only a few images.
* **Random access without decoding.** Shards are indexed once per stream by walking their tar
  headers (:mod:`pipeline.train.shardio`), then a raw patch is two reads of just the rows it
  covers; PNG shards (older ones) are decoded per sample. The patch is a copy, never a view
  of a whole sub-image, so nothing large stays alive.
* **Exact resume.** A batch is a pure function of the step (see :class:`PatchStream`), so a
  run resumed at step k sees the batches an uninterrupted run would have seen.
* Batches leave the loader as uint8 (4x less inter-process traffic than float) and are
  converted on the training device.

The pure functions that decide which sample, crop and transform fill a slot are in
:mod:`pipeline.train.sampling`; the validation images (whole, split across ranks by index) are
read by :mod:`pipeline.train.validation`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.console import UserError
from pipeline.train import shardindex, shardio
from pipeline.train.sampling import Schedule, dihedral, random_patch, rank_slots

# ---------------------------------------------------------------------------------------------
# The training stream
# ---------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    import sys

    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


class PatchStream(IterableDataset):
    """Endless stream of uint8 batches ``(lr, hr)``, NCHW, for one rank.

    **Exact resume contract.** The batch of step ``t`` is a pure function of (the shards and
    their manifest, ``seed``, ``scale``, ``patch_size``, ``augment``, ``patches_per_sample``,
    ``global_batch``, ``rank``, ``world_size``, ``t``): ``PatchStream(..., start_step=k)`` yields
    the batches of steps ``k, k+1, ...``, bit for bit those an uninterrupted stream yields from
    its k-th batch on, with any number of loader processes (0 included; DataLoader workers
    take steps round-robin: worker ``w`` of ``W`` makes steps ``k+w, k+w+W, ...``, which
    DataLoader returns in order). Samples replaced because their shard is skipped
    (``skip_bad_shards``) or too small for the patch are replaced deterministically too.

    ``shuffle_buffer`` is accepted for compatibility and unused: the schedule mixes globally.
    """

    def __init__(
        self,
        shards: Sequence[str],
        counts: Sequence[int],
        scale: int,
        patch_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1,
        start_step: int = 0,
        augment: bool = True,
        patches_per_sample: int = 1,
        shuffle_buffer: int = 256,
        *,
        global_batch: int | None = None,
        skip_bad_shards: bool = False,
    ) -> None:
        import multiprocessing

        if len(shards) != len(counts):
            raise ValueError("one sample count per shard is needed")
        self.shards = [str(s) for s in shards]
        self.counts = [int(c) for c in counts]
        self.scale, self.patch_size, self.batch_size = scale, patch_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.start_step = seed, start_step
        self.augment = augment
        self.patches_per_sample = max(1, patches_per_sample)
        self.global_batch = global_batch if global_batch is not None else batch_size * world_size
        self.slots = rank_slots(self.global_batch, rank, world_size)
        if len(self.slots) != batch_size:
            raise ValueError(f"rank {rank} of {world_size} takes {len(self.slots)} of a global batch of "
                             f"{self.global_batch}, not {batch_size}")
        self.skip_bad_shards = skip_bad_shards
        # Shared with the loader processes (forked): which shards this rank's streams skipped.
        self._skipped = multiprocessing.get_context("fork").Array("b", len(self.shards))
        self.schedule = Schedule(self.counts, seed)
        self._reader: shardindex.ShardReader | None = None
        self._bad: set[int] = set()
        self._small_warned = False
        self._decoded: OrderedDict = OrderedDict()

    # -- what the loop and tracking can read ------------------------------------------------
    @property
    def skipped_shards(self) -> int:
        """Distinct shards found bad and skipped (``skip_bad_shards``) by this rank's loader
        processes so far (readable from the training process while they run)."""
        with self._skipped.get_lock():
            return sum(1 for flag in self._skipped if flag)

    def skipped_shard_names(self) -> list[str]:
        with self._skipped.get_lock():
            return [shardio.shown(self.shards[i]) for i, flag in enumerate(self._skipped) if flag]

    # -- reading ----------------------------------------------------------------------------
    def reader(self) -> shardindex.ShardReader:
        if self._reader is None:
            entries = shardio.entries_for_locations(self.shards)
            for entry, count in zip(entries, self.counts, strict=True):
                if entry.samples != count:
                    raise UserError(f"{shardio.shown(entry.location)}: the manifest says {entry.samples} samples, "
                                    f"the job was given {count}")
            self._reader = shardindex.ShardReader(entries, self.scale)
            self._reader.prefetch()  # object storage: index every shard in the background
        return self._reader

    def _skip(self, shard: int, exc: shardindex.BadShard) -> None:
        self._bad.add(shard)
        with self._skipped.get_lock():
            self._skipped[shard] = 1
        _warn(f"{exc}; shard skipped (--skip-bad-shards)")

    def _pair(self, shard: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """A decoded PNG sample, cached for the next few steps (``patches_per_sample`` > 1)."""
        key = (shard, pos)
        got = self._decoded.get(key)
        if got is None:
            got = self.reader().pair(shard, pos)
            self._decoded[key] = got
            while len(self._decoded) > 2 * self.batch_size * (self.patches_per_sample > 1):
                self._decoded.popitem(last=False)
        return got

    def _too_small(self, shard: int, pos: int, h: int, w: int, lp: int) -> None:
        if not self._small_warned:
            self._small_warned = True
            _warn(f"{self.reader().where(shard, pos)}: LR {w}x{h} is smaller than the LR patch {lp} "
                  f"(--patch-size {self.patch_size} / scale {self.scale}); such samples are replaced by "
                  "others (a smaller --patch-size uses them; preprocess --min-size drops them)")

    def _try_patch(self, g: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        shard, pos = self.schedule.locate(g)
        if shard in self._bad:
            return None
        s, lp = self.scale, self.patch_size // self.scale
        reader = self.reader()
        try:
            size = reader.size(shard, pos)  # indexes (and verifies) the shard on first use
            if size is not None:  # raw: crop straight from the file, only the rows we need
                h, w = size
                if h < lp or w < lp:
                    self._too_small(shard, pos, h, w, lp)
                    return None
                y, x = int(rng.integers(0, h - lp + 1)), int(rng.integers(0, w - lp + 1))
                lr = reader.rows(shard, pos, "lr", y, y + lp)[:, x : x + lp]
                hr = reader.rows(shard, pos, "hr", y * s, (y + lp) * s)[:, x * s : (x + lp) * s]
            else:
                lr_full, hr_full = self._pair(shard, pos)
                if lr_full.shape[0] < lp or lr_full.shape[1] < lp:
                    self._too_small(shard, pos, lr_full.shape[0], lr_full.shape[1], lp)
                    return None
                lr, hr = random_patch(lr_full, hr_full, s, self.patch_size, rng)
        except shardindex.BadShard as exc:
            if not self.skip_bad_shards:
                raise
            self._skip(shard, exc)
            return None
        if self.augment:
            k = int(rng.integers(8))
            lr, hr = dihedral(lr, k), dihedral(hr, k)
        return lr, hr  # views: batch() copies them straight into the batch arrays

    def draw(self, step: int, slot: int) -> int:
        """The draw number (position in the endless sequence of passes) of a batch slot."""
        return (step // self.patches_per_sample) * self.global_batch + slot

    def sample_for(self, step: int, slot: int) -> int:
        """The global sample index the schedule puts in a batch slot (before any replacement)."""
        return self.schedule.sample(self.draw(step, slot))

    def patch(self, step: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The (LR, HR) patch (HWC views) of global batch slot ``slot`` at step ``step``."""
        d = self.draw(step, slot)
        rng = np.random.default_rng([self.seed, 0xB, step, slot])
        g = self.schedule.sample(d)
        for attempt in range(1, 1001):
            got = self._try_patch(g, rng)
            if got is not None:
                return got
            g = self.schedule.replacement(d, attempt)
        raise UserError(f"no usable training sample in 1000 draws: every shard skipped or every sample smaller "
                        f"than the LR patch {self.patch_size // self.scale} (lower --patch-size)")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch of step ``step``: uint8 NCHW (LR, HR).

        Each patch is copied once, from its read buffer (or decoded sample) straight into the
        batch in NCHW order: the batch owns its bytes and keeps nothing else alive."""
        lp = self.patch_size // self.scale
        lr = np.empty((len(self.slots), 3, lp, lp), np.uint8)
        hr = np.empty((len(self.slots), 3, self.patch_size, self.patch_size), np.uint8)
        for i, slot in enumerate(self.slots):
            lr_p, hr_p = self.patch(step, slot)
            lr[i] = lr_p.transpose(2, 0, 1)
            hr[i] = hr_p.transpose(2, 0, 1)
        return torch.from_numpy(lr), torch.from_numpy(hr)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers


# ---------------------------------------------------------------------------------------------
# The DataLoader over it
# ---------------------------------------------------------------------------------------------


def _background_worker(worker_id: int) -> None:
    """Loader processes yield the CPU to the training threads.

    On CPU training the step's compute threads use every core, and a decoding process that
    competes on equal terms makes the whole parallel region wait for its slowest thread. At
    low priority the loader runs in the gaps (Python glue, single-threaded ops, waits) and the
    prefetch queue absorbs the jitter; on GPU nodes it changes nothing.
    """
    import os

    torch.set_num_threads(1)
    try:
        os.nice(10)
    except OSError:
        pass


def auto_loader_workers(cpus: float) -> int:
    """``--loader-workers auto``: every CPU the training worker reserved beyond the one its own
    process needs (a GPU worker's Python thread, or a CPU worker's main compute thread).

    The CPUs come out of the worker's own Ray reservation (``--cpus-per-worker``), so loader
    processes never oversubscribe a node: size ``--cpus-per-worker`` to what the node has
    (cluster/README.md shows the arithmetic for an 8-GPU node).
    """
    return max(0, math.floor(cpus + 1e-9) - 1)


def reserved_cpus() -> float:
    """CPUs Ray reserved for this worker; outside Ray, the CPUs this process may use."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return float(cpus)
    except Exception:  # not in a Ray worker
        pass
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_train_loader(dataset: PatchStream, loader_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over the endless stream; batches are formed inside the workers.

    ``loader_workers`` -1 means auto (:func:`auto_loader_workers` of :func:`reserved_cpus`).
    """
    if loader_workers < 0:
        loader_workers = auto_loader_workers(reserved_cpus())
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        persistent_workers=loader_workers > 0,
        prefetch_factor=4 if loader_workers > 0 else None,
        worker_init_fn=_background_worker if loader_workers > 0 else None,
        multiprocessing_context="fork" if loader_workers > 0 else None,
    )


def to_model_range(batch: torch.Tensor, device: torch.device, rgb_range: float) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, rgb_range] on `device` (conversion after the copy)."""
    return batch.to(device, non_blocking=True).float().mul_(rgb_range / 255.0)
