"""Reading and writing users' photos for `upscale`: orientation, colour profile, bit depth, alpha.

Benchmark images are plain 8-bit PNGs; photos are not. What this module keeps, and why:

* **EXIF orientation** is applied to the pixels (a phone's portrait JPEG is stored sideways
  with orientation 6); the output carries no EXIF, so viewers show it as the input looked.
  Unreadable EXIF is one warning line and the image is used as stored.
* **ICC profile** is copied into the output (PNG ``iCCP``, JPEG and WebP ICC): the SR pixels
  are in the input's colour space, so without it wide-gamut photos look washed out. A CMYK
  profile cannot describe RGB pixels; CMYK is converted to RGB and its profile dropped (said).
* **16-bit** grey and colour PNGs give 16-bit samples when asked (``keep_16bit``), written as
  16-bit PNG by :func:`encode_png16` (Pillow cannot write 48/64-bit colour PNG); otherwise
  they are rounded to 8 bits as :func:`pipeline.imageio.read_image` does.
* **Alpha** (RGBA, LA, PA, palette transparency) is kept apart for the caller to resize.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import console
from pipeline.console import UserError

ORIENTATION_TAG = 0x0112
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class Photo:
    path: Path
    pixels: np.ndarray  # HxW (grey) or HxWx3, uint8 or uint16, displayed orientation
    alpha: np.ndarray | None  # HxW, same dtype as pixels, or None
    icc: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels as displayed for EXIF ``orientation`` 1..8 (as Pillow's exif_transpose)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    return np.ascontiguousarray(ops[orientation](array))


def _orientation(img, path: Path) -> int:
    """EXIF orientation, 1 when absent. Corrupt EXIF (Pillow warns while opening or here, or
    raises) and values outside 1..8 give one warning line and 1: the image is used as stored,
    not lost. Call inside :func:`_exif_warnings`."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception as exc:  # Pillow raises many types on malformed EXIF; none is fatal
        warnings.warn(f"Corrupt EXIF data: {type(exc).__name__}", UserWarning, stacklevel=1)
        return 1
    if value in (None, 0):
        return 1
    if not isinstance(value, int) or not 1 <= value <= 8:
        console.warn(f"{path}: EXIF orientation {value!r} is not 1-8; image used as stored")
        return 1
    return value


