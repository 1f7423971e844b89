"""Which sample, which crop and which transform fill each batch slot: pure numpy, no I/O.

The global draw order (:class:`Schedule`), each rank's share of a global batch
(:func:`rank_slots`), the aligned LR/HR crop (:func:`random_patch`) and the 8 dihedral
transforms (:func:`dihedral`) are functions of the seed, the step and the slot alone, the same
on every rank and in every loader process. Balanced coverage and exact resume rest on them, so
they are kept apart from the reading and the DataLoader plumbing of :mod:`pipeline.train.data`
and can be checked without a shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.console import UserError

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
