"""GPU benchmark of DNLAN (issue 14): training step, fused attention, tiled inference, CPU/GPU agreement.

Runs with torch, numpy and pillow alone (no Ray, MLflow or WebDataset anywhere in its import
chain), so it runs on a bare CUDA machine with a copy of the repository. Sections, each with
its own time budget so the whole run stays within 8 minutes on one H100/H200:

1. **train**: the paper model's training step at global batch 16, HR patch 96, x2/x3/x4 -
   patches/s, MFU (FLOPs counted by pipeline.model.flops), peak GPU memory - for
   ``fp32 baseline`` (the code before issue 14: blocked attention, plain Adam, fp32, no cuDNN
   autotuning),
   ``fp32`` (fused SDPA attention, fused Adam), ``bf16``, ``bf16 + channels_last`` and
   ``bf16 + channels_last + compile``. The step is the loop's pieces (model, autocast from
   pipeline.device, L1 loss on the float32 output, Adam with the loop's hyper-parameters),
   minus data loading and logging; the non-compiled variants of every scale run before any
   compile, and compiles run while the section's budget lasts.
2. **attention**: one paper-width DNLA layer (192 channels, the x2 training shape) forward and
   backward: the fast path against the step-by-step oracle (tests/dnla_oracle.py): speed
   ratio and max difference.
3. **inference**: output Mpx/s of overlap-tiled inference (tile 192, overlap 16, fixed hash)
   of a DIV2K-sized LR image, fp32 one tile at a time vs bf16 batched tiles.
4. **agreement**: fixed-hash outputs on CPU and GPU for one real image (``--image``, e.g. a
   Set5 HR image): max difference of the float outputs and PSNR (Y, shaved) difference.

``--device cpu --quick`` runs every section at toy sizes (tiny model) to prove the script;
CI runs it. Results: a markdown table on stdout and, with ``--out DIR``, ``DIR/gpu.md`` and
``DIR/gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the oracle lives with the tests

GLOBAL_BATCH = 16
HR_PATCH = 96
# (name, precision, SDPA attention + fused Adam, channels_last, compile)
VARIANTS = (
    ("fp32 baseline", "fp32", False, False, False),
    ("fp32", "fp32", True, False, False),
    ("bf16", "bf16", True, False, False),
    ("bf16 + channels_last", "bf16", True, True, False),
    ("bf16 + channels_last + compile", "bf16", True, True, True),
)
BUDGET_S = {"train": 300.0, "attention": 45.0, "inference": 45.0, "agreement": 50.0}


class Section:
    """A time budget: ``left()`` seconds remain; callers skip work that would not fit."""

    def __init__(self, seconds: float, quick: bool) -> None:
        self.end = time.monotonic() + (seconds if not quick else 1e9)

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device, warmup: int, iters: int, budget: float) -> float:
    """Median seconds per call after ``warmup`` calls; stops early when ``budget`` runs out."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.monotonic()
    while len(times) < iters and (not times or time.monotonic() - start < budget):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def sdpa_mode(mode: str) -> None:
    from pipeline.model import attention

    attention.SDPA_MODE = mode


