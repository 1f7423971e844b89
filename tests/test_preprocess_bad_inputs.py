"""Every bad input from the issue: one clear line naming the file, nothing final damaged."""

from __future__ import annotations

import errno
import fcntl
import json
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import fixtures_preprocess
import numpy as np
import pytest
from fixtures_preprocess import SMALL, decode_member, read_tar_members
from helpers import BIN, run_cli
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import tarwriter
from pipeline.preprocess.manifest import read_manifest, shard_paths
from pipeline.preprocess.run import run_preprocess

t91_small = fixtures_preprocess.t91_small


def _one_error_line(stderr: str) -> str:
    """The CLI printed exactly one `error:` line and no traceback; return it."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _png16_rgb(arr16: np.ndarray, path: Path) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_truncated_and_corrupt_images_abort_with_one_line(t91_small, tmp_path):
    out = tmp_path / "out"
    good = (t91_small / "t1.png").read_bytes()
    (t91_small / "t11_truncated.png").write_bytes(good[: len(good) // 2])
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "t11_truncated.png" in line and "truncated" in line
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp"))
    for p in out.glob("*.tar"):  # whatever was finished before the bad file is complete
        assert read_tar_members(p)

    (t91_small / "t11_truncated.png").write_bytes(b"this is not a PNG at all")
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
    line = _one_error_line(proc.stderr)
    assert "t11_truncated.png" in line and "not an image" in line


def test_skip_bad_reports_in_manifest(t91_small, tmp_path):
    out = tmp_path / "out"
    good = (t91_small / "t1.png").read_bytes()
    (t91_small / "a_truncated.png").write_bytes(good[:3000])
    (t91_small / "b_garbage.jpg").write_bytes(b"\x00" * 100)
    (t91_small / "notes.txt").write_text("not an image; ignored")
    Image.fromarray(np.full((10, 30, 3), 128, np.uint8)).save(t91_small / "c_tiny.png")
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL, "--skip-bad", check=True)
    assert "ignored non-image file" in proc.stderr and "notes.txt" in proc.stderr
    assert "c_tiny.png" in proc.stderr and "smaller than 12 px" in proc.stderr
    m = read_manifest(out)
    skipped = {Path(s["file"]).name: s["error"] for s in m["skipped"]}
    assert set(skipped) == {"a_truncated.png", "b_garbage.jpg", "c_tiny.png"}
    assert "truncated" in skipped["a_truncated.png"] and "not an image" in skipped["b_garbage.jpg"]
    assert m["splits"]["train"]["images"] == 5  # the five good photos
    # a rerun without --skip-bad does not silently accept the earlier skips
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
    assert proc.returncode == 1 and "a_truncated.png" in _one_error_line(proc.stderr)
    assert read_manifest(out) == m  # the finished output is untouched


def test_odd_modes_are_converted_and_said_once(t91_dir, tmp_path):
    src = np.asarray(Image.open(t91_dir / "t1.png").convert("RGB"))[:72, :96]
    folder = tmp_path / "modes"
    folder.mkdir()
    Image.fromarray(src).convert("L").save(folder / "gray.png")
    Image.fromarray(src).convert("P").save(folder / "palette.png")
    Image.fromarray(src).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(src[:, :, 0].astype(np.uint16) * 257).save(folder / "gray16.png")
    _png16_rgb(src.astype(np.uint16) * 257, folder / "rgb16.png")
    out = tmp_path / "out"
    proc = run_cli("preprocess", "--images", str(folder), "--out", str(out), "--crop", "480", "--scales", "2", check=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "converted to 8-bit RGB" in warnings[0]  # said once ...
    assert "5 images were converted to 8-bit RGB" in proc.stderr  # ... and counted
    members = {}
    for p in shard_paths(out, "train"):
        members.update(read_tar_members(p))
    expected = {
        "gray": np.repeat(np.asarray(Image.fromarray(src).convert("L"))[:, :, None], 3, axis=2),
        "palette": np.asarray(Image.fromarray(src).convert("P").convert("RGB")),
        "rgba": src,
        "gray16": np.repeat(src[:, :, :1], 3, axis=2),
        "rgb16": src,
    }
    for stem, want in expected.items():
        got = decode_member(".npy", members[f"train_{stem}_0_0.hr.npy"])  # smaller than the crop: one sample
        np.testing.assert_array_equal(got, want, err_msg=stem)


def test_smaller_than_crop_is_one_sample_cropped_to_12(t91_dir, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    img = np.asarray(Image.open(t91_dir / "t2.png").convert("RGB"))
    Image.fromarray(img[:41, :70]).save(folder / "small.png")  # 41x70 < crop 48 in height
    Image.fromarray(img[:11, :70]).save(folder / "sliver.png")  # under 12 px: skipped
    out = tmp_path / "out"
    proc = run_cli("preprocess", "--images", str(folder), "--out", str(out), *SMALL, check=True)
    assert "sliver.png" in proc.stderr and "smaller than 12 px" in proc.stderr
    members = dict(read_tar_members(shard_paths(out, "train")[0]))
    meta = json.loads(members["train_small_0_0.json"])
    assert meta["box"] == [0, 0, 36, 60] and meta["lr_sizes"]["3"] == [12, 20]
    np.testing.assert_array_equal(decode_member(".npy", members["train_small_0_0.hr.npy"]), img[:36, :60])
    m = read_manifest(out)
    assert m["splits"]["train"]["samples"] == 1 and [Path(s["file"]).name for s in m["skipped"]] == ["sliver.png"]


def test_missing_empty_and_conflicting_inputs(tmp_path):
    out = str(tmp_path / "out")
    cases = [
        (["--images", str(tmp_path / "nope")], "nope: images folder not found"),
        (["--data-dir", str(tmp_path)], "no DIV2K_train_HR/"),
        (["--images", str(tmp_path), "--data-dir", str(tmp_path)], "exactly one of"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    cases.append((["--images", str(empty)], "empty: no images in images folder"))
    for args, message in cases:
        proc = run_cli("preprocess", *args, "--out", out)
        assert proc.returncode == 1
        assert message in _one_error_line(proc.stderr), (args, proc.stderr)
    assert not (tmp_path / "out").exists()  # inputs are checked before anything is created


def test_output_not_a_folder_or_locked(t91_small, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    for out, message in [(a_file, "exists and is not a folder"), (a_file / "sub", "cannot create output folder")]:
        proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
        assert message in _one_error_line(proc.stderr)
    assert a_file.read_text() == "keep me"
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".preprocess.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
    assert "another `sr-pipeline preprocess` is writing here" in _one_error_line(proc.stderr)


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (root)")


def _run_on_tmpfs(tmp_path: Path, images: Path, options: str, extra: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the CLI with --out on a private tmpfs (mount namespace); copy the result back out."""
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    keep.mkdir()
    script = (
        f"mount -t tmpfs -o {options} tmpfs {mnt} || exit 99; "
        f"{BIN / 'sr-pipeline'} preprocess --images {images} --out {mnt}/shards {' '.join(extra)}; rc=$?; "
        f"cp -a {mnt}/. {keep}/ 2>/dev/null; exit $rc"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 99, proc.stderr
    return proc, keep / "shards"


@needs_mount
def test_disk_full_on_a_real_small_filesystem(t91_small, tmp_path):
    proc, out = _run_on_tmpfs(tmp_path, t91_small, "size=400k", [*SMALL, "-j", "1"])
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "disk full" in line and "photos-train-" in line
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp"))
    finals = sorted(out.glob("*.tar"))
    assert finals, "the filesystem should have held a few shards before filling up"
    for p in finals:  # complete, valid archives only
        with tarfile.open(p) as tf:
            assert len(tf.getmembers()) == 16 * 5


@needs_mount
def test_read_only_output_folder(t91_small, tmp_path):
    proc, _ = _run_on_tmpfs(tmp_path, t91_small, "ro,size=64k", SMALL)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "mnt/shards" in line and ("Read-only" in line or "not writable" in line)


def test_injected_write_error_leaves_no_partial_shard(t91_small, tmp_path, monkeypatch):
    """Same guarantee without mount privileges: ENOSPC raised inside the real writer."""
    budget = {"left": 300_000}
    real_write = tarwriter._HashingFile.write

    def failing_write(self, data):
        budget["left"] -= len(data)
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(tarwriter._HashingFile, "write", failing_write)
    out = tmp_path / "out"
    cfg = PreprocessConfig(images=str(t91_small), out=str(out), crop=48, step=24, shard_samples=16, jobs=1)
    with pytest.raises(UserError, match="disk full"):
        run_preprocess(cfg)
    assert not list(out.glob(".*.tmp")) and not (out / "manifest.json").exists()
    written = sorted(out.glob("*.tar"))
    assert written
    for p in written:
        assert len(read_tar_members(p)) == 16 * 5
    monkeypatch.undo()
    run_preprocess(cfg)  # space is back: the rerun completes from where it stopped
    assert read_manifest(out)["splits"]["train"]["samples"] > 16 * len(written)


def test_float_and_32bit_images_are_bad_inputs_not_black_samples(t91_small, tmp_path):
    """Mode F (values 0..1) used to become an all-black sample, 32-bit I a saturated one."""
    Image.fromarray(np.random.default_rng(0).random((60, 60)).astype(np.float32)).save(t91_small / "x_float.tif")
    out = tmp_path / "out"
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert "x_float.tif" in line and "floating-point image (mode F)" in line
    assert not (out / "manifest.json").exists()
    Image.fromarray(np.full((60, 60), 70000, np.int32)).save(t91_small / "y_int32.tif")
    run_cli("preprocess", "--images", str(t91_small), "--out", str(out), *SMALL, "--skip-bad", check=True)
    skipped = {Path(s["file"]).name: s["error"] for s in read_manifest(out)["skipped"]}
    assert set(skipped) == {"x_float.tif", "y_int32.tif"}
    assert "32-bit integer image" in skipped["y_int32.tif"]
