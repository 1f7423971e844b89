"""GPU benchmark of DNLAN (issue 14): training step, fused attention, tiled inference, profile, CPU/GPU agreement.

Runs with torch, numpy and pillow alone (no Ray, MLflow or WebDataset anywhere in its import
chain), so it runs on a bare CUDA machine with a copy of the repository. One total time budget
(``--budget``, default 290 s: the whole run stays within about 5.5 minutes on one H100/H200),
and a share of it per section; results are written after every section:

1. **train**: the paper model's training step at global batch 16, HR patch 96, x2/x3/x4 -
   patches/s, forward+backward and optimizer time, MFU (FLOPs counted by
   pipeline.model.flops), peak GPU memory. The step is the loop's own
   (:func:`pipeline.train.step.train_step` with its StepParts, Window and Timer, the loop's
   optimizer and hyper-parameters), minus data loading, DDP and logging. Variants:
   ``fp32 baseline`` (the code before issue 14: blocked attention, plain Adam, no cuDNN
   autotuning), ``fp32`` (the model's automatic attention path, fused Adam, autotuning),
   ``bf16``, ``bf16 + channels_last``.
2. **attention**: one paper-width DNLA layer (192 channels, the x2 training shape) forward and
   backward, each path (blocked, SDPA) in fp32 and under bf16 autocast, against the
   step-by-step oracle (tests/dnla_oracle.py), and whether the automatic choice picked the
   faster path for each precision.
3. **inference**: output Mpx/s of overlap-tiled inference (tile 192, overlap 16, fixed hash)
   of a DIV2K-sized LR image, fp32 one tile at a time vs bf16 batched tiles; peak memory of
   the first call (cuDNN autotuning) and of the calls after it.
4. **agreement**: fixed-hash outputs on CPU and GPU for one real image (``--image``, e.g. a
   Set5 HR image): max difference of the float outputs and PSNR (Y, shaved) difference.
5. **profile**: torch.profiler over a few bf16 + channels_last x2 steps: the top CUDA kernels
   by total time, with their share.
6. **compile**: ``bf16 + channels_last + compile`` for x2, then x3/x4 while the total budget
   lasts (each compile is estimated from the one before it); last, so a slow compile never
   costs the other sections.

``--device cpu --quick`` runs every section at toy sizes (tiny model) to prove the script;
CI runs it. Results: a markdown table on stdout and, with ``--out DIR``, ``DIR/gpu.md`` and
``DIR/gpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the oracle lives with the tests
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_common import Budget, error_text, peak_gib, reset_peak, sdpa_mode, sync, time_call  # noqa: E402
from gpu_report import machine, markdown, write_outputs  # noqa: E402
from gpu_train import (  # noqa: E402
    FIRST_COMPILE_S,
    GLOBAL_BATCH,
    HR_PATCH,
    add_baseline_ratios,
    bench_compile,
    bench_profile,
    bench_train,
)

TOTAL_BUDGET_S = 290.0
# most seconds each eager section may take (they also stop at the total budget's end)
BUDGET_S = {"train": 120.0, "attention": 45.0, "inference": 40.0, "agreement": 40.0, "profile": 20.0}


# ---------------------------------------------------------------------------------------------
# 2. attention: each path in each precision vs the oracle
# ---------------------------------------------------------------------------------------------


def bench_attention(device, feats: int, batch: int, side: int, budget: Budget, quick: bool) -> tuple[list[dict], list[str]]:
    import torch
    from dnla_oracle import oracle_dnla

    from pipeline.model import DecoupledNonLocalAttention, attention
    from pipeline.model.attention import hash_length

    torch.manual_seed(0)
    layer = DecoupledNonLocalAttention(feats, 2, 3, 144, 7).to(device)
    layer.set_hash_mode("fixed", 5)
    x = torch.randn(batch, feats, side, side, device=device, requires_grad=True)
    projection = layer.projection(hash_length(side * side, 144, 7), device)
    grad = torch.randn(batch, feats, side, side, device=device)

    def oracle(x):
        return oracle_dnla(x, layer.conv_match, layer.conv_assembly, projection, 144, layer.res_scale)[0]

    cuda = device.type == "cuda"
    # (name, function, autocast dtype, SDPA mode, SDPA backend forced or None: PyTorch's pick)
    variants = [("oracle", oracle, None, "off", None),
                ("blocked, fp32", layer, None, "off", None), ("SDPA, fp32", layer, None, "on", None)]
    if cuda:  # CPU autocast bf16 is slow and not what the GPU choice is about
        variants += [("blocked, bf16 autocast", layer, torch.bfloat16, "off", None),
                     ("SDPA, bf16 autocast", layer, torch.bfloat16, "on", None),
                     # which kernel wins for DNLA's shapes (768 chunks of 144 queries x 433 keys)
                     ("SDPA, bf16 autocast, flash only", layer, torch.bfloat16, "on", "flash"),
                     ("SDPA, bf16 autocast, memory-efficient, q/k unpadded", layer, torch.bfloat16, "on",
                      "efficient")]
    with torch.no_grad():
        reference = oracle(x)
    rows = []
    for name, fn, dtype, mode, backend in variants:
        row = {"variant": name, "path": "oracle" if fn is oracle else ("SDPA" if mode == "on" else "blocked")}
        rows.append(row)
        if budget.left() < 3:
            row["skipped"] = "time budget"
            continue
        sdpa_mode(mode)

        @contextlib.contextmanager
        def precision(dtype=dtype, backend=backend):
            from pipeline.model import attention_sdpa

            with contextlib.ExitStack() as stack:
                if dtype:
                    stack.enter_context(torch.autocast(device.type, dtype=dtype))
                if backend:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    kind = SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.EFFICIENT_ATTENTION
                    stack.enter_context(sdpa_kernel([kind]))
                    attention_sdpa.EQUAL_HEAD_DIMS = backend == "flash"
                try:
                    yield
                finally:
                    attention_sdpa.EQUAL_HEAD_DIMS = True

        def fwd_bwd(fn=fn, precision=precision):
            with precision():
                y = fn(x)
            torch.autograd.grad(y, [x, *layer.parameters()], grad)
            return y

        try:
            with torch.no_grad(), precision():
                diff = float((fn(x).float() - reference).abs().max())
            fwd_bwd()  # first call (cuDNN autotuning) outside the peak and the timing
            sync(device)
            reset_peak(device)
            seconds = time_call(fwd_bwd, device, warmup=1, iters=3 if quick else 10,
                                budget=min(10.0, budget.left()))
            row.update(ms=1000 * seconds, max_diff=diff, peak_gib=peak_gib(device))
        except Exception as exc:  # noqa: BLE001
            row["error"] = error_text(exc)
        finally:
            sdpa_mode("auto")
        print(f"  attention {name}: {row}", flush=True)
    oracle_ms = rows[0].get("ms")
    for r in rows:
        if r.get("ms") and oracle_ms:
            r["speedup_vs_oracle"] = oracle_ms / r["ms"]
    # the automatic choice (SDPA_MODE auto) for each precision, against the measured winner
    choice = []
    by_name = {r["variant"]: r for r in rows}
    for key, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        blocked, fused = by_name.get(f"blocked, {key}" + (" autocast" if dtype else "")), \
            by_name.get(f"SDPA, {key}" + (" autocast" if dtype else ""))
        if not blocked or not fused:
            continue
        auto = "SDPA" if attention.uses_sdpa(device, dtype) else "blocked"
        if blocked.get("ms") and fused.get("ms"):
            faster = "SDPA" if fused["ms"] < blocked["ms"] else "blocked"
            verdict = "right" if auto == faster else "WRONG: the other path is faster here"
            choice.append(f"Automatic choice on {device.type}, {key}: {auto} (measured faster: {faster}, "
                          f"{min(fused['ms'], blocked['ms']):.2f} vs {max(fused['ms'], blocked['ms']):.2f} ms) - {verdict}.")
        else:
            choice.append(f"Automatic choice on {device.type}, {key}: {auto} (not both paths measured).")
    return rows, choice


# ---------------------------------------------------------------------------------------------
# 3. tiled inference
# ---------------------------------------------------------------------------------------------


def bench_inference(device, preset: str, lr_hw: tuple[int, int], tile: int, overlap: int, budget: Budget,
                    quick: bool) -> list[dict]:
    import torch

    from pipeline.evaluate.tiling import make_forward
    from pipeline.model import build_model, set_hash_mode

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
        if budget.left() < 5:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        forward = make_forward(model, 2, tiling="overlap", tile=tile, overlap=overlap,
                               precision=precision, batch_tiles=batch_tiles)
        try:
            # the first call autotunes cuDNN for each new shape; its workspaces are measured
            # apart from the steady state (fp32 algorithm search reached 73 GiB on an H200)
            reset_peak(device)
            outputs[name] = forward(lr)
            sync(device)
            first_peak = peak_gib(device)
            reset_peak(device)
            seconds = time_call(lambda f=forward, n=name: outputs.__setitem__(n, f(lr)), device,
                                warmup=0, iters=1 if quick else 3, budget=min(20.0, budget.left()))
            mpx = 4 * lr_hw[0] * lr_hw[1] / 1e6
            rows.append({"variant": name, "seconds": seconds, "mpx_per_s": mpx / seconds,
                         "peak_gib": peak_gib(device), "first_call_peak_gib": first_peak})
        except Exception as exc:  # noqa: BLE001
            rows.append({"variant": name, "error": error_text(exc)})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes (tiny model): proves the script")
    parser.add_argument("--image", type=Path, default=REPO / "benchmarks" / "data" / "Set5" / "butterfly.png",
                        help="HR image for the CPU/GPU agreement check")
    parser.add_argument("--checkpoint", help="weights for the agreement check (default: random init)")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--out", type=Path, help="write gpu.md and gpu.json into this folder")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                        help="seconds for the whole run; the compiled variants use what the other sections leave "
                             f"(x2 starts only with {FIRST_COMPILE_S:.0f} s left)")
    parser.add_argument("--train-budget", type=float, default=BUDGET_S["train"],
                        help="most seconds for the eager training variants")
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
    feats, abatch, side = (64, 1, 24) if args.quick else (192, GLOBAL_BATCH, HR_PATCH // 2)
    lr_hw = (40, 56) if args.quick else (678, 1020)
    tile = 24 if args.quick else 192
    overlap = 4 if args.quick else 16

    started = time.monotonic()
    budget = Budget(args.budget, args.quick)
    BUDGET_S["train"] = args.train_budget
    results: dict = {"machine": machine(device), "args": " ".join(sys.argv[1:]), "hr_patch": hr_patch,
                     "batch": batch, "train": [], "attention": [], "inference": [], "agreement": {}, "profile": {},
                     "attention_shape": f"{feats} channels, batch {abatch}, LR {side}x{side}",
                     "inference_shape": f"{preset}, LR {lr_hw[1]}x{lr_hw[0]}, tile {tile}, overlap {overlap}"}
    print(f"# benchmarks/gpu.py on {results['machine']['gpu']} ({device}), torch {torch.__version__}", flush=True)

    def attention_section():
        results["attention"], results["attention_choice"] = bench_attention(
            device, feats, abatch, side, budget.section(BUDGET_S["attention"]), args.quick)

    def agreement_section():
        if budget.left() < 10:
            return {"skipped": "time budget"}
        return bench_agreement(device, preset, args.image, args.checkpoint, args.quick)

    sections = (  # the compiled variants last: they take what the others leave
        ("train", lambda: bench_train(device, preset, scales, batch, hr_patch,
                                      budget.section(BUDGET_S["train"]), args.quick)),
        ("attention", attention_section),
        ("inference", lambda: bench_inference(device, preset, lr_hw, tile, overlap,
                                              budget.section(BUDGET_S["inference"]), args.quick)),
        ("agreement", agreement_section),
        ("profile", lambda: bench_profile(device, preset, batch, hr_patch, budget.section(BUDGET_S["profile"]),
                                          args.quick)),
        ("compile", lambda: results["train"] + bench_compile(device, preset, scales, batch, hr_patch, budget,
                                                             args.quick)),
    )
    for name, run in sections:
        key = "train" if name == "compile" else name
        try:
            value = run()
            if value is not None:
                results[key] = value
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next section
            error = error_text(exc)
            print(f"  {name}: FAILED {error}", flush=True)
            if key in ("agreement", "profile"):
                results[key] = {"error": error}
            else:
                results[key] = [r for r in results[key] if "variant" in r] + [
                    {"variant": f"all ({name})", "scale": 0, "error": error}]
        add_baseline_ratios(results["train"])
        results["total_s"] = time.monotonic() - started
        write_outputs(args.out, results)  # after every section: a timeout still leaves the rest
    text = markdown(results) + f"\nTotal {results['total_s']:.0f} s.\n"
    print()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
