"""Loader throughput: patches per CPU-second, side by side, for our shards and the reference's paths.

Every row makes the same thing: aligned random crops (HR 96, x2), a random dihedral transform,
batches of 16; all run in this one process on one thread, and the rate is patches per second
of this process's CPU time (so load from other processes on a shared machine does not count).

* **ours, raw shards**: `PatchStream` over shards whose members are uint8 ``.npy`` arrays: the
  tar is indexed once, then each patch is two reads of just the rows it covers, no decode.
* **ours, PNG shards**: the same loader over the PNG shards the real preprocess writes: one
  sub-image (480 px) decoded per patch; and with ``patches_per_sample=4`` (the tiny preset).
* **official `--ext sep`** (EDSR/DNLAN's default): at setup every HR and LR image is decoded
  once and pickled to its own file (``pickle.dump(imageio.imread(f))``); per patch the data set's
  ``__getitem__`` unpickles the whole HR and LR image, cuts the aligned patch
  (``common.get_patch``), augments it with hflip/vflip/rot90 coin flips (``common.augment``),
  converts to float tensors (``common.np2Tensor``), and the DataLoader's collate stacks them.
* **official `--ext img`**: the same, but the whole PNGs are decoded per patch (what the README's
  old "21.9x an EDSR-style loader" compared against).
* **in-memory**: all images decoded in RAM, only crop + augment + batch (an upper bound).

Loader memory: Python/numpy memory the loader allocates and keeps while running (tracemalloc
peak over the measurement, after warm-up), i.e. per loader stream.

Inputs: Set14 photos upscaled (PIL bicubic) to DIV2K's size (2040 px long side), saved as PNG
with the default zlib level like the DIV2K files; LR x2 with our MATLAB-style imresize. DIV2K
itself is not on this machine; the stand-in has DIV2K's pixel counts and ~40 sub-images each.

    python benchmarks/loader.py [--seconds 8] [--images 8]

Target (issue 11): raw shards >= 4x the `sep` path per core.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("SR_PIPELINE_QUIET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import PreprocessConfig  # noqa: E402
from pipeline.imageio import decode_png  # noqa: E402
from pipeline.preprocess import imresize  # noqa: E402
from pipeline.preprocess.run import run_preprocess  # noqa: E402
from pipeline.train import data, sampling  # noqa: E402

SCALE, PATCH, BATCH = 2, 96, 16


def shared_data() -> Path:
    """``$SR_SHARED_DATA``, else the nearest ``shared/data`` above this file (checkouts and worktrees)."""
    if os.environ.get("SR_SHARED_DATA"):
        return Path(os.environ["SR_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "benchmark" / "Set14").is_dir():
            return parent / "shared" / "data"
    sys.exit("Set14 not found: set SR_SHARED_DATA to the folder holding benchmark/Set14")


def make_sources(dst: Path, count: int) -> list[tuple[Path, Path]]:
    """(HR png, LR png) pairs of DIV2K size from the Set14 photographs."""
    src = shared_data() / "benchmark" / "Set14" / "HR"
    (dst / "hr").mkdir(parents=True)
    (dst / "lr").mkdir()
    pairs = []
    for p in sorted(src.glob("*.png"))[:count]:
        img = Image.open(p).convert("RGB")
        f = 2040 / max(img.size)
        w, h = round(img.width * f) // 12 * 12, round(img.height * f) // 12 * 12
        hr = np.asarray(img.resize((w, h), Image.BICUBIC))
        Image.fromarray(hr).save(dst / "hr" / p.name)  # default zlib level, as DIV2K's PNGs
        Image.fromarray(imresize(hr, scale=1 / SCALE)).save(dst / "lr" / p.name)
        pairs.append((dst / "hr" / p.name, dst / "lr" / p.name))
    return pairs


def make_shards(src: Path, out: Path, encoding: str, holdout: int = 0) -> tuple[list[str], list[int]]:
    """Shards by the real preprocess code; raw ones with its --encoding raw when it has it,
    else by re-encoding its PNG shards' members as .npy (same samples, same order)."""
    fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    cfg = dict(images=str(src), out=str(out), scales=[SCALE], jobs=1, holdout=holdout)
    if "encoding" in fields:
        run_preprocess(PreprocessConfig(**cfg, encoding=encoding))
    elif encoding == "png":
        run_preprocess(PreprocessConfig(**cfg))
    else:
        png = out.parent / f"{out.name}-png-src"
        run_preprocess(PreprocessConfig(**{**cfg, "out": str(png)}))
        to_raw(png, out)
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["splits"]["train"]["shards"]
    return [str(out / e["name"]) for e in entries], [e["samples"] for e in entries]