@contextlib.contextmanager
def _exif_warnings(path: Path, state: dict):
    """Pillow's multi-line warnings about a file become one line naming it; ``state["exif_bad"]``
    says whether the EXIF was corrupt (then the orientation is not trusted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = " ".join(str(w.message).split())
        if "EXIF" in text:
            if not state.get("exif_bad"):
                console.warn(f"{path}: corrupt EXIF ({text}); orientation not applied")
            state["exif_bad"] = True
        else:
            console.warn(f"{path}: {text}")


def _wide_rgb16(path: Path, img, rawmode: str | None) -> np.ndarray | None:
    """All 16 bits of a 48/64-bit colour PNG (Pillow keeps only the high byte), or None."""
    from pipeline.imageio import _low_byte_rawmode, wide_samples

    low_mode = _low_byte_rawmode(rawmode) if img.mode in ("RGB", "RGBA") else None
    if low_mode is None:
        return None
    return wide_samples(path, np.asarray(img, dtype=np.uint8), low_mode)


def _split_alpha(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        return arr[..., :-1].squeeze(-1) if arr.shape[2] == 2 else arr[..., :3], arr[..., -1]
    return arr, None


def _decode(img, path: Path, rawmode: str | None, keep_16bit: bool, icc: bytes | None):
    """(pixels, alpha, icc, notes) in stored orientation."""
    from pipeline.imageio import _U16_GREY, _grey16, scale16, to_uint8_rgb

    mode = img.mode
    notes: list[str] = []
    if mode in ("I", "F") or mode.startswith("I;16"):
        eight = _grey16(img, path, rawmode) if mode != "F" else to_uint8_rgb(img, path)[0]
        if keep_16bit and (mode in _U16_GREY or rawmode in _U16_GREY):
            return np.asarray(img).astype(np.uint16), None, icc, notes
        return eight, None, icc, notes
    if mode in ("RGB", "RGBA"):
        wide = _wide_rgb16(path, img, rawmode)
        if wide is not None:
            pixels, alpha = _split_alpha(wide if keep_16bit else scale16(wide))
            return pixels, alpha, icc, notes
        pixels, alpha = _split_alpha(np.asarray(img, dtype=np.uint8))
        return pixels, alpha, icc, notes
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8), None, icc, notes
    if mode in ("LA", "La"):
        pixels, alpha = _split_alpha(np.asarray(img.convert("LA"), dtype=np.uint8))
        return pixels, alpha, icc, notes
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)
        pixels, alpha = _split_alpha(arr)
        return pixels, alpha, icc, notes
    if mode == "CMYK":
        if icc is not None:
            notes.append("CMYK converted to RGB; its CMYK colour profile is not copied")
        else:
            notes.append("CMYK converted to RGB")
        return np.asarray(img.convert("RGB"), dtype=np.uint8), None, None, notes
    pixels, note = to_uint8_rgb(img, path, rawmode)
    if note:
        notes.append(note)
    return pixels, None, icc, notes


def read_photo(path: Path, keep_16bit: bool = False) -> Photo:
    """Decode fully (truncation is detected here), oriented for display; one-line errors."""
    from PIL import Image

    from pipeline.imageio import _rawmode, decode_errors

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not an image")
    state: dict = {}
    with decode_errors(p), _exif_warnings(p, state), Image.open(p) as img:
        rawmode = _rawmode(img)
        img.load()
        icc = img.info.get("icc_profile") or None
        orientation = _orientation(img, p)
        pixels, alpha, icc, notes = _decode(img, p, rawmode, keep_16bit, icc)
    if state.get("exif_bad"):
        orientation = 1
    pixels = orient(pixels, orientation)
    alpha = orient(alpha, orientation) if alpha is not None else None
    return Photo(p, pixels, alpha, icc, notes)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def encode_png16(array: np.ndarray, icc: bytes | None = None) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) from a uint16 HxW / HxWxC array.

    Samples are big-endian as PNG requires; no row filter (type 0), zlib level 6. ``icc`` goes
    into an ``iCCP`` chunk (zlib-compressed profile, as the PNG spec defines).
    """
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint16 or arr.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC uint16, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = arr.astype(">u2").reshape(h, w * c).view(np.uint8)
    raw = np.zeros((h, rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 1:] = rows

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc:
        parts.append(chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(icc)))
    parts += [chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)), chunk(b"IEND", b"")]
    return b"".join(parts)


def encode_photo(array: np.ndarray, fmt: str, icc: bytes | None, quality: int) -> bytes:
    """Bytes of ``array`` (HxW, HxWx2/3/4; uint8, or uint16 for PNG) in ``fmt`` (PNG, JPEG,
    WEBP) with the ICC profile. The caller has checked that ``fmt`` can hold the array."""
    from PIL import Image

    if array.dtype == np.uint16:
        return encode_png16(array, icc)
    img = Image.fromarray(np.ascontiguousarray(array))  # L, LA, RGB or RGBA from the shape
    if fmt == "WEBP" and img.mode in ("L", "LA"):
        img = img.convert("RGB" if img.mode == "L" else "RGBA")
    options: dict = {"icc_profile": icc} if icc else {}
    if fmt == "PNG":
        options["compress_level"] = 6
    else:
        options["quality"] = quality
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def cannot_hold(fmt: str, photo_has_alpha: bool, bits: int) -> str | None:
    """Why ``fmt`` cannot hold the output without losing something, else None."""
    if bits == 16 and fmt != "PNG":
        return f"{fmt} holds 8 bits per sample; 16-bit output needs --format png"
    if photo_has_alpha and fmt == "JPEG":
        return "JPEG cannot hold its alpha channel; use --format png or webp"
    return None
