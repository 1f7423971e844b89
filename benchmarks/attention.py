"""Benchmark one DNLA layer: fast path vs the step-by-step oracle vs full non-local attention.

One attention layer at 64 channels (reduction 2, 3 hash rounds, 7 bits, chunk 144, the paper's
layer settings at the tiny width), batch 1, CPU, float32, LR sizes 48^2 .. 384^2. For each
variant: forward (inference, no_grad) and forward+backward (training) median time and peak
memory. Variants:

* ``fast``   - pipeline.model.attention (what the model runs),
* ``oracle`` - tests/dnla_oracle.py, spec section 2 literally (3 copies of adjacent chunks,
  autograd through every step),
* ``full``   - quadratic non-local attention as in NLA: every token attends to every token
  (same embeddings and normalised keys), skipped with an estimate where it cannot fit.

Peak memory on CPU: every case runs in its own subprocess started with
``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation above 64 KiB is its own mmap and goes back
to the OS when freed, so RSS tracks live memory rather than glibc's heap high-water mark).
Right before the measured call the process resets its kernel peak counter
(``/proc/self/clear_refs`` <- 5) and reads its RSS; the peak is ``VmHWM - RSS_before``: all
memory the call touched at its worst moment (tensors, autograd's saved tensors, BLAS/oneDNN
workspaces), excluding what existed before (weights, input, interpreter). torch's CPU
allocator does not cache blocks, so no pool hides anything.

Usage: ``python benchmarks/attention.py [--sizes 48,96,192,384] [--limit-gib 6] [--json F]``.
Prints a table, oracle/fast ratios, and the fitted exponent of time vs pixel count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FEATS, REDUCTION, HASHES, BITS, CHUNK = 64, 2, 3, 7, 144
VARIANTS = ("fast", "oracle", "full")
MODES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# measuring helpers (also used by benchmarks/model.py)
# ---------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak additional resident memory while ``fn`` runs (see the module docstring)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time and median CPU time of this process (all its threads) per call.

    On a shared machine the CPU time is the stable number: with one torch thread it counts
    the work done, not the time spent waiting for a core other people's jobs hold.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": statistics.median(wall), "seconds": statistics.median(cpu)}


def _run_worker(script: Path, args: list[str], what: str, timeout: float) -> dict:
    env = dict(os.environ)
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", what, *args],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Time and peak memory of one case, each in a fresh process (``script --worker ...``).

    Timing runs with the normal allocator; only the memory run uses the mmap threshold
    (which makes every large allocation a fresh mmap and would add page-fault time).
    """
    res = _run_worker(script, args, "memory", timeout)
    if "error" in res:
        return res
    timed = _run_worker(script, args, "time", timeout)
    if "error" in timed:
        return timed
    return {**timed, "peak": res["peak"]}


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def fmt_mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def machine_line() -> str:
    import platform

    import torch

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


# ---------------------------------------------------------------------------------------------
# the worker: one (variant, size, mode) in this process
# ---------------------------------------------------------------------------------------------


def _full_attention(layer, x):
    """Quadratic non-local attention: softmax over all L keys (no hashing, no chunks)."""
    import torch
    import torch.nn.functional as F

    n, feats, h, w = x.shape
    q = layer.conv_match(x).reshape(n, -1, h * w).transpose(1, 2)
    v = layer.conv_assembly(x).reshape(n, feats, h * w).transpose(1, 2)
    k = F.normalize(q, dim=-1, eps=5e-5)
    probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    y = torch.bmm(probs, v).transpose(1, 2).reshape(n, feats, h, w)
    return y * layer.res_scale + x


