"""pipeline.imageio on real files of every bit depth Pillow reads, and atomic writes' modes."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.console import UserError
from pipeline.imageio import atomic_write_bytes, read_image, scale16, to_uint8_rgb, write_png

RNG = np.random.default_rng(1234)


def _exact8(v16: np.ndarray) -> np.ndarray:
    """The reference 16 -> 8 bit mapping, in floating point: round(v * 255 / 65535)."""
    return np.floor(v16.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png16(arr16: np.ndarray, path: Path) -> None:
    """A 16-bit-per-sample PNG (grey, grey+alpha, RGB or RGBA), which Pillow cannot write for
    colour. Rows cycle through all five PNG filters (None, Sub, Up, Average, Paeth) so the
    decoder's unfiltering, which depends on the bytes per pixel, is exercised."""
    h, w = arr16.shape[:2]
    c = 1 if arr16.ndim == 2 else arr16.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    bpp = 2 * c
    rows = np.frombuffer(arr16.astype(">u2").tobytes(), np.uint8).reshape(h, w * bpp).astype(np.int32)
    out = []
    for y in range(h):
        x = rows[y]
        up = rows[y - 1] if y else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(x)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        out.append(bytes([kind]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(out)))
        + _chunk(b"IEND", b"")
    )


def _random16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------
# 16-bit images: scaled by 255/65535 exactly, whatever the container
# ---------------------------------------------------------------------------------------------


def test_scale16_is_exact_rounding():
    v = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(scale16(v), _exact8(v))
    np.testing.assert_array_equal(scale16(np.arange(256) * 257), np.arange(256))


def test_16bit_grey_png(tmp_path):
    grey = _random16(23, 31)
    Image.fromarray(grey).save(tmp_path / "g.png")  # Pillow writes a 16-bit grey PNG itself
    rgb, note = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(rgb, np.repeat(_exact8(grey)[:, :, None], 3, axis=2))
    assert "16-bit grey" in note
    y, note = read_image(tmp_path / "g.png", keep_gray=True)  # benchmarks keep grey as grey
    assert y.shape == (23, 31) and y.dtype == np.uint8
    np.testing.assert_array_equal(y, _exact8(grey))


def test_dark_16bit_image_is_not_mistaken_for_8bit(tmp_path):
    """Values that all fit in 8 bits are still 16-bit samples: a near-black image stays dark."""
    dark = RNG.integers(0, 256, (16, 16), dtype=np.uint16)
    dark[0, 0] = 255
    for name, save in (("dark.png", None), ("dark.tif", "tiff")):
        Image.fromarray(dark).save(tmp_path / name, format=save)
        rgb, _ = read_image(tmp_path / name)
        assert rgb.max() == 1
        np.testing.assert_array_equal(rgb[:, :, 0], _exact8(dark))
    pgm = tmp_path / "dark.pgm"  # Pillow opens 16-bit PGM as mode "I" (raw mode I;16B)
    pgm.write_bytes(b"P5\n16 16\n65535\n" + dark.astype(">u2").tobytes())
    with Image.open(pgm) as im:
        assert im.mode == "I"
    rgb, note = read_image(pgm)
    np.testing.assert_array_equal(rgb[:, :, 0], _exact8(dark))
    assert "16-bit grey (I;16B)" in note


def test_16bit_grey_tiff_and_pgm(tmp_path):
    grey = _random16(9, 14)
    Image.fromarray(grey).save(tmp_path / "g.tif")
    with Image.open(tmp_path / "g.tif") as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif")[0][:, :, 1], _exact8(grey))
    pgm = tmp_path / "g.pgm"
    pgm.write_bytes(b"P5\n14 9\n65535\n" + grey.astype(">u2").tobytes())
    np.testing.assert_array_equal(read_image(pgm)[0][:, :, 2], _exact8(grey))
    # maxval 1023: Pillow scales the samples to 0..65535 itself; the result must be v*255/1023
    ten = RNG.integers(0, 1024, (9, 14), dtype=np.uint16)
    pgm10 = tmp_path / "g10.pgm"
    pgm10.write_bytes(b"P5\n14 9\n1023\n" + ten.astype(">u2").tobytes())
    got = read_image(pgm10)[0][:, :, 0].astype(int)
    assert np.abs(got - np.round(ten * 255.0 / 1023.0)).max() <= 1


