"""Training and validation data streamed from WebDataset shards.

Why it is built this way:

* **Equal steps on every rank.** DDP hangs if one rank runs out of batches before the others
  (uneven shard counts do exactly that). Each loader stream is therefore *endless*: it cycles
  over its own shards, reshuffling their order every pass, and the training loop takes exactly
  ``iters_per_epoch`` batches per epoch from it. An "epoch" is a number of steps, as in the
  reference (1000 iterations of batch 16), not a pass over the data.
* **Disjoint streams.** Stream ``rank * loader_workers + worker`` owns a fixed subset of the
  shards, so no sample is ever drawn by two ranks when there are at least as many shards as
  streams. With fewer shards, every stream reads all shards and keeps every n-th sample
  (still disjoint, more I/O); only when there are fewer *samples* than streams do streams share
  samples (a warning is printed by the launcher).
* **Cheap patches.** A sample is an HR sub-image (480 px for DIV2K) plus its LR; decoding one
  sub-image per patch is ~20x cheaper than decoding a whole 2K source image per patch, the
  reference's approach (benchmarks/loader.py). ``patches_per_sample`` cuts several patches
  from each decoded sub-image when decoding competes with CPU training for the same cores.
  Batches leave the loader as uint8 (4x less inter-process traffic than float) and are
  converted on the training device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.console import UserError
from pipeline.imageio import decode_png

# ---------------------------------------------------------------------------------------------
# Which samples a loader stream owns (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPlan:
    """The shards a stream reads and which of their samples it keeps.

    ``mode``: ``"shards"`` (own shards, keep everything), ``"samples"`` (all shards, keep
    global sample index ``i`` when ``i % stride == offset``) or ``"shared"`` (all shards, keep
    everything: only when there are fewer samples than streams).
    """

    mode: str
    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0

    def keeps(self, global_index: int) -> bool:
        return global_index % self.stride == self.offset


def plan_stream(counts: Sequence[int], stream: int, n_streams: int, seed: int = 0) -> StreamPlan:
    """Assign shards (with per-shard sample ``counts``) to stream ``stream`` of ``n_streams``.

    The shard-to-stream assignment uses a seeded permutation that every rank computes
    identically, so streams are disjoint without any communication.
    """
    if not 0 <= stream < n_streams:
        raise ValueError(f"stream {stream} out of range for {n_streams} streams")
    n = len(counts)
    if n == 0:
        raise UserError("no training shards to read")
    if n >= n_streams:
        perm = np.random.default_rng(seed).permutation(n)
        return StreamPlan("shards", tuple(sorted(int(i) for i in perm[stream::n_streams])))
    if sum(counts) >= n_streams:
        return StreamPlan("samples", tuple(range(n)), stride=n_streams, offset=stream)
    return StreamPlan("shared", tuple(range(n)))


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
# Reading shards
# ---------------------------------------------------------------------------------------------


def _lr_name(scale: int) -> str:
    return f"lr_x{scale}.png"


def iter_shard(path: str, scale: int) -> Iterator[dict]:
    """Samples of one shard with only the HR and the chosen-scale LR kept (others skipped)."""
    import webdataset as wds

    wanted = (".hr.png", f".{_lr_name(scale)}")
    samples = wds.tarfile_samples(
        [{"url": path}], select_files=lambda name: name.endswith(wanted)
    )
    for sample in samples:
        if "hr.png" not in sample or _lr_name(scale) not in sample:
            raise UserError(
                f"{path}: sample {sample.get('__key__')!r} has no {'hr.png' if 'hr.png' not in sample else _lr_name(scale)}"
                f" (shards made without scale x{scale}? rerun preprocess with --scales including {scale})"
            )
        yield sample


def decode_pair(sample: dict, scale: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        lr = decode_png(sample[_lr_name(scale)])
        hr = decode_png(sample["hr.png"])
    except Exception as exc:  # PIL raises several types for corrupt data
        raise UserError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} is not a valid PNG ({exc})") from None
    check_pair(lr, hr, scale, f"{sample.get('__url__')}: sample {sample.get('__key__')!r}")
    return lr, hr


def _shuffled(items: Iterator, buffer: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle: yields a random element of a buffer refilled from `items`."""
    buf: list = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        yield buf[i]
        buf[i] = item
    order = rng.permutation(len(buf))  # only reached for finite inputs
    yield from (buf[i] for i in order)


