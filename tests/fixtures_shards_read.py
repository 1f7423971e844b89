"""Small shard folders for the reader tests, written with the standard tarfile/numpy/PIL APIs.

They follow the shard contract (members ``<key>.hr.npy|png`` and ``<key>.lr_x{s}.npy|png``,
a manifest with ``params.encoding`` and per-shard samples/bytes/sha256) without depending on
the preprocess code, so the reader is tested against the contract itself. Every pixel of a
sample holds its global sample number (mod 256 in each channel) so a test can tell from a
patch which sample it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def sample_arrays(index: int, hr_size: tuple[int, int], scales: tuple[int, ...]) -> dict[str, np.ndarray]:
    """HR and LR arrays whose channels encode `index`; texture so crops differ by position."""
    h, w = hr_size
    rng = np.random.default_rng(index)
    hr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    hr[..., 0] = index % 256
    hr[..., 1] = (index // 256) % 256
    out = {"hr": hr}
    for s in scales:
        lr = np.ascontiguousarray(hr[::s, ::s][: h // s, : w // s])
        out[f"lr_x{s}"] = lr
    return out


def _encode(arr: np.ndarray, encoding: str) -> bytes:
    buf = io.BytesIO()
    if encoding == "raw":
        np.save(buf, arr, allow_pickle=False)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    folder: Path,
    counts_per_split: dict[str, list[int]],
    *,
    encoding: str = "raw",
    scales: tuple[int, ...] = (2,),
    hr_size: tuple[int, int] = (24, 24),
    sizes: dict[int, tuple[int, int]] | None = None,
    prefix: str = "div2k",
    manifest_encoding: bool = True,
    min_hr: bool = True,
) -> Path:
    """Shards with the given sample counts per split; ``sizes`` overrides the HR size of some
    global sample numbers (train samples first, then valid). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict] = {}
    index = 0
    ext = "npy" if encoding == "raw" else "png"
    for split in ("train", "valid"):
        shards, smallest = [], None
        for n, count in enumerate(counts_per_split.get(split, [])):
            name = f"{prefix}-{split}-{n:06d}.tar"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for _ in range(count):
                    size = (sizes or {}).get(index, hr_size)
                    smallest = size if smallest is None else (min(smallest[0], size[0]), min(smallest[1], size[1]))
                    for member, arr in sample_arrays(index, size, scales).items():
                        data = _encode(arr, encoding)
                        info = tarfile.TarInfo(f"s{index:07d}.{member}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    index += 1
            data = buf.getvalue()
            (folder / name).write_bytes(data)
            shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"images": len(shards), "samples": sum(s["samples"] for s in shards), "shards": shards}
        if min_hr and smallest is not None:
            splits[split]["min_hr"] = list(smallest)
    params = {"scales": list(scales), "crop": max(hr_size)}
    if manifest_encoding:
        params["encoding"] = encoding
    manifest = {
        "format": "sr-pipeline/shards", "format_version": 1, "dataset": "test", "created": "2026-01-01T00:00:00",
        "package_version": "0", "params": params, "inputs": {}, "splits": splits, "skipped": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def train_entries(folder: Path) -> tuple[list[str], list[int]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    return [str(folder / s["name"]) for s in shards], [s["samples"] for s in shards]


def sample_of(patch: np.ndarray) -> int:
    """The global sample number a CHW or HWC patch was cut from (see :func:`sample_arrays`)."""
    a = patch if patch.shape[-1] == 3 else np.moveaxis(patch, 0, -1)
    return int(a[0, 0, 0]) + 256 * int(a[0, 0, 1])
