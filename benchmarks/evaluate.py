"""Evaluation inference: whole-image vs `reference` chop vs `overlap` tiles, tiny and paper DNLAN.

Measures images/s and peak memory on Set14 at x2 (LR made with our MATLAB imresize) and on a
synthetic 2K image (2040x1356 HR, the DIV2K size, so LR 1020x678 at x2). Each case runs in a
fresh process; peak memory is the process's VmHWM after the run minus its RSS just before it
(the HWM is reset through /proc/self/clear_refs after the model is built and warmed up), so
it is the extra memory the inference itself needed, output image included. Speed is the
process's CPU time with one torch thread (robust to the other jobs on a shared machine; wall
time is printed too). Weights are random (fixed seed): speed and memory do not depend on them.
Hash mode fixed.

Cases that would take too long on a 2-core CPU or risk the shared machine's memory are not run
in full: they are either *partial* (the first few tiles; time extrapolated from the tile count,
peak memory measured, since every tile is the same size), or *estimated* from the per-pixel
rates of a measured smaller run, and the table says so.

    python benchmarks/evaluate.py [--threads 2] [--set14-images 14] [--paper-images face,comic]
                                  [--tile 192] [--tile-overlap 16] [--json out.json] [--full]

`--full` measures everything for real (about an hour on one core, up to ~12 GB for the paper
model on the whole 2K image, which it still refuses to run when its estimated peak exceeds 60%
of the available memory): the paper model on all of Set14, and every tile of the 2K cases.

Ratios are against whole-image inference of the same model and data, measured in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("SR_PIPELINE_QUIET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HR_2K = (1356, 2040)  # DIV2K-size HR; LR at x2 is 678 x 1020
SCALE = 2


# ---------------------------------------------------------------------------------------------
# worker: one case in a fresh process
# ---------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _load_images(case: dict) -> list[np.ndarray]:
    from pipeline.evaluate.benchmarks import load_sample, resolve_benchmark
    from pipeline.preprocess import imresize

    if case["data"] == "2k":
        rng = np.random.default_rng(0)
        h, w = HR_2K[0] // SCALE, HR_2K[1] // SCALE
        yy, xx = np.mgrid[0:h, 0:w]
        base = 128 + 60 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 23.0)[..., None]
        img = base + rng.normal(0, 20, (h, w, 3))
        return [np.clip(img, 0, 255).astype(np.uint8)]
    bench = resolve_benchmark("Set14", case["data_dir"])
    files = bench.images()
    if case.get("names"):
        files = [p for p in files if p.stem in case["names"]]
    else:
        files = files[: case["count"]]
    return [load_sample(bench, p, SCALE, imresize).lr for p in files]


class _Stop(Exception):
    pass


def worker(case: dict) -> dict:
    import torch

    from pipeline.evaluate import tiling
    from pipeline.model import build_model, set_hash_mode

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    model = set_hash_mode(build_model(case["model"], SCALE).eval(), "fixed", seed=0)
    images = _load_images(case)
    tensors = []
    for lr in images:
        rgb = np.repeat(lr[:, :, None], 3, axis=2) if lr.ndim == 2 else lr
        tensors.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None].float() / 255.0)

    calls = {"n": 0}
    limit = case.get("max_calls")

    class Counted(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            if limit is not None and calls["n"] >= limit:
                raise _Stop
            calls["n"] += 1
            return self.net(x)

    counted = Counted(model)
    mode = case["mode"]
    fwd = tiling.make_forward(counted, SCALE, tiling=mode, tile=case["tile"], overlap=case["overlap"])
    tiling.forward_whole(model, torch.rand(1, 3, 48, 48))  # warm-up: kernels, allocator
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status()["VmRSS"]
    c0 = time.process_time()
    t0 = time.perf_counter()
    done = 0
    partial = False
    try:
        for x in tensors:
            y = fwd(x)
            done += 1
            del y
    except _Stop:
        partial = True
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = _status()["VmHWM"] - base
    pixels = sum(int(t.shape[-1] * t.shape[-2]) for t in tensors)
    total_calls = None
    if partial:  # count the forwards a full run makes, without running the model
        class Shape(torch.nn.Module):
            def forward(self, x):
                calls["n"] += 1
                return x.new_zeros((1, 3, SCALE * x.shape[-2], SCALE * x.shape[-1]))

        calls["n"] = 0
        limit = None
        shape_fwd = tiling.make_forward(Shape(), SCALE, tiling=mode, tile=case["tile"], overlap=case["overlap"])
        for x in tensors:
            shape_fwd(x)
        total_calls = calls["n"]
        calls["n"] = case["max_calls"]
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak": peak,
        "images": len(tensors) if not partial else done,
        "pixels": pixels,
        "calls": calls["n"],
        "total_calls": total_calls,
        "partial": partial,
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_case(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": str(case["threads"])},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is robust to load)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--set14-images", type=int, default=14, help="tiny model: first N Set14 images")
    ap.add_argument("--paper-images", default="face,comic", help="paper model: these Set14 images")
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--tile-overlap", type=int, default=16)
    ap.add_argument("--paper-2k-tiles", type=int, default=1, help="paper on 2K: tiles run before extrapolating")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--full", action="store_true",
                    help="no partial or estimated cases: paper on all Set14 images, all 2K tiles, 2K whole if memory allows")  # fmt: skip
    args = ap.parse_args()
    if args.full:
        args.paper_images, args.paper_2k_tiles = "", None
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    common = {"threads": args.threads, "tile": args.tile, "overlap": args.tile_overlap, "data_dir": args.data_dir}
    modes = ("none", "reference", "overlap")
    results: list[dict] = []

    def record(model: str, data: str, mode: str, r: dict, note: str = "") -> dict:
        row = {"model": model, "data": data, "tiling": mode, "note": note, **r}
        factor = r["total_calls"] / r["calls"] if r.get("partial") and r.get("total_calls") else 1.0
        row["seconds_full"] = r["seconds"] * factor
        row["cpu_full"] = r["cpu"] * factor
        results.append(row)
        print(f"  {model:5s} {data:11s} {mode:9s} {row['cpu_full']:8.1f} s CPU {row['seconds_full']:8.1f} s wall  "
              f"peak +{fmt_mb(r['peak'])} MB {note}", file=sys.stderr, flush=True)  # fmt: skip
        return row

    print(f"measuring (threads={args.threads}, tile={args.tile}, overlap={args.tile_overlap})", file=sys.stderr)
    # Set14 x2: tiny on N images, paper on a few small ones
    for mode in modes:
        record("tiny", "Set14", mode, run_case({**common, "model": "tiny", "data": "set14", "count": args.set14_images, "mode": mode}))
    names = [n for n in args.paper_images.split(",") if n]  # none: the same images as tiny
    paper_set14 = {"names": names} if names else {"count": args.set14_images}
    for mode in modes:
        record("paper", "Set14-" + "+".join(names) if names else "Set14", mode,
               run_case({**common, "model": "paper", "data": "set14", **paper_set14, "mode": mode}))  # fmt: skip

    # 2K synthetic: tiny whole only when its estimated peak is safe on a shared machine
    lr_px = (HR_2K[0] // SCALE) * (HR_2K[1] // SCALE)
    tiny_whole = next(r for r in results if r["model"] == "tiny" and r["tiling"] == "none")
    big = max(_load_sizes(args.data_dir, args.set14_images))
    est_peak = tiny_whole["peak"] / max(1, big) * lr_px  # activations scale with the largest image
    if est_peak < mem_available() / 4:
        record("tiny", "2K", "none", run_case({**common, "model": "tiny", "data": "2k", "mode": "none"}))
    else:
        results.append(_estimate("tiny", tiny_whole, lr_px, big, "estimated (peak too large for a shared machine)"))
    for mode in ("reference", "overlap"):
        record("tiny", "2K", mode, run_case({**common, "model": "tiny", "data": "2k", "mode": mode}))
    paper_whole = next(r for r in results if r["model"] == "paper" and r["tiling"] == "none")
    paper_big = max(_load_sizes(args.data_dir, args.set14_images, names))
    paper_est = _estimate("paper", paper_whole, lr_px, paper_big,
                          "estimated, not run: too much memory for a shared machine; time is a lower bound")  # fmt: skip
    if args.full and paper_est["peak"] < 0.6 * mem_available():
        record("paper", "2K", "none", run_case({**common, "model": "paper", "data": "2k", "mode": "none"}))
    else:
        results.append(paper_est)
    for mode in ("reference", "overlap"):
        r = run_case({**common, "model": "paper", "data": "2k", "mode": mode, "max_calls": args.paper_2k_tiles})
        note = f"partial: {r['calls']} of {r['total_calls']} tiles, time extrapolated" if r["partial"] else ""
        record("paper", "2K", mode, r, note)

    # table
    lines = [
        f"machine: {os.cpu_count()} cores, {mem_total_gib():.0f} GiB RAM, no GPU; torch {torch.__version__}, "
        f"python {platform.python_version()}, {date.today().isoformat()}; threads {args.threads}; "
        f"overlap tile {args.tile} / overlap {args.tile_overlap} LR px; x{SCALE}, fixed hash, random weights",
        "",
        "| model | data | tiling | images | CPU s/image | images/s (CPU) | wall s | speed vs whole | peak extra MB | memory vs whole | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next(b for b in results if b["model"] == r["model"] and b["data"] == r["data"] and b["tiling"] == "none")
        n = 1 if r.get("partial") else (r["images"] or 1)
        spi = r["cpu_full"] / n
        speed = base["cpu_full"] / r["cpu_full"]
        mem = r["peak"] / base["peak"] if base["peak"] else float("nan")
        lines.append(
            f"| {r['model']} | {r['data']} | {r['tiling']} | {n} | {spi:.2f} | {1 / spi:.3f} | "
            f"{r['seconds_full']:.1f} | {speed:.2f}x | {fmt_mb(r['peak'])} | {mem:.2f}x | {r['note']} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _load_sizes(data_dir: str, count: int, names: list[str] | None = None) -> list[int]:
    """LR pixel counts of the Set14 images a case used (x2, modcropped)."""
    from pipeline.evaluate.benchmarks import resolve_benchmark
    from pipeline.imageio import read_image

    bench = resolve_benchmark("Set14", data_dir)
    files = [p for p in bench.images() if p.stem in names] if names else bench.images()[:count]
    out = []
    for p in files:
        img, _ = read_image(p, keep_gray=True)
        out.append((img.shape[0] // SCALE) * (img.shape[1] // SCALE))
    return out


def _estimate(model: str, measured: dict, pixels: int, measured_big: int, note: str) -> dict:
    """Whole-image cost of a `pixels` LR image from a measured run: time per pixel, memory per
    pixel of the largest image (activations scale linearly with the image)."""
    secs = measured["seconds"] / measured["pixels"] * pixels
    cpu = measured["cpu"] / measured["pixels"] * pixels
    peak = measured["peak"] / measured_big * pixels
    return {"model": model, "data": "2K", "tiling": "none", "note": note, "seconds": secs, "seconds_full": secs,
            "cpu": cpu, "cpu_full": cpu, "peak": peak, "images": 1, "pixels": pixels, "partial": False,
            "estimated": True}  # fmt: skip


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    main()
