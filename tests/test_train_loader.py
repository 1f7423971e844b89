"""The training loader (issue 11, reader side): raw and PNG shards, verified reads, the global
sampling schedule (mixing and coverage figures on the real PatchStream code), exact resume,
small images, `--loader-workers auto` and the driver's data preflight."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_shards_read import sample_of, train_entries, write_shards

from pipeline.config import TrainConfig, load_config
from pipeline.console import UserError
from pipeline.train import data, datasource, sampling, shardio, validation

# ---------------------------------------------------------------------------------------------
# reading both encodings
# ---------------------------------------------------------------------------------------------


def test_raw_and_png_shards_give_the_same_batches(tmp_path):
    """Same pixels, two encodings: bit-identical batches, every patch from the sample the
    schedule names, HR aligned with LR, and each patch its own small array."""
    counts = {"train": [7, 5, 9], "valid": [3]}
    streams = {}
    for enc in ("raw", "png"):
        paths, n = train_entries(write_shards(tmp_path / enc, counts, encoding=enc))  # names come from the manifest
        streams[enc] = data.PatchStream(paths, n, 2, 12, 4, seed=3, augment=False)
    for step in range(6):
        raw, png = streams["raw"].batch(step), streams["png"].batch(step)
        assert torch.equal(raw[0], png[0]) and torch.equal(raw[1], png[1])
        lr, hr = raw[0].numpy(), raw[1].numpy()
        assert lr.shape == (4, 3, 6, 6) and hr.shape == (4, 3, 12, 12) and lr.dtype == np.uint8
        want = [streams["raw"].schedule.sample(step * 4 + slot) for slot in range(4)]
        assert [sample_of(p) for p in hr] == want and [sample_of(p) for p in lr] == want
        np.testing.assert_array_equal(hr[:, :, ::2, ::2], lr)  # the fixture's LR is HR[::2, ::2]
    for t in streams["raw"].batch(0) + streams["png"].batch(0):  # a batch owns its bytes, nothing more
        assert t.untyped_storage().nbytes() == t.numel()


def test_validation_reads_both_encodings_and_checks_sha256(tmp_path):
    folder = write_shards(tmp_path / "r", {"train": [2], "valid": [3, 2]}, encoding="raw")
    valid = [str(folder / f"div2k-valid-00000{i}.tar") for i in range(2)]
    got = list(validation.validation_from_shards(valid, 2))
    assert [s.index for s in got] == list(range(5)) and got[0].hr.shape == (24, 24, 3) and got[0].lr.shape == (12, 12, 3)
    assert [s.index for s in validation.validation_from_shards(valid, 2, rank=1, world_size=2)] == [1, 3]
    # same size, one byte changed inside a pixel: only the checksum can tell
    path = tmp_path / "r2"
    folder = write_shards(path, {"train": [2], "valid": [3]}, encoding="raw")
    shard = folder / "div2k-valid-000000.tar"
    blob = bytearray(shard.read_bytes())
    blob[2000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"div2k-valid-000000\.tar: sha256 differs"):
        list(validation.validation_from_shards([str(shard)], 2))


# ---------------------------------------------------------------------------------------------
# verified reads
# ---------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "header":
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            at = tar.getmembers()[3].offset
        b = bytearray(blob)
        b[at + 10] ^= 0x55  # inside the name field of a later member header: checksum fails
        path.write_bytes(bytes(b))
    elif how == "replaced":  # a shard with one sample fewer, padded to the same size
        import io
        import tarfile

        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(blob)) as src, \
                tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for m in src.getmembers()[:-2]:  # drop the last sample's two members
                tar.addfile(m, src.extractfile(m))
        new = out.getvalue()
        path.write_bytes(new + b"\0" * (len(blob) - len(new)))


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", r"size \d+ bytes, manifest says \d+"),
    ("header", r"corrupt tar header at byte"),
    ("replaced", r"4 samples, manifest says 5"),
    ("missing", r"listed in the manifest is missing"),
])
def test_a_bad_shard_stops_the_stream_in_one_line_or_is_skipped(tmp_path, how, message):
    folder = write_shards(tmp_path / "s", {"train": [6, 5, 7], "valid": [1]}, encoding="raw")
    paths, counts = train_entries(folder)
    bad = Path(paths[1])
    if how == "missing":
        bad.unlink()
    else:
        _damage(bad, how)
    stream = data.PatchStream(paths, counts, 2, 12, 6, seed=0)
    with pytest.raises(UserError, match=rf"div2k-train-000001\.tar: .*{message}") as err:
        for step in range(10):
            stream.batch(step)
    assert "\n" not in str(err.value)
    skipping = data.PatchStream(paths, counts, 2, 12, 6, seed=0, skip_bad_shards=True)
    seen = Counter(sample_of(p) for step in range(12) for p in skipping.batch(step)[1].numpy())
    assert skipping.skipped_shards == 1
    assert not set(seen) & set(range(6, 11))  # none of the bad shard's samples
    assert set(seen) == set(range(6)) | set(range(11, 18))  # every other sample still drawn


def test_skipped_shards_are_counted_across_loader_processes(tmp_path):
    folder = write_shards(tmp_path / "s", {"train": [6, 5], "valid": [1]}, encoding="raw")
    paths, counts = train_entries(folder)
    _damage(Path(paths[0]), "truncated")
    stream = data.PatchStream(paths, counts, 2, 12, 2, seed=0, skip_bad_shards=True)
    batches = list(itertools.islice(iter(data.make_train_loader(stream, 2, False)), 6))
    assert {sample_of(p) for b in batches for p in b[1].numpy()} <= set(range(6, 11))
    assert stream.skipped_shards == 1 and stream.skipped_shard_names() == [paths[0]]  # seen by both processes


# ---------------------------------------------------------------------------------------------
# mixing and coverage: the real PatchStream schedule, DIV2K-shaped shards
# ---------------------------------------------------------------------------------------------


def _div2k_like() -> tuple[list[str], list[int], np.ndarray]:
    """800 images of 36-44 sub-images (in name order) in shards of 64: names, counts, image of sample."""
    rng = np.random.default_rng(0)
    per_image = rng.integers(36, 45, size=800)
    image_of = np.repeat(np.arange(800), per_image)
    total = len(image_of)
    counts = [64] * (total // 64) + ([total % 64] if total % 64 else [])
    return [f"/nowhere/div2k-train-{i:06d}.tar" for i in range(len(counts))], counts, image_of


def _global_batches(paths, counts, preset: str, world: int, loader_workers: int, steps: int):
    """The samples of the global batch at each step, built from every rank's PatchStream as the
    DataLoader would (worker w of W makes steps w, w+W, ...)."""
    cfg = load_config(TrainConfig, preset=preset, overrides={"batch_size": 16})
    streams = [
        data.PatchStream(paths, counts, 2, cfg.patch_size, len(sampling.rank_slots(16, r, world)), rank=r, world_size=world,
                         seed=cfg.seed, patches_per_sample=cfg.patches_per_sample, global_batch=16)
        for r in range(world)
    ]
    out = []
    for w in range(max(1, loader_workers)):
        for step in range(w, steps, max(1, loader_workers)):
            out.append([s.sample_for(step, slot) for s in streams for slot in s.slots])
    return out


@pytest.mark.parametrize("preset", ["paper", "paper128", "tiny"])
def test_a_global_batch_of_16_mixes_near_uniformly(preset):
    paths, counts, image_of = _div2k_like()
    for world, loader_workers in [(1, 0), (1, 1), (2, 2), (4, 4), (8, 8), (16, 4)]:  # 1 to 64 streams
        batches = _global_batches(paths, counts, preset, world, loader_workers, steps=240)
        assert all(len(b) == 16 for b in batches)
        distinct = np.mean([len(set(image_of[b])) for b in batches])
        assert distinct >= 15.0, (preset, world, loader_workers, distinct)


@pytest.mark.parametrize("streams", [1, 3, 64, 256])
def test_every_sample_is_drawn_equally_often_whatever_the_shard_sizes(streams):
    rng = np.random.default_rng(streams)
    counts = [int(c) for c in rng.integers(1, 90, size=13)]  # very uneven shards
    total = sum(counts)
    paths = [f"/nowhere/x-train-{i:06d}.tar" for i in range(len(counts))]
    world = min(streams, 64)
    loader_workers = streams // world
    batch = max(world, 64)
    draws: Counter[int] = Counter()
    ranks = [data.PatchStream(paths, counts, 2, 48, len(sampling.rank_slots(batch, r, world)), rank=r, world_size=world,
                              seed=7, global_batch=batch) for r in range(world)]
    steps = total * 2  # an epoch's worth of samples, twice over: exactly 2 * batch passes
    for w in range(loader_workers):
        for step in range(w, steps, loader_workers):
            draws.update(s.sample_for(step, slot) for s in ranks for slot in s.slots)
    assert sorted(draws) == list(range(total))
    assert max(draws.values()) <= 1.05 * min(draws.values())


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 on 2 cores: on purpose
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_a_stream_started_at_step_k_yields_the_uninterrupted_batches_bit_for_bit(tmp_path, encoding):
    folder = write_shards(tmp_path / "s", {"train": [9, 4, 11], "valid": [1]}, encoding=encoding)
    paths, counts = train_entries(folder)
    kwargs = dict(rank=1, world_size=2, seed=5, patches_per_sample=2, global_batch=7)
    whole = list(itertools.islice(iter(data.PatchStream(paths, counts, 2, 12, 3, **kwargs)), 12))
    for workers in (0, 2, 3):
        resumed = data.PatchStream(paths, counts, 2, 12, 3, start_step=5, **kwargs)
        got = list(itertools.islice(iter(data.make_train_loader(resumed, workers, False)), 7))
        for a, b in zip(whole[5:], got, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), workers


# ---------------------------------------------------------------------------------------------
# small images, loader workers, driver preflight
# ---------------------------------------------------------------------------------------------


def test_samples_smaller_than_the_patch_are_replaced_not_a_crash(tmp_path, capfd):
    sizes = {1: (8, 8), 4: (12, 8)}  # HR 8 px: LR 4 px, smaller than the LR patch of 6
    for enc in ("raw", "png"):
        folder = write_shards(tmp_path / enc, {"train": [3, 3], "valid": [1]}, encoding=enc, sizes=sizes, min_hr=False)
        paths, counts = train_entries(folder)
        stream = data.PatchStream(paths, counts, 2, 12, 3, seed=1)
        seen = {sample_of(p) for step in range(8) for p in stream.batch(step)[1].numpy()}
        assert seen == {0, 2, 3, 5}
    assert "smaller than the LR patch 6" in capfd.readouterr().err


def _cfg(shards: Path, **over) -> TrainConfig:
    return load_config(TrainConfig, preset="tiny", overrides={"shards": str(shards), **over})


def test_preflight_refuses_a_patch_that_does_not_fit_the_smallest_sub_image(tmp_path):
    folder = write_shards(tmp_path / "s", {"train": [3], "valid": [1]}, sizes={1: (60, 90)}, hr_size=(96, 96))
    with pytest.raises(UserError, match=r"--patch-size 96 does not fit the smallest training sub-image .* \(90x60 px HR\): "
                       r"use --patch-size 60 or less, or preprocess again with --min-size 96"):
        datasource.resolve_job(_cfg(folder, patch_size=96))
    job = datasource.resolve_job(_cfg(folder, patch_size=48))
    assert job.train_counts == [3] and job.val_count == 1


def test_preflight_checks_sizes_and_skips_bad_shards_when_asked(tmp_path):
    folder = write_shards(tmp_path / "s", {"train": [3, 4, 5], "valid": [2]})
    paths, _ = train_entries(folder)
    _damage(Path(paths[2]), "truncated")
    with pytest.raises(UserError, match=r"div2k-train-000002\.tar: size \d+ bytes, manifest says \d+ .*--skip-bad-shards"):
        datasource.resolve_job(_cfg(folder, patch_size=12))
    assert datasource.node_data_problems(paths)[0].endswith("(truncated or replaced)")
    cfg = _cfg(folder, patch_size=12, skip_bad_shards=True)
    job = datasource.resolve_job(cfg)
    assert job.train_counts == [3, 4] and datasource.skipped_shards(cfg, job) == 1
    (folder / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"manifest.json: not found"):
        datasource.resolve_job(cfg)


def test_val_data_folders_skip_dotfiles(tmp_path, set5_dir):
    import shutil

    folder = tmp_path / "val"
    folder.mkdir()
    shutil.copy(next(Path(set5_dir).glob("*.png")), folder / "baby.png")
    (folder / "._baby.png").write_bytes(b"\0\5\26\7 AppleDouble resource fork")
    samples = list(validation.validation_from_folder(folder, 2))
    assert [s.key for s in samples] == ["baby"]


def test_loader_workers_auto_uses_the_reserved_cpus_beyond_one():
    assert [data.auto_loader_workers(c) for c in (0.5, 1, 2, 6, 12.0)] == [0, 0, 1, 5, 11]
    cfg = load_config(TrainConfig, overrides={"loader_workers": -1})
    assert cfg.loader_workers == -1


def test_manifest_encoding_defaults_to_png_and_unknown_is_refused():
    assert shardio.encoding_of({"params": {}}) == "png"
    with pytest.raises(UserError, match="unknown encoding 'jpeg'"):
        shardio.encoding_of({"params": {"encoding": "jpeg"}})


def test_t91_crop_96_with_patch_96_does_not_crash(t91_dir, tmp_path):
    """The issue's regression: t20 (78 px) is kept whole at --crop 96; patches of 96 skip it."""
    from helpers import run_cli

    images = tmp_path / "img"
    images.mkdir()
    for name in ("t20", "t9", "t24"):
        (images / f"{name}.png").symlink_to(t91_dir / f"{name}.png")
    out = tmp_path / "shards"
    run_cli("preprocess", "--images", str(images), "--out", str(out), "--scales", "2", "--crop", "96", "--step", "48",
            "--holdout", "1", "-j", "1", check=True, timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = _cfg(out, patch_size=96)
    if shardio.min_hr(manifest, "train") is not None and min(shardio.min_hr(manifest, "train")) < 96:
        with pytest.raises(UserError, match="--patch-size 96 does not fit"):
            datasource.resolve_job(cfg)
        return
    job = datasource.resolve_job(cfg)  # an older manifest: the loader replaces the small sample
    stream = data.PatchStream(job.train_shards, job.train_counts, 2, 96, 4, seed=0)
    for step in range(12):
        lr, hr = stream.batch(step)
        assert hr.shape == (4, 3, 96, 96)


def test_cli_bad_shard_is_one_line_before_ray(tmp_path):
    """Through `sr-pipeline train`: --loader-workers auto parses, a truncated shard is one line."""
    from helpers import run_cli

    folder = write_shards(tmp_path / "s", {"train": [3, 4], "valid": [2]})
    paths, _ = train_entries(folder)
    _damage(Path(paths[1]), "truncated")
    proc = run_cli("train", "--shards", str(folder), "--preset", "tiny", "--patch-size", "12", "--loader-workers", "auto")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Ray" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {paths[1]}: size ") and line.endswith("or train without it with --skip-bad-shards")
