"""Preprocess options of issue 11: encodings, --min-size, shard-name prefixes, step/crop,
dangling symlinks, and the spawn guard. Real T91/Set5 photos, real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fixtures_preprocess
import numpy as np
import pytest
from fixtures_preprocess import SMALL, copy_images, decode_member, manifest, read_tar_members
from helpers import run_cli
from PIL import Image

from pipeline.config import ConfigError, PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import encoding
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.run import run_preprocess

t91_small = fixtures_preprocess.t91_small
REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> PreprocessConfig:
    base = {"crop": 48, "step": 24, "shard_samples": 16, "jobs": 1, "scales": [2]}
    base.update(kw)
    cfg = PreprocessConfig(**base)
    cfg.validate()
    return cfg


def test_npy_members_are_deterministic_and_self_describing():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 42, 3), dtype=np.uint8)
    data = encoding.encode_npy(arr[:, ::-1])  # a non-contiguous view is stored C-order
    assert data == encoding.encode_npy(np.ascontiguousarray(arr[:, ::-1]))
    assert data.startswith(b"\x93NUMPY\x01\x00") and len(data) == 128 + arr.size  # v1.0 header, no padding past it
    np.testing.assert_array_equal(encoding.decode_npy(data), arr[:, ::-1])
    with pytest.raises(ValueError):
        encoding.encode_npy(arr.astype(np.float32))
    assert encoding.of_manifest({"params": {}}) == "png"  # manifests from before the field


def test_raw_and_png_hold_the_same_pixels(t91_small, tmp_path):
    """Same inputs, both encodings: identical keys, JSON and pixels; raw is the default."""
    raw, png = tmp_path / "raw", tmp_path / "png"
    run_preprocess(_cfg(images=str(t91_small), out=str(raw)))
    run_cli("preprocess", "--images", str(t91_small), "--out", str(png), *SMALL, "--scales", "2", "-j", "1",
            "--encoding", "png", check=True)
    assert manifest(raw)["params"]["encoding"] == "raw" and "png_compress_level" not in manifest(raw)["params"]
    assert manifest(png)["params"]["encoding"] == "png" and manifest(png)["params"]["png_compress_level"] == 1
    for a, b in zip(mf.shard_paths(raw, "train"), mf.shard_paths(png, "train"), strict=True):
        ma, mb = read_tar_members(a), read_tar_members(b)
        assert [n.replace(".npy", ".png") for n, _ in ma] == [n for n, _ in mb]
        for (na, da), (nb, db) in zip(ma, mb, strict=True):
            if na.endswith(".json"):
                assert da == db
            else:
                np.testing.assert_array_equal(decode_member(na, da), decode_member(nb, db))
    assert sum(p.stat().st_size for p in raw.glob("*.tar")) > sum(p.stat().st_size for p in png.glob("*.tar"))
    with pytest.raises(UserError, match=r"encoding raw -> png.*--force"):  # replacing needs --force
        run_preprocess(_cfg(images=str(t91_small), out=str(raw), encoding="png"))


def test_mixed_encodings_are_refused_in_one_line():
    raw, png = {"params": {"encoding": "raw"}}, {"params": {}}
    assert mf.require_one_encoding({"a": raw, "b": {"params": {"encoding": "raw"}}}) == "raw"
    with pytest.raises(UserError, match=r"mixed shard encodings \(/t is raw, /v is png\)"):
        mf.require_one_encoding({"/t": raw, "/v": png})


def test_min_size_drops_small_images_and_min_hr_is_recorded(t91_dir, tmp_path):
    """T91 with crop 96 keeps images smaller than the crop whole: min_hr says how small."""
    names = ["t1.png", "t10.png", "t12.png", "t2.png", "t20.png"]  # t20: 78 x 78 px
    images = copy_images(t91_dir, tmp_path / "t91", names)
    sides = {n: min(Image.open(images / n).size) for n in names}
    out = tmp_path / "out"
    run_preprocess(_cfg(images=str(images), out=str(out), crop=96, step=96))
    m = manifest(out)
    small = [n for n in names if sides[n] < 96]
    assert small == ["t20.png"], sides  # the regression case: a T91 image smaller than the crop
    assert m["splits"]["train"]["min_hr"] == [72, 72]  # t20 (78 px) kept whole, modcropped to 72
    out2 = tmp_path / "out2"
    proc = run_cli("preprocess", "--images", str(images), "--out", str(out2), "--crop", "96", "--step", "96",
                   "--scales", "2", "-j", "1", "--min-size", "96", check=True)
    m2 = manifest(out2)
    assert f"{len(small)} image(s) with a side below --min-size 96 px dropped" in proc.stderr
    assert sorted(Path(s["file"]).name for s in m2["skipped"]) == sorted(small)
    assert all("--min-size 96" in s["error"] for s in m2["skipped"])
    assert m2["splits"]["train"]["min_hr"] == [96, 96] and m2["params"]["min_size"] == 96
    assert m2["splits"]["train"]["images"] == len(names) - len(small)


def test_step_larger_than_crop_is_refused():
    with pytest.raises(ConfigError, match=r"step \(96\) is larger than preprocess.crop \(48\)"):
        _cfg(crop=48, step=96)


def test_shard_prefix_from_folder_or_name(t91_small, tmp_path):
    assert mf.sanitize_prefix("DIV2K") == "div2k" and mf.sanitize_prefix("My Photos (2024)") == "my-photos-2024"
    assert mf.sanitize_prefix("...") == ""
    out = tmp_path / "out"
    run_preprocess(_cfg(images=str(t91_small), out=str(out), name="Flickr 2K"))
    names = [s["name"] for s in manifest(out)["splits"]["train"]["shards"]]
    assert names[0] == "flickr-2k-train-000000.tar" and manifest(out)["params"]["name"] == "flickr-2k"
    assert sorted(p.name for p in out.glob("*.tar")) == names
    with pytest.raises(UserError, match="--name '!!!'"):
        run_preprocess(_cfg(images=str(t91_small), out=str(tmp_path / "o2"), name="!!!"))
    # renaming replaces the old shards (with --force) and removes exactly those
    (out / "other-train-000000.tar").write_bytes(b"someone else's")
    run_preprocess(_cfg(images=str(t91_small), out=str(out), name="renamed"), force=True)
    left = sorted(p.name for p in out.glob("*.tar"))
    assert "other-train-000000.tar" in left and not any(n.startswith("flickr-2k-") for n in left)
    assert mf.verify_shards(out)[2] == []


def test_dangling_symlink_is_named_by_its_own_path(t91_small, tmp_path):
    link = t91_small / "gone.png"
    link.symlink_to(tmp_path / "never-there.png")
    out = tmp_path / "out"
    bad = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL, "--scales", "2", "-j", "1")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(link) in line and "broken symbolic link" in line
    run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL, "--scales", "2", "-j", "1",
            "--skip-bad", check=True)
    skipped = manifest(out)["skipped"]
    assert [s["file"] for s in skipped] == [str(link)] and "never-there.png" in skipped[0]["error"]


def test_api_call_without_main_guard_says_so(tmp_path, set5_dir):
    script = tmp_path / "noguard.py"
    script.write_text(
        "from pipeline.config import PreprocessConfig\n"
        "from pipeline.preprocess.run import run_preprocess\n"
        f"run_preprocess(PreprocessConfig(images={str(set5_dir)!r}, out={str(tmp_path / 'out')!r}, "
        "crop=48, step=24, jobs=1))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "if __name__ == \"__main__\":" in last and "worker process" in last, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "manifest.json").exists()
