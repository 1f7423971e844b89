"""`sr-pipeline train` input errors: one line each, before any Ray or MLflow work starts."""

from __future__ import annotations

from fixtures_train import train_shards  # noqa: F401 - fixture
from helpers import free_port, run_cli


def _error(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_missing_or_wrong_shards(tmp_path):
    assert "--shards is required" in _error(run_cli("train", "--preset", "tiny"))
    line = _error(run_cli("train", "--preset", "tiny", "--shards", str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in line


def test_bad_values_are_named(train_shards):  # noqa: F811
    line = _error(run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--workers", "4", "--batch-size", "2"))
    assert "batch_size is the global batch (2); it must be >= workers (4)" in line
    line = _error(run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--scale", "3"))
    assert "not x3" in line  # the fixture shards hold x2 only
    line = _error(run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--patch-size", "96"))
    assert "--patch-size 96 does not fit the smallest training sub-image" in line and "48x48 px HR" in line
    line = _error(run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--val-data", "/no/such/dir"))
    assert "/no/such/dir" in line
    line = _error(run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--checkpoint-every", "7"))
    assert "checkpoint_every (7) must be a multiple of log_every (5)" in line


def test_unreachable_tracking_server_fails_fast(train_shards):  # noqa: F811
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--tracking-uri", uri)
    assert f"MLflow tracking server {uri} is not reachable" in _error(proc)
    assert "Ray" not in proc.stderr  # checked before any Ray instance starts


def test_storage_path_that_cannot_be_created_is_one_line_before_ray(train_shards):  # noqa: F811
    proc = run_cli("train", "--shards", str(train_shards), "--preset", "tiny", "--storage-path", "/proc/sr-audit")
    line = _error(proc)
    assert line.startswith("error: --storage-path /proc/sr-audit: cannot create or write it (")
    assert "Ray" not in proc.stderr  # checked before any Ray instance starts


def test_gpu_requests_that_cannot_work_are_refused_before_ray_starts(train_shards):  # noqa: F811
    base = ("train", "--shards", str(train_shards), "--preset", "tiny", "--set", "use_gpu=yes")
    line = _error(run_cli(*base, "--gpus-per-worker", "0.5"))
    assert "--gpus-per-worker 0.5: each NCCL rank needs whole GPUs of its own" in line
    proc = run_cli(*base, "--workers", "2")  # this machine has no GPU
    assert "--workers 2 x --gpus-per-worker 1 needs 2 GPUs but the cluster has 0" in _error(proc)
    assert "Ray" not in proc.stderr
