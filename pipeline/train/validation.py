"""Validation during training: every rank scores its share of the images, then one reduce.

The model runs in ``fixed`` hash mode (a deterministic projection per layer), so two
validations of the same weights give the same PSNR and "best" means better weights, not a
luckier hash draw. Large images go through the reference's recursive chop, as in `evaluate`.

Why ``val/psnr`` and ``evaluate``'s ``eval/<set>/x<s>/psnr`` can differ for the same images:
validation images from shards are stored by `preprocess` cropped to a multiple of 12 (so one
set of shards serves x2, x3 and x4), while `evaluate` crops to a multiple of the scale only; a
few border rows and columns more or less change the PSNR slightly. (``--val-data FOLDER``
crops to a multiple of the scale, as `evaluate` does.)

The images themselves (whole, from the valid shards or a folder, split across ranks by index)
are read here too (:func:`validation_from_shards`, :func:`validation_from_folder`), not by the
training stream of :mod:`pipeline.train.data`, which only deals out patches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.train import shardindex, shardio


@dataclass
class ValResult:
    psnr_sum: float = 0.0
    count: int = 0
    # (lr, sr, hr) of global image 0, kept by the rank that scored it, for the comparison image
    first: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def super_resolve(model: torch.nn.Module, lr: np.ndarray, scale: int, rgb_range: float, device: torch.device) -> np.ndarray:
    """uint8 HxWx3 LR -> uint8 SR through the LR-to-SR path `evaluate` and `upscale` use."""
    from pipeline.evaluate.infer import lr_to_sr
    from pipeline.evaluate.tiling import make_forward

    return lr_to_sr(make_forward(model, scale, tiling="reference"), lr, rgb_range, device)


def validate(
    model: torch.nn.Module,
    samples: Iterable[ValSample],
    scale: int,
    rgb_range: float,
    device: torch.device,
    hash_seed: int,
) -> ValResult:
    """PSNR (Y, shave = scale) of this rank's images; the model's hash mode and train/eval
    state are what they were before, whatever they were (training runs stochastic)."""
    from pipeline.evaluate.metrics import psnr
    from pipeline.model import temporary_hash_mode

    was_training = model.training
    model.eval()
    result = ValResult()
    try:
        with temporary_hash_mode(model, "fixed", seed=hash_seed):
            for sample in samples:
                sr = super_resolve(model, sample.lr, scale, rgb_range, device)
                value = psnr(sr, sample.hr, scale)
                result.psnr_sum += min(value, 100.0)  # identical images give inf; cap for the mean
                result.count += 1
                if sample.index == 0:
                    result.first = (sample.lr, sr, sample.hr)
    finally:
        model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------------
# Which images, when (issue 12: cheap validation)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValPlan:
    """The two validation sets of a run and the steps they run at (every number is a step).

    * **subset**: a small fixed set (the first ``val_subset`` valid images, or the whole
      ``--val-data`` folder), scored every ``val_every`` steps (0: at every epoch end). Its
      PSNR is ``val/psnr``, the series the best model is chosen on: cheap enough to run often,
      and always the same images, so two points compare weights, not image sets.
    * **full**: the whole valid set (capped by ``val_max_images``), every ``val_full_every``
      steps (0: never during training) and always at the last step, as ``val_full/psnr``.
      When the subset already is the whole set, one pass gives both.
    """

    subset_images: int  # 0 = the whole folder / set
    full_images: int  # 0 = all
    subset_is_full: bool
    every: int
    full_every: int
    total_steps: int

    @classmethod
    def from_config(cls, cfg, val_count: int, folder: bool) -> ValPlan:
        total = cfg.epochs * cfg.iters_per_epoch
        every = cfg.val_every or cfg.iters_per_epoch
        full_cap = cfg.val_max_images or 0
        if folder:  # the folder is the subset and the whole set at once
            return cls(full_cap, full_cap, True, every, cfg.val_full_every, total)
        subset = min(cfg.val_subset, full_cap) if full_cap else cfg.val_subset
        whole = min(val_count, full_cap) if full_cap else val_count
        return cls(subset, full_cap, subset >= whole, every, cfg.val_full_every, total)

    def due(self, step: int) -> tuple[bool, bool]:
        """(subset, full) due after `step`; the last step runs both."""
        last = step == self.total_steps
        return last or step % self.every == 0, last or bool(self.full_every and step % self.full_every == 0)


# ---------------------------------------------------------------------------------------------
# The images: whole, split across ranks by index
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
    for entry in shardio.entries_for_locations([str(p) for p in shards]):
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
