"""The training sections of benchmarks/gpu.py: the loop's step timed per variant, the compiled
variants within the run's budget, and a torch.profiler breakdown of a bf16 step."""

from __future__ import annotations

import time

from gpu_common import Budget, error_text, peak_gib, reset_peak, sdpa_mode, sync, time_call
from gpu_report import fmt

GLOBAL_BATCH = 16
HR_PATCH = 96
# (name, precision, fast: automatic attention path + fused Adam + cuDNN autotuning, channels_last, compile)
VARIANTS = (
    ("fp32 baseline", "fp32", False, False, False),
    ("fp32", "fp32", True, False, False),
    ("bf16", "bf16", True, False, False),
    ("bf16 + channels_last", "bf16", True, True, False),
)
COMPILED = ("bf16 + channels_last + compile", "bf16", True, True, True)
FIRST_COMPILE_S = 100.0  # seconds a first compile (and its timing) must have left to start


# ---------------------------------------------------------------------------------------------
# 1. training step (and 6. its compiled variant)
# ---------------------------------------------------------------------------------------------


def make_train_step(cfg, device, precision: str, fast: bool, channels_last: bool, compiled: bool,
                    batch: int, hr_patch: int):
    """The loop's training step (pipeline.train.step) on one device, with random patches.

    Returns ``(step, timer)``: ``step()`` runs one step; ``timer.read()`` gives the summed
    forward+backward and optimizer seconds since the last read (after a synchronisation)."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.model import build_from_config
    from pipeline.train.step import StepParts, Timer, Window, build_optimizer, train_step

    torch.manual_seed(0)
    train = TrainConfig()
    fmt_ = torch.channels_last if channels_last else torch.contiguous_format
    model = build_from_config(cfg).to(device, memory_format=fmt_).train()
    ema = None
    if train.ema > 0:
        ema = build_from_config(cfg).to(device, memory_format=fmt_)
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    hyper = {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps, "weight_decay": train.weight_decay}
    # the loop's optimizer (fused on CUDA); the baseline is the plain Adam of the code before issue 14
    optimizer = build_optimizer(trainable, device, **hyper) if fast else torch.optim.Adam(trainable, **hyper)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")
    parts = StepParts(
        model=model, net=torch.compile(model) if compiled else model, optimizer=optimizer, scaler=scaler,
        ema=ema, ema_decay=train.ema, grad_clip=train.grad_clip, precision=precision, device=device,
        loss_weight=1.0, local_batch=batch, channels_last=channels_last, trainable=trainable,
    )
    window, timer = Window(device), Timer(device)
    lr_side = hr_patch // cfg.scale
    lr_img = torch.rand(batch, 3, lr_side, lr_side, device=device) * cfg.rgb_range
    hr_img = torch.rand(batch, 3, hr_patch, hr_patch, device=device) * cfg.rgb_range

    def step():
        train_step(parts, lr_img, hr_img, window, timer)

    return step, timer


def measure_train(row: dict, device, cfg, variant, batch: int, hr_patch: int, budget: Budget, quick: bool) -> None:
    """Fill ``row`` with one variant's numbers (or its error)."""
    import torch

    from pipeline.model.flops import mfu, model_flops

    name, precision, fast, channels_last, compiled = variant
    cuda = device.type == "cuda"
    sdpa_mode("auto" if fast else "off")
    if cuda:  # the baseline is the code before issue 14, which left cuDNN autotuning off
        torch.backends.cudnn.benchmark = fast
    try:
        step, timer = make_train_step(cfg, device, precision, fast, channels_last, compiled, batch, hr_patch)
        t0 = time.monotonic()
        step()  # first call: compile, cuDNN autotune, lazy allocations
        sync(device)
        row["first_step_s"] = time.monotonic() - t0
        for _ in range(1 if quick else 2):
            step()  # warm-up (a compiled step may recompile once more)
        sync(device)
        timer.read()
        reset_peak(device)
        calls = [0]

        def counted():
            step()
            calls[0] += 1

        seconds = time_call(counted, device, warmup=0, iters=2 if quick else 10,
                            budget=min(20.0, max(1.0, budget.left() - 5)))
        fwd_bwd, opt = timer.read()
        flops = model_flops(cfg, hr_patch, str(device)).train
        row.update(patches_per_s=batch / seconds, step_ms=1000 * seconds, tflop_per_patch=flops / 1e12,
                   fwd_bwd_ms=1000 * fwd_bwd / calls[0], optimizer_ms=1000 * opt / calls[0],
                   mfu=mfu(batch / seconds, flops, device, precision), peak_gib=peak_gib(device))
    except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
        row["error"] = error_text(exc)
    finally:
        sdpa_mode("auto")
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    msg = row.get("error") or (f"{row['patches_per_s']:.1f} patches/s, MFU {fmt(row['mfu'], '.1%')}, "
                               f"peak {fmt(row['peak_gib'], '.2f')} GiB, first step {row['first_step_s']:.1f} s")
    print(f"  train x{row['scale']} {name}: {msg}", flush=True)