class PatchStream(IterableDataset):
    """Endless stream of uint8 batches ``(lr, hr)``, NCHW, from this rank's share of shards.

    Seeding: each stream's RNG depends on (seed, stream id, ``start_step``), so a resumed run
    does not replay the exact patches of its first epochs.
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
    ) -> None:
        if len(shards) != len(counts):
            raise ValueError("one sample count per shard is needed")
        self.shards = [str(Path(s)) for s in shards]
        self.counts = list(counts)
        self.scale, self.patch_size, self.batch_size = scale, patch_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.start_step = seed, start_step
        self.augment = augment
        self.patches_per_sample = max(1, patches_per_sample)
        self.shuffle_buffer = max(1, shuffle_buffer)

    def stream_id(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def plan(self) -> StreamPlan:
        stream, n_streams = self.stream_id()
        return plan_stream(self.counts, stream, n_streams, seed=self.seed)

    def samples(self, plan: StreamPlan, rng: np.random.Generator) -> Iterator[dict]:
        """Endless: this stream's samples, shard order reshuffled every pass."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int)
        for _ in itertools.count():
            got = 0
            for shard in rng.permutation(plan.shards):
                for pos, sample in enumerate(iter_shard(self.shards[shard], self.scale)):
                    if plan.keeps(int(offsets[shard]) + pos):
                        got += 1
                        yield sample
            if got == 0:
                raise UserError(f"loader stream found no samples in its shards {[self.shards[i] for i in plan.shards]}")

    def patches(self, plan: StreamPlan, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        lp = self.patch_size // self.scale
        for sample in self.samples(plan, rng):
            lr, hr = decode_pair(sample, self.scale)
            if lr.shape[0] < lp or lr.shape[1] < lp:
                raise UserError(
                    f"{sample.get('__url__')}: sample {sample.get('__key__')!r} LR {lr.shape[1]}x{lr.shape[0]} is "
                    f"smaller than the LR patch {lp} (--patch-size {self.patch_size} / scale {self.scale})"
                )
            for _ in range(self.patches_per_sample):
                lr_p, hr_p = random_patch(lr, hr, self.scale, self.patch_size, rng)
                if self.augment:
                    k = int(rng.integers(8))
                    lr_p, hr_p = dihedral(lr_p, k), dihedral(hr_p, k)
                yield lr_p, hr_p

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream, _ = self.stream_id()
        rng = np.random.default_rng([self.seed, stream, self.start_step])
        plan = self.plan()
        patches = _shuffled(self.patches(plan, rng), self.shuffle_buffer, rng)
        while True:
            batch = list(itertools.islice(patches, self.batch_size))
            lr = np.stack([b[0] for b in batch]).transpose(0, 3, 1, 2)
            hr = np.stack([b[1] for b in batch]).transpose(0, 3, 1, 2)
            yield torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(hr))


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


def make_train_loader(dataset: PatchStream, loader_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over the endless stream; batches are formed inside the workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        persistent_workers=loader_workers > 0,
        prefetch_factor=4 if loader_workers > 0 else None,
        worker_init_fn=_background_worker if loader_workers > 0 else None,
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


def validation_from_shards(
    shards: Sequence[str], scale: int, rank: int = 0, world_size: int = 1, max_images: int = 0
) -> Iterator[ValSample]:
    """This rank's validation images (global index ``i`` with ``i % world_size == rank``)."""
    index = 0
    for path in shards:
        for sample in iter_shard(str(path), scale):
            if max_images and index >= max_images:
                return
            if index % world_size == rank:
                lr, hr = decode_pair(sample, scale)
                yield ValSample(index, str(sample["__key__"]), lr, hr)
            index += 1


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
