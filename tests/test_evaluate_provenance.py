"""Every evaluation says how it was made: files, MLflow params and tags; DNLAN+ has its own keys."""

from __future__ import annotations

import csv
import json

import fixtures_evaluate
from mlflow.tracking import MlflowClient

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate.driver import evaluate
from pipeline.evaluate.report import render_table

mini_bench = fixtures_evaluate.mini_bench


def test_provenance_in_files_and_mlflow_and_dnlan_plus_keys(mlflow_server, mini_bench, tmp_path):
    import torch

    from pipeline.mlflow_model import sha256_file
    from pipeline.model import build_model
    from pipeline.train import checkpoint

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("provenance-train") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("provenance-train")
    train_run = client.create_run(exp_id, run_name="train-prov").info.run_id
    torch.manual_seed(3)
    run_dir = tmp_path / "run"
    checkpoint.write_best(str(run_dir), build_model("tiny", 2), 20.0, 30, 1, train_run)  # as train does
    weights = run_dir / "best_model" / "model.pt"

    def run(out: str, **kw):
        cfg = load_config(EvalConfig, overrides={
            "checkpoint": str(run_dir), "benchmarks": [str(mini_bench)], "max_images": 1,
            "figure_images": 0, "tracking_uri": mlflow_server.uri, "experiment": "provenance-eval",
            "out": str(tmp_path / out), **kw,
        })  # fmt: skip
        return evaluate(cfg)

    plus = run("plus", self_ensemble=True, tiling="overlap", tile=48, tile_overlap=8, hash_seed=5)
    plain = run("plain")

    # files: every summary record and the CSV's sidecar carry the settings
    summary = json.loads(plus.json_path.read_text())
    prov = summary[0]["provenance"]
    assert prov["label"] == "DNLAN+" and prov["self_ensemble"] is True
    assert (prov["tiling"], prov["tile"], prov["tile_overlap"]) == ("overlap", 48, 8)
    assert (prov["hash"], prov["hash_seed"], prov["precision"]) == ("fixed", 5, "fp32")
    assert prov["checkpoint_sha256"] == sha256_file(weights) and prov["checkpoint"] == str(weights)
    assert prov["source_run"] == train_run and prov["step"] == 30
    assert json.loads((plus.out_dir / "provenance.json").read_text()) == prov
    assert len(list(csv.DictReader(plus.csv_path.open()))) == 1
    assert json.loads(plain.json_path.read_text())[0]["provenance"]["label"] == "DNLAN"
    assert "DNLAN+ PSNR" in render_table(plus.outcome.summaries, plus.outcome.label)

    # MLflow: DNLAN+ under its own keys, next to the plain ones; provenance as params and tags
    p_run, q_run = client.get_run(plus.run_id), client.get_run(plain.run_id)
    assert set(p_run.data.metrics) == {"eval/Mini/x2/psnr_plus", "eval/Mini/x2/ssim_plus"}
    assert set(q_run.data.metrics) == {"eval/Mini/x2/psnr", "eval/Mini/x2/ssim"}
    assert p_run.data.metrics["eval/Mini/x2/psnr_plus"] == plus.outcome.summaries[0].psnr
    params, tags = p_run.data.params, p_run.data.tags
    assert params["provenance.checkpoint_sha256"] == prov["checkpoint_sha256"]
    assert params["provenance.self_ensemble"] == "True" and params["provenance.source_run"] == train_run
    assert tags["eval.provenance.tiling"] == "overlap" and tags["eval.provenance.hash_seed"] == "5"
    arts = {a.path for a in client.list_artifacts(plus.run_id, "evaluation")}
    assert "evaluation/provenance.json" in arts

    # attached to the training run (--run-id with --checkpoint): tags per output folder
    cfg = load_config(EvalConfig, overrides={
        "checkpoint": str(weights), "run_id": train_run, "benchmarks": [str(mini_bench)],
        "max_images": 1, "figure_images": 0, "tracking_uri": mlflow_server.uri,
        "out": str(tmp_path / "attached"), "tiling": "none",
    })  # fmt: skip
    evaluate(cfg)
    tags = client.get_run(train_run).data.tags
    assert tags["eval.attached.provenance.tiling"] == "none"
    assert tags["eval.attached.provenance.checkpoint_sha256"] == prov["checkpoint_sha256"]
