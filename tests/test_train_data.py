"""The shard loader on real (PNG) shards from preprocess: aligned patches, dihedral augmentation,
batches, validation splits. The sampling schedule, raw shards and verified reads are in
test_train_loader.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from fixtures_train import shard_counts, train_shards  # noqa: F401 - fixture

from pipeline.console import UserError
from pipeline.train import data, sampling, validation


def _train_paths(shards):
    from pipeline.preprocess.manifest import shard_paths

    return [str(p) for p in shard_paths(shards, "train")]


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------


def test_patches_are_aligned_between_lr_and_hr():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, size=(60, 72, 3), dtype=np.uint8)
    for scale in (2, 3, 4):
        lr = hr[::scale, ::scale]  # a "LR" whose pixel (y, x) is HR pixel (s*y, s*x)
        for _ in range(20):
            lr_p, hr_p = sampling.random_patch(lr, hr, scale, 6 * scale, rng)
            assert hr_p.shape[:2] == (lr_p.shape[0] * scale, lr_p.shape[1] * scale)
            np.testing.assert_array_equal(hr_p[::scale, ::scale], lr_p)


def test_patch_positions_cover_the_whole_image():
    rng = np.random.default_rng(1)
    lr = np.arange(10 * 10 * 3, dtype=np.int32).reshape(10, 10, 3)
    hr = np.repeat(np.repeat(lr, 2, 0), 2, 1)
    corners = {tuple(sampling.random_patch(lr, hr, 2, 8, rng)[0][0, 0, :1]) for _ in range(400)}
    assert len(corners) == 7 * 7  # every valid top-left LR position (10 - 4 + 1)^2


def test_dihedral_gives_eight_distinct_transforms_and_keeps_alignment():
    rng = np.random.default_rng(2)
    lr = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, 2, 0), 2, 1)  # each LR pixel is a 2x2 HR block

    def up(a):
        return np.repeat(np.repeat(a, 2, 0), 2, 1)

    outs = {sampling.dihedral(hr, k).tobytes() for k in range(8)}
    assert len(outs) == 8
    for k in range(8):
        np.testing.assert_array_equal(sampling.dihedral(hr, k), up(sampling.dihedral(lr, k)))


def test_mismatched_sizes_are_a_clear_error():
    with pytest.raises(UserError, match="not 2x the LR"):
        sampling.check_pair(np.zeros((10, 10, 3)), np.zeros((21, 20, 3)), 2, "x.tar: sample 'a'")


# ---------------------------------------------------------------------------------------------
# the loader on real shards
# ---------------------------------------------------------------------------------------------


def test_loader_yields_uint8_batches_from_real_shards(train_shards):  # noqa: F811
    paths, counts = _train_paths(train_shards), shard_counts(train_shards)
    ds = data.PatchStream(paths, counts, scale=2, patch_size=24, batch_size=3, seed=5)
    loader = data.make_train_loader(ds, loader_workers=1, pin_memory=False)
    batches = list(itertools.islice(iter(loader), 40))  # several passes over 53 samples
    lr, hr = batches[0]
    assert lr.dtype == torch.uint8 and lr.shape == (3, 3, 12, 12) and hr.shape == (3, 3, 24, 24)
    assert len({b[1].numpy().tobytes() for b in batches}) == 40  # random crops differ
    x = data.to_model_range(hr, torch.device("cpu"), 1.0)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_resumed_stream_does_not_replay_the_first_patches(train_shards):  # noqa: F811
    paths, counts = _train_paths(train_shards), shard_counts(train_shards)
    first = next(iter(data.PatchStream(paths, counts, 2, 24, 4, seed=5, start_step=0)))[1]
    again = next(iter(data.PatchStream(paths, counts, 2, 24, 4, seed=5, start_step=0)))[1]
    later = next(iter(data.PatchStream(paths, counts, 2, 24, 4, seed=5, start_step=40)))[1]
    assert torch.equal(first, again) and not torch.equal(first, later)


def test_patch_larger_than_sample_is_a_clear_error(train_shards):  # noqa: F811
    paths, counts = _train_paths(train_shards), shard_counts(train_shards)
    with pytest.raises(UserError, match="smaller than the LR patch"):
        next(iter(data.PatchStream(paths, counts, 2, 96, 2)))


def test_validation_images_are_split_across_ranks(train_shards):  # noqa: F811
    from pipeline.preprocess.manifest import shard_paths

    valid = [str(p) for p in shard_paths(train_shards, "valid")]
    one = list(validation.validation_from_shards(valid, 2, 0, 1))
    assert len(one) == 3 and all(s.hr.shape[0] == 2 * s.lr.shape[0] for s in one)
    parts = [list(validation.validation_from_shards(valid, 2, r, 2)) for r in range(2)]
    assert [[s.index for s in p] for p in parts] == [[0, 2], [1]]  # index 0 belongs to rank 0
    assert sorted(s.key for p in parts for s in p) == sorted(s.key for s in one)  # each image once
    assert [s.key for s in validation.validation_from_shards(valid, 2, 1, 2, max_images=1)] == []


def test_validation_from_a_folder_makes_bicubic_lr(set5_dir):
    samples = list(validation.validation_from_folder(set5_dir, 3, 1, 2))
    assert [s.index for s in samples] == [1, 3]
    for s in samples:
        assert s.hr.shape[0] == 3 * s.lr.shape[0] and s.hr.shape[1] == 3 * s.lr.shape[1]
