"""`sr-pipeline demo`, the README's first command, end to end (real Ray, real MLflow store)."""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.slow]


def test_demo_prints_run_psnr_against_bicubic_and_ui_command(demo_run):
    result = demo_run.result
    assert result["run_id"] and result["run_id"] in demo_run.stdout
    benches = {row[0]: row for row in result["rows"]}
    assert "heldout" in benches  # the held-out photo
    for _bench, scale, psnr, bicubic in result["rows"]:
        assert scale == 2
        assert math.isfinite(psnr) and math.isfinite(bicubic)
        assert 20 < psnr < 60 and 20 < bicubic < 60
        assert f"DNLAN {psnr:6.2f} dB" in demo_run.stdout
    # the headline: a few CPU minutes of training already beat bicubic on the held-out photo
    # (observed margin +0.85 dB; benchmarks/RESULTS.md, "Demo")
    _, _, psnr, bicubic = benches["heldout"]
    assert psnr > bicubic + 0.2, (psnr, bicubic)
    assert "ui" in demo_run.stdout.splitlines()[-1]
    assert f"SR_PIPELINE_HOME={demo_run.home}" in demo_run.stdout  # the exact command to browse it
    assert result["seconds"] > 0


def test_demo_run_in_mlflow_has_params_metrics_and_artifacts(demo_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=demo_run.tracking_uri)
    run = client.get_run(demo_run.result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["preset"] == "tiny" and params["model.n_feats"] == "64"
    assert params["workers"] == "2" and params["model.scale"] == "2"
    assert params["derived.backend"] == "gloo"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss) >= 5
    steps = [m.step for m in loss]
    assert len(steps) == len(set(steps))  # no duplicated steps
    val = client.get_metric_history(run.info.run_id, "val/psnr")
    assert len(val) >= 2
    assert "eval/heldout/x2/psnr" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_model", "validation"} <= top
    best = {a.path for a in client.list_artifacts(run.info.run_id, "best_model")}
    assert {"best_model/model.pt", "best_model/state_dict.pt"} <= best
    versions = client.search_model_versions("name='dnlan-x2'")
    assert any(v.run_id == run.info.run_id for v in versions)
    # an MLflow Model logged by the run, registered, and the champion of its name (issue 13)
    champion = client.get_model_version_by_alias("dnlan-x2", "champion")
    assert champion.run_id == run.info.run_id
    assert [f"models:/{o.model_id}" for o in run.outputs.model_outputs] == [champion.source]
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_demo_on_a_real_div2k_layout(tmp_path, t91_dir, set5_dir):
    """`--data-dir` swaps the bundled photos for a DIV2K root (here: real T91/Set5 images)."""
    import json
    import shutil

    from helpers import run_cli

    root = tmp_path / "DIV2K"
    (root / "DIV2K_train_HR").mkdir(parents=True)
    (root / "DIV2K_valid_HR").mkdir()
    for name in ("t1.png", "t2.png", "t3.png", "t4.png"):
        shutil.copy(t91_dir / name, root / "DIV2K_train_HR" / name)
    for name in ("bird.png", "head.png"):
        shutil.copy(set5_dir / name, root / "DIV2K_valid_HR" / name)
    out = tmp_path / "demo.json"
    proc = run_cli(
        "demo", "--data-dir", str(root), "--epochs", "1", "--iters-per-epoch", "4", "--json", str(out),
        env={"SR_PIPELINE_HOME": str(tmp_path / "home")}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [row[0] for row in result["rows"]] == ["DIV2K_valid_HR"]
    assert "preprocess: DIV2K at" in proc.stderr
