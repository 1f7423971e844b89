"""Training and validation data read from WebDataset shards (raw or PNG), locally or remotely.

Why it is built this way:

* **Equal steps on every rank.** DDP hangs if one rank runs out of batches before the others.
  Each rank's stream is therefore *endless* and the training loop takes exactly
  ``iters_per_epoch`` batches per epoch from it. An "epoch" is a number of steps, as in the
  reference (1000 iterations of batch 16), not a pass over the data.
* **Samples, not shards, are dealt out.** A seeded permutation of all samples per pass
  (:class:`Schedule`) decides which sample fills which slot of each global batch, and each
  rank fills its own slots. Every sample is drawn once per pass whatever the shard sizes and
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
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.console import UserError
from pipeline.train import shardindex, shardio

# ---------------------------------------------------------------------------------------------
# Patch extraction and augmentation (pure numpy)
# ---------------------------------------------------------------------------------------------


def random_patch(
    lr: np.ndarray, hr: np.ndarray, scale: int, hr_patch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops: an LR patch of ``hr_patch // scale`` at a uniform position, and the HR
    patch at ``scale`` times that position (the reference's single-scale semantics)."""
    lp = hr_patch // scale
    h, w = lr.shape[:2]
    y = int(rng.integers(0, h - lp + 1))
    x = int(rng.integers(0, w - lp + 1))
    return (
        lr[y : y + lp, x : x + lp],
        hr[y * scale : (y + lp) * scale, x * scale : (x + lp) * scale],
    )


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 dihedral transforms of an HxWxC image: bit 0 flips the width axis, bit 1
    the height axis, bit 2 transposes (as the reference's hflip/vflip/rot90 coin flips)."""
    if k & 1:
        img = img[:, ::-1]
    if k & 2:
        img = img[::-1, :]
    if k & 4:
        img = img.transpose(1, 0, 2)
    return img


def check_pair(lr: np.ndarray, hr: np.ndarray, scale: int, where: str) -> None:
    if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
        raise UserError(
            f"{where}: HR {hr.shape[1]}x{hr.shape[0]} is not {scale}x the LR "
            f"{lr.shape[1]}x{lr.shape[0]} (shards from another scale or a broken writer?)"
        )


# ---------------------------------------------------------------------------------------------
# Which sample fills which batch slot (pure, the same on every rank and loader process)
# ---------------------------------------------------------------------------------------------


class Schedule:
    """The global draw order: pass ``p`` over all ``N`` samples is a seeded permutation.

    Draw ``d`` is sample ``perm_{d // N}[d % N]``. The global batch of step ``t`` takes draws
    ``[g*B, (g+1)*B)`` with ``g = t // patches_per_sample`` and ``B`` the global batch; rank
    ``r`` takes its contiguous share of those slots. So every sample is drawn exactly once per
    pass whatever the number of ranks, loader processes or shard sizes (balanced coverage), and
    a batch is a uniform draw without replacement from the whole dataset (near-uniform mixing).
    """

    def __init__(self, counts: Sequence[int], seed: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        if len(self.counts) == 0 or self.counts.sum() == 0:
            raise UserError("no training samples to read (the manifest lists no train shards)")
        self.ends = np.cumsum(self.counts)
        self.total = int(self.ends[-1])
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, p: int) -> np.ndarray:
        perm = self._perms.get(p)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0xA, p]).permutation(self.total)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[p] = perm
        return perm

    def sample(self, d: int) -> int:
        p, i = divmod(d, self.total)
        return int(self.perm(p)[i])

    def replacement(self, d: int, attempt: int) -> int:
        """A uniformly drawn stand-in for draw ``d`` when its sample cannot be used."""
        return int(np.random.default_rng([self.seed, 0xC, d, attempt]).integers(self.total))

    def locate(self, g: int) -> tuple[int, int]:
        """(shard number, position in the shard) of global sample index ``g``."""
        shard = int(np.searchsorted(self.ends, g, side="right"))
        return shard, g - int(self.ends[shard] - self.counts[shard])


def rank_slots(global_batch: int, rank: int, world: int) -> range:
    """The global batch slots rank ``rank`` fills (as loop.rank_batch splits the batch)."""
    base, extra = divmod(global_batch, world)
    start = base * rank + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


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
            entries = entries_for_locations(self.shards)
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


def entries_for_locations(locations: Sequence[str]) -> list[shardio.ShardEntry]:
    """The manifest entry of each shard, from the manifest in the shard's folder."""
    manifests: dict[str, dict[str, shardio.ShardEntry]] = {}
    out = []
    for loc in locations:
        folder = shardio.parent(loc)
        if folder not in manifests:
            manifest = shardio.load_manifest(folder)
            manifests[folder] = {
                shardio.shown(e.location).rsplit("/", 1)[-1]: e
                for split in ("train", "valid") for e in shardio.entries_for(folder, split, manifest)
            }
        name = shardio.shown(loc).rsplit("/", 1)[-1]
        entry = manifests[folder].get(name)
        if entry is None:
            raise UserError(f"{shardio.shown(loc)}: not listed in {shardio.shown(shardio.join(folder, shardio.MANIFEST))}")
        out.append(dataclasses.replace(entry, location=loc))
    return out



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


# ---------------------------------------------------------------------------------------------
# Validation data: whole images, split across ranks by index
# ---------------------------------------------------------------------------------------------


@dataclass
class ValSample:
    index: int
    key: str
    lr: np.ndarray  # HxWx3 uint8
    hr: np.ndarray  # (scale*H)x(scale*W)x3 uint8


_VERIFIED: set[str] = set()  # validation shards whose sha256 this process already checked


def validation_from_shards(
    shards: Sequence[str], scale: int, rank: int = 0, world_size: int = 1, max_images: int = 0
) -> Iterator[ValSample]:
    """This rank's validation images (global index ``i`` with ``i % world_size == rank``).

    Each shard is read whole, so its sha256 is checked too (once per process)."""
    index = 0
    for entry in entries_for_locations([str(p) for p in shards]):
        if entry.location in _VERIFIED:
            reader, shard = shardindex.ShardReader([entry], scale), 0
        else:
            reader, shard = shardindex.read_whole_verified(entry, scale)
            _VERIFIED.add(entry.location)
        try:
            keys = reader.index(shard).keys
            for pos, key in enumerate(keys):
                if max_images and index >= max_images:
                    return
                if index % world_size == rank:
                    lr, hr = reader.pair(shard, pos)
                    yield ValSample(index, key, lr, hr)
                index += 1
        finally:
            reader.close()


def validation_from_folder(
    folder: str | Path, scale: int, rank: int = 0, world_size: int = 1, max_images: int = 0
) -> Iterator[ValSample]:
    """HR images of a folder (e.g. ``Set5/HR``); LR made with MATLAB-style bicubic, HR cropped
    to a multiple of the scale as in the standard benchmark protocol."""
    from pipeline.imageio import list_images
    from pipeline.preprocess import imresize

    files = list_images(folder)
    if max_images:
        files = files[:max_images]
    for index, path in enumerate(files):
        if index % world_size != rank:
            continue
        from pipeline.imageio import read_image

        hr, _ = read_image(path)
        h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        hr = np.ascontiguousarray(hr[:h, :w])
        lr = imresize(hr, scale=1.0 / scale)
        yield ValSample(index, path.stem, lr, hr)
