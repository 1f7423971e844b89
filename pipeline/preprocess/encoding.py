"""How a sample's images are stored in a shard: ``raw`` (``.npy``) or ``png``.

``raw`` (the default for new shards) stores each HR sub-image and LR image as an uncompressed
uint8 HxWx3 C-order array in numpy's ``.npy`` format: the header names dtype and shape, so the
train loader crops straight from the bytes without decoding (PNG decoding was ~94 % of the
loader's per-sample cost). It costs disk: see README "Shard encodings" for sizes.
``png`` keeps the older, smaller shards (:func:`pipeline.imageio.encode_png_fast`).

Member names (a contract with the train loader): ``<key>.hr.npy`` / ``<key>.lr_x{s}.npy``
for raw, ``<key>.hr.png`` / ``<key>.lr_x{s}.png`` for png, plus ``<key>.json`` for both.
A manifest without ``params.encoding`` was written before raw existed and means ``png``.
"""

from __future__ import annotations

import io

import numpy as np

ENCODINGS = ("raw", "png")
DEFAULT = "raw"
LEGACY = "png"  # what a manifest without params.encoding holds
EXTENSION = {"raw": "npy", "png": "png"}


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a uint8 HxWx3 array, deterministic (format version 1.0, C order)."""
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of a raw member (no pickles: ``.npy`` from a shard is untrusted input)."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def encode(array: np.ndarray, encoding: str, png_compress_level: int) -> bytes:
    if encoding == "raw":
        return encode_npy(array)
    from pipeline.imageio import encode_png_fast

    return encode_png_fast(array, png_compress_level)


def of_manifest(manifest: dict) -> str:
    """The encoding a shard manifest records (``png`` when it predates the field)."""
    return manifest.get("params", {}).get("encoding", LEGACY)
