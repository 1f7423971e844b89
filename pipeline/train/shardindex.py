"""Random access to the samples of WebDataset shards, verified against the manifest.

Why not stream the tars front to back: near-uniform mixing needs each loader stream to draw
samples from anywhere in the dataset (see :mod:`pipeline.train.data`). A tar has no index, but
its 512-byte member headers are cheap to walk: one small read per member gives every member's
offset and size, and for raw ``.npy`` members the array header (shape, dtype) rides along in
the same read. After that a patch costs two reads of just the rows it covers (LR and HR), with
no decoding at all for raw shards.

Every shard is checked when it is first indexed: its size against the manifest's ``bytes``, a
header that does not parse (truncated or corrupt), the sample count against the manifest's
``samples``, and each sample having the members this scale needs. A shard read whole (the
validation split) is also checked against its ``sha256``, which is cheap there. Problems raise
:class:`BadShard`: one line naming the shard and what differs.
"""

from __future__ import annotations

import ast
import hashlib
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.console import UserError
from pipeline.train.shardio import (
    BadShard,
    InMemory,
    ShardEntry,
    _RandomAccess,
    file_size,
    is_url,
    object_error,
    read_bytes,
    shown,
)

_NPY_PEEK = 256  # bytes of a .npy member read with its tar header (its header is 128 in practice)

# ---------------------------------------------------------------------------------------------
# The index of one shard
# ---------------------------------------------------------------------------------------------