def fmt(value, spec: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------
# 1. training step
# ---------------------------------------------------------------------------------------------


def make_train_step(cfg, device, precision: str, fast: bool, channels_last: bool, compiled: bool,
                    batch: int, hr_patch: int):
    """One training step as the loop runs it (model, autocast, L1 on float32, Adam)."""
    import torch
    import torch.nn.functional as F

    from pipeline.config import TrainConfig
    from pipeline.device import autocast
    from pipeline.model import build_from_config

    torch.manual_seed(0)
    model = build_from_config(cfg).to(device).train()
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt_)
    train = TrainConfig()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if fast and device.type == "cuda" else {}
    optimizer = torch.optim.Adam(trainable, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                 weight_decay=train.weight_decay, **fused)
    net = torch.compile(model) if compiled else model
    lr_side = hr_patch // cfg.scale
    lr_img = torch.rand(batch, 3, lr_side, lr_side, device=device).contiguous(memory_format=fmt_)
    hr_img = torch.rand(batch, 3, hr_patch, hr_patch, device=device)

    def step():
        with autocast(device, precision):
            sr = net(lr_img)
        loss = F.l1_loss(sr.float(), hr_img)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def bench_train(device, preset: str, scales: list[int], batch: int, hr_patch: int, quick: bool) -> list[dict]:
    import torch

    from pipeline.config import model_config
    from pipeline.model.flops import mfu, model_flops

    section = Section(BUDGET_S["train"], quick)
    rows: list[dict] = []
    cuda = device.type == "cuda"
    variants = [v for v in VARIANTS if cuda or (v[1] == "fp32" and not v[3] and not v[4])]
    # every scale's eager variants first, then the compiles while the budget lasts
    plan = [(s, v) for s in scales for v in variants if not v[4]]
    plan += [(s, v) for s in scales for v in variants if v[4]]
    for scale, (name, precision, fast, channels_last, compiled) in plan:
        cfg = model_config(preset, scale)
        row = {"scale": scale, "variant": name, "batch": batch}
        need = 150.0 if compiled else 15.0
        if section.left() < need:
            row["skipped"] = "time budget"
            rows.append(row)
            print(f"  train x{scale} {name}: skipped (time budget)", flush=True)
            continue
        sdpa_mode("on" if fast else "off")
        if cuda:  # the baseline is the code before issue 14, which left cuDNN autotuning off
            torch.backends.cudnn.benchmark = fast
        try:
            step = make_train_step(cfg, device, precision, fast, channels_last, compiled, batch, hr_patch)
            t0 = time.monotonic()
            step()  # first call: compile, cuDNN autotune, lazy allocations
            sync(device)
            row["first_step_s"] = time.monotonic() - t0
            reset_peak(device)
            seconds = time_call(step, device, warmup=1 if quick else 3, iters=2 if quick else 10,
                                budget=min(20.0, max(1.0, section.left() - 5)))
            flops = model_flops(cfg, hr_patch, str(device)).train
            row["patches_per_s"] = batch / seconds
            row["step_ms"] = 1000 * seconds
            row["tflop_per_patch"] = flops / 1e12
            row["mfu"] = mfu(batch / seconds, flops, device, precision)
            row["peak_gib"] = peak_gib(device)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            sdpa_mode("auto")
            if cuda:
                torch.cuda.empty_cache()
            torch._dynamo.reset()
        rows.append(row)
        msg = row.get("error") or (f"{row['patches_per_s']:.1f} patches/s, MFU {fmt(row['mfu'], '.1%')}, "
                                   f"peak {fmt(row['peak_gib'], '.2f')} GiB, first step {row['first_step_s']:.1f} s")
        print(f"  train x{scale} {name}: {msg}", flush=True)
    # speed-up against the baseline of the same scale
    base = {r["scale"]: r.get("patches_per_s") for r in rows if r["variant"] == "fp32 baseline"}
    for r in rows:
        if r.get("patches_per_s") and base.get(r["scale"]):
            r["vs_baseline"] = r["patches_per_s"] / base[r["scale"]]
    return rows


# ---------------------------------------------------------------------------------------------
# 2. attention: fast path vs oracle
# ---------------------------------------------------------------------------------------------


