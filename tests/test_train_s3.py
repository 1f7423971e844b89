"""Training data read from object storage: a real S3-API server on 127.0.0.1 (moto, with
authentication enforced: tests/fixtures_s3.py), shards streamed in place (ranged reads, no
local copy)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from fixtures_shards_read import train_entries, write_shards
from helpers import free_port

from pipeline.config import TrainConfig, load_config
from pipeline.console import UserError
from pipeline.train import data, datasource, validation


def _cfg(shards: str) -> TrainConfig:
    return load_config(TrainConfig, preset="tiny", overrides={"shards": shards, "patch_size": 12})


def test_shards_stream_from_s3_exactly_as_from_disk(s3_server, tmp_path, monkeypatch):
    local = write_shards(tmp_path / "s", {"train": [6, 5, 7], "valid": [3]}, encoding="raw")
    url = s3_server.upload(local, "div2k/raw", bucket="sr-data", endpoint_in_url=True)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "index-cache"
    monkeypatch.setenv("SR_PIPELINE_INDEX_CACHE", str(cache))
    job = datasource.resolve_job(_cfg(url))  # manifest and sizes read from the bucket
    assert job.train_counts == [6, 5, 7] and job.val_count == 3
    assert all(s.startswith("s3://sr-data/div2k/raw/div2k-train-") and "endpoint_override" in s for s in job.train_shards)
    paths, counts = train_entries(local)
    disk = data.PatchStream(paths, counts, 2, 12, 4, seed=2, skip_bad_shards=False)
    remote = data.PatchStream(job.train_shards, job.train_counts, 2, 12, 4, seed=2)
    loader = data.make_train_loader(remote, 2, pin_memory=False)  # forked loader processes read S3 too
    for step, (lr, hr) in enumerate(itertools.islice(iter(loader), 6)):
        want = disk.batch(step)
        assert torch.equal(lr, want[0]) and torch.equal(hr, want[1])
    assert len(list(cache.glob("*-x2-raw.npz"))) == 3  # tar headers walked once per node, shared by processes
    again = data.PatchStream(job.train_shards, job.train_counts, 2, 12, 4, seed=2)
    assert torch.equal(again.batch(3)[1], disk.batch(3)[1])  # from the cached indexes
    val = list(validation.validation_from_shards(job.val_shards, 2))
    assert [v.index for v in val] == [0, 1, 2] and val[0].hr.shape == (24, 24, 3)
    assert datasource.node_data_problems(job.train_shards) == []


def test_object_store_problems_are_one_line_before_ray(s3_server, tmp_path, monkeypatch):
    local = write_shards(tmp_path / "s", {"train": [2], "valid": [1]}, encoding="raw")
    url = s3_server.upload(local, "x", bucket="sr-bad", endpoint_in_url=True)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    problems = []
    with pytest.raises(UserError) as err:
        datasource.resolve_job(_cfg(url))
    problems.append(str(err.value))
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError) as err:
        datasource.resolve_job(_cfg(s3_server.url("x", bucket="no-such-bucket", endpoint_in_url=True)))
    problems.append(str(err.value))
    dead = s3_server.url("x", bucket="sr-bad", endpoint_in_url=True).replace(s3_server.host, f"127.0.0.1:{free_port()}")
    with pytest.raises(UserError) as err:
        datasource.resolve_job(_cfg(dead))
    problems.append(str(err.value))
    for line in problems:
        assert "\n" not in line and s3_server.secret not in line and "endpoint_override" not in line, line
    assert problems[0].startswith("cannot read the shard manifest s3://sr-bad/x/manifest.json: ")
    assert problems[0].endswith("[no AWS credentials in this environment: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                "AWS_PROFILE, or give the node a role]")
    assert problems[1] == ("s3://no-such-bucket/x: bucket 'no-such-bucket' not found (or not visible with this "
                           "node's credentials)")
    assert problems[2].startswith("cannot read the shard manifest s3://sr-bad/x/manifest.json: ")


def test_a_node_without_the_stores_settings_is_told_they_are_its_own(s3_server, tmp_path, monkeypatch):
    """Preflight's probe as it runs on a node: with the settings it reads the store; without
    them its one line says the node's own variables are missing (the driver's are not sent)."""
    from pipeline.train.preflight import _probe_node

    local = tmp_path / "store"
    local.mkdir()
    (local / "token").write_text("t0k3n")
    url = s3_server.upload(local, "probe")
    checks = {"token_path": f"{url}/token", "token": "t0k3n", "storage": url, "files": [], "tracking_uri": None}
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    assert _probe_node(checks)["errors"] == []
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k)
    errors = _probe_node(checks)["errors"]
    assert len(errors) == 1 and errors[0].startswith(f"storage {url} is not visible ("), errors
    assert "this node reads s3:// with its own settings" in errors[0] and "AWS_ENDPOINT_URL_S3" in errors[0]
    assert s3_server.secret not in errors[0] and "\n" not in errors[0]


@pytest.mark.slow
def test_train_reads_its_shards_from_s3(s3_server, tmp_path):
    """The product path: `sr-pipeline train --shards s3://...` on a local Ray instance; the
    preflight probe and both DDP workers (with a loader process each) read the bucket."""
    from fixtures_train import tiny_args
    from helpers import run_cli
    from mlflow.tracking import MlflowClient

    from pipeline import defaults

    local = write_shards(tmp_path / "s", {"train": [7, 6, 5], "valid": [2]}, encoding="raw", hr_size=(48, 48))
    url = s3_server.upload(local, "div2k", bucket="sr-train", endpoint_in_url=True)
    args = tiny_args(url, tmp_path / "store", epochs=1, iters=4,
                     extra=("--cpus-per-worker", "1", "--loader-workers", "1", "--run-name", "from-s3",
                            "--experiment", "train-s3"))
    proc = run_cli(*args, env={**s3_server.env, "SR_PIPELINE_INDEX_CACHE": str(tmp_path / "idx")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s3_server.secret not in proc.stderr + proc.stdout
    run = MlflowClient(defaults.default_tracking_uri()).get_run(proc.stdout.strip().splitlines()[-1])
    assert run.info.status == "FINISHED" and "val/psnr" in run.data.metrics
    assert s3_server.secret not in json.dumps(run.data.params)


@pytest.mark.slow
@pytest.mark.cluster
def test_two_node_job_reads_its_shards_from_s3(ray_cluster, mlflow_server, s3_server, tmp_path):
    """Two Ray nodes stream the shards from the bucket with the key and endpoint in THEIR OWN
    environment (the fixture cluster's): the launcher forwards neither, so the job can only
    finish if each node's credentials are used; the secret never reaches the output or MLflow."""
    from fixtures_train import cluster_args, tiny_args
    from helpers import run_cli
    from mlflow.tracking import MlflowClient

    assert ray_cluster.node_env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret
    local = write_shards(tmp_path / "s", {"train": [7, 6, 5], "valid": [2]}, encoding="raw", hr_size=(48, 48))
    url = s3_server.upload(local, "two-nodes")  # plain s3://bucket/prefix: endpoint from the env
    args = tiny_args(url, tmp_path / "store", epochs=1, iters=4,
                     extra=(*cluster_args(ray_cluster, mlflow_server.uri), "--experiment", "train-s3-cluster",
                            "--run-name", "s3-two-nodes"))
    proc = run_cli(*args, env=s3_server.env, timeout=300)  # the driver's own preflight reads it too
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s3_server.secret not in proc.stderr + proc.stdout
    run = MlflowClient(mlflow_server.uri).get_run(proc.stdout.strip().splitlines()[-1])
    assert run.info.status == "FINISHED" and "val/psnr" in run.data.metrics
    tags, params = run.data.tags, run.data.params
    assert tags["sr.nodes_used"] == "2" and tags["sr.world_size"] == "2", tags
    assert params["data.train_shards"] == "3" and params["shards"] == url, params
    assert s3_server.secret not in json.dumps(params) + json.dumps(tags)