def to_raw(png_dir: Path, raw_dir: Path) -> None:
    raw_dir.mkdir(parents=True)
    manifest = json.loads((png_dir / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            buf = io.BytesIO()
            with tarfile.open(png_dir / entry["name"]) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
                for m in src.getmembers():
                    if not m.name.endswith(".png"):  # metadata members stay as they are
                        dst.addfile(m, src.extractfile(m))
                        continue
                    arr = io.BytesIO()
                    np.save(arr, decode_png(src.extractfile(m).read()), allow_pickle=False)
                    info = tarfile.TarInfo(m.name.removesuffix(".png") + ".npy")
                    info.size = arr.getbuffer().nbytes
                    arr.seek(0)
                    dst.addfile(info, arr)
            blob = buf.getvalue()
            (raw_dir / entry["name"]).write_bytes(blob)
            entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    manifest["params"]["encoding"] = "raw"
    (raw_dir / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# The reference's data path (EDSR/DNLAN src/data/srdata.py + common.py), written from its
# description: whole decoded images per item, crop, coin-flip augmentation, float tensors.
# ---------------------------------------------------------------------------------------------


def ref_get_patch(lr: np.ndarray, hr: np.ndarray, patch_size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    ih, iw = lr.shape[:2]
    ip = patch_size // scale
    ix, iy = random.randrange(0, iw - ip + 1), random.randrange(0, ih - ip + 1)
    tx, ty = scale * ix, scale * iy
    return lr[iy : iy + ip, ix : ix + ip, :], hr[ty : ty + patch_size, tx : tx + patch_size, :]


def ref_augment(*imgs: np.ndarray) -> list[np.ndarray]:
    hflip, vflip, rot90 = random.random() < 0.5, random.random() < 0.5, random.random() < 0.5

    def _augment(img: np.ndarray) -> np.ndarray:
        if hflip:
            img = img[:, ::-1, :]
        if vflip:
            img = img[::-1, :, :]
        if rot90:
            img = img.transpose(1, 0, 2)
        return img

    return [_augment(a) for a in imgs]


def ref_np2tensor(img: np.ndarray, rgb_range: float = 1.0) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img.transpose((2, 0, 1)))).float()
    return t.mul_(rgb_range / 255)


class RefDataset:
    """``__getitem__`` of the reference's SRData in training mode, for ``sep`` or ``img``."""

    def __init__(self, pairs: list[tuple[Path, Path]], ext: str, bin_dir: Path) -> None:
        self.ext = ext
        if ext == "sep":  # setup: decode once, pickle each image to its own file
            bin_dir.mkdir(parents=True, exist_ok=True)
            self.files = []
            for hr_path, lr_path in pairs:
                entry = []
                for p, tag in ((hr_path, "hr"), (lr_path, "lr")):
                    f = bin_dir / f"{p.stem}_{tag}.pt"
                    with open(f, "wb") as fh:
                        pickle.dump(np.asarray(Image.open(p).convert("RGB")), fh)
                    entry.append(f)
                self.files.append(tuple(entry))
        else:
            self.files = [(h, lr) for h, lr in pairs]

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        f_hr, f_lr = self.files[idx]
        if self.ext == "sep":
            with open(f_hr, "rb") as fh:
                hr = pickle.load(fh)
            with open(f_lr, "rb") as fh:
                lr = pickle.load(fh)
        else:
            hr, lr = np.asarray(Image.open(f_hr).convert("RGB")), np.asarray(Image.open(f_lr).convert("RGB"))
        return lr, hr

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr, hr = self.load(idx % len(self.files))
        lr, hr = ref_get_patch(lr, hr, PATCH, SCALE)
        lr, hr = ref_augment(lr, hr)
        return ref_np2tensor(lr), ref_np2tensor(hr)


def ref_batches(ds: RefDataset) -> Iterator:
    """DataLoader(shuffle=True) order, default collate (torch.stack), in-process."""
    order: list[int] = []
    while True:
        while len(order) < BATCH:
            order += random.sample(range(len(ds.files)), len(ds.files))
        items = [ds[order.pop()] for _ in range(BATCH)]
        yield torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def in_memory(pairs: list[tuple[Path, Path]], rng: np.random.Generator) -> Iterator:
    images = [(decode_png(lr.read_bytes()), decode_png(h.read_bytes())) for h, lr in pairs]
    while True:
        b = []
        for _ in range(BATCH):
            lr, hr = images[int(rng.integers(len(images)))]
            lr_p, hr_p = sampling.random_patch(lr, hr, SCALE, PATCH, rng)
            k = int(rng.integers(8))
            b.append((np.ascontiguousarray(sampling.dihedral(lr_p, k)), np.ascontiguousarray(sampling.dihedral(hr_p, k))))
        yield (torch.from_numpy(np.stack([x[0] for x in b]).transpose(0, 3, 1, 2).copy()),
               torch.from_numpy(np.stack([x[1] for x in b]).transpose(0, 3, 1, 2).copy()))


def measure(make: Callable[[], Iterator], seconds: float) -> tuple[float, float]:
    """(patches per CPU-second, loader memory MB: tracemalloc peak after warm-up)."""
    it = make()
    for _ in range(2):
        next(it)  # warm-up: opens files, indexes shards, first decodes
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds:
        next(it)
        n += BATCH
    cpu = time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del it
    return n / cpu, max(0.0, (peak - base)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="CPU seconds measured per loader")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        pairs = make_sources(tmp / "src", args.images)
        t0 = time.perf_counter()
        raw_paths, counts = make_shards(tmp / "src" / "hr", tmp / "raw", "raw")
        png_paths, _ = make_shards(tmp / "src" / "hr", tmp / "png", "png")
        prep = time.perf_counter() - t0
        raw_mb = sum(Path(p).stat().st_size for p in raw_paths) / 1e6
        png_mb = sum(Path(p).stat().st_size for p in png_paths) / 1e6

        def ours(paths: list[str], k: int = 1) -> Callable[[], Iterator]:
            return lambda: iter(data.PatchStream(paths, counts, SCALE, PATCH, BATCH, patches_per_sample=k))

        rows = [
            ("official --ext sep (unpickle whole image per patch)", lambda: ref_batches(RefDataset(pairs, "sep", tmp / "bin"))),
            ("official --ext img (decode whole PNG per patch)", lambda: ref_batches(RefDataset(pairs, "img", tmp / "bin"))),
            ("ours, PNG shards (decode 480 px sub-image)", ours(png_paths)),
            ("ours, PNG shards, patches_per_sample=4", ours(png_paths, 4)),
            ("ours, raw shards (read the patch's rows)", ours(raw_paths)),
            ("in-memory decoded images (upper bound)", lambda: in_memory(pairs, np.random.default_rng(0))),
        ]
        results = [(name, *measure(make, args.seconds)) for name, make in rows]
    load1 = os.getloadavg()
    base = results[0][1]
    print(f"# loader benchmark: HR patch {PATCH}, x{SCALE}, batch {BATCH}, one thread, {args.seconds:g} CPU-s each")
    print(f"# sources: {len(pairs)} Set14 photos upscaled to 2040 px; {sum(counts)} sub-images in {len(raw_paths)} shards "
          f"(raw {raw_mb:.0f} MB, PNG {png_mb:.0f} MB; both made in {prep:.0f} s)")
    print(f"{'loader':54s} {'patches/CPU-s':>13s} {'vs sep':>7s} {'memory MB':>10s}")
    for name, rate, mem in results:
        print(f"{name:54s} {rate:13.1f} {rate / base:6.2f}x {mem:10.1f}")
    raw_ratio = results[4][1] / base
    print(f"target: raw shards >= 4x the official sep path per core -> {'met' if raw_ratio >= 4 else 'MISSED'} ({raw_ratio:.1f}x)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"torch {torch.__version__}, pillow {Image.__version__}; load avg before/after {load0[0]:.1f}/{load1[0]:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
