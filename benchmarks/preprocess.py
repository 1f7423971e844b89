"""Preprocess throughput: --jobs 1 vs all cores, a naive PIL baseline, imresize vs PIL resize.

Inputs: Set14 photos upscaled (PIL bicubic) to DIV2K size (2040 px long side) and saved as PNG,
so decode/resize/encode costs are those of real DIV2K images. Everything is measured in this run,
so ratios are meaningful even on a noisy shared machine; absolute times are not.

    python benchmarks/preprocess.py [--images 8] [--repeats 2]

Targets (issue 4): parallel efficiency >= 80%; MATLAB-exact imresize <= 3x PIL's resize time.
"""

from __future__ import annotations

import os

# One BLAS thread, like the preprocess workers, so single-image timings are single-core.
for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("SR_PIPELINE_QUIET", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import PreprocessConfig  # noqa: E402
from pipeline.preprocess import imresize  # noqa: E402
from pipeline.preprocess.pool import resolve_jobs  # noqa: E402
from pipeline.preprocess.run import run_preprocess  # noqa: E402

SCALES = (2, 3, 4)


def make_inputs(src: Path, dst: Path, count: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.png"))[:count]
    out = []
    for p in files:
        img = Image.open(p).convert("RGB")
        f = 2040 / max(img.size)
        big = img.resize((round(img.width * f), round(img.height * f)), Image.BICUBIC)
        target = dst / p.name
        big.save(target)  # default zlib level, like the DIV2K PNGs
        out.append(target)
    return out


def naive_baseline(files: list[Path], out: Path) -> float:
    """What a first attempt does: PIL open, PIL bicubic per scale, save PNG (sequential)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            im.load()
            for s in SCALES:
                im.resize((im.width // s, im.height // s), Image.BICUBIC).save(out / f"{p.stem}x{s}.png")
    return time.perf_counter() - t0


def _cpu() -> float:
    """CPU seconds of this process plus its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_ours(images: Path, out: Path, jobs: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one full preprocess run, pool start-up included."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = PreprocessConfig(images=str(images), out=str(out), jobs=jobs)
    cfg.validate()
    c0, t0 = _cpu(), time.perf_counter()
    run_preprocess(cfg)
    return time.perf_counter() - t0, _cpu() - c0


def resize_ratio(files: list[Path], repeats: int) -> tuple[float, float]:
    """Mean per-image time of imresize (x2, x3, x4 of the modcropped uint8 image) vs PIL's."""
    ours, pil = [], []
    for p in files:
        arr = np.asarray(Image.open(p).convert("RGB"))
        arr = arr[: arr.shape[0] // 12 * 12, : arr.shape[1] // 12 * 12]
        im = Image.fromarray(arr)
        best_o, best_p = float("inf"), float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for s in SCALES:
                imresize(arr, 1 / s)
            best_o = min(best_o, time.perf_counter() - t)
            t = time.perf_counter()
            for s in SCALES:
                im.resize((arr.shape[1] // s, arr.shape[0] // s), Image.BICUBIC)
            best_p = min(best_p, time.perf_counter() - t)
        ours.append(best_o)
        pil.append(best_p)
    return float(np.mean(ours)), float(np.mean(pil))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/benchmark/Set14/HR"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for each timing")
    args = ap.parse_args()
    cores = resolve_jobs(0)
    tmp = Path(tempfile.mkdtemp(prefix="sr-prep-bench-"))
    try:
        files = make_inputs(Path(args.source), tmp / "in", args.images)
        in_mb = sum(p.stat().st_size for p in files) / 1e6
        load0 = os.getloadavg()
        naive = min(naive_baseline(files, tmp / f"naive{i}") for i in range(args.repeats))
        t1, c1 = min(run_ours(tmp / "in", tmp / "o1", 1) for _ in range(args.repeats))
        tn, cn = min(run_ours(tmp / "in", tmp / "on", cores) for _ in range(args.repeats))
        out_mb = sum(p.stat().st_size for p in (tmp / "on").glob("div2k-*.tar")) / 1e6
        ours_resize, pil_resize = resize_ratio(files, args.repeats)
        load1 = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(files)
    eff = t1 / tn / cores
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, "
          f"numpy {np.__version__}, pillow {Image.__version__}; load avg before/after {load0[0]:.1f}/{load1[0]:.1f}")
    print(f"inputs: {n} Set14 photos upscaled to 2040 px long side, {in_mb:.1f} MB of PNG; "
          f"output {out_mb:.1f} MB of shards (crop 480, step 240, scales 2,3,4)")
    print()
    print("| run | time (s) | images/s | input MB/s | output MB/s | vs naive |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| naive PIL loop (open, PIL bicubic x2/x3/x4, PNG save; LR only) | {naive:.2f} | {n / naive:.2f} | {in_mb / naive:.1f} | - | 1.00x |")
    print(f"| sr-pipeline preprocess --jobs 1 | {t1:.2f} | {n / t1:.2f} | {in_mb / t1:.1f} | {out_mb / t1:.1f} | {naive / t1:.2f}x |")
    print(f"| sr-pipeline preprocess --jobs {cores} | {tn:.2f} | {n / tn:.2f} | {in_mb / tn:.1f} | {out_mb / tn:.1f} | {naive / tn:.2f}x |")
    print()
    print(f"parallel speed-up {t1 / tn:.2f}x on {cores} cores = efficiency {eff:.0%} (target >= 80%)")
    print(f"CPU seconds: --jobs 1 {c1:.1f}, --jobs {cores} {cn:.1f} -> work overhead of the parallel run "
          f"{cn / c1 - 1:+.0%}; efficiency on otherwise idle cores would be at most {c1 / cn:.0%}")
    print(f"resize per image (x2+x3+x4, uint8, one thread): imresize {ours_resize * 1e3:.1f} ms, "
          f"PIL {pil_resize * 1e3:.1f} ms, ratio {ours_resize / pil_resize:.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
