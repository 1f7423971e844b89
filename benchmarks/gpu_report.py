"""The report of benchmarks/gpu.py: machine facts, the markdown tables, atomic gpu.md/gpu.json.

Kept apart from the measurements so that gpu.py reads as the list of what is measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path


def fmt(value, spec: str = ".1f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


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


def _not_measured(r: dict) -> str | None:
    if "error" in r:
        return r["error"]
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    return None


def _train(results: dict) -> list[str]:
    lines = [f"## Training step (global batch {results['batch']}, HR patch {results['hr_patch']}; "
             "the loop's step: pipeline.train.step.train_step)", "",
             "| scale | variant | patches/s | step ms | fwd+bwd ms | optimizer ms | MFU | TFLOP/patch | "
             "peak GiB | vs fp32 baseline | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["train"]:
        missing = _not_measured(r) if "patches_per_s" not in r else None
        if "patches_per_s" not in r:
            lines.append(f"| x{r['scale']} | {r['variant']} | {missing} | | | | | | | | |")
            continue
        lines.append(f"| x{r['scale']} | {r['variant']} | {r['patches_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{fmt(r.get('fwd_bwd_ms'))} | {fmt(r.get('optimizer_ms'))} | "
                     f"{fmt(r['mfu'], '.1%')} | {r['tflop_per_patch']:.3f} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r.get('vs_baseline'), '.2f')}x | {r['first_step_s']:.1f} |")
    return lines


def _attention(results: dict) -> list[str]:
    lines = ["", "## DNLA layer, forward + backward (" + results["attention_shape"] + ")", "",
             "| variant | path | ms | speed-up vs oracle | max diff vs oracle | peak GiB |",
             "|---|---|---|---|---|---|"]
    for r in results["attention"]:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('path', '')} | {_not_measured(r)} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r.get('path', '')} | {r['ms']:.2f} | "
                     f"{fmt(r.get('speedup_vs_oracle'), '.2f')}x | {r['max_diff']:.2e} | {fmt(r['peak_gib'], '.2f')} |")
    for line in results.get("attention_choice", []):
        lines += ["", line]
    return lines


def _inference(results: dict) -> list[str]:
    lines = ["", "## Tiled inference, x2 (" + results["inference_shape"] + ")", "",
             "| variant | seconds | output Mpx/s | max diff vs first row | peak GiB (steady) | "
             "peak GiB (first call) |", "|---|---|---|---|---|---|"]
    for r in results["inference"]:
        if "seconds" not in r:
            lines.append(f"| {r['variant']} | {_not_measured(r)} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['seconds']:.2f} | {r['mpx_per_s']:.3f} | "
                     f"{fmt(r.get('max_diff_vs_first'), '.2e')} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r.get('first_call_peak_gib'), '.2f')} |")
    lines += ["", "Peak (steady): calls after the first; the first call of each new tile shape also holds "
              "cuDNN's autotuning workspaces (cudnn.benchmark), which fp32 convolutions can make very large."]
    return lines


def _profile(results: dict) -> list[str]:
    prof = results.get("profile") or {}
    lines = ["", "## Where the time goes (torch.profiler, " + prof.get("what", "not run") + ")", ""]
    if "kernels" not in prof:
        return lines + [_not_measured(prof) or "not run"]
    busy = f" ({prof['busy']:.0%} of the wall time: the rest is the GPU waiting)" if prof["groups"] else ""
    lines += [f"Step {prof['step_ms']:.1f} ms wall; {prof['kernel_ms_per_step']:.1f} ms of {prof['unit']} "
              f"per step{busy}; top {len(prof['kernels'])} by total time:", "",
              "| # | kernel / op | calls per step | ms per step | share |", "|---|---|---|---|---|"]
    for i, k in enumerate(prof["kernels"], 1):
        lines.append(f"| {i} | `{k['name']}` | {k['calls_per_step']:.1f} | {k['ms_per_step']:.3f} | {k['share']:.1%} |")
    if prof.get("groups"):
        lines += ["", "| kind (by name) | share |", "|---|---|"]
        lines += [f"| {name} | {share:.1%} |" for name, share in prof["groups"].items()]
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# benchmarks/gpu.py - {m['date']}", "",
             f"GPU: {m['gpu']}; driver {m.get('driver', 'n/a')}; torch {m['torch']}; CUDA {m['cuda']}; "
             f"cuDNN {m.get('cudnn', 'n/a')}; {m['cpus']} CPUs; args: `{results['args']}`", ""]
    lines += _train(results) + _attention(results) + _inference(results) + _profile(results)
    lines += ["", "## Fixed-hash agreement, CPU vs GPU (x2)", "", "| quantity | value |", "|---|---|"]
    for key, value in results["agreement"].items():
        lines.append(f"| {key} | {format(value, '.6g') if isinstance(value, float) else value} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path | None, results: dict) -> None:
    """gpu.md and gpu.json, each written to a temporary name and renamed (never half a file)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results) + f"\nTotal {results.get('total_s', 0):.0f} s.\n"
    for name, content in (("gpu.md", text), ("gpu.json", json.dumps(results, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(out / name)
