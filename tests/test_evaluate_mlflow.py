"""MLflow logging of evaluations against a real tracking server, and --run-id checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_evaluate
import pytest
from helpers import free_port, run_cli
from mlflow.tracking import MlflowClient

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate.runner import evaluate

mini_bench = fixtures_evaluate.mini_bench
tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_new_run_with_metrics_params_and_artifacts(mlflow_server, shared_data, tmp_path):
    proc = run_cli(
        "evaluate", "--model", "bicubic", "--benchmarks", "Set5", "--scale", "2,4",
        "--data-dir", str(shared_data), "--tracking-uri", mlflow_server.uri,
        "--experiment", "eval-test", "--out", str(tmp_path / "out"), check=True,
    )  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("eval-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id in proc.stderr  # the command says where it logged
    m = run.data.metrics
    assert m["eval/Set5/x2/psnr"] == pytest.approx(33.673, abs=1e-3)
    assert m["eval/Set5/x4/psnr"] == pytest.approx(28.429, abs=1e-3)
    assert m["eval/Set5/x2/ssim"] == pytest.approx(0.9303, abs=1e-4)
    assert set(m) == {
        "eval/Set5/x2/psnr",
        "eval/Set5/x2/ssim",
        "eval/Set5/x4/psnr",
        "eval/Set5/x4/ssim",
    }
    assert run.data.params["method"] == "bicubic" and run.data.params["scales"] == "2,4"
    assert not any(k.startswith("model.") or k == "preset" for k in run.data.params)  # no network
    assert run.data.tags["sr_pipeline.stage"] == "evaluate"
    assert run.info.status == "FINISHED"
    assert _artifacts(client, run.info.run_id) == {
        "evaluation/per_image.csv", "evaluation/summary.json",
        "evaluation/figures/Set5_x2.png", "evaluation/figures/Set5_x4.png",
    }  # fmt: skip
    local = client.download_artifacts(run.info.run_id, "evaluation/summary.json", str(tmp_path))
    assert [r["scale"] for r in json.loads(Path(local).read_text())] == [2, 4]


@pytest.fixture(scope="module")
def training_run(mlflow_server, tiny_checkpoints):
    """A run shaped like the trainer's: params, val/psnr, best_model/{model,state_dict}.pt."""
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("dnlan-train-test") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("dnlan-train-test")
    run = client.create_run(exp_id, run_name="train-tiny")
    rid = run.info.run_id
    client.log_param(rid, "model.n_feats", "64")
    client.log_metric(rid, "val/psnr", 20.0)
    client.log_artifact(rid, str(tiny_checkpoints.ours_x2), "best_model")
    client.log_artifact(rid, str(tiny_checkpoints.official_x2), "best_model")
    return rid


def test_run_id_resolves_best_model_and_attaches_results(
    mlflow_server, training_run, mini_bench, tmp_path, tiny_checkpoints
):  # noqa: E501
    client = MlflowClient(mlflow_server.uri)
    # the trainer's artifact name is best_model/model.pt: rename the logged file accordingly
    ours = tmp_path / "best" / "model.pt"
    ours.parent.mkdir()
    ours.write_bytes(tiny_checkpoints.ours_x2.read_bytes())
    client.log_artifact(training_run, str(ours), "best_model")
    cfg = load_config(EvalConfig, overrides={
        "run_id": training_run, "tracking_uri": mlflow_server.uri, "benchmarks": [str(mini_bench)],
        "out": str(tmp_path / "out"), "figure_images": 1,
    })  # fmt: skip
    rep = evaluate(cfg)
    assert rep.run_id == training_run
    run = client.get_run(training_run)
    psnr = run.data.metrics["eval/Mini/x2/psnr"]
    assert psnr == pytest.approx(rep.outcome.summaries[0].psnr)
    assert run.data.metrics["val/psnr"] == 20.0 and run.data.params == {"model.n_feats": "64"}
    arts = _artifacts(client, training_run)
    stamp = rep.out_dir.name
    assert {f"evaluation/{stamp}/per_image.csv", f"evaluation/{stamp}/summary.json",
            f"evaluation/{stamp}/figures/Mini_x2.png"} <= arts  # fmt: skip
    # same number as evaluating that file directly (into a new run labelled with its real config)
    direct = load_config(EvalConfig, overrides={
        "checkpoint": str(ours), "benchmarks": [str(mini_bench)], "tracking_uri": mlflow_server.uri,
        "experiment": "direct-eval", "out": str(tmp_path / "d"),
    })  # fmt: skip
    rep2 = evaluate(direct)
    assert rep2.outcome.summaries[0].psnr == psnr
    params = client.get_run(rep2.run_id).data.params
    assert (
        params["model.n_feats"] == "64" and params["model.n_resgroups"] == "2"
    )  # not the preset's 192


def test_run_id_errors(mlflow_server, mini_bench, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    exp_id = client.create_experiment("no-artifacts")
    bare = client.create_run(exp_id).info.run_id
    common = [
        "--benchmarks",
        str(mini_bench),
        "--tracking-uri",
        mlflow_server.uri,
        "--out",
        str(tmp_path),
    ]
    proc = run_cli("evaluate", "--run-id", bare, *common)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow run {bare} has no best_model/model.pt artifact (was it trained by sr-pipeline "
        "and did it reach a validation?)"
    ]
    proc = run_cli("evaluate", "--run-id", "0123456789abcdef0123456789abcdef", *common)
    assert (
        proc.returncode == 1
        and "error: MLflow run '0123456789abcdef0123456789abcdef' not found" in proc.stderr
    )
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli(
        "evaluate", "--model", "bicubic", "--benchmarks", str(mini_bench), "--tracking-uri", dead
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow tracking server {dead} is not reachable: [Errno 111] Connection refused"
    ]
