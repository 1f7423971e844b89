"""benchmarks/gpu.py --device cpu --quick: the GPU benchmark script runs end to end on CPU,
with torch, numpy and pillow only (no Ray, MLflow or WebDataset in its import chain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "webdataset")


def test_gpu_benchmark_quick_on_cpu(tmp_path, set5_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu",
         "--quick", "--image", str(set5_dir / "butterfly.png"), "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # -X importtime lists every imported module as "... | <name>" on stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" in imported and "numpy" in imported
    assert not imported & set(FORBIDDEN), imported & set(FORBIDDEN)

    table = (tmp_path / "gpu.md").read_text()
    for heading in ("## Training step", "## DNLA layer", "## Tiled inference", "## Where the time goes",
                    "## Fixed-hash agreement"):
        assert heading in table
    assert "GPU: none" in table and table in proc.stdout
    results = json.loads((tmp_path / "gpu.json").read_text())
    train = {r["variant"]: r for r in results["train"]}
    # bf16 variants need a GPU; the compiled one is listed, skipped on CPU
    assert set(train) == {"fp32 baseline", "fp32", "bf16 + channels_last + compile"}
    assert "CUDA only" in train["bf16 + channels_last + compile"]["skipped"]
    measured = [train["fp32 baseline"], train["fp32"]]
    assert all(r["patches_per_s"] > 0 and r["mfu"] is None for r in measured)
    # the loop's Timer splits the step: forward+backward and optimizer both measured
    assert all(r["fwd_bwd_ms"] > 0 and r["optimizer_ms"] > 0 for r in measured)
    assert train["fp32"]["tflop_per_patch"] > 0
    attention = {r["variant"]: r for r in results["attention"]}
    assert attention["oracle"]["max_diff"] == 0.0
    assert attention["blocked, fp32"]["max_diff"] < 1e-5 and attention["SDPA, fp32"]["max_diff"] < 1e-5
    assert results["attention_choice"][0].startswith("Automatic choice on cpu, fp32: blocked")
    assert all(r["max_diff_vs_first"] < 1e-5 for r in results["inference"])
    profile = results["profile"]
    assert 0 < len(profile["kernels"]) <= 20 and profile["step_ms"] > 0
    assert abs(sum(k["share"] for k in profile["kernels"]) - 1) < 0.5  # the top 20 hold most of the time
    assert any("conv" in k["name"] for k in profile["kernels"][:5])
    agreement = results["agreement"]
    assert agreement["image"] == "butterfly.png" and agreement["psnr cpu fp32"] > 5
    assert "no GPU" in agreement["note"]
