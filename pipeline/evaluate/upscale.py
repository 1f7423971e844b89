"""`sr-pipeline upscale`: super-resolve users' own images (any size, RGB/grey/alpha).

Differences from benchmark evaluation, all for users' files rather than protocol fidelity:
overlap tiling by default (bounded memory for photos of any size), grey images come back
grey, an alpha channel is carried over (bicubic-resized), output is always PNG (lossless),
and an output may never replace an input file.
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


def read_user_image(path: Path) -> UserImage:
    """Decode fully (one-line errors from :func:`read_image`), keeping grey and alpha."""
    from PIL import Image

    pixels, _ = read_image(path, keep_gray=True)
    alpha = None
    with Image.open(path) as img:
        mode = img.mode
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


def output_paths(inputs: list[Path], out_dir: Path, scale: int) -> list[Path]:
    """``<out>/<stem>_x<scale>.png``; clashing stems get ``-2``, ``-3``...; never an input."""
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
        if candidate.resolve() in resolved_inputs:
            raise UserError(
                f"{candidate}: refusing to overwrite an input image; choose another --out"
            )
        taken.add(candidate.resolve())
        outs.append(candidate)
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
    inputs: list[Path], out_dir: Path, upscaler, scale: int, label: str = ""
) -> list[Path]:
    """Upscale every input into ``out_dir`` with a progress bar; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = output_paths(inputs, out_dir, scale)
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
