"""Shard contents, sample counts, keys, manifest and verify, on real T91/Set5 photos."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import fixtures_preprocess
import numpy as np
import pytest
from fixtures_preprocess import (
    SMALL,
    copy_images,
    decode,
    decode_member,
    manifest,
    read_tar_members,
    shard_bytes,
)
from helpers import run_cli
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import imresize
from pipeline.preprocess.manifest import read_manifest, shard_paths, verify_shards
from pipeline.preprocess.run import run_preprocess
from pipeline.preprocess.subimages import crop_positions, key_stems, modcrop, sample_boxes

t91_small = fixtures_preprocess.t91_small


def _cfg(**kw) -> PreprocessConfig:
    base = {"crop": 48, "step": 24, "shard_samples": 16, "jobs": 2}
    base.update(kw)
    cfg = PreprocessConfig(**base)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def test_crop_positions_cover_the_image_like_basicsr():
    assert crop_positions(1356, 480, 240) == [0, 240, 480, 720, 876]  # last one flush with the end
    assert crop_positions(2040, 480, 240) == [0, 240, 480, 720, 960, 1200, 1440, 1560]
    assert crop_positions(960, 480, 240) == [0, 240, 480]  # exact fit: no duplicate
    assert crop_positions(300, 480, 240) == [0]
    # DIV2K 2040x1356 -> 40 sub-images
    assert len(sample_boxes(1356, 2040, "train", 480, 240)) == 40
    assert sample_boxes(1356, 2040, "valid", 480, 240) == [(0, 0, 1356, 2040)]
    assert sample_boxes(300, 600, "train", 480, 240) == [(0, 0, 300, 600)]  # smaller than crop


def test_key_stems_are_safe_and_unique():
    stems = key_stems(["a.png", "a.jpg", "my photo.v2.png", "b.png"])
    assert len(set(stems)) == 4
    assert stems[3] == "b"
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for s in stems)
    assert stems[2] == "my-photo-v2"
    assert stems[0].startswith("a-") and stems[1].startswith("a-")
    assert key_stems(["x" * 200 + ".png"])[0] == "x" * 60


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_shards_decode_to_exact_pixels_and_counts(t91_small, tmp_path, encoding):
    out = tmp_path / "out"
    run_preprocess(_cfg(images=str(t91_small), holdout=1, out=str(out), encoding=encoding))
    ext = {"raw": "npy", "png": "png"}[encoding]
    m = read_manifest(out)
    names = sorted(p.name for p in t91_small.iterdir())
    train_names, valid_names = names[:-1], names[-1:]

    # expected samples, computed independently of the writer
    expected = {}
    for split, files in (("train", train_names), ("valid", valid_names)):
        for n in files:
            img = modcrop(np.asarray(Image.open(t91_small / n).convert("RGB")))
            h, w = img.shape[:2]
            boxes = [(0, 0, h, w)] if split == "valid" else [
                (t, le, 48, 48) for t in crop_positions(h, 48, 24) for le in crop_positions(w, 48, 24)]
            for box in boxes:
                expected[f"{split}_{Path(n).stem}_{box[0]}_{box[1]}"] = (img, box, n)

    seen = {}
    for split in ("train", "valid"):
        paths = shard_paths(out, split)
        assert [p.name for p in paths] == [f"photos-{split}-{i:06d}.tar" for i in range(len(paths))]
        counts = []
        for p in paths:
            members = read_tar_members(p)
            keys = []
            for name, _ in members:
                key = name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
            counts.append(len(keys))
            by_name = dict(members)
            for key in keys:
                assert "." not in key and key not in seen
                seen[key] = split
                exts = sorted(n.split(".", 1)[1] for n, _ in members if n.split(".", 1)[0] == key)
                assert exts == [f"hr.{ext}", "json", f"lr_x2.{ext}", f"lr_x3.{ext}", f"lr_x4.{ext}"]
                img, (t, le, bh, bw), src = expected[key]
                meta = json.loads(by_name[f"{key}.json"])
                assert meta == {
                    "key": key, "source": src, "split": split, "box": [t, le, bh, bw], "hr_size": [bh, bw],
                    "source_size": list(img.shape[:2]), "scales": [2, 3, 4],
                    "lr_sizes": {str(s): [bh // s, bw // s] for s in (2, 3, 4)},
                }
                hr_name = f"{key}.hr.{ext}"
                np.testing.assert_array_equal(decode_member(hr_name, by_name[hr_name]), img[t : t + bh, le : le + bw])
                for s in (2, 3, 4):
                    lr_full = imresize(img, 1 / s)  # LR from the whole image, then cropped
                    lr_name = f"{key}.lr_x{s}.{ext}"
                    np.testing.assert_array_equal(
                        decode_member(lr_name, by_name[lr_name]),
                        lr_full[t // s : (t + bh) // s, le // s : (le + bw) // s],
                    )
        # equal-size shards, only the last may be shorter
        assert all(c == 16 for c in counts[:-1]) and 0 < counts[-1] <= 16
        assert [s["samples"] for s in m["splits"][split]["shards"]] == counts
        assert m["splits"][split]["samples"] == sum(counts)
    assert set(seen) == set(expected)
    assert m["splits"]["train"]["images"] == 4 and m["splits"]["valid"]["images"] == 1
    assert m["params"]["crop"] == 48 and m["params"]["scales"] == [2, 3, 4] and m["params"]["shard_samples"] == 16
    assert m["dataset"] == "photos" and m["skipped"] == []
    assert m["params"]["encoding"] == encoding and m["params"]["name"] == "photos"
    # smallest sample per split: train crops are 48 px; valid is one whole (modcropped) image
    valid_img = modcrop(np.asarray(Image.open(t91_small / valid_names[0]).convert("RGB")))
    assert m["splits"]["train"]["min_hr"] == [48, 48]
    assert m["splits"]["valid"]["min_hr"] == list(valid_img.shape[:2])


def test_parallelism_does_not_change_bytes_and_rerun_is_a_noop(t91_small, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_preprocess(_cfg(images=str(t91_small), out=str(a), jobs=1, scales=[2, 4]))
    run_preprocess(_cfg(images=str(t91_small), out=str(b), jobs=2, scales=[2, 4]))
    assert shard_bytes(a) == shard_bytes(b) and shard_bytes(a)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in a.glob("*")}
    m1 = manifest(a)
    run_preprocess(_cfg(images=str(t91_small), out=str(a), jobs=2, scales=[2, 4]))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in a.glob("photos-*")}
    assert after == {k: v for k, v in before.items() if k.startswith("photos-")}  # nothing rewritten
    assert manifest(a) == m1  # identical, including the creation time
    assert m1["splits"]["valid"] == {"images": 0, "samples": 0, "min_hr": None, "shards": []}
    member = read_tar_members(next(iter(sorted(a.glob("photos-train-*.tar")))))[1][0]
    assert member.endswith(".lr_x2.npy")


def test_changed_settings_rebuild_and_remove_stale_shards(t91_small, tmp_path):
    out = tmp_path / "out"
    run_preprocess(_cfg(images=str(t91_small), out=str(out), shard_samples=8))
    many = len(list(out.glob("photos-train-*.tar")))
    with pytest.raises(UserError, match=r"shard_samples 8 -> 64.*--force"):
        run_preprocess(_cfg(images=str(t91_small), out=str(out), shard_samples=64))
    run_preprocess(_cfg(images=str(t91_small), out=str(out), shard_samples=64), force=True)
    names = sorted(p.name for p in out.glob("photos-*.tar"))
    assert len(names) < many
    assert names == [s["name"] for s in read_manifest(out)["splits"]["train"]["shards"]]
    assert all(s["samples"] == 64 for s in read_manifest(out)["splits"]["train"]["shards"][:-1])


def test_verify_detects_corruption(t91_small, tmp_path):
    out = tmp_path / "out"
    run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL, "--scales", "2", check=True)
    ok = run_cli("preprocess", "--verify", "--out", str(out), check=True)
    assert "match" in ok.stderr
    victim = sorted(out.glob("photos-train-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run_cli("preprocess", "--verify", "--out", str(out))
    assert bad.returncode == 1
    assert victim.name in bad.stderr and "sha256 mismatch" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    count, _, problems = verify_shards(out)
    assert len(problems) == 1 and count == len(list(out.glob("photos-*.tar")))


def test_data_dir_layout_and_scales_option(set5_dir, t91_dir, tmp_path):
    root = tmp_path / "DIV2K"
    copy_images(t91_dir, root / "DIV2K_train_HR", ["t1.png", "t2.png"])
    copy_images(set5_dir, root / "DIV2K_valid_HR", ["bird.png"])
    out = tmp_path / "out"
    proc = run_cli("preprocess", "--data-dir", str(root), "--out", str(out), *SMALL, "--scales", "3", "-j", "1",
                   "--encoding", "png", check=True)
    assert "train" in proc.stderr
    m = read_manifest(out)
    assert m["dataset"] == "DIV2K" and m["params"]["scales"] == [3] and m["params"]["encoding"] == "png"
    assert [p.name for p in shard_paths(out, "valid")] == ["div2k-valid-000000.tar"]  # DIV2K layout keeps div2k-
    assert m["splits"]["valid"]["images"] == 1 and m["splits"]["valid"]["samples"] == 1
    members = dict(read_tar_members(shard_paths(out, "valid")[0]))
    assert sorted(members) == ["valid_bird_0_0.hr.png", "valid_bird_0_0.json", "valid_bird_0_0.lr_x3.png"]
    meta = json.loads(members["valid_bird_0_0.json"])
    assert meta["source"] == "DIV2K_valid_HR/bird.png" and meta["hr_size"] == [288, 288]
    assert decode(members["valid_bird_0_0.lr_x3.png"]).shape == (96, 96, 3)


def test_config_file_and_cli_override(t91_small, tmp_path):
    cfg_file = tmp_path / "pre.yaml"
    cfg_file.write_text(f"images: {t91_small}\ncrop: 96\nstep: 48\nscales: [2]\nshard_samples: 4\n")
    out = tmp_path / "out"
    run_cli("preprocess", "--config", str(cfg_file), "--out", str(out), "--step", "96", "-j", "1", check=True)
    m = read_manifest(out)
    assert m["params"]["crop"] == 96 and m["params"]["step"] == 96 and m["params"]["shard_samples"] == 4
    bad = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), "--step", "50")
    assert bad.returncode == 1 and "multiple of 12" in bad.stderr


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match="manifest.json: not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "sr-pipeline/shards", ')
    with pytest.raises(UserError, match="invalid JSON"):
        read_manifest(tmp_path)
    good = {
        "format": "sr-pipeline/shards", "format_version": 1, "dataset": "x", "created": "t",
        "package_version": "0", "params": {}, "skipped": [],
        "splits": {"train": {"images": 1, "samples": 2, "shards": [
            {"name": "div2k-train-000000.tar", "samples": 2, "bytes": 10, "sha256": "0" * 64}]},
            "valid": {"images": 0, "samples": 0, "shards": []}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert read_manifest(tmp_path)["dataset"] == "x"
    with pytest.raises(UserError, match="missing"):
        shard_paths(tmp_path, "train")
    (tmp_path / "div2k-train-000000.tar").write_bytes(b"x" * 10)
    assert shard_paths(tmp_path, "train") == [(tmp_path / "div2k-train-000000.tar").resolve()]
    assert shard_paths(tmp_path, "valid") == []
    for broken, pattern in [
        ({"format_version": 2}, "format_version"),
        ({"format": "other"}, "not a shard manifest"),
        ({"splits": {"train": good["splits"]["train"]}}, "splits"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **broken}))
        with pytest.raises(UserError, match=pattern):
            read_manifest(tmp_path)
    evil = json.loads(json.dumps(good))
    evil["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    (tmp_path / "manifest.json").write_text(json.dumps(evil))
    with pytest.raises(UserError, match="bad shard name"):
        shard_paths(tmp_path, "train")


def test_webdataset_reads_the_shards(t91_small, tmp_path):
    """The format the train stage consumes: WebDataset groups members by key."""
    import webdataset as wds

    out = tmp_path / "out"
    run_preprocess(_cfg(images=str(t91_small), out=str(out), scales=[2]))
    urls = [str(p) for p in shard_paths(out, "train")]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    keys = []
    for sample in ds:
        assert set(sample) >= {"__key__", "hr.npy", "lr_x2.npy", "json"}
        assert json.loads(sample["json"])["key"] == sample["__key__"]
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == read_manifest(out)["splits"]["train"]["samples"]
    assert os.path.basename(urls[0]) == "photos-train-000000.tar"


def _modes(out: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}


def test_finished_dataset_is_only_replaced_with_force(t91_small, tmp_path):
    out = tmp_path / "out"
    base = ["--images", str(t91_small), "--out", str(out), "--scales", "2", "-j", "1"]
    run_cli("preprocess", *base, *SMALL, check=True)
    before = shard_bytes(out)
    first = manifest(out)
    bad = run_cli("preprocess", *base, "--crop", "96", "--step", "48", "--shard-samples", "16", "--holdout", "1")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert str(out) in errors[0] and "--force" in errors[0]
    for change in ("crop 48 -> 96", "step 24 -> 48", "holdout unset -> 1"):
        assert change in errors[0], errors[0]
    assert shard_bytes(out) == before and manifest(out) == first  # nothing touched
    same = run_cli("preprocess", *base, *SMALL, check=True)  # identical settings: still a no-op
    assert "--force" not in same.stderr and manifest(out) == first
    run_cli("preprocess", *base, "--crop", "96", "--step", "48", "--shard-samples", "16", "--holdout", "1",
            "--force", check=True)
    m = manifest(out)
    assert m["params"]["crop"] == 96 and m["inputs"]["holdout"] == 1 and m["splits"]["valid"]["images"] == 1


def test_written_files_follow_the_umask(t91_small, tmp_path):
    """Manifest (atomic write) and shards (their own temporary file) get the same, usual mode."""
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        run_preprocess(_cfg(images=str(t91_small), out=str(out), scales=[2], jobs=1))
    finally:
        os.umask(previous)
    modes = _modes(out)
    assert "manifest.json" in modes and any(n.startswith("photos-") for n in modes)
    assert set(modes.values()) == {0o640}, modes
