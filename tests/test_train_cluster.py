"""`sr-pipeline train` for real: Ray Train on the two-node fixture cluster, MLflow server, shards.

Every job here trains the tiny preset for a few dozen steps on CPU, with 2 workers over the
3 uneven shards of `train_shards` (the case that hangs DDP when steps per rank differ).
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
from pathlib import Path

import pytest
import torch
from fixtures_train import (
    cli_warnings,
    cluster_args,
    mean_psnr,
    metric_steps,
    registered_checkpoints,
    runs_named,
    session_workers,
    start_cli,
    state_digest,
    tiny_args,
    train_shards,  # noqa: F401 - fixture
    train_workers,
    valid_pairs,
    wait_for_checkpoint,
    wait_for_line,
)
from helpers import run_cli, stop_session

pytestmark = pytest.mark.slow


def _finish(proc, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except Exception:
        stop_session(proc)
        raise


@pytest.mark.cluster
def test_two_node_job_trains_and_tracks_everything(ray_cluster, mlflow_server, train_shards, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from pipeline.model import load_checkpoint, read_checkpoint

    store = tmp_path / "store"
    # Credentials in the URI (the fixture server ignores them) must reach MLflow only, never
    # Ray's job config, checkpoints, params or logs; bf16 on CPU must fall back to fp32 once.
    secret = "s3cret-pw-" + os.urandom(4).hex()
    uri_with_credentials = mlflow_server.uri.replace("http://", f"http://alice:{secret}@")
    args = tiny_args(train_shards, store, epochs=3, iters=8,
                     extra=(*cluster_args(ray_cluster, uri_with_credentials), "--experiment", "train-short",
                            "--run-name", "short", "--precision", "bf16", "--checkpoint-every", "8"))
    proc = start_cli(args, tmp_path / "train.log")
    nodes_seen: set[str] = set()
    while proc.poll() is None:  # independent of our own tag: where Ray placed the workers
        nodes_seen |= {a["node_id"] for a in train_workers(ray_cluster.dashboard_url)}
        time.sleep(1)
    log = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    run_id = log.strip().splitlines()[-1]
    assert len(nodes_seen) == 2, nodes_seen

    # where to watch was printed at start
    assert f"{mlflow_server.uri}/#/experiments/" in log and "Ray dashboard:" in log and str(store / "short") in log

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["preset"] == "tiny" and params["model.n_feats"] == "64" and params["model.scale"] == "2"
    assert params["workers"] == "2" and params["batch_size"] == "4" and params["derived.per_worker_batch"] == "2"
    assert params["cluster.nodes"] == "2" and params["version.torch"] == torch.__version__
    assert params["git.commit"] and params["data.train_shards"] == "3" and params["derived.backend"] == "gloo"
    assert tags["sr.nodes_used"] == "2" and tags["sr.ray_run_name"] == "short"

    # system metrics from each of the two nodes (one monitor per Ray node), host named in a tag;
    # GPU figures exactly when NVML works here
    from pipeline.train.sysmetrics import gpu_available

    system = [k for k in run.data.metrics if k.startswith("system/")]
    labels = {k.split("/")[1] for k in system}
    assert len(labels) == 2 and all(label.startswith("node-") for label in labels), system
    for label in labels:
        assert f"system/{label}/cpu_utilization_percentage" in run.data.metrics, system
        assert tags[f"sr.node.{label}"].endswith("(127.0.0.1)")
    assert any("/gpu_" in k for k in system) == gpu_available()

    # metric histories: every logged step once, loss going down, ranks in sync
    assert metric_steps(mlflow_server.uri, run_id, "train/loss") == list(range(2, 25, 2))
    loss = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert statistics.mean(loss[-3:]) < 0.8 * statistics.mean(loss[:3]), loss
    spread = client.get_metric_history(run_id, "train/param_spread")
    assert [m.step for m in spread] == [8, 16, 24] and all(m.value == 0.0 for m in spread)
    for key in ("train/lr", "train/samples_per_s", "train/data_wait", "train/grad_norm", "train/time_fwd_bwd",
                "train/time_optimizer", "train/step_time"):
        values = [m.value for m in client.get_metric_history(run_id, key)]
        assert len(values) == 12 and all(v >= 0 for v in values), key
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "train/data_wait"))
    psnr = client.get_metric_history(run_id, "val/psnr")
    assert [m.step for m in psnr] == [8, 16, 24] and all(5 < m.value < 60 for m in psnr)
    # 3 valid images: the subset is the whole set, so the final pass is both series
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_full/psnr")] == [(24, psnr[-1].value)]
    share = client.get_metric_history(run_id, "train/val_share")
    assert [m.step for m in share] == [8, 16, 24] and all(0 < m.value < 10 for m in share)

    # artifacts: a comparison image per validation, the best model in both formats
    images = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert images == [f"validation/step_{s:08d}.png" for s in (8, 16, 24)]
    best = {a.path for a in client.list_artifacts(run_id, "best_model")}
    assert best == {"best_model/model.pt", "best_model/state_dict.pt", "best_model/meta.json"}
    local = client.download_artifacts(run_id, "best_model", str(tmp_path / "dl"))
    model = load_checkpoint(Path(local) / "model.pt")
    assert model.config.n_feats == 64
    plain = torch.load(Path(local) / "state_dict.pt", weights_only=True)
    assert set(plain) == set(model.state_dict())

    # the registry holds it with its validation PSNR
    versions = [v for v in client.search_model_versions("name='dnlan-x2'") if v.run_id == run_id]
    assert len(versions) == 1
    assert float(versions[0].tags["val_psnr"]) == pytest.approx(max(m.value for m in psnr), abs=1e-3)

    # Ray checkpoints: the last K (2) are kept, each loadable by `evaluate` (model.pt in our format)
    ckpts = sorted(p for p in store.joinpath("short").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    assert load_checkpoint(ckpts[-1] / "model.pt").config == model.config
    state = torch.load(ckpts[-1] / "train_state.pt", weights_only=True)
    assert state["mlflow_run_id"] == run_id and state["progress"]["step"] == 24

    # precision: asked bf16, ran fp32 (CPU), said so once, logged what really ran
    assert params["precision"] == "bf16" and params["derived.precision"] == "fp32"
    said = [w for w in cli_warnings(log) if "precision" in w]
    assert len(set(said)) == 1 and "--precision bf16 needs a CUDA GPU; running in fp32 on cpu" in said[0], said
    # as often as a line rank 0 prints once (two nodes on one box forward each worker line twice)
    assert len(said) == sum("epoch 1/3 step 8: val PSNR" in line for line in log.splitlines()), said

    # no secret in the logs, params, tags, the job config stored in checkpoints, the run record
    assert secret not in log and "alice" not in log
    assert not [v for v in (*params.values(), *tags.values()) if secret in v or "alice" in v]
    assert params["tracking_uri"] == mlflow_server.uri
    assert secret not in repr(state["config"]) and state["config"]["tracking_uri"] == mlflow_server.uri
    assert not [p for p in store.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]

    # every DDP rank ended with the same weights, and they are the checkpoint's (each rank
    # tagged its own digest; the test hashes the checkpoint itself)
    ranks = {k: v for k, v in tags.items() if k.startswith("sr.params_sha256.rank")}
    last = read_checkpoint(ckpts[-1] / "model.pt")
    assert sorted(ranks) == ["sr.params_sha256.rank0", "sr.params_sha256.rank1"]
    assert set(ranks.values()) == {state_digest(last["state_dict"])}

    # val/psnr, reduced over 2 ranks (2 + 1 images), equals the best model's mean PSNR on the
    # 3 valid images read from the tars and scored here in one process by the plain formula
    pairs = valid_pairs(train_shards, 2)
    assert len(pairs) == 3
    meta_step = max(psnr, key=lambda m: m.value).step
    assert {m.step: m.value for m in psnr}[meta_step] == pytest.approx(mean_psnr(model, pairs, 2), abs=0.01)


@pytest.mark.cluster
def test_killed_worker_restarts_from_checkpoint_in_the_same_run(ray_cluster, mlflow_server, train_shards, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    # 2 loader workers per rank: 4 streams over 3 shards, the sample-level split
    args = tiny_args(train_shards, store, epochs=4, iters=8,
                     extra=(*cluster_args(ray_cluster, mlflow_server.uri), "--experiment", "train-kill",
                            "--run-name", "kill", "--max-failures", "1", "--loader-workers", "2",
                            "--checkpoint-every", "8"))
    proc = start_cli(args, tmp_path / "train.log")
    try:
        wait_for_checkpoint(store / "kill", proc)
        workers = train_workers(ray_cluster.dashboard_url)
        assert len(workers) == 2, workers
        victim = int(workers[-1]["pid"])
        os.kill(victim, signal.SIGKILL)
        rc = _finish(proc)
    finally:
        stop_session(proc)
    log = (tmp_path / "train.log").read_text()
    assert rc == 0, log[-4000:]
    assert "resumed from checkpoint at epoch" in log

    runs = runs_named(mlflow_server.uri, "train-kill", "kill")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    restarts = [int(s) for s in run.data.tags["sr.restarts_at_steps"].split(",")]
    assert len(restarts) == 1 and restarts[0] >= 8 and restarts[0] % 8 == 0  # from a checkpoint, not from scratch
    assert metric_steps(mlflow_server.uri, run.info.run_id, "train/loss") == list(range(2, 33, 2))
    assert metric_steps(mlflow_server.uri, run.info.run_id, "val/psnr") == [8, 16, 24, 32]


@pytest.mark.cluster
def test_node_local_storage_is_refused_on_two_nodes(ray_cluster, mlflow_server, train_shards, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    base = tiny_args(train_shards, store, extra=("--address", ray_cluster.address, "--cpus-per-worker", "1",
                                                 "--experiment", "train-refused", "--run-name", "refused"))
    proc = run_cli(*base, "--tracking-uri", mlflow_server.uri, timeout=180)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: storage path {store} is on a node-local filesystem")
    assert "2 nodes" in last and "s3://" in last and "--shared-storage" in last
    assert not list(store.glob("refused/*")) and runs_named(mlflow_server.uri, "train-refused", "refused") == []

    # a shared storage, but the default MLflow store is a file on this machine: refused too
    proc = run_cli(*base, "--shared-storage", timeout=180)
    assert proc.returncode == 1
    assert "is a file on this machine" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.cluster
def test_non_finite_losses_stop_the_job_with_a_clear_error(ray_cluster, mlflow_server, train_shards, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    args = tiny_args(train_shards, store, epochs=3, iters=8,
                     extra=(*cluster_args(ray_cluster, mlflow_server.uri), "--experiment", "train-nan",
                            "--run-name", "nan", "--lr", "1e12", "--set", "max_bad_steps=3", "--max-failures", "1"))
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"training stopped: \d+ non-finite losses in a row \(by step \d+", last), last
    assert int(last.split("training stopped: ")[1].split()[0]) >= 3 and "run nan" in last
    run = runs_named(mlflow_server.uri, "train-nan", "nan")[0]
    assert run.info.status == "FAILED"
    assert "resumed from checkpoint" not in proc.stderr  # stopped, not retried by Ray


def test_sigterm_to_a_worker_checkpoints_and_the_same_run_name_continues(train_shards, tmp_path):  # noqa: F811
    """Local Ray instance (no --address), default MLflow store under SR_PIPELINE_HOME. (Ctrl-C
    in the driver: tests/test_train_resume.py.)"""
    from mlflow.tracking import MlflowClient

    from pipeline import defaults

    store = tmp_path / "store"
    args = tiny_args(train_shards, store, epochs=4, iters=16,
                     extra=("--cpus-per-worker", "0.5", "--run-name", "again", "--experiment", "train-again",
                            "--ema", "0.9", "--checkpoint-every", "8"))
    uri = defaults.default_tracking_uri()
    proc = start_cli(args, tmp_path / "first.log")
    try:
        wait_for_line(tmp_path / "first.log", "step 2/64 epoch", proc)  # the first log point
        victims = session_workers(proc)
        assert len(victims) == 2, victims
        os.kill(victims[0], signal.SIGTERM)  # one worker only: the ranks agree to stop together
        rc = _finish(proc, timeout=120)
    finally:
        stop_session(proc)
    first = (tmp_path / "first.log").read_text()
    assert rc == 1, first[-3000:]
    last = first.strip().splitlines()[-1]
    assert "training stopped: a worker received SIGTERM; checkpoint written at step" in last and "run again" in last
    stopped_at = int(last.split("checkpoint written at step ")[1].split()[0].rstrip(";"))
    runs = runs_named(uri, "train-again", "again")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    run_id = runs[0].info.run_id
    steps_before = metric_steps(uri, run_id, "train/loss")
    assert steps_before[-1] == stopped_at < 64
    assert max(int(c["metrics"]["step"]) for c in registered_checkpoints(store / "again")) == stopped_at

    second = run_cli(*args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing run again" in second.stderr
    assert f"resumed from checkpoint at epoch {stopped_at // 16}, step {stopped_at}" in second.stderr
    assert second.stdout.strip().splitlines()[-1] == run_id
    runs = runs_named(uri, "train-again", "again")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert metric_steps(uri, run_id, "train/loss") == list(range(2, 65, 2))
    assert metric_steps(uri, run_id, "val/psnr") == [16, 32, 48, 64]
    assert MlflowClient(uri).get_run(run_id).data.params["epochs"] == "4"
    # EMA weights travel with the checkpoint (and survived the restart)
    from pipeline.model import read_checkpoint

    last = sorted(p for p in (store / "again").glob("checkpoint_*") if p.is_dir())[-1]
    ckpt = read_checkpoint(last / "model.pt")
    assert set(ckpt["ema_state_dict"]) == set(ckpt["state_dict"]) and ckpt["step"] == 64
    assert any(not torch.equal(ckpt["ema_state_dict"][k], v) for k, v in ckpt["state_dict"].items())