def parse_npy_header(buf: bytes, where: str) -> tuple[int, tuple[int, ...]]:
    """(offset of the array data, shape) of a uint8 C-order ``.npy`` whose first bytes are `buf`."""
    if buf[:6] != b"\x93NUMPY" or len(buf) < 10:
        raise UserError(f"{where}: not a .npy array")
    major = buf[6]
    if major == 1:
        hlen, start = int.from_bytes(buf[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(buf[8:12], "little"), 12
    else:
        raise UserError(f"{where}: unsupported .npy version {major}")
    if start + hlen > len(buf):
        raise UserError(f"{where}: .npy header longer than expected ({hlen} bytes)")
    try:
        header = ast.literal_eval(buf[start : start + hlen].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except Exception:
        raise UserError(f"{where}: corrupt .npy header") from None
    if np.dtype(descr) != np.uint8 or fortran or len(shape) != 3 or shape[2] != 3:
        raise UserError(f"{where}: expected a C-order uint8 HxWx3 array, got {descr} {shape}")
    return start + hlen, shape


@dataclass
class ShardIndex:
    """Offsets of the HR and chosen-scale LR member of every sample, in tar order.

    Arrays rather than objects: a stream indexes every shard it touches and keeps the index.
    ``hr_shape``/``lr_shape`` are known from the headers for raw shards (zeros for PNG).
    """

    keys: list[str]
    hr: np.ndarray  # (n, 2) int64: data offset, size
    lr: np.ndarray
    hr_shape: np.ndarray  # (n, 2) int64: height, width
    lr_shape: np.ndarray
    encoding: str


def index_shard(entry: ShardEntry, scale: int, source: _RandomAccess | None = None) -> ShardIndex:
    """Walk the tar headers of one shard and check it against its manifest entry."""
    where = shown(entry.location)
    own = source is None
    try:
        try:
            source = source or _RandomAccess(entry.location)
        except FileNotFoundError:
            raise BadShard(f"{where}: shard listed in the manifest is missing") from None
        except UserError:
            raise
        except Exception as exc:
            raise BadShard(f"cannot open shard {object_error(entry.location, exc)}") from None
        if source.size != entry.bytes:
            raise BadShard(f"{where}: size {source.size} bytes, manifest says {entry.bytes} (truncated or replaced)")
        return _walk(entry, scale, source, where)
    finally:
        if own and source is not None:
            source.close()


def _walk(entry: ShardEntry, scale: int, source: _RandomAccess, where: str) -> ShardIndex:
    ext = "npy" if entry.encoding == "raw" else "png"
    want_hr, want_lr = f"hr.{ext}", f"lr_x{scale}.{ext}"
    members: dict[str, dict[str, tuple[int, int, tuple[int, ...]]]] = {}
    order: list[str] = []
    pos = 0
    peek = _NPY_PEEK if ext == "npy" else 0
    while pos + 512 <= source.size:
        block = bytes(source.read_at(pos, 512 + peek))
        head = block[:512]
        if head == b"\0" * 512:
            break
        try:
            info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise BadShard(f"{where}: corrupt tar header at byte {pos} (damaged shard)") from None
        data = pos + 512
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise BadShard(f"{where}: unexpected tar member {info.name!r} (type {info.type!r}); not a shard from preprocess")
        if data + info.size > source.size:
            raise BadShard(f"{where}: member {info.name!r} runs past the end of the file (truncated)")
        base = info.name.rsplit("/", 1)[-1]
        key, _, suffix = base.partition(".")
        if key not in members:
            members[key] = {}
            order.append(key)
        if suffix in (want_hr, want_lr):
            shape: tuple[int, ...] = ()
            offset = data
            if ext == "npy":
                buf = block[512:]
                if len(buf) < min(info.size, _NPY_PEEK):
                    buf = bytes(source.read_at(data, min(info.size, _NPY_PEEK)))
                skip, shape = parse_npy_header(buf[: info.size], f"{where}: {info.name}")
                if skip + int(np.prod(shape)) != info.size:
                    raise BadShard(f"{where}: {info.name}: array of {shape} does not fill its {info.size} bytes")
                offset = data + skip
            members[key][suffix] = (offset, info.size - (offset - data), shape)
        pos = data + (info.size + 511) // 512 * 512
    if len(order) != entry.samples:
        raise BadShard(f"{where}: {len(order)} samples, manifest says {entry.samples} (truncated, corrupt or replaced)")
    n = len(order)
    hr, lr = np.zeros((n, 2), np.int64), np.zeros((n, 2), np.int64)
    hr_shape, lr_shape = np.zeros((n, 2), np.int64), np.zeros((n, 2), np.int64)
    for i, key in enumerate(order):
        got = members[key]
        for name in (want_hr, want_lr):
            if name not in got:
                hint = f" (shards made without scale x{scale}? rerun preprocess with --scales including {scale})" if name == want_lr else ""
                raise BadShard(f"{where}: sample {key!r} has no {name}{hint}")
        hr[i], lr[i] = got[want_hr][:2], got[want_lr][:2]
        if ext == "npy":
            hr_shape[i], lr_shape[i] = got[want_hr][2][:2], got[want_lr][2][:2]
            if hr_shape[i][0] != lr_shape[i][0] * scale or hr_shape[i][1] != lr_shape[i][1] * scale:
                raise BadShard(f"{where}: sample {key!r}: HR {tuple(hr_shape[i])} is not {scale}x the LR {tuple(lr_shape[i])}")
    return ShardIndex(order, hr, lr, hr_shape, lr_shape, entry.encoding)


def index_cache_dir() -> str:
    """Node-local folder for indexes of remote shards (``SR_PIPELINE_INDEX_CACHE`` overrides)."""
    import tempfile

    return os.environ.get("SR_PIPELINE_INDEX_CACHE") or os.path.join(tempfile.gettempdir(), "sr-pipeline-index")


def cached_index(entry: ShardEntry, scale: int) -> ShardIndex:
    """The index of a remote shard, shared by every process of a node through a file named
    after the shard's sha256 (content-addressed: a shard rewritten with other content gets
    another name; its size is still checked against the manifest on every open)."""
    path = os.path.join(index_cache_dir(), f"{entry.sha256}-x{scale}-{entry.encoding}.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            idx = ShardIndex([str(k) for k in z["keys"]], z["hr"], z["lr"], z["hr_shape"], z["lr_shape"], entry.encoding)
        if len(idx.keys) == entry.samples:
            size = file_size(entry.location)
            if size != entry.bytes:
                raise BadShard(f"{shown(entry.location)}: size {size} bytes, manifest says {entry.bytes} (truncated or replaced)")
            return idx
    except (OSError, KeyError, ValueError):
        pass
    idx = index_shard(entry, scale)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, keys=np.array(idx.keys), hr=idx.hr, lr=idx.lr, hr_shape=idx.hr_shape, lr_shape=idx.lr_shape)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full /tmp only costs the next process a walk
    return idx


# ---------------------------------------------------------------------------------------------
# A stream's reader: open files and indexes, kept for the stream's life
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardReader:
    """Reads patches and whole samples of the shards `entries` at one scale."""

    entries: list[ShardEntry]
    scale: int
    max_open: int = 32
    _open: OrderedDict = field(default_factory=OrderedDict)
    _index: dict[int, ShardIndex] = field(default_factory=dict)
    _pending: dict[int, Any] = field(default_factory=dict)

    def source(self, shard: int) -> _RandomAccess:
        src = self._open.get(shard)
        if src is None:
            entry = self.entries[shard]
            try:
                src = _RandomAccess(entry.location)
            except FileNotFoundError:
                raise BadShard(f"{shown(entry.location)}: shard listed in the manifest is missing") from None
            except Exception as exc:
                raise BadShard(f"cannot open shard {object_error(entry.location, exc)}") from None
            self._open[shard] = src
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(shard)
        return src

    def index(self, shard: int) -> ShardIndex:
        """The shard's index (built and verified on first use; raises BadShard)."""
        idx = self._index.get(shard)
        if idx is None:
            future = self._pending.pop(shard, None)
            entry = self.entries[shard]
            if future is not None:
                idx = future.result()  # raises the BadShard found in the background
            elif is_url(entry.location):
                idx = cached_index(entry, self.scale)
            else:
                idx = index_shard(entry, self.scale, self.source(shard))
            self._index[shard] = idx
        return idx

    def prefetch(self, threads: int = 16) -> None:
        """Object storage: index every shard in the background, ``threads`` at a time.

        Walking a tar's headers costs one ranged GET per member; done lazily, a stream drawing
        uniformly would stall on the first sample of every shard. Threads overlap the requests
        (pyarrow's filesystems are thread-safe); local files need none of this."""
        if self._pending or not self.entries or not is_url(self.entries[0].location):
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-index")
        self._pending = {i: pool.submit(cached_index, e, self.scale) for i, e in enumerate(self.entries)}
        pool.shutdown(wait=False)

    def where(self, shard: int, pos: int) -> str:
        return f"{shown(self.entries[shard].location)}: sample {self.index(shard).keys[pos]!r}"

    def size(self, shard: int, pos: int) -> tuple[int, int] | None:
        """LR (height, width) when known without reading pixels (raw shards)."""
        idx = self.index(shard)
        return (int(idx.lr_shape[pos][0]), int(idx.lr_shape[pos][1])) if idx.encoding == "raw" else None

    def rows(self, shard: int, pos: int, which: str, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` of a raw member as an (y1-y0, W, 3) array (one read)."""
        idx = self.index(shard)
        (offset, _), (_, w) = getattr(idx, which)[pos], getattr(idx, f"{which}_shape")[pos]
        row = int(w) * 3
        buf = self.source(shard).read_at(int(offset) + y0 * row, (y1 - y0) * row)
        if len(buf) != (y1 - y0) * row:
            raise BadShard(f"{self.where(shard, pos)}: short read (shard changed while training?)")
        return np.frombuffer(buf, np.uint8).reshape(y1 - y0, int(w), 3)

    def member(self, shard: int, pos: int, which: str) -> bytes:
        idx = self.index(shard)
        offset, size = getattr(idx, which)[pos]
        return bytes(self.source(shard).read_at(int(offset), int(size)))

    def pair(self, shard: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole (LR, HR) of one sample, decoded when PNG."""
        idx = self.index(shard)
        if idx.encoding == "raw":
            (lh, _), (hh, _) = idx.lr_shape[pos], idx.hr_shape[pos]
            return self.rows(shard, pos, "lr", 0, int(lh)).copy(), self.rows(shard, pos, "hr", 0, int(hh)).copy()
        from pipeline.imageio import decode_png

        try:
            lr, hr = decode_png(self.member(shard, pos, "lr")), decode_png(self.member(shard, pos, "hr"))
        except UserError:
            raise
        except Exception as exc:  # PIL raises several types for corrupt data
            raise BadShard(f"{self.where(shard, pos)} is not a valid PNG ({exc})") from None
        if hr.shape[0] != lr.shape[0] * self.scale or hr.shape[1] != lr.shape[1] * self.scale:
            raise BadShard(f"{self.where(shard, pos)}: HR {hr.shape[1]}x{hr.shape[0]} is not {self.scale}x the LR "
                           f"{lr.shape[1]}x{lr.shape[0]} (shards from another scale or a broken writer?)")
        return lr, hr

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def read_whole_verified(entry: ShardEntry, scale: int) -> tuple[ShardReader, int]:
    """A reader over one shard held in memory after checking its sha256 (validation shards are
    read whole anyway, so the checksum costs little there). Returns (reader, shard number 0)."""
    data = read_bytes(entry.location) if file_size(entry.location) is not None else None
    if data is None:
        raise BadShard(f"{shown(entry.location)}: shard listed in the manifest is missing")
    if len(data) != entry.bytes:
        raise BadShard(f"{shown(entry.location)}: size {len(data)} bytes, manifest says {entry.bytes} (truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BadShard(f"{shown(entry.location)}: sha256 differs from the manifest (corrupt or modified)")
    reader = ShardReader([entry], scale)
    reader._open[0] = InMemory(data)
    return reader, 0