def bench_train(device, preset: str, scales: list[int], batch: int, hr_patch: int, budget: Budget,
                quick: bool) -> list[dict]:
    from pipeline.config import model_config

    cuda = device.type == "cuda"
    variants = [v for v in VARIANTS if cuda or (v[1] == "fp32" and not v[3])]
    rows: list[dict] = []
    for scale in scales:
        for variant in variants:
            row = {"scale": scale, "variant": variant[0], "batch": batch}
            rows.append(row)
            if budget.left() < 10:
                row["skipped"] = "time budget"
                print(f"  train x{scale} {variant[0]}: skipped (time budget)", flush=True)
                continue
            measure_train(row, device, model_config(preset, scale), variant, batch, hr_patch, budget, quick)
    return rows


def bench_compile(device, preset: str, scales: list[int], batch: int, hr_patch: int, budget: Budget,
                  quick: bool) -> list[dict]:
    """The compiled step, x2 first; a further scale starts only when the time the previous
    compile took (plus timing) still fits in what is left of the run's budget."""
    from pipeline.config import model_config

    rows: list[dict] = []
    need = FIRST_COMPILE_S
    for scale in scales:
        row = {"scale": scale, "variant": COMPILED[0], "batch": batch}
        rows.append(row)
        if device.type != "cuda":
            row["skipped"] = "CUDA only (inductor's CPU build needs minutes here)"
            continue
        if budget.left() < need:
            row["skipped"] = f"time budget ({budget.left():.0f} s left, about {need:.0f} s needed)"
            print(f"  train x{scale} {COMPILED[0]}: skipped ({row['skipped']})", flush=True)
            continue
        measure_train(row, device, model_config(preset, scale), COMPILED, batch, hr_patch, budget, quick)
        need = row.get("first_step_s", FIRST_COMPILE_S) + 15.0  # the next scale recompiles: about as long
    return rows


def add_baseline_ratios(rows: list[dict]) -> None:
    base = {r["scale"]: r.get("patches_per_s") for r in rows if r["variant"] == "fp32 baseline"}
    for r in rows:
        if r.get("patches_per_s") and base.get(r["scale"]):
            r["vs_baseline"] = r["patches_per_s"] / base[r["scale"]]


# ---------------------------------------------------------------------------------------------
# 5. profile: where a bf16 training step spends its GPU time
# ---------------------------------------------------------------------------------------------

# kernel kinds, by name (first match wins; approximate: kernel names are the libraries')
KERNEL_KINDS = (
    ("optimizer (Adam, foreach)", ("adam", "multi_tensor", "foreach")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "mem_eff")),
    ("convolution (cuDNN)", ("conv", "fprop", "dgrad", "wgrad", "implicit", "winograd", "cudnn")),
    ("matmul (bmm, attention blocks)", ("gemm", "gemv", "matmul")),
    ("sort", ("sort", "radix")),
    ("gather / scatter / index", ("index", "scatter", "gather")),
    ("elementwise / reduction", ("elementwise", "reduce", "vectorized", "unrolled", "softmax", "norm")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, words in KERNEL_KINDS:
        if any(w in low for w in words):
            return kind
    return "other"


def bench_profile(device, preset: str, batch: int, hr_patch: int, budget: Budget, quick: bool, top: int = 20) -> dict:
    """torch.profiler over a few x2 training steps (bf16 + channels_last on CUDA, fp32 on CPU):
    the top CUDA kernels by total time (CPU ops by self time on CPU) with their share."""
    from collections import defaultdict

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import model_config

    cuda = device.type == "cuda"
    name, precision, channels_last = ("bf16 + channels_last", "bf16", True) if cuda else ("fp32", "fp32", False)
    steps = 2 if quick else 5
    result: dict = {"what": f"x2 {name} training step, {steps} steps", "unit": "CUDA kernels" if cuda else "CPU op self time"}
    if budget.left() < 8:
        return {**result, "skipped": "time budget"}
    sdpa_mode("auto")
    step, _ = make_train_step(model_config(preset, 2), device, precision, True, channels_last, False, batch, hr_patch)
    step_s = time_call(step, device, warmup=2, iters=3, budget=min(5.0, budget.left()))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    total: dict[str, float] = defaultdict(float)  # microseconds
    calls: dict[str, int] = defaultdict(int)
    events = prof.events()
    if cuda:
        kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
        if not kernels:  # older layouts: kernels hang off the CPU op that launched them
            kernels = [(k.name, k.duration) for e in events for k in getattr(e, "kernels", [])]
    else:
        kernels = [(e.name, e.self_cpu_time_total) for e in events
                   if e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep")]
    for kname, us in kernels:
        total[kname] += us
        calls[kname] += 1
    all_us = sum(total.values()) or 1.0
    ranked = sorted(total.items(), key=lambda kv: -kv[1])
    kinds: dict[str, float] = defaultdict(float)
    for kname, us in ranked:
        kinds[kernel_kind(kname)] += us / all_us
    result.update(
        step_ms=1000 * step_s, kernel_ms_per_step=all_us / 1000 / steps, busy=all_us / 1e6 / steps / step_s,
        kernels=[{"name": k[:100], "calls_per_step": calls[k] / steps, "ms_per_step": us / 1000 / steps,
                  "share": us / all_us} for k, us in ranked[:top]],
        groups=dict(sorted(kinds.items(), key=lambda kv: -kv[1])) if cuda else {},
    )
    del prof, step
    if cuda:
        torch.cuda.empty_cache()
    print(f"  profile: step {result['step_ms']:.1f} ms, {result['kernel_ms_per_step']:.1f} ms of {result['unit']}, "
          f"top: {result['kernels'][0]['name'] if result['kernels'] else 'none'}", flush=True)
    return result
