"""Train building blocks without Ray: checkpoints, storage checks, resources, MLflow logging."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import plain_y_psnr

from pipeline.config import TrainConfig, load_config
from pipeline.console import UserError
from pipeline.train import checkpoint, cluster, credentials, loop, runs, storage, tracking


def _tiny_model():
    from pipeline.model import build_model

    return build_model("tiny", 2, n_resgroups=1, n_resblocks=1, n_feats=16)


def _optim(model):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.5)
    return opt, sched


def _one_step(model, opt, sched):
    x = torch.rand(2, 3, 12, 12)
    loss = torch.nn.functional.l1_loss(model(x), torch.rand(2, 3, 24, 24))
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_checkpoint_round_trip_restores_everything(tmp_path: Path):
    torch.manual_seed(0)
    model = _tiny_model()
    ema = _tiny_model()
    opt, sched = _optim(model)
    for _ in range(3):
        _one_step(model, opt, sched)
    progress = checkpoint.Progress(epoch=3, step=30, best_psnr=31.5, best_step=20, skipped_steps=1)
    checkpoint.save(tmp_path, model, opt, sched, progress, ema=ema, run_id="abc", config={"lr": 1e-3})
    expected_draw = torch.rand(4)  # the RNG continues from the saved state after a restore

    torch.manual_seed(123)
    model2, ema2 = _tiny_model(), _tiny_model()
    opt2, sched2 = _optim(model2)
    got, state = checkpoint.load(tmp_path, model2, opt2, sched2, ema=ema2)
    assert got == progress and state["mlflow_run_id"] == "abc" and state["config"] == {"lr": 1e-3}
    assert torch.equal(torch.rand(4), expected_draw)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(5e-4)
    # the optimiser moments came back: one more identical step gives identical weights
    torch.manual_seed(7)
    _one_step(model, opt, sched)
    torch.manual_seed(7)
    _one_step(model2, opt2, sched2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_model_file_is_our_model_format(tmp_path: Path):
    from pipeline.model import load_checkpoint

    model = _tiny_model()
    opt, sched = _optim(model)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.Progress(epoch=1, step=5))
    loaded = load_checkpoint(tmp_path / checkpoint.MODEL_FILE)  # no flags: config from metadata
    assert loaded.config == model.config


def test_a_foreign_train_state_is_refused(tmp_path: Path):
    model = _tiny_model()
    opt, sched = _optim(model)
    checkpoint.save(tmp_path, model, opt, sched, checkpoint.Progress())
    torch.save({"format": "something-else"}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(UserError, match="not an sr-pipeline training state"):
        checkpoint.load(tmp_path, model, opt, sched)
    (tmp_path / checkpoint.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="train_state.pt: not a readable training state"):
        checkpoint.load(tmp_path, model, opt, sched)


def test_best_model_export_has_both_formats(tmp_path: Path):
    from pipeline.model import load_checkpoint

    model = _tiny_model()
    run_dir = str(tmp_path / "run")
    checkpoint.write_best(run_dir, model, 30.25, step=12, epoch=2, run_id="r1")
    meta = checkpoint.read_best_meta(run_dir)
    assert meta == {"val_psnr": 30.25, "step": 12, "epoch": 2, "mlflow_run_id": "r1"}
    plain = torch.load(Path(run_dir) / "best_model" / "state_dict.pt", weights_only=True)
    assert set(plain) == set(model.state_dict())
    assert load_checkpoint(Path(run_dir) / "best_model" / "model.pt").config == model.config


# ---------------------------------------------------------------------------------------------
# storage and preflight decisions
# ---------------------------------------------------------------------------------------------


def test_storage_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs", Path("/x")) == str(tmp_path / "runs")
    assert storage.resolve(None, Path("/x/y")) == "/x/y"
    assert storage.resolve("s3://bucket/runs/", Path("/x")) == "s3://bucket/runs"
    assert storage.is_uri("gs://b/x") and not storage.is_uri("/tmp/x") and not storage.is_uri("file:///tmp")


def test_filesystem_type_of_local_and_missing_paths(tmp_path: Path):
    fstype = storage.filesystem_type(str(tmp_path / "not" / "yet" / "there"))
    assert fstype != "unknown" and not storage.is_shared_fstype(fstype)
    assert storage.is_shared_fstype("nfs4") and storage.is_shared_fstype("fuse.s3fs")


def _node(cpu, gpu=0.0):
    return {"Resources": {"CPU": cpu, "GPU": gpu}}


def test_resource_check_counts_whole_workers_per_node():
    cfg = load_config(TrainConfig, preset="tiny", overrides={"workers": 2, "cpus_per_worker": 1})
    cluster.check_resources(cfg, False, [_node(1), _node(1)])
    cfg = load_config(TrainConfig, overrides={"workers": 8, "cpus_per_worker": 4, "gpus_per_worker": 1})
    cluster.check_resources(cfg, True, [_node(16, 4), _node(16, 4)])
    with pytest.raises(UserError, match="--workers 8 needs 8 x \\(4 CPU \\+ 1 GPU\\).*fits only 6"):
        cluster.check_resources(cfg, True, [_node(16, 4), _node(8, 4)])
    cfg = load_config(TrainConfig, overrides={"workers": 3, "cpus_per_worker": 1.5})
    with pytest.raises(UserError, match="fits only 2"):  # 2 CPUs each: one 1.5-CPU worker per node
        cluster.check_resources(cfg, False, [_node(2), _node(2)])


def test_run_names(tmp_path: Path):
    cfg = load_config(TrainConfig, preset="tiny")
    name, record = runs.choose_run(cfg, str(tmp_path))
    assert name.startswith("dnlan-x2-") and record is None
    assert runs.choose_run(cfg, str(tmp_path))[0] != name  # fresh runs never collide
    with pytest.raises(UserError, match="no run to resume"):
        runs.choose_run(load_config(TrainConfig, overrides={"resume": True}), str(tmp_path))
    storage.write_json(str(tmp_path / "old" / storage.RUN_FILE), {"mlflow_run_id": "r", "model": {"n_feats": 64}})
    name, record = runs.choose_run(load_config(TrainConfig, overrides={"resume": True}), str(tmp_path))
    assert name == "old" and record["mlflow_run_id"] == "r"
    with pytest.raises(UserError, match="model.n_feats=64, not 192"):
        runs.check_same_model(load_config(TrainConfig), record, "old")
    with pytest.raises(UserError, match="plain name"):
        runs.choose_run(load_config(TrainConfig, overrides={"run_name": "a/b"}), str(tmp_path))


def test_ema_update_is_an_exponential_average():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    loop.ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)


def test_global_batch_split_and_lr_scaling():
    assert [loop.rank_batch(16, r, 3) for r in range(3)] == [6, 5, 5]
    assert sum(loop.rank_batch(10, r, 4) for r in range(4)) == 10
    cfg = load_config(TrainConfig, overrides={"batch_size": 64, "scale_lr": True, "workers": 4})
    assert cfg.effective_lr == pytest.approx(4e-4) and cfg.per_worker_batch == 16


# ---------------------------------------------------------------------------------------------
# MLflow: no duplicate steps after a restart (real store)
# ---------------------------------------------------------------------------------------------


def test_metric_logger_skips_steps_already_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a non-default sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "t", "job", str(tmp_path))
    created = MlflowClient(uri).get_run(run_id)  # a new run, tagged with the Ray run's name
    assert created.info.status == "RUNNING" and created.data.tags[tracking.TAG_RAY_RUN] == "job"
    run_dir = str(tmp_path / "run")  # the journal beside the checkpoints says what was logged
    first = tracking.MetricLogger(uri, run_id, enabled=True, run_dir=run_dir)
    for step in (2, 4, 6):
        first.log({"train/loss": 1.0 / step}, step)
    first.log({"val/psnr": 20.0}, 4)
    first.close()
    # a restarted worker group resumes from the checkpoint at step 2 and logs steps 4.. again
    again = tracking.MetricLogger(uri, run_id, enabled=True, run_dir=run_dir)
    for step in (4, 6, 8):
        again.log({"train/loss": 0.5 / step, "val/psnr": 21.0}, step)
    again.log({"train/loss": math.nan}, 10)  # not finite: not logged, not fatal
    again.close()
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(run_id, "val/psnr")] == [4, 6, 8]
    assert tracking.open_run(uri, "t", "job", str(tmp_path), run_id)[:1] == (run_id,)
    # system metrics keep their own step counter: they never set a floor for ours
    client.log_metric(run_id, "system/cpu_utilization_percentage", 5.0, step=1000)
    probe = tracking.MetricLogger(uri, run_id, enabled=True, run_dir=run_dir)
    assert "system/cpu_utilization_percentage" not in probe.floors
    probe.close()


def test_params_keep_first_values_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "t", "job", str(tmp_path))
    tracking.log_params(uri, run_id, {"epochs": 10, "lr": 1e-4, "aws_secret_access_key": "x"})
    tracking.log_params(uri, run_id, {"epochs": 20, "lr": 1e-4, "seed": 1})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == {"epochs": "10", "lr": "0.0001", "seed": "1"}
    assert run.data.tags["resume.changed.epochs"] == "20"


def test_comparison_image_is_three_panels():
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    hr = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img = tracking.comparison_image(lr, hr, hr, 2, crop=16)
    assert img.shape == (32, 3 * 32 + 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[:, 36:68], hr[14:46, 24:56])


# ---------------------------------------------------------------------------------------------
# precision, validation hash mode, weight digests
# ---------------------------------------------------------------------------------------------


def test_loop_resolves_precision_once_and_only_rank_0_warns(capsys):
    cpu = torch.device("cpu")
    assert loop.agree_on_precision("bf16", cpu, rank=0) == "fp32"
    assert capsys.readouterr().err.count("warning:") == 1
    assert loop.agree_on_precision("bf16", cpu, rank=1) == "fp32"
    assert loop.agree_on_precision("fp32", cpu, rank=0) == "fp32"
    assert loop.agree_on_precision("auto", cpu, rank=0) == "fp32"
    assert capsys.readouterr().err == ""


def test_ray_train_report_logger_is_where_we_quiet_it():
    """quiet_ray_train_reports reaches into a private Ray module (no public switch for the
    workers' per-report INFO lines): this fails loudly when a Ray upgrade moves it."""
    import logging

    from ray.train.v2._internal.execution import context as ray_context

    assert ray_context.logger.name == ray_context.__file__
    logger = logging.getLogger(ray_context.__file__)
    before = logger.level
    try:
        loop.quiet_ray_train_reports()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)