def bench_attention(device, feats: int, batch: int, side: int, quick: bool) -> list[dict]:
    import torch
    from dnla_oracle import oracle_dnla

    from pipeline.model import DecoupledNonLocalAttention
    from pipeline.model.attention import hash_length

    section = Section(BUDGET_S["attention"], quick)
    torch.manual_seed(0)
    layer = DecoupledNonLocalAttention(feats, 2, 3, 144, 7).to(device)
    layer.set_hash_mode("fixed", 5)
    x = torch.randn(batch, feats, side, side, device=device, requires_grad=True)
    projection = layer.projection(hash_length(side * side, 144, 7), device)
    grad = torch.randn(batch, feats, side, side, device=device)

    def oracle(x):
        return oracle_dnla(x, layer.conv_match, layer.conv_assembly, projection, 144, layer.res_scale)[0]

    cuda = device.type == "cuda"
    variants = [("oracle", oracle, None, "off"), ("fast, fp32", layer, None, "auto")]
    if cuda:
        variants += [("blocked (pre-SDPA), fp32", layer, None, "off"), ("fast, bf16", layer, torch.bfloat16, "auto")]
    with torch.no_grad():
        reference = oracle(x)
    rows = []
    for name, fn, dtype, mode in variants:
        if section.left() < 3:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        sdpa_mode(mode)

        def precision(dtype=dtype):
            return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

        def fwd_bwd(fn=fn, precision=precision):
            with precision():
                y = fn(x)
            torch.autograd.grad(y, [x, *layer.parameters()], grad)
            return y

        try:
            with torch.no_grad(), precision():
                diff = float((fn(x).float() - reference).abs().max())
            reset_peak(device)
            seconds = time_call(fwd_bwd, device, warmup=1, iters=3 if quick else 10,
                                budget=min(10.0, section.left()))
            rows.append({"variant": name, "ms": 1000 * seconds, "max_diff": diff, "peak_gib": peak_gib(device)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        finally:
            sdpa_mode("auto")
        print(f"  attention {name}: {rows[-1]}", flush=True)
    oracle_ms = rows[0].get("ms")
    for r in rows:
        if r.get("ms") and oracle_ms:
            r["speedup_vs_oracle"] = oracle_ms / r["ms"]
    return rows


# ---------------------------------------------------------------------------------------------
# 3. tiled inference
# ---------------------------------------------------------------------------------------------


def bench_inference(device, preset: str, lr_hw: tuple[int, int], tile: int, overlap: int, quick: bool) -> list[dict]:
    import torch

    from pipeline.evaluate.tiling import make_forward
    from pipeline.model import build_model, set_hash_mode

    section = Section(BUDGET_S["inference"], quick)
    torch.manual_seed(0)
    model = set_hash_mode(build_model(preset, 2).to(device).eval(), "fixed", 0)
    lr = torch.rand(1, 3, *lr_hw, device=device)
    cuda = device.type == "cuda"
    variants = [("fp32, 1 tile per call", "fp32", 1)]
    variants += [("bf16, 1 tile per call", "bf16", 1), ("bf16, 8 tiles per call", "bf16", 8)] if cuda else \
        [("fp32, 4 tiles per call", "fp32", 4)]
    rows = []
    outputs = {}
    for name, precision, batch_tiles in variants:
        if section.left() < 5:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        forward = make_forward(model, 2, tiling="overlap", tile=tile, overlap=overlap,
                               precision=precision, batch_tiles=batch_tiles)
        try:
            reset_peak(device)
            seconds = time_call(lambda f=forward, n=name: outputs.__setitem__(n, f(lr)), device,
                                warmup=1, iters=1 if quick else 3, budget=min(20.0, section.left()))
            mpx = 4 * lr_hw[0] * lr_hw[1] / 1e6
            rows.append({"variant": name, "seconds": seconds, "mpx_per_s": mpx / seconds,
                         "peak_gib": peak_gib(device)})
        except Exception as exc:  # noqa: BLE001
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        print(f"  inference {name}: {rows[-1]}", flush=True)
    first = outputs.get(variants[0][0])
    for r in rows:
        if first is not None and r["variant"] in outputs:
            r["max_diff_vs_first"] = float((outputs[r["variant"]] - first).abs().max())
    return rows


# ---------------------------------------------------------------------------------------------
# 4. fixed-hash agreement, CPU vs GPU
# ---------------------------------------------------------------------------------------------


def bench_agreement(device, preset: str, image: Path | None, checkpoint: str | None, quick: bool) -> dict:
    import numpy as np
    import torch

    from pipeline.evaluate.metrics import psnr, quantize
    from pipeline.imageio import read_image
    from pipeline.model import build_model, load_checkpoint, set_hash_mode
    from pipeline.preprocess.imresize import imresize

    if image is None or not image.is_file():
        return {"skipped": f"no image (--image {image}): copy a Set5 HR image there"}
    scale = 2
    hr, _ = read_image(image)
    hr = hr[: hr.shape[0] - hr.shape[0] % scale, : hr.shape[1] - hr.shape[1] % scale]
    lr = imresize(hr, 1 / scale)
    x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))[None].float() / 255.0
    torch.manual_seed(0)
    model = load_checkpoint(checkpoint, scale=scale) if checkpoint else build_model(preset, scale)
    set_hash_mode(model.eval(), "fixed", 0)
    result: dict = {"image": image.name, "lr_size": f"{lr.shape[1]}x{lr.shape[0]}",
                    "weights": checkpoint or f"random init ({preset}, seed 0)"}
    outs = {}
    # (name, device, precision, TF32 convolutions: PyTorch's default on GPUs, off = strict fp32)
    runs = [("cpu fp32", torch.device("cpu"), "fp32", False)]
    if device.type == "cuda":
        runs += [("gpu fp32 (TF32 off)", device, "fp32", False), ("gpu fp32 (TF32 convs)", device, "fp32", True),
                 ("gpu bf16", device, "bf16", True)]
    from pipeline.evaluate.tiling import with_precision

    tf32_default = torch.backends.cudnn.allow_tf32
    for name, dev, precision, tf32 in runs:
        model.to(dev)
        torch.backends.cudnn.allow_tf32 = tf32
        t0 = time.monotonic()
        with torch.no_grad():
            y = with_precision(model, precision)(x.to(dev)).cpu()
        torch.backends.cudnn.allow_tf32 = tf32_default
        outs[name] = y
        sr = quantize(y[0].numpy().transpose(1, 2, 0))
        result[f"psnr {name}"] = psnr(sr, hr, scale)
        result[f"seconds {name}"] = time.monotonic() - t0
    for name in outs:
        if name != "cpu fp32":
            result[f"max_diff {name} vs cpu"] = float((outs[name] - outs["cpu fp32"]).abs().max())
            result[f"psnr_diff {name} vs cpu"] = result[f"psnr {name}"] - result["psnr cpu fp32"]
    if device.type != "cuda":
        result["note"] = "no GPU in this run: CPU half only"
    print(f"  agreement: {result}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def machine(device) -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown (nvidia-smi unavailable)"
    else:
        info["gpu"] = "none"
        info["cpu"] = platform.processor() or platform.machine()
    return info


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# benchmarks/gpu.py - {m['date']}", "",
             f"GPU: {m['gpu']}; driver {m.get('driver', 'n/a')}; torch {m['torch']}; CUDA {m['cuda']}; "
             f"cuDNN {m.get('cudnn', 'n/a')}; {m['cpus']} CPUs; args: `{results['args']}`", ""]
    lines += [f"## Training step (global batch {results['batch']}, HR patch {results['hr_patch']})", "",
              "| scale | variant | patches/s | step ms | MFU | TFLOP/patch | peak GiB | vs fp32 baseline | first step s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        if "patches_per_s" not in r:
            lines.append(f"| x{r['scale']} | {r['variant']} | {r.get('error') or 'skipped: ' + r['skipped']} "
                         "| | | | | | |")
            continue
        lines.append(f"| x{r['scale']} | {r['variant']} | {r['patches_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{fmt(r['mfu'], '.1%')} | {r['tflop_per_patch']:.3f} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r.get('vs_baseline'), '.2f')}x | {r['first_step_s']:.1f} |")
    lines += ["", "## DNLA layer, forward + backward (" + results["attention_shape"] + ")", "",
              "| variant | ms | speed-up vs oracle | max diff vs oracle | peak GiB |", "|---|---|---|---|---|"]
    for r in results["attention"]:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('error') or 'skipped: ' + r['skipped']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {fmt(r.get('speedup_vs_oracle'), '.2f')}x | "
                     f"{r['max_diff']:.2e} | {fmt(r['peak_gib'], '.2f')} |")
    lines += ["", "## Tiled inference, x2 (" + results["inference_shape"] + ")", "",
              "| variant | seconds | output Mpx/s | max diff vs first row | peak GiB |", "|---|---|---|---|---|"]
    for r in results["inference"]:
        if "seconds" not in r:
            lines.append(f"| {r['variant']} | {r.get('error') or 'skipped: ' + r['skipped']} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['mpx_per_s']:.3f} | "
                     f"{fmt(r.get('max_diff_vs_first'), '.2e')} | {fmt(r['peak_gib'], '.2f')} |")
    lines += ["", "## Fixed-hash agreement, CPU vs GPU (x2)", "", "| quantity | value |", "|---|---|"]
    for key, value in results["agreement"].items():
        lines.append(f"| {key} | {format(value, '.6g') if isinstance(value, float) else value} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path | None, results: dict) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results) + f"\nTotal {results.get('total_s', 0):.0f} s.\n"
    for name, content in (("gpu.md", text), ("gpu.json", json.dumps(results, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes (tiny model): proves the script")
    parser.add_argument("--image", type=Path, default=REPO / "benchmarks" / "data" / "Set5" / "butterfly.png",
                        help="HR image for the CPU/GPU agreement check")
    parser.add_argument("--checkpoint", help="weights for the agreement check (default: random init)")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--out", type=Path, help="write gpu.md and gpu.json into this folder")
    parser.add_argument("--train-budget", type=float, default=BUDGET_S["train"],
                        help="seconds for the training section (compiles start only while 150 s remain)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads with --device cpu (1: stable on a shared machine)")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (use --device cpu --quick to test the script)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    preset = "tiny" if args.quick else "paper"
    batch, hr_patch = (2, 48) if args.quick else (GLOBAL_BATCH, HR_PATCH)
    scales = [int(s) for s in args.scales.split(",")]
    if args.quick:
        scales = scales[:1]
    attention_args = (64, 1, 24) if args.quick else (192, GLOBAL_BATCH, HR_PATCH // 2)
    lr_hw = (40, 56) if args.quick else (678, 1020)
    tile = 24 if args.quick else 192
    overlap = 4 if args.quick else 16

    started = time.monotonic()
    results: dict = {"machine": machine(device), "args": " ".join(sys.argv[1:]), "hr_patch": hr_patch,
                     "batch": batch, "train": [], "attention": [], "inference": [], "agreement": {}}
    print(f"# benchmarks/gpu.py on {results['machine']['gpu']} ({device}), torch {torch.__version__}", flush=True)
    feats, abatch, side = attention_args
    results["attention_shape"] = f"{feats} channels, batch {abatch}, LR {side}x{side}"
    results["inference_shape"] = f"{preset}, LR {lr_hw[1]}x{lr_hw[0]}, tile {tile}, overlap {overlap}"
    BUDGET_S["train"] = args.train_budget
    sections = (
        ("train", lambda: bench_train(device, preset, scales, batch, hr_patch, args.quick)),
        ("attention", lambda: bench_attention(device, feats, abatch, side, args.quick)),
        ("inference", lambda: bench_inference(device, preset, lr_hw, tile, overlap, args.quick)),
        ("agreement", lambda: bench_agreement(device, preset, args.image, args.checkpoint, args.quick)),
    )
    for name, run in sections:
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next section
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(f"  {name}: FAILED {error}", flush=True)
            results[name] = {"error": error} if name == "agreement" else [{"variant": "all", "scale": 0,
                                                                            "error": error}]
        results["total_s"] = time.monotonic() - started
        write_outputs(args.out, results)  # after every section: a timeout still leaves the rest
    text = markdown(results) + f"\nTotal {results['total_s']:.0f} s.\n"
    print()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
