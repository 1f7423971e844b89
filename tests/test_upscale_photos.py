"""`upscale` on photos as people have them (issue 15, item 2): EXIF orientation, ICC profiles,
output formats, 16-bit in and out, alpha, folders with --skip-existing and a summary, and each
bad input as one clear line with nothing lost."""

from __future__ import annotations

import hashlib
import io

import fixtures_evaluate
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image, ImageCms, ImageOps

from pipeline.evaluate.photo_io import encode_png16, read_photo
from pipeline.preprocess import imresize

tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture()
def photo(set5_dir) -> Image.Image:
    with Image.open(set5_dir / "butterfly.png") as im:
        return im.convert("RGB").crop((40, 30, 60, 70))  # 20 wide, 40 tall, real texture


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def test_every_exif_orientation_matches_pillow(tmp_path, photo):
    for o in range(1, 9):
        path = tmp_path / f"o{o}.png"
        photo.save(path, exif=_exif(o))
        with Image.open(path) as im:
            want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        np.testing.assert_array_equal(read_photo(path).pixels, want, err_msg=f"orientation {o}")


def test_phone_photo_rotated_with_profile_in_every_format(tmp_path, photo):
    """The issue's case: a JPEG stored 20x40 with orientation 6 displays as 40x20."""
    src = tmp_path / "in"
    src.mkdir()
    icc = _srgb_icc()
    photo.save(src / "phone.jpg", quality=92, exif=_exif(6), icc_profile=icc)
    shown = read_photo(src / "phone.jpg").pixels
    assert shown.shape == (20, 40, 3)
    sizes = {}
    for fmt, quality in (("png", 95), ("jpg", 95), ("jpg", 30), ("webp", 80), ("same", 95)):
        out = tmp_path / f"out-{fmt}-{quality}"
        proc = run_cli("upscale", str(src), "--model", "bicubic", "--scale", "2", "--out", str(out),
                       "--format", fmt, "--quality", str(quality))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        (made,) = list(out.iterdir())
        suffix = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "same": ".jpg"}[fmt]
        assert made.name == f"phone_x2{suffix}"
        with Image.open(made) as im:
            assert im.format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[suffix]
            assert im.size == (80, 40)  # rotated: as the viewer showed the input
            assert im.info.get("icc_profile") == icc
            assert not im.getexif().get(0x0112)  # no orientation left to apply twice
            if fmt == "png":
                np.testing.assert_array_equal(np.asarray(im), imresize(shown, scale=2))
        sizes[(fmt, quality)] = made.stat().st_size
    assert sizes[("jpg", 30)] < sizes[("jpg", 95)]  # --quality reaches the encoder