def worker(what: str, variant: str, size: int, mode: str, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)

    sys.path.insert(0, str(REPO / "tests"))
    from dnla_oracle import oracle_dnla

    from pipeline.model.attention import DecoupledNonLocalAttention

    torch.manual_seed(0)
    layer = DecoupledNonLocalAttention(FEATS, REDUCTION, HASHES, CHUNK, BITS, res_scale=0.1)
    layer.set_hash_mode("fixed", 0)
    projection = layer.projection(BITS, torch.device("cpu"))
    x = torch.randn(1, FEATS, size, size, requires_grad=(mode != "fwd"))

    if variant == "fast":
        def forward():
            return layer(x)
    elif variant == "oracle":
        def forward():
            return oracle_dnla(x, layer.conv_match, layer.conv_assembly, projection, CHUNK,
                               layer.res_scale)[0]
    else:
        def forward():
            return _full_attention(layer, x)

    def clear_grads():
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            clear_grads()
            forward().sum().backward()

    if what == "time":
        return median_seconds(step, repeats)
    step()  # warm-up (lazy initialisation, oneDNN primitives) outside the measured peak
    clear_grads()  # so that the measured step allocates its gradients inside the window
    return {"peak": peak_bytes(step)}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------


def _estimate_peak(results: dict, variant: str, mode: str, size: int, power: float) -> float | None:
    """Extrapolate the largest measured size by (pixels ratio)^power."""
    known = [(s, r) for (v, s, m), r in results.items() if v == variant and m == mode and "peak" in r
             and not r.get("estimated")]
    if not known:
        return None
    s0, r0 = max(known)
    return r0["peak"] * (size * size / (s0 * s0)) ** power


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="48,96,192,384")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--limit-gib", type=float, default=6.0,
                        help="skip (and estimate) a case whose extrapolated peak exceeds this")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case (1 keeps timings stable on a shared machine)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        what, variant, size, mode, repeats, threads = args.worker
        print(json.dumps(worker(what, variant, int(size), mode, int(repeats), int(threads))))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    limit = args.limit_gib * 2**30
    growth = {"fast": 1.0, "oracle": 1.0, "full": 2.0}  # memory growth with pixel count
    results: dict[tuple[str, int, str], dict] = {}
    print(f"# DNLA layer benchmark (F={FEATS}, r={REDUCTION}, nh={HASHES}, hl={BITS}, "
          f"cs={CHUNK}, batch 1, float32, CPU) - {machine_line()}; benchmark threads "
          f"{args.threads}", flush=True)
    for size in sizes:
        for variant in variants:
            for mode in MODES:
                guess = _estimate_peak(results, variant, mode, size, growth[variant])
                if guess is not None and guess > limit:
                    known = [(s, r) for (v, s, m), r in results.items()
                             if v == variant and m == mode and not r.get("estimated")]
                    s0, r0 = max(known)
                    t_power = 2.0 if variant == "full" else 1.0
                    grow = (size * size / (s0 * s0)) ** t_power
                    results[(variant, size, mode)] = {"seconds": r0["seconds"] * grow,
                                                      "wall": r0["wall"] * grow, "peak": guess,
                                                      "estimated": True}
                    print(f"  {variant:6s} {size:4d}^2 {mode:8s} skipped: estimated peak "
                          f"{fmt_mib(guess)} MiB > limit; time estimated from {s0}^2", flush=True)
                    continue
                repeats = 5 if size <= 96 else 3
                res = run_case(Path(__file__),
                               [variant, str(size), mode, str(repeats), str(args.threads)])
                results[(variant, size, mode)] = res
                if "error" in res:
                    print(f"  {variant:6s} {size:4d}^2 {mode:8s} FAILED: {res['error']}", flush=True)
                else:
                    print(f"  {variant:6s} {size:4d}^2 {mode:8s} {fmt_ms(res['seconds']):>9s} ms "
                          f"CPU {fmt_ms(res['wall']):>9s} ms wall {fmt_mib(res['peak']):>7s} MiB",
                          flush=True)

    print()
    print(report(results, sizes, variants))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"variant": v, "size": s, "mode": m, **r} for (v, s, m), r in results.items()],
            indent=1))
    return 0


def _ratio(results: dict, size: int, mode: str, key: str, inverse: bool = False) -> str:
    f, o = results.get(("fast", size, mode), {}), results.get(("oracle", size, mode), {})
    if key not in f or key not in o or not f[key] or not o[key]:
        return "n/a"
    mark = "~" if o.get("estimated") or f.get("estimated") else ""
    value = f[key] / o[key] if inverse else o[key] / f[key]
    return f"{mark}{value:.2f}x"