def test_plain_psnr_of_the_tests_agrees_with_the_metric():
    """The cluster test checks val/psnr with fixtures_train.plain_y_psnr: it must be the metric."""
    from pipeline.evaluate.metrics import psnr

    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-9, 10, hr.shape), 0, 255).astype(np.uint8)
    assert plain_y_psnr(sr, hr, 2) == pytest.approx(psnr(sr, hr, 2), abs=1e-9)
    assert plain_y_psnr(hr, hr, 2) == 100.0


def test_validation_restores_the_hash_mode_it_found():
    from pipeline.model import DecoupledNonLocalAttention, hash_mode_of, set_hash_mode
    from pipeline.train.validation import ValSample, validate

    model = _tiny_model()
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    samples = [ValSample(0, "a", hr[::2, ::2].copy(), hr)]
    layers = [m for m in model.modules() if isinstance(m, DecoupledNonLocalAttention)]

    set_hash_mode(model, "fixed", seed=40)  # e.g. a caller that validates a frozen model
    seeds = [layer.hash_seed for layer in layers]
    model.train()
    result = validate(model, samples, 2, 1.0, torch.device("cpu"), hash_seed=0)
    assert result.count == 1 and math.isfinite(result.psnr_sum)
    assert hash_mode_of(model) == "fixed" and [layer.hash_seed for layer in layers] == seeds
    assert model.training

    set_hash_mode(model, "stochastic")
    model.eval()
    again = validate(model, samples, 2, 1.0, torch.device("cpu"), hash_seed=0)
    assert hash_mode_of(model) == "stochastic" and not model.training
    assert again.psnr_sum == result.psnr_sum  # validation itself always runs fixed, seed 0


