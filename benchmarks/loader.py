"""Loader throughput: patches/s on ONE core for the shard loader vs two baselines.

* **shard loader** (ours): `PatchStream` over shards written by the real preprocess code
  (480 px sub-images, x2 LR), in-process (no DataLoader workers), so the number is per core.
* **EDSR-style**: what the reference's loader does per patch when it reads PNGs: decode the whole
  source HR image and its whole LR image, then crop one aligned patch.
* **in-memory**: all images already decoded in RAM; only crop + augment + batch (upper bound).

Every path does the same crop, dihedral augmentation and uint8 batching (batch 16, HR patch 96,
x2, as the paper). Inputs: Set14 photos upscaled (PIL bicubic) to DIV2K size (2040 px long side)
and saved as PNG (default zlib level, like the DIV2K files); LR x2 with our MATLAB-style
imresize. DIV2K itself is not on this machine; the stand-in has DIV2K's pixel counts.

    python benchmarks/loader.py [--seconds 8] [--images 14]

Target (issue 5): shard loader >= 3x the EDSR-style loader.
"""

from __future__ import annotations

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("SR_PIPELINE_QUIET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import PreprocessConfig  # noqa: E402
from pipeline.imageio import decode_png  # noqa: E402
from pipeline.preprocess import imresize  # noqa: E402
from pipeline.preprocess.shards import run_preprocess  # noqa: E402
from pipeline.train import data  # noqa: E402

SCALE, PATCH, BATCH = 2, 96, 16
SET14 = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmark" / "Set14" / "HR"


def make_sources(dst: Path, count: int) -> list[tuple[Path, Path]]:
    """(HR png, LR png) pairs of DIV2K size from the Set14 photographs."""
    src = Path(os.environ.get("SR_SHARED_DATA", SET14.parents[2])) / "benchmark" / "Set14" / "HR"
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


def batches(patches: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        b = [next(patches) for _ in range(BATCH)]
        lr = torch.from_numpy(np.ascontiguousarray(np.stack([x[0] for x in b]).transpose(0, 3, 1, 2)))
        hr = torch.from_numpy(np.ascontiguousarray(np.stack([x[1] for x in b]).transpose(0, 3, 1, 2)))
        yield lr, hr


def augmented(lr: np.ndarray, hr: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lr_p, hr_p = data.random_patch(lr, hr, SCALE, PATCH, rng)
    k = int(rng.integers(8))
    return data.dihedral(lr_p, k), data.dihedral(hr_p, k)


def edsr_style(pairs: list[tuple[Path, Path]], rng: np.random.Generator) -> Iterator:
    while True:
        hr_path, lr_path = pairs[int(rng.integers(len(pairs)))]
        hr, lr = decode_png(hr_path.read_bytes()), decode_png(lr_path.read_bytes())
        yield augmented(lr, hr, rng)


def in_memory(pairs: list[tuple[Path, Path]], rng: np.random.Generator) -> Iterator:
    images = [(decode_png(h.read_bytes()), decode_png(lr.read_bytes())) for h, lr in pairs]
    while True:
        hr, lr = images[int(rng.integers(len(images)))]
        yield augmented(lr, hr, rng)


def measure(make: Callable[[], Iterator], seconds: float) -> float:
    it = make()
    next(it)  # warm-up: fills shuffle buffers, opens files
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += BATCH
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measuring time per loader")
    ap.add_argument("--images", type=int, default=14)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        pairs = make_sources(tmp / "src", args.images)
        shards = tmp / "shards"
        t0 = time.perf_counter()
        run_preprocess(PreprocessConfig(images=str(tmp / "src" / "hr"), out=str(shards), scales=[SCALE], jobs=1))
        prep = time.perf_counter() - t0
        manifest = json.loads((shards / "manifest.json").read_text())
        entries = manifest["splits"]["train"]["shards"]
        paths = [str(shards / e["name"]) for e in entries]
        counts = [e["samples"] for e in entries]

        def ours(k: int) -> Callable[[], Iterator]:
            return lambda: iter(data.PatchStream(paths, counts, SCALE, PATCH, BATCH, patches_per_sample=k))

        rows = [
            ("EDSR-style (decode whole source PNG per patch)", lambda: batches(edsr_style(pairs, np.random.default_rng(0)))),
            ("shard loader (ours, 1 patch per sub-image)", ours(1)),
            ("shard loader (ours, --set patches_per_sample=4)", ours(4)),
            ("in-memory decoded images (upper bound)", lambda: batches(in_memory(pairs, np.random.default_rng(0)))),
        ]
        results = [(name, measure(make, args.seconds)) for name, make in rows]
    load1 = os.getloadavg()
    base = results[0][1]
    print(f"# loader benchmark: HR patch {PATCH}, x{SCALE}, batch {BATCH}, 1 core, {args.seconds:g} s each")
    print(f"# sources: {len(pairs)} Set14 photos upscaled to 2040 px; {sum(counts)} sub-images in {len(paths)} shards"
          f" (preprocess {prep:.0f} s)")
    print(f"{'loader':52s} {'patches/s':>10s} {'vs EDSR-style':>14s}")
    for name, rate in results:
        print(f"{name:52s} {rate:10.1f} {rate / base:13.1f}x")
    ours_ratio = results[1][1] / base
    print(f"target: shard loader >= 3x EDSR-style -> {'met' if ours_ratio >= 3 else 'MISSED'} ({ours_ratio:.1f}x)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"pillow {Image.__version__}; load avg before/after {load0[0]:.1f}/{load1[0]:.1f}")


if __name__ == "__main__":
    main()
