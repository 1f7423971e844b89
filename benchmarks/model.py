"""Benchmark the whole DNLAN: throughput (patches/s) and peak memory, forward and training step.

Presets ``tiny`` and ``paper`` at the training patch size of each scale (HR 96 -> LR 48 / 32 /
24 for x2 / x3 / x4, as the reference's --patch_size 96), CPU, float32.

* ``fwd``: eval mode, ``no_grad``, fixed hashing (how evaluation and validation run).
* ``fwd+bwd``: train mode, stochastic hashing, L1 loss, backward (one training step without
  the optimizer update).

Throughput is patches per second of the median step, by CPU time (stable on a shared machine:
with one thread it counts work, not waiting) and by wall time; peak memory is measured as in
benchmarks/attention.py (a fresh subprocess per case, mmap'd allocations, VmHWM delta over the
step, so weights and inputs are excluded but activations, saved tensors and gradients count).

Usage: ``python benchmarks/model.py [--presets tiny,paper] [--scales 2,3,4] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import fmt_mib, machine_line, median_seconds, peak_bytes, run_case  # noqa: E402

HR_PATCH = 96
BATCH = {"tiny": 4, "paper": 1}
MODES = ("fwd", "fwd+bwd")


def worker(what: str, preset: str, scale: int, mode: str, repeats: int, threads: int) -> dict:
    import torch

    from pipeline.model import build_model, set_hash_mode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset, scale)
    lr_size = HR_PATCH // scale
    batch = BATCH[preset]
    x = torch.rand(batch, 3, lr_size, lr_size)
    target = torch.rand(batch, 3, HR_PATCH, HR_PATCH)
    if mode == "fwd":
        model.eval()
        set_hash_mode(model, "fixed", 0)

        def step():
            with torch.no_grad():
                model(x)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.l1_loss(model(x), target).backward()

    if what == "time":
        return {**median_seconds(step, repeats), "batch": batch}
    step()
    # free the warm-up's gradients first, so the measured step allocates them inside the window
    model.zero_grad(set_to_none=True)
    return {"peak": peak_bytes(step), "batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,paper")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        what, preset, scale, mode, repeats, threads = args.worker
        print(json.dumps(worker(what, preset, int(scale), mode, int(repeats), int(threads))))
        return 0

    print(f"# DNLAN whole-network benchmark (CPU, float32, HR patch {HR_PATCH}) - "
          f"{machine_line()}; benchmark threads {args.threads}", flush=True)
    rows = []
    for preset in args.presets.split(","):
        for scale in (int(s) for s in args.scales.split(",")):
            row = {"preset": preset, "scale": scale, "lr": HR_PATCH // scale,
                   "batch": BATCH[preset]}
            for mode in MODES:
                res = run_case(Path(__file__), [preset, str(scale), mode, str(args.repeats),
                                                str(args.threads)])
                row[mode] = res
                msg = res.get("error") or (f"{res['batch'] / res['seconds']:.2f} patches/s, "
                                           f"{fmt_mib(res['peak'])} MiB")
                print(f"  {preset:6s} x{scale} {mode:8s} {msg}", flush=True)
            rows.append(row)
    print()
    print("| preset | scale | LR patch | batch | fwd patches/s (CPU) | fwd patches/s (wall) | "
          "fwd peak MiB | fwd+bwd patches/s (CPU) | fwd+bwd patches/s (wall) | "
          "fwd+bwd peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for mode in MODES:
            res = r[mode]
            if "error" in res:
                cells += ["failed"] * 3
            else:
                cells += [f"{res['batch'] / res['seconds']:.2f}",
                          f"{res['batch'] / res['wall']:.2f}", fmt_mib(res["peak"])]
        print(f"| {r['preset']} | x{r['scale']} | {r['lr']}^2 | {r['batch']} | " + " | ".join(cells)
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
