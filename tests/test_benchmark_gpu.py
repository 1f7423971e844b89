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
    for heading in ("## Training step", "## DNLA layer", "## Tiled inference", "## Fixed-hash agreement"):
        assert heading in table
    assert "GPU: none" in table and table in proc.stdout
    results = json.loads((tmp_path / "gpu.json").read_text())
    train = {r["variant"]: r for r in results["train"]}
    assert set(train) == {"fp32 baseline", "fp32"}  # bf16 and compile variants need a GPU
    assert all(r["patches_per_s"] > 0 and r["mfu"] is None for r in train.values())
    assert train["fp32"]["tflop_per_patch"] > 0
    attention = {r["variant"]: r for r in results["attention"]}
    assert attention["oracle"]["max_diff"] == 0.0
    assert attention["fast, fp32"]["max_diff"] < 1e-5
    assert all(r["max_diff_vs_first"] < 1e-5 for r in results["inference"])
    agreement = results["agreement"]
    assert agreement["image"] == "butterfly.png" and agreement["psnr cpu fp32"] > 5
    assert "no GPU" in agreement["note"]
