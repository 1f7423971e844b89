"""`sr-pipeline runs` on a file-based store holding training and evaluation runs (no Ray)."""

from __future__ import annotations

import json

import fixtures_evaluate
from helpers import run_cli
from mlflow.tracking import MlflowClient

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate.driver import evaluate
from pipeline.train import tracking

mini_bench = fixtures_evaluate.mini_bench


def _training_run(uri: str, name: str, preset: str, psnr: list[float], status: str) -> str:
    run_id, _ = tracking.open_run(uri, "runs-train", name, f"/tmp/{name}")
    tracking.log_params(uri, run_id, {"preset": preset, "model.scale": 2, "epochs": 2})
    log = tracking.MetricLogger(uri, run_id, enabled=True)
    for i, value in enumerate(psnr):
        log.log({"train/loss": 1.0 / (i + 1), "val/psnr": value}, step=10 * (i + 1))
    tracking.finish_run(uri, run_id, status)
    return run_id


def test_runs_table_and_json(tmp_path, mini_bench):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    first = _training_run(uri, "first", "tiny", [20.0, 22.5, 22.1], "FINISHED")
    second = _training_run(uri, "second", "paper", [19.0], "FAILED")
    client = MlflowClient(uri)
    client.log_metric(first, "eval/Mini/x2/psnr_plus", 30.5)  # a DNLAN+ evaluation attached to it
    client.log_metric(first, "eval/Mini/x2/ssim_plus", 0.91)
    cfg = load_config(EvalConfig, overrides={
        "method": "bicubic", "scales": [2], "benchmarks": [str(mini_bench)], "max_images": 1,
        "figure_images": 0, "tracking_uri": uri, "experiment": "runs-eval", "out": str(tmp_path / "e"),
    })  # fmt: skip
    bic = evaluate(cfg)

    proc = run_cli("runs", "--tracking-uri", uri, "--json", check=True)
    rows = {r["run_id"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {first, second, bic.run_id}
    a, b, e = rows[first], rows[second], rows[bic.run_id]
    assert (a["name"], a["kind"], a["preset"], a["scale"], a["steps"]) == ("first", "train", "tiny", "2", 30)
    assert a["best_val_psnr"] == 22.5 and a["status"] == "FINISHED" and a["duration_s"] >= 0
    assert a["evals"] == {"Mini x2+": {"psnr": 30.5, "ssim": 0.91}}
    assert (b["preset"], b["best_val_psnr"], b["status"]) == ("paper", 19.0, "FAILED")
    assert e["kind"] == "evaluate" and e["experiment"] == "runs-eval"
    s = bic.outcome.summaries[0]
    assert e["evals"] == {"Mini x2": {"psnr": s.psnr, "ssim": s.ssim}}

    table = run_cli("runs", "--tracking-uri", uri, check=True).stdout.splitlines()
    assert table[0].split()[:7] == ["run", "experiment", "kind", "preset", "scale", "steps", "best"]
    assert "Mini x2 PSNR/SSIM" in table[0] and "Mini x2+ PSNR/SSIM" in table[0]
    line = next(row for row in table if row.startswith("first "))
    assert "22.500" in line and "30.500/0.9100" in line and "FINISHED" in line
    only = run_cli("runs", "--tracking-uri", uri, "-e", "runs-eval", "--json", check=True)
    assert [r["run_id"] for r in json.loads(only.stdout)] == [bic.run_id]

    bad = run_cli("runs", "--tracking-uri", uri, "-e", "nope")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --experiment 'nope': no such experiment in the store"
    ]
    empty = run_cli("runs", "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}", check=True)
    assert empty.stdout.startswith("no runs in ")
