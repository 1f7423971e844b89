"""`sr-pipeline upscale`: super-resolve users' own images (any size, RGB/grey/alpha, photos).

Differences from benchmark evaluation, all for users' files rather than protocol fidelity:
overlap tiling by default (bounded memory for photos of any size), grey images come back
grey, an alpha channel is carried over (bicubic-resized), EXIF orientation is applied and the
ICC profile kept (:mod:`pipeline.evaluate.photo_io`), the output format is PNG (lossless,
default), JPEG or WebP by ``--format``, 16-bit PNGs stay 16-bit with ``--keep-16bit``. An
output may never replace an input file, and an existing file is replaced only with
``--overwrite`` (or skipped with ``--skip-existing``). Every target is checked before the
first image is written, so a refusal leaves the output folder as it was; an image that cannot
be read or written in the chosen format is skipped, said in one line, and listed in the
summary, so one bad file in a folder costs none of the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import console
from pipeline.console import UserError
from pipeline.evaluate.photo_io import FORMATS, Photo, cannot_hold, encode_photo, read_photo
from pipeline.imageio import IMAGE_SUFFIXES, atomic_write_bytes, list_images


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


OUTPUT_FORMATS = ("png", "jpg", "webp", "same")


def output_suffix(src: Path, fmt: str) -> str:
    """``.png``/``.jpg``/``.webp``; ``same`` keeps the input's when it is one of those (else PNG)."""
    if fmt == "same":
        own = src.suffix.lower().lstrip(".")
        return f".{own}" if own in FORMATS else ".png"
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    return f".{fmt}"


def output_paths(
    inputs: list[Path],
    out_dir: Path,
    scale: int,
    overwrite: bool = False,
    fmt: str = "png",
    skip_existing: bool = False,
) -> list[Path]:
    """``<out>/<stem>_x<scale>.<ext>``; inputs sharing a stem get ``-2``, ``-3``... in order.

    Never an input (not even with ``overwrite``: that would destroy the user's original), and
    never an existing file unless ``overwrite`` (replace it) or ``skip_existing`` (the caller
    leaves it alone). An existing file is refused rather than renamed around, so the output
    names stay predictable for scripts. Only checks: nothing is created or written here.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: --out is a file, not a folder; choose another --out")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out_dir}: {parent} is a file, not a folder; choose another --out")
    taken: set[Path] = set()
    resolved_inputs = {p.resolve() for p in inputs}
    outs = []
    for src in inputs:
        n = 1
        suffix = output_suffix(src, fmt)
        while True:
            stem = src.stem if n == 1 else f"{src.stem}-{n}"
            candidate = out_dir / f"{stem}_x{scale}{suffix}"
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
        if candidate.exists() and not (overwrite or skip_existing):
            raise UserError(
                f"{candidate}: already exists; pass --overwrite to replace it, --skip-existing "
                "to keep it, or choose another --out"
            )
    return outs


def _sr16(upscaler, lr: np.ndarray, scale: int) -> np.ndarray:
    """16-bit LR -> 16-bit SR: the network sees all 16 bits (floats), bicubic runs in float."""
    import torch

    from pipeline.preprocess import imresize

    if hasattr(upscaler, "forward_float"):
        y = upscaler.forward_float(lr, 0, peak=65535.0)
        q = y[0].mul(65535.0 / upscaler.rgb_range).clamp_(0, 65535).round_()
        return q.to(torch.int32).permute(1, 2, 0).cpu().numpy().astype(np.uint16)
    return np.clip(np.round(imresize(lr.astype(np.float64), scale=scale)), 0, 65535).astype(np.uint16)


def _resize_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    from pipeline.preprocess import imresize

    if alpha.dtype == np.uint8:
        return imresize(alpha, scale=scale)
    return np.clip(np.round(imresize(alpha.astype(np.float64), scale=scale)), 0, 65535).astype(
        alpha.dtype
    )


def upscale_image(image: Photo, upscaler, scale: int) -> np.ndarray:
    """SR pixels in the input's layout: grey -> grey, RGB -> RGB, with alpha -> RGBA / LA;
    uint8 in -> uint8 out, uint16 in -> uint16 out."""
    from pipeline.evaluate.metrics import rgb_to_gray

    wide = image.pixels.dtype == np.uint16
    sr = _sr16(upscaler, image.pixels, scale) if wide else upscaler(image.pixels, 0)
    if image.pixels.ndim == 2 and sr.ndim == 3:
        top = 65535 if wide else 255
        sr = np.clip(np.round(rgb_to_gray(sr)), 0, top).astype(sr.dtype)
    if image.alpha is not None:
        sr = np.dstack([sr, _resize_alpha(image.alpha, scale)])  # HxWx2 (LA) or HxWx4 (RGBA)
    return sr


@dataclass
class UpscaleSummary:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (input, why)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (input, one-line reason)

    def line(self, out_dir: Path) -> str:
        total = len(self.written) + len(self.skipped) + len(self.failed)
        text = f"wrote {len(self.written)} of {total} image(s) to {out_dir}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} whose output exists"
        if self.failed:
            text += f"; {len(self.failed)} could not be upscaled (warnings above)"
        return text


def upscale_files(
    inputs: list[Path],
    out_dir: Path,
    upscaler,
    scale: int,
    label: str = "",
    overwrite: bool = False,
    fmt: str = "png",
    quality: int = 95,
    keep_16bit: bool = False,
    skip_existing: bool = False,
) -> UpscaleSummary:
    """Upscale every input into ``out_dir`` with a progress bar.

    An input that cannot be read, or whose output format cannot hold it (alpha in JPEG), is
    reported in one warning line and skipped; the others are still written. Outputs are written
    atomically (temporary name, then rename), so an interrupted run leaves no half file.
    """
    targets = output_paths(inputs, out_dir, scale, overwrite, fmt, skip_existing)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = UpscaleSummary()
    desc = f"upscale x{scale}{label}"
    with console.progress_bar(desc, total=len(inputs), unit="img") as bar:
        for src, dst in zip(inputs, targets, strict=True):
            bar.advance()
            if skip_existing and dst.exists():
                summary.skipped.append((src, "output exists"))
                continue
            try:
                image = read_photo(src, keep_16bit=keep_16bit)
                fmt_name = FORMATS[dst.suffix.lstrip(".")]
                why = cannot_hold(fmt_name, image.alpha is not None, image.bits)
                if why is not None:
                    raise UserError(f"{src}: {why}")
            except UserError as exc:
                if len(inputs) == 1:
                    raise  # one image: its error is the command's error
                console.warn(f"skipped {exc}")
                summary.failed.append((src, str(exc)))
                continue
            for note in image.notes:
                console.info(f"{src}: {note}")
            if hasattr(upscaler, "on_tile"):  # big images: show the tile being worked on
                upscaler.on_tile = lambda d, t, name=src.name: bar.set_description(
                    f"{desc}: {name} tile {d}/{t}"
                )
            sr = upscale_image(image, upscaler, scale)
            atomic_write_bytes(dst, encode_photo(sr, fmt_name, image.icc, quality))
            summary.written.append(dst)
            bar.set_description(desc)
    return summary
