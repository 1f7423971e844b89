"""Reading and writing images with one-line errors and atomic writes.

Every stage reads user-supplied images; each failure mode (missing, truncated, not an image,
odd modes) becomes a :class:`~pipeline.console.UserError` naming the file. Writes go to a
temporary name in the same directory and are renamed into place, so a crash never leaves a
partial file under a final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.console import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm"}


# Unsigned 16-bit grey as Pillow's raw decoders name it (mode "I" in Pillow < 11 for PNG/PGM).
_U16_GREY = {"I;16", "I;16B", "I;16L", "I;16N"}


def _rawmode(img) -> str | None:
    """The pixel layout of the undecoded file (e.g. ``RGB;16B``): lost once the image is loaded,
    and the only place where Pillow shows the bit depth of a 48/64-bit colour image."""
    tiles = getattr(img, "tile", None) or []
    if not tiles:
        return None
    args = tiles[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _ppm_maxval(img) -> int:
    tiles = getattr(img, "tile", None) or []
    args = tiles[0][3] if tiles else None
    if img.format == "PPM" and isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int):
        return args[1]
    return 255


def scale16(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as round(v * 255 / 65535): exact, so 257 * k maps back to k."""
    v = np.clip(np.asarray(values, dtype=np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _grey16(img, path: str | Path, rawmode: str | None) -> np.ndarray:
    """HxW uint8 from a single-channel integer image; UserError unless it is unsigned 16-bit.

    Pillow reports 16-bit grey as mode ``I;16*`` (or ``I`` in older versions, and for PGM files,
    whose values it scales to 0..65535) but also puts 32-bit and signed TIFFs in mode ``I``:
    only the undecoded raw mode tells them apart. Guessing from the data (max <= 255 -> 8-bit)
    would make a dark 16-bit image bright, so anything else is refused.
    """
    mode = img.mode
    sixteen = mode in _U16_GREY or (mode == "I" and (rawmode in _U16_GREY or img.format == "PPM"))
    if not sixteen:
        kind = "signed 16-bit" if rawmode and "16" in rawmode else "32-bit"
        detail = f"mode {mode}, {rawmode}" if rawmode else f"mode {mode}"
        raise UserError(
            f"{path}: {kind} integer image ({detail}) is not supported; save it as 8- or 16-bit unsigned"
        )
    return scale16(np.asarray(img))


def to_uint8_rgb(
    img, path: str | Path = "<image>", rawmode: str | None = None
) -> tuple[np.ndarray, str | None]:
    """Convert a PIL image to an HxWx3 uint8 array; returns (array, note-if-converted).

    16-bit grey is scaled by 255/65535 (not clipped, not guessed from the data), palettes
    expanded, alpha dropped (composited on black would invent colours; DIV2K-style data has no
    alpha), grey repeated. Floating-point (mode ``F``), 32-bit and signed integer images are
    refused: their value range is not knowable from the file. ``rawmode`` is the undecoded
    pixel layout (see :func:`read_image`); without it a mode ``I`` image counts as 32-bit.
    """
    mode = img.mode
    if mode == "F":
        raise UserError(
            f"{path}: floating-point image (mode F) is not supported (its value range is unknown); "
            "save it as 8- or 16-bit"
        )
    if mode == "I" or mode.startswith("I;16"):
        grey = _grey16(img, path, rawmode)
        return np.repeat(grey[:, :, None], 3, axis=2), f"16-bit grey ({rawmode or mode}) converted to 8-bit RGB"
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy(), None
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), f"mode {mode} converted to 8-bit RGB"
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: unsupported image mode {mode} ({exc})") from None


def _low_byte_rawmode(rawmode: str | None) -> str | None:
    """For a 16-bit-per-channel colour layout, the layout that makes Pillow's decoder keep the
    LOW byte of each sample: the same unpacker with the other byte order."""
    m = re.fullmatch(r"(RGB|RGBA);16([BLN])", rawmode or "")
    if m is None:
        return None
    order = m.group(2)
    if order == "N":
        order = "B" if sys.byteorder == "big" else "L"
    return f"{m.group(1)};16{'L' if order == 'B' else 'B'}"


def wide_samples(path: Path, high: np.ndarray, low_rawmode: str) -> np.ndarray | None:
    """All 16 bits (uint16, the layout of ``high``) of a 48/64-bit colour image.

    Pillow decodes such files to 8 bits by keeping the high byte (floor(v / 256), up to one level
    below round(v * 255 / 65535), which 16-bit grey gets). Decoding the file a second time with
    the byte order swapped yields the low bytes; together they give the 16-bit samples. None if
    this Pillow refuses the swapped layout (the caller keeps the high bytes and says so).
    """
    from PIL import Image

    try:
        with Image.open(path) as again:
            again.tile = [
                t._replace(args=_swap_args(t[3], low_rawmode)) if hasattr(t, "_replace")
                else (t[0], t[1], t[2], _swap_args(t[3], low_rawmode))
                for t in again.tile
            ]
            again.load()
            low = np.asarray(again, dtype=np.uint8)
    except (OSError, ValueError, KeyError, SyntaxError):
        return None
    if low.shape != high.shape:
        return None
    return high.astype(np.uint16) << 8 | low.astype(np.uint16)


def _exact_wide_rgb(path: Path, high: np.ndarray, low_rawmode: str) -> np.ndarray | None:
    """HxWx3 uint8 of a 48/64-bit colour image, rounded from all 16 bits (see wide_samples)."""
    full = wide_samples(path, high, low_rawmode)
    return None if full is None else scale16(full[..., :3])


def _swap_args(args, rawmode: str):
    return rawmode if isinstance(args, str) else (rawmode, *args[1:])


def read_image(path: str | Path, keep_gray: bool = False) -> tuple[np.ndarray, str | None]:
    """Decode an image file fully (so truncation is detected here, not later).

    Returns ``(array, note)``: HxWx3 uint8 RGB, or HxW uint8 when ``keep_gray`` and the file is
    single-channel 8- or 16-bit grey (benchmark protocols treat grey images as Y). ``note``
    says what was converted, if anything. 16-bit samples (grey or colour) become
    round(v * 255 / 65535); float and 32-bit/signed integer images are refused (one line).
    """
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not an image")
    with decode_errors(p), Image.open(p) as img:
        rawmode = _rawmode(img)
        wide = ";16" in (rawmode or "") or _ppm_maxval(img) > 255
        img.load()
        if keep_gray and img.mode == "L":
            return np.asarray(img, dtype=np.uint8).copy(), None
        if keep_gray and (img.mode == "I" or img.mode.startswith("I;16")):
            return _grey16(img, p, rawmode), f"16-bit grey ({rawmode or img.mode}) converted to 8-bit"
        low_rawmode = _low_byte_rawmode(rawmode) if img.mode in ("RGB", "RGBA") else None
        if low_rawmode is not None:
            exact = _exact_wide_rgb(p, np.asarray(img, dtype=np.uint8), low_rawmode)
            if exact is not None:
                return exact, f"16-bit {img.mode} ({rawmode}) converted to 8-bit RGB"
        array, note = to_uint8_rgb(img, p, rawmode)
        if wide and note is None:
            kept = " (high byte of each sample kept)" if low_rawmode is not None else ""
            note = f"16-bit {img.mode} converted to 8-bit RGB{kept}"
        return array, note


@contextlib.contextmanager
def decode_errors(path: Path | str, corrupt: str = "corrupt or truncated image") -> Iterator[None]:
    """PIL's failures while opening or decoding `path` as one line each (UserError): not an
    image, too large (decompression-bomb guard), or `corrupt` with PIL's reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (or an unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused, image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for truncated/corrupt data
        raise UserError(f"{path}: {corrupt} ({' '.join(str(exc).split())})") from None


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_png_fast(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG with the "Up" filter on every row, deflated by zlib: a valid, deterministic PNG.

    Why not Pillow: its encoder tries every PNG filter per row (adaptive filtering); on photos
    that costs ~1.6x the encode time of a fixed "Up" filter for files within ~2% of the size,
    and its Paeth-heavy output decodes ~2x slower. The preprocess stage encodes ~4x the DIV2K
    pixels (overlapping crops) and the train loader decodes them every epoch, so both matter.
    """
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected HxW or HxWx{{1,3,4}} uint8, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[c]
    rows = arr.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 arithmetic wraps, as PNG wants

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
        + chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8).copy()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    set-and-restore dance under a lock (os.umask has no read-only form)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename.

    mkstemp creates its file with mode 0600 whatever the umask; the file is given the mode a
    plain ``open(path, "w")`` would have (0666 minus the umask) before the rename, so manifests,
    checkpoints and written images are as readable as any other file the user creates.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_png(path: str | Path, array: np.ndarray, compress_level: int = 1) -> None:
    """Atomically save an HxW or HxWx3 uint8 array as PNG."""
    atomic_write_bytes(path, encode_png(array, compress_level))


def list_images(folder: str | Path) -> list[Path]:
    """Image files in `folder` (not recursive, dotfiles skipped), sorted by name; errors for missing/empty."""
    d = Path(folder)
    if not d.exists():
        raise UserError(f"{d}: folder not found")
    if not d.is_dir():
        raise UserError(f"{d}: not a folder")
    # dotfiles (macOS "._x.png" resource forks, editors' temp files) are never images
    files = sorted(
        p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise UserError(f"{d}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files