def test_sixteen_bit_png_stays_sixteen_bit_on_request(tmp_path, photo, tiny_checkpoints):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    rgb16 = (np.asarray(photo).astype(np.uint16) * 257 + rng.integers(0, 257, (40, 20, 3))).astype(
        np.uint16
    )
    icc = _srgb_icc()
    (src / "deep.png").write_bytes(encode_png16(rgb16, icc))
    grey16 = rgb16[..., 1].copy()
    Image.fromarray(grey16).save(src / "deepgrey.png")
    back = read_photo(src / "deep.png", keep_16bit=True)
    np.testing.assert_array_equal(back.pixels, rgb16)  # our writer and reader agree on all bits
    assert back.icc == icc

    out = tmp_path / "out16"
    proc = run_cli("upscale", str(src), "--model", "bicubic", "--scale", "2", "--out", str(out),
                   "--keep-16bit")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = read_photo(out / "deep_x2.png", keep_16bit=True)
    want = np.clip(np.round(imresize(rgb16.astype(np.float64), scale=2)), 0, 65535)
    np.testing.assert_array_equal(got.pixels, want.astype(np.uint16))
    assert got.icc == icc
    grey = read_photo(out / "deepgrey_x2.png", keep_16bit=True).pixels
    assert grey.dtype == np.uint16 and grey.shape == (80, 40)

    out8 = tmp_path / "out8"  # without the flag: 8-bit, as every other input
    proc = run_cli("upscale", str(src / "deep.png"), "--model", "bicubic", "--scale", "2",
                   "--out", str(out8))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(out8 / "deep_x2.png") as im:
        assert im.mode == "RGB"

    # the network sees all 16 bits: its 16-bit output is not an 8-bit one scaled by 257
    out_net = tmp_path / "net16"
    proc = run_cli("upscale", str(src / "deep.png"), "--checkpoint", str(tiny_checkpoints.ours_x2),
                   "--out", str(out_net), "--keep-16bit", "--precision", "bf16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--precision bf16 needs a CUDA GPU; running in fp32 on cpu" in proc.stderr
    net = read_photo(out_net / "deep_x2.png", keep_16bit=True).pixels
    assert net.dtype == np.uint16 and net.shape == (80, 40, 3)
    assert np.count_nonzero(net % 257) > net.size // 2


def test_folder_with_bad_inputs_skip_existing_and_summary(tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    photo.save(src / "a_plain.png")
    photo.convert("CMYK").save(src / "b_cmyk.jpg", quality=95)
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(src / "c_palette.png")
    la = photo.convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.arange(20, dtype=np.uint8) * 12, (40, 1))))
    la.save(src / "d_greyalpha.png")
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00")
    (src / "e_badexif.jpg").write_bytes(buf.getvalue())
    Image.new("RGB", (1, 1), (9, 99, 199)).save(src / "f_dot.png")
    data = (src / "a_plain.png").read_bytes()
    (src / "g_broken.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_plain_x2.png").write_bytes(b"the user's own file")
    proc = run_cli("upscale", str(src), "--model", "bicubic", "--scale", "2", "--out", str(out),
                   "--skip-existing")  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr
    assert f"warning: skipped {src / 'g_broken.png'}: corrupt or truncated image" in err
    assert f"warning: {src / 'e_badexif.jpg'}: corrupt EXIF (" in err
    assert f"{src / 'b_cmyk.jpg'}: CMYK converted to RGB" in err
    assert f"wrote 5 of 7 image(s) to {out}; skipped 1 whose output exists; 1 could not be " in err
    assert err.strip().splitlines()[-1].startswith(
        "error: 1 of 7 image(s) could not be upscaled: g_broken.png (corrupt or truncated image"
    )
    assert (out / "a_plain_x2.png").read_bytes() == b"the user's own file"
    modes = {}
    for p in sorted(out.iterdir())[1:]:  # [0] is the user's file, left alone
        with Image.open(p) as im:
            modes[p.name] = (im.mode, im.size)
    assert modes == {
        "b_cmyk_x2.png": ("RGB", (40, 80)),
        "c_palette_x2.png": ("RGB", (40, 80)),
        "d_greyalpha_x2.png": ("LA", (40, 80)),
        "e_badexif_x2.png": ("RGB", (40, 80)),
        "f_dot_x2.png": ("RGB", (2, 2)),
    }
    with Image.open(out / "d_greyalpha_x2.png") as im:
        alpha = np.asarray(im)[..., 1]
    np.testing.assert_array_equal(alpha, imresize(np.asarray(la)[..., 1], scale=2))

    # JPEG cannot hold alpha: that one image is skipped with the reason, the rest are written
    jpg = tmp_path / "jpg"
    proc = run_cli("upscale", str(src / "a_plain.png"), str(src / "d_greyalpha.png"), "--model",
                   "bicubic", "--scale", "2", "--out", str(jpg), "--format", "jpg")  # fmt: skip
    assert proc.returncode == 1
    assert (f"skipped {src / 'd_greyalpha.png'}: JPEG cannot hold its alpha channel; use "
            "--format png or webp") in proc.stderr  # fmt: skip
    assert sorted(p.name for p in jpg.iterdir()) == ["a_plain_x2.jpg"]


def test_output_folder_that_is_a_file_and_bad_options(tmp_path, photo):
    photo.save(tmp_path / "p.png")
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"keep me")
    digest = hashlib.sha256(b"keep me").hexdigest()
    for out, extra, start in (
        (blocker, [], f"error: {blocker}: --out is a file, not a folder"),
        (blocker / "sub", [], f"error: {blocker / 'sub'}: {blocker} is a file, not a folder"),
        (tmp_path / "o", ["--format", "gif"], "error: --format must be one of png, jpg, webp, same"),
        (tmp_path / "o", ["--skip-existing", "--overwrite"], "error: --skip-existing and --overwrite"),
    ):
        proc = run_cli("upscale", str(tmp_path / "p.png"), "--model", "bicubic", "--scale", "2",
                       "--out", str(out), *extra)  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert hashlib.sha256(blocker.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "o").exists()