def test_param_digest_tracks_every_weight():
    model = _tiny_model()
    digest = loop.param_digest(model)
    assert digest == loop.param_digest(model) and len(digest) == 64
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert loop.param_digest(model) != digest


# ---------------------------------------------------------------------------------------------
# credentials never reach Ray; storage prepared before Ray
# ---------------------------------------------------------------------------------------------


def test_worker_env_carries_no_credentials(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cr%40t@mlflow.example:5000/base")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr@t")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "x")
    env = cluster.worker_env("127.0.0.1:6379")
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/base"
    assert env["MLFLOW_EXPERIMENT_NAME"] == "x" and env["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert not any("alice" in v or "s3cr" in v for v in env.values())

    # credentials of a user:password@ URI travel as MLflow's own variables, and only those
    given = credentials.uri_credentials("http://bob:pw%2F1@127.0.0.1:5000")
    with_uri = cluster.worker_env(None, {**given, "AWS_SECRET_ACCESS_KEY": "no"})
    assert with_uri["MLFLOW_TRACKING_USERNAME"] == "bob" and with_uri["MLFLOW_TRACKING_PASSWORD"] == "pw/1"
    assert "AWS_SECRET_ACCESS_KEY" not in with_uri and "RAY_ADDRESS" not in with_uri
    assert with_uri["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/base"


def test_driver_credentials_come_from_the_uri_and_are_put_back(monkeypatch: pytest.MonkeyPatch):
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "before")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with credentials.credentials_in_env("http://bob:p%3Ass@127.0.0.1:5000"):
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p:ss"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "before" and "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert credentials.uri_credentials("http://127.0.0.1:5000") == {}
    with credentials.credentials_in_env("sqlite:///x.db"):
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "before"


def test_local_storage_is_prepared_or_refused_in_one_line(tmp_path: Path):
    storage.prepare_local(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"--storage-path {tmp_path / 'file' / 'runs'}: cannot create or write it"):
        storage.prepare_local(str(tmp_path / "file" / "runs"))


# ---------------------------------------------------------------------------------------------
# intervals: every number counts steps
# ---------------------------------------------------------------------------------------------


def test_interval_options_count_steps_and_are_checked():
    from pipeline.config import ConfigError

    cfg = load_config(TrainConfig, preset="tiny")
    assert (cfg.checkpoint_every, cfg.val_every, cfg.val_full_every, cfg.val_subset) == (0, 0, 0, 10)
    with pytest.raises(ConfigError, match=r"checkpoint_every \(7\) must be a multiple of log_every \(5\)"):
        load_config(TrainConfig, preset="tiny", overrides={"checkpoint_every": 7})
    with pytest.raises(ConfigError, match="val_full_every must be >= 0"):
        load_config(TrainConfig, overrides={"val_full_every": -1})


def test_validation_plan_subset_often_whole_set_rarely():
    from pipeline.train.validation import ValPlan

    cfg = load_config(TrainConfig, overrides={"epochs": 3, "iters_per_epoch": 10, "val_full_every": 20})
    plan = ValPlan.from_config(cfg, val_count=100, folder=False)
    assert (plan.subset_images, plan.full_images, plan.subset_is_full) == (10, 0, False)
    due = {s: plan.due(s) for s in range(1, 31) if any(plan.due(s))}
    assert due == {10: (True, False), 20: (True, True), 30: (True, True)}  # epoch ends; full at 20 and the end
    cfg = load_config(TrainConfig, overrides={"epochs": 1, "iters_per_epoch": 10, "val_every": 4, "val_max_images": 6})
    plan = ValPlan.from_config(cfg, val_count=100, folder=False)
    assert (plan.subset_images, plan.full_images, plan.subset_is_full) == (6, 6, True)
    assert [s for s in range(1, 11) if any(plan.due(s))] == [4, 8, 10]
    folder = ValPlan.from_config(load_config(TrainConfig), val_count=5, folder=True)
    assert folder.subset_is_full and folder.subset_images == 0  # the whole folder
