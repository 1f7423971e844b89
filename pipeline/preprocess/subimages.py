"""One source image -> its WebDataset samples (HR sub-images with aligned MATLAB-bicubic LR).

Pure functions plus :func:`process_image`, the unit of work a worker process runs. Everything
here is deterministic (same file, same parameters -> the same bytes), which is what lets an
interrupted run resume into shards byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.console import UserError
from pipeline.imageio import read_image
from pipeline.preprocess.encoding import EXTENSION, encode
from pipeline.preprocess.imresize import imresize

MODCROP = 12  # lcm(2, 3, 4): HR cropped to this multiple so every scale aligns
MIN_SIDE = 12
_STEM_MAX = 60


@dataclass(frozen=True)
class SampleParams:
    """What shapes the bytes of a sample (also part of the resume fingerprint)."""

    scales: tuple[int, ...]
    crop: int
    step: int
    png_compress_level: int
    encoding: str = "raw"  # "raw" (.npy members) | "png"
    min_size: int = 0  # images whose shorter side is below this are skipped (0: only < MIN_SIDE)

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "scales": list(self.scales),
            "crop": self.crop,
            "step": self.step,
            "encoding": self.encoding,
            "modcrop": MODCROP,
            "resize": "matlab-bicubic-antialias",
        }
        if self.encoding == "png":  # PNG-only knobs stay out of a raw dataset's settings
            d.update({"png_compress_level": self.png_compress_level, "png": "filter-up-zlib"})
        if self.min_size:
            d["min_size"] = self.min_size
        return d


@dataclass(frozen=True)
class ImageTask:
    split: str  # "train" | "valid"
    index: int  # position in the split's sorted input list
    path: str  # absolute path to read
    source: str  # path relative to the input root, stored in the sample JSON
    stem: str  # key-safe, unique within the split


@dataclass
class ImageResult:
    split: str
    index: int
    source: str
    samples: list[tuple[str, list[tuple[str, bytes]]]] = field(default_factory=list)
    note: str | None = None  # e.g. "mode P converted to 8-bit RGB"
    error: str | None = None  # a bad file: one line naming it
    skipped: str | None = None  # a usable file we deliberately skip (too small)
    min_hr: tuple[int, int] | None = None  # (smallest height, smallest width) of its samples


def key_stems(sources: list[str]) -> list[str]:
    """Key-safe stems for file names: ``[A-Za-z0-9_-]`` only (WebDataset splits keys at the
    first dot), at most 60 characters, and unique (collisions get a short hash of the name).
    """
    base = []
    for src in sources:
        stem = Path(src).stem
        clean = re.sub(r"[^A-Za-z0-9_-]", "-", stem)[:_STEM_MAX] or "image"
        base.append(clean)
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    out = []
    for src, b in zip(sources, base, strict=True):
        if counts[b] > 1:  # "a.png" and "a.jpg", or "a b" and "a-b"
            b = f"{b[: _STEM_MAX - 9]}-{hashlib.sha256(src.encode()).hexdigest()[:8]}"
        out.append(b)
    if len(set(out)) != len(out):  # vanishingly unlikely after hashing; never write duplicates
        raise UserError("could not make unique sample keys from the input file names")
    return out


def modcrop(img: np.ndarray, multiple: int = MODCROP) -> np.ndarray:
    """Top-left crop to a multiple of `multiple` (DIV2K LR sizes are HR // scale)."""
    h, w = img.shape[0] // multiple * multiple, img.shape[1] // multiple * multiple
    return img[:h, :w]


def crop_positions(length: int, crop: int, step: int) -> list[int]:
    """Sub-image origins along one axis, BasicSR-style: every `step`, plus one flush with the end."""
    if length < crop:
        return [0]
    pos = list(range(0, length - crop + 1, step))
    if pos[-1] + crop < length:
        pos.append(length - crop)
    return pos


def sample_boxes(h: int, w: int, split: str, crop: int, step: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every sample of a modcropped HxW image.

    Valid split: the whole image. Train: crop x crop sub-images, or the whole image when it is
    smaller than the crop on either side (kept as one sample rather than dropped).
    """
    if split == "valid" or h < crop or w < crop:
        return [(0, 0, h, w)]
    return [(t, left, crop, crop) for t in crop_positions(h, crop, step) for left in crop_positions(w, crop, step)]


def sample_json(key: str, task: ImageTask, box, source_size, scales) -> bytes:
    """The sample's ``.json`` member.

    ``box`` is ``[top, left, height, width]`` of the HR crop in the source image AFTER its
    top-left crop to a multiple of 12 (:func:`modcrop`), and ``source_size`` is
    ``[height, width]`` of that modcropped image, not of the file (which may be up to 11 px
    taller and wider): it is the frame ``box`` lives in. ``lr_sizes`` maps each scale to
    ``[height, width]`` of that LR member.
    """
    top, left, bh, bw = box
    meta = {
        "key": key,
        "source": task.source,
        "split": task.split,
        "box": [top, left, bh, bw],
        "hr_size": [bh, bw],
        "source_size": list(source_size),
        "scales": list(scales),
        "lr_sizes": {str(s): [bh // s, bw // s] for s in scales},
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def make_samples(
    hr: np.ndarray, task: ImageTask, params: SampleParams
) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Encode every sample of a (modcropped, uint8 RGB) image: [(key, [(member, bytes), ...])]."""
    h, w = hr.shape[:2]
    # LR from the WHOLE image, as DIV2K's official LR_bicubic; crops are then exact sub-blocks.
    lrs = {s: imresize(hr, 1.0 / s) for s in params.scales}
    for s, lr in lrs.items():
        assert lr.shape[:2] == (h // s, w // s), (s, lr.shape, hr.shape)
    out = []
    for top, left, bh, bw in sample_boxes(h, w, task.split, params.crop, params.step):
        key = f"{task.split}_{task.stem}_{top}_{left}"
        ext, enc, level = EXTENSION[params.encoding], params.encoding, params.png_compress_level
        members = [(f"{key}.hr.{ext}", encode(hr[top : top + bh, left : left + bw], enc, level))]
        for s in params.scales:
            lr = lrs[s][top // s : (top + bh) // s, left // s : (left + bw) // s]
            members.append((f"{key}.lr_x{s}.{ext}", encode(lr, enc, level)))
        members.append((f"{key}.json", sample_json(key, task, (top, left, bh, bw), (h, w), params.scales)))
        out.append((key, members))
    return out


def process_image(task: ImageTask, params: SampleParams) -> ImageResult:
    """Worker entry point: decode, check, modcrop, resize, cut and encode one image.

    A bad file is reported in the result (not raised) so the parent decides between aborting
    and `--skip-bad`; anything else (a bug, out of memory) propagates.
    """
    result = ImageResult(task.split, task.index, task.source)
    if os.path.islink(task.path) and not os.path.exists(task.path):
        result.error = f"{task.path}: broken symbolic link (its target {os.readlink(task.path)} does not exist)"
        return result
    try:
        img, note = read_image(task.path)
    except UserError as exc:
        result.error = " ".join(str(exc).split())
        return result
    result.note = note
    h, w = img.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        result.skipped = f"{task.path}: {w}x{h} px is smaller than {MIN_SIDE} px; skipped"
        return result
    if min(h, w) < params.min_size:
        result.skipped = f"{task.path}: {w}x{h} px, shorter side below --min-size {params.min_size}; skipped"
        return result
    hr = np.ascontiguousarray(modcrop(img))
    result.samples = make_samples(hr, task, params)
    boxes = sample_boxes(hr.shape[0], hr.shape[1], task.split, params.crop, params.step)
    result.min_hr = (min(b[2] for b in boxes), min(b[3] for b in boxes))
    return result