@pytest.mark.parametrize("channels", [3, 4])
def test_48_and_64_bit_colour_png_use_all_16_bits(tmp_path, channels):
    """Pillow alone keeps only the high byte (floor(v/256)); read_image rounds from all 16 bits."""
    rgb16 = _random16(21, 17, channels)
    path = tmp_path / f"c{channels}.png"
    _png16(rgb16, path)
    with Image.open(path) as im:
        pillow = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(pillow, (rgb16[..., :3] >> 8).astype(np.uint8))  # what Pillow does
    got, note = read_image(path)
    np.testing.assert_array_equal(got, _exact8(rgb16[..., :3]))  # alpha dropped, colour exact
    assert (got != pillow).any()  # the random data does exercise the difference
    assert note.startswith("16-bit RGB")


def test_48_bit_colour_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb16 = _random16(12, 10, 3)
    for compression in (None, "zlib"):  # Pillow's raw decoder and libtiff
        path = tmp_path / f"c-{compression}.tif"
        tifffile.imwrite(path, rgb16, compression=compression)
        got, note = read_image(path)
        np.testing.assert_array_equal(got, _exact8(rgb16), err_msg=str(compression))
        assert "16-bit RGB" in note


def test_48_bit_ppm_is_rounded_by_pillow_and_noted(tmp_path):
    rgb16 = _random16(8, 6, 3)
    path = tmp_path / "c.ppm"
    path.write_bytes(b"P6\n6 8\n65535\n" + rgb16.astype(">u2").tobytes())
    got, note = read_image(path)
    np.testing.assert_array_equal(got, _exact8(rgb16))
    assert note is not None and "16-bit" in note


def test_8bit_images_are_untouched(tmp_path, set5_dir):
    rgb, note = read_image(set5_dir / "baby.png")
    with Image.open(set5_dir / "baby.png") as im:
        np.testing.assert_array_equal(rgb, np.asarray(im.convert("RGB")))
    assert note is None and rgb.dtype == np.uint8
    grey = RNG.integers(0, 256, (7, 9), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g8.png", keep_gray=True)[0], grey)
    np.testing.assert_array_equal(read_image(tmp_path / "g8.png")[0][:, :, 0], grey)


# ---------------------------------------------------------------------------------------------
# Formats whose value range is unknowable: refused with one line naming the file
# ---------------------------------------------------------------------------------------------


def test_float_tiff_is_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(RNG.random((8, 8)).astype(np.float32)).save(path)  # mode F, values 0..1
    with pytest.raises(UserError, match=r"float\.tif: floating-point image \(mode F\) is not supported") as err:
        read_image(path)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="mode F"):
        read_image(path, keep_gray=True)


def test_32bit_and_signed_integer_tiffs_are_refused(tmp_path):
    path = tmp_path / "int32.tif"
    Image.fromarray((RNG.integers(0, 1 << 20, (8, 8))).astype(np.int32)).save(path)
    with pytest.raises(UserError, match=r"int32\.tif: 32-bit integer image \(mode I, I;32S\) is not supported"):
        read_image(path)
    with pytest.raises(UserError, match="32-bit integer"):
        read_image(path, keep_gray=True)
    small = tmp_path / "int32-small.tif"  # max <= 255 must not make it "8-bit"
    Image.fromarray(RNG.integers(0, 256, (8, 8)).astype(np.int32)).save(small)
    with pytest.raises(UserError, match="32-bit integer"):
        read_image(small)
    tifffile = pytest.importorskip("tifffile")
    signed = tmp_path / "s16.tif"
    tifffile.imwrite(signed, RNG.integers(-1000, 1000, (8, 8)).astype(np.int16))
    with pytest.raises(UserError, match=r"s16\.tif: signed 16-bit integer image"):
        read_image(signed)


def test_to_uint8_rgb_without_the_raw_mode_refuses_mode_i():
    """A mode-I image built in memory has no file layout to tell 16 from 32 bits: refused."""
    with pytest.raises(UserError, match="32-bit integer image"):
        to_uint8_rgb(Image.fromarray(np.zeros((4, 4), np.int32)), "mem")
    arr, note = to_uint8_rgb(Image.fromarray(np.full((4, 4), 257 * 9, np.uint16)), "mem")  # mode I;16
    assert (arr == 9).all() and "16-bit grey" in note


# ---------------------------------------------------------------------------------------------
# Atomic writes get the mode an ordinary file would get
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(value: int) -> None:
        os.umask(value)

    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    write_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x")  # what the user's other files get
    want = 0o666 & ~mask
    assert stat.S_IMODE(plain.stat().st_mode) == want
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    # replacing an existing file keeps the rule (no temporary file is left either)
    atomic_write_bytes(tmp_path / "a.json", b"{}\n")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png", "plain.txt"]