def _exponent_of(results: dict, variant: str, mode: str, key: str, sizes: list[int]) -> float | None:
    pts = [(s, results[(variant, s, mode)]) for s in sizes if (variant, s, mode) in results]
    pts = [(s, r) for s, r in pts if key in r and not r.get("estimated")]
    if len(pts) < 2:
        return None
    return exponent([s * s for s, _ in pts], [r[key] for _, r in pts])


def report(results: dict, sizes: list[int], variants: list[str]) -> str:
    def cell(variant, size, mode, key):
        r = results.get((variant, size, mode), {})
        if key not in r:
            return "n/a"
        text = fmt_mib(r[key]) if key == "peak" else fmt_ms(r[key])
        return f"~{text}" if r.get("estimated") else text

    lines = ["| LR size | variant | fwd CPU ms | fwd wall ms | fwd peak MiB | fwd+bwd CPU ms | "
             "fwd+bwd wall ms | fwd+bwd peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for v in variants:
            cells = [cell(v, size, m, k) for m in MODES for k in ("seconds", "wall", "peak")]
            lines.append(f"| {size}^2 | {v} | " + " | ".join(cells) + " |")
    lines += ["", "(~ = skipped, estimated from the largest measured size: time by pixels^2 for "
              "full, pixels^1 otherwise; memory likewise)", ""]
    if "fast" in variants and "oracle" in variants:
        lines += ["| LR size | oracle/fast CPU time fwd | oracle/fast CPU time fwd+bwd | "
                  "oracle/fast wall time fwd+bwd | fast/oracle peak fwd | fast/oracle peak fwd+bwd |",
                  "|---|---|---|---|---|---|"]
        for size in sizes:
            row = [_ratio(results, size, "fwd", "seconds"),
                   _ratio(results, size, "fwd+bwd", "seconds"),
                   _ratio(results, size, "fwd+bwd", "wall"),
                   _ratio(results, size, "fwd", "peak", inverse=True),
                   _ratio(results, size, "fwd+bwd", "peak", inverse=True)]
            lines.append(f"| {size}^2 | " + " | ".join(row) + " |")
        lines.append("")
    big = [s for s in sizes if 96 <= s <= 384]
    lines += ["| variant | CPU-time exponent fwd (96^2..384^2) | CPU-time exponent fwd+bwd "
              "(96^2..384^2) | wall-time exponent fwd+bwd (96^2..384^2) | CPU-time exponent "
              "fwd+bwd, measured sizes |", "|---|---|---|---|---|"]
    for v in variants:
        vals = [_exponent_of(results, v, "fwd", "seconds", big),
                _exponent_of(results, v, "fwd+bwd", "seconds", big),
                _exponent_of(results, v, "fwd+bwd", "wall", big),
                _exponent_of(results, v, "fwd+bwd", "seconds", sizes)]
        lines.append(f"| {v} | " + " | ".join("n/a" if e is None else f"{e:.2f}" for e in vals)
                     + " |")
    lines += ["", *targets(results)]
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """The issue's three targets, each stated as met or MISSED."""
    out = []
    f, o = results.get(("fast", 96, "fwd+bwd"), {}), results.get(("oracle", 96, "fwd+bwd"), {})
    if "seconds" in f and "seconds" in o:
        speed = o["seconds"] / f["seconds"]
        wall = o["wall"] / f["wall"] if f.get("wall") and o.get("wall") else float("nan")
        mem = f["peak"] / o["peak"] if o.get("peak") else float("nan")
        out.append(f"target fwd+bwd 96^2 speed-up >= 1.5x: {speed:.2f}x CPU time "
                   f"({wall:.2f}x wall) -> {'met' if speed >= 1.5 else 'MISSED'}")
        out.append(f"target fwd+bwd 96^2 peak memory <= 0.7x oracle: {mem:.2f}x -> "
                   f"{'met' if mem <= 0.7 else 'MISSED'}")
    e = _exponent_of(results, "fast", "fwd+bwd", "seconds", [96, 192, 384])
    if e is not None:
        out.append(f"target fast time exponent (fwd+bwd, 96^2..384^2) <= 1.15: {e:.2f} -> "
                   f"{'met' if e <= 1.15 else 'MISSED'}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
