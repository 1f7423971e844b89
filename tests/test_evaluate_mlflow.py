"""MLflow logging of evaluations against a real tracking server, and --run-id checkpoints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import fixtures_evaluate
import pytest
from helpers import free_port, run_cli
from mlflow.tracking import MlflowClient

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate.driver import evaluate

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
        "evaluation/per_image.csv", "evaluation/summary.json", "evaluation/provenance.json",
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
):
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


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_repeated_evaluations_get_their_own_steps(mlflow_server, mini_bench, tmp_path):
    """The trained step when the checkpoint records it, else 0; the next free step when taken."""
    import torch

    from pipeline.model import build_model, export_state_dict, save_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny", 2)
    best = save_checkpoint(tmp_path / "best" / "model.pt", model, step=120, epoch=3)
    official = export_state_dict(tmp_path / "official.pt", model)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("steps-test")
    exp_id = exp.experiment_id if exp else client.create_experiment("steps-test")
    rid = client.create_run(exp_id, run_name="train-steps").info.run_id
    client.log_metric(rid, "val/psnr", 20.0, step=120)
    client.log_artifact(rid, str(best), "best_model")

    # output folder names MLflow would refuse as part of a key (the parentheses): made key-safe
    outs = (tmp_path / f"out{i} (v2)" for i in itertools.count())

    def run(**kw):
        cfg = load_config(EvalConfig, overrides={
            "run_id": rid, "tracking_uri": mlflow_server.uri, "benchmarks": [str(mini_bench)],
            "max_images": 1, "figure_images": 0, "out": str(next(outs)), **kw,
        })  # fmt: skip
        return evaluate(cfg)

    first = run()  # the run's best model, trained to step 120
    second = run()  # the same weights again
    plain = run(checkpoint=str(official))  # an official file: no step recorded -> 0 (free)
    again = run(checkpoint=str(official))  # 0 is taken now -> next free
    psnr = first.outcome.summaries[0].psnr
    assert [r.outcome.summaries[0].psnr for r in (second, plain, again)] == [psnr] * 3
    for key in ("eval/Mini/x2/psnr", "eval/Mini/x2/ssim"):
        assert [s for s, _ in _history(client, rid, key)] == [0, 120, 121, 122], key
    tags = client.get_run(rid).data.tags
    assert [tags[f"eval.out{i} _v2_.step"] for i in range(4)] == ["120", "121", "0", "122"]
    assert tags["eval.out3 _v2_.method"] == "dnlan"
    arts = {a.path for a in client.list_artifacts(rid, "evaluation/out0 _v2_")}
    assert "evaluation/out0 _v2_/summary.json" in arts
    assert _history(client, rid, "val/psnr") == [(120, 20.0)]  # the training history untouched
    # a new evaluation run of a checkpoint that records its step is logged at that step
    cfg = load_config(EvalConfig, overrides={
        "checkpoint": str(best), "tracking_uri": mlflow_server.uri, "experiment": "steps-new",
        "benchmarks": [str(mini_bench)], "max_images": 1, "figure_images": 0,
        "out": str(tmp_path / "new"),
    })  # fmt: skip
    new = evaluate(cfg)
    assert _history(client, new.run_id, "eval/Mini/x2/psnr") == [(120, psnr)]
    assert client.get_run(new.run_id).data.tags["eval.step"] == "120"


def test_unknown_run_id_fails_before_evaluating(mlflow_server, mini_bench, tiny_checkpoints,
                                                tmp_path):  # fmt: skip
    out = tmp_path / "out"
    missing = "fedcba9876543210fedcba9876543210"
    proc = run_cli("evaluate", "--checkpoint", str(tiny_checkpoints.ours_x2), "--run-id", missing,
                   "--benchmarks", str(mini_bench), "--tracking-uri", mlflow_server.uri,
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow run '{missing}' not found")
    assert not out.exists()  # nothing was evaluated


def test_key_part_keeps_valid_names_and_makes_others_safe():
    from mlflow.utils.validation import validate_param_and_metric_name

    from pipeline.evaluate.mlflow_log import key_part

    assert [key_part(n) for n in ("Set5", "B100", "my-set_2.v1", "out 3")] == [
        "Set5", "B100", "my-set_2.v1", "out 3"
    ]  # fmt: skip
    assert key_part("res (1)/x:y") == "res _1__x_y"
    assert key_part("..") == "_"
    for name in ("res (1)", "a+b=c", "日本"):
        assert validate_param_and_metric_name(f"eval/{key_part(name)}/x2/psnr")
