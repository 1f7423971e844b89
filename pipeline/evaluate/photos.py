"""`sr-pipeline upscale`: super-resolve users' own images (any size, RGB/grey/alpha).

Differences from benchmark evaluation, all for users' files rather than protocol fidelity:
overlap tiling by default (bounded memory for photos of any size), grey images come back
grey, an alpha channel is carried over (bicubic-resized), output is always PNG (lossless),
an output may never replace an input file, and an existing file is replaced only with
``--overwrite``. Every target is checked before the first image is written, so a refusal
leaves the output folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import console
from pipeline.console import UserError
from pipeline.evaluate.metrics import rgb_to_gray
from pipeline.imageio import IMAGE_SUFFIXES, list_images, read_image, write_png


@dataclass
class UserImage:
    path: Path
    pixels: np.ndarray  # HxW (grey) or HxWx3 uint8
    alpha: np.ndarray | None  # HxW uint8 or None


def collect_inputs(items: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive)."""
    if not items:
        raise UserError("no input images given")
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(list_images(p))
        elif p.exists():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                console.warn(f"{p}: unusual image extension {p.suffix!r}; trying to read it anyway")
            out.append(p)
        else:
            raise UserError(f"{p}: file not found")
    return out


# Single-channel modes besides 8-bit "L" (bilevel, 16/32-bit integer): read_image turns them into
# 8-bit RGB; for users' files they are grey images and must come back grey.
_WIDE_GREY_MODES = ("1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def read_user_image(path: Path) -> UserImage:
    """Decode fully (one-line errors from :func:`read_image`), keeping grey and alpha.

    Pixels are 8-bit: 16-bit files are scaled down as :func:`read_image` does.
    """
    from PIL import Image

    pixels, _ = read_image(path, keep_gray=True)
    alpha = None
    with Image.open(path) as img:
        mode = img.mode
        if mode in _WIDE_GREY_MODES and pixels.ndim == 3:
            pixels = pixels[..., 0].copy()  # read_image repeated the one channel three times
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            mode == "P" and "transparency" in img.info
        ):
            rgba = np.asarray(img.convert("RGBA"))
            alpha = rgba[..., 3].copy()
            if mode in ("LA", "La"):
                pixels = np.asarray(img.convert("L"), dtype=np.uint8).copy()
            else:
                pixels = rgba[..., :3].copy()
    return UserImage(path, pixels, alpha)


def output_paths(
    inputs: list[Path], out_dir: Path, scale: int, overwrite: bool = False
) -> list[Path]:
    """``<out>/<stem>_x<scale>.png``; inputs sharing a stem get ``-2``, ``-3``... in order.

    Never an input (not even with ``overwrite``: that would destroy the user's original), and
    never an existing file unless ``overwrite``. An existing file is refused rather than
    renamed around, so the output names stay predictable for scripts. Only checks: nothing is
    created or written here.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: --out is a file, not a folder; choose another --out")
    taken: set[Path] = set()
    resolved_inputs = {p.resolve() for p in inputs}
    outs = []
    for src in inputs:
        n = 1
        while True:
            stem = src.stem if n == 1 else f"{src.stem}-{n}"
            candidate = out_dir / f"{stem}_x{scale}.png"
            if candidate.resolve() not in taken:
                break
            n += 1
        taken.add(candidate.resolve())
        outs.append(candidate)
    for candidate in outs:  # inputs first: that refusal holds whatever the flags
        if candidate.resolve() in resolved_inputs:
            raise UserError(
                f"{candidate}: refusing to overwrite an input image; choose another --out"
            )
    for candidate in outs:
        if candidate.is_dir():
            raise UserError(f"{candidate}: a folder has the output's name; choose another --out")
        if candidate.exists() and not overwrite:
            raise UserError(
                f"{candidate}: already exists; pass --overwrite to replace it, or choose "
                "another --out"
            )
    return outs


def upscale_image(image: UserImage, upscaler, scale: int) -> np.ndarray:
    """SR pixels in the input's layout: grey -> grey, RGB -> RGB, with alpha -> RGBA / LA."""
    from pipeline.preprocess import imresize

    sr = upscaler(image.pixels, 0)
    if image.pixels.ndim == 2 and sr.ndim == 3:
        sr = np.clip(np.round(rgb_to_gray(sr)), 0, 255).astype(np.uint8)
    if image.alpha is not None:
        a = imresize(image.alpha, scale=scale)
        sr = np.dstack([sr, a])  # HxWx2 (LA) or HxWx4 (RGBA)
    return sr


def upscale_files(
    inputs: list[Path],
    out_dir: Path,
    upscaler,
    scale: int,
    label: str = "",
    overwrite: bool = False,
) -> list[Path]:
    """Upscale every input into ``out_dir`` with a progress bar; returns the written paths."""
    targets = output_paths(inputs, out_dir, scale, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    desc = f"upscale x{scale}{label}"
    with console.progress_bar(desc, total=len(inputs), unit="img") as bar:
        for src, dst in zip(inputs, targets, strict=True):
            image = read_user_image(src)
            if hasattr(upscaler, "on_tile"):  # big images: show the tile being worked on
                upscaler.on_tile = lambda d, t, name=src.name: bar.set_description(
                    f"{desc}: {name} tile {d}/{t}"
                )
            write_png(dst, upscale_image(image, upscaler, scale))
            written.append(dst)
            bar.set_description(desc)
            bar.advance()
    return written
