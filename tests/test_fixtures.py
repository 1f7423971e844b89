"""The test harness itself: the real cluster, the real MLflow server, the real images."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import in_loopback_namespace


@pytest.mark.cluster
def test_ray_cluster_has_two_loopback_nodes(ray_cluster):
    code = (
        "import ray, json\n"
        f"ray.init(address={ray_cluster.address!r}, logging_level='ERROR')\n"
        "@ray.remote(num_cpus=1)\n"
        "def where():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "nodes = [n for n in ray.nodes() if n['Alive']]\n"
        "ids = set(ray.get([where.options(scheduling_strategy=ray.util.scheduling_strategies."
        "NodeAffinitySchedulingStrategy(n['NodeID'], soft=False)).remote() for n in nodes]))\n"
        "print(json.dumps({'n': len(nodes), 'ids': len(ids), 'addrs': [n['NodeManagerAddress'] for n in nodes]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 2 and result["ids"] == 2  # tasks really ran on two nodes
    if in_loopback_namespace():
        assert all(a.startswith("127.") for a in result["addrs"]), result["addrs"]


def test_loopback_namespace_when_run_by_the_test_command():
    if os.environ.get("SR_PIPELINE_IN_NETNS") != "1":
        pytest.skip("suite not started through scripts/netns.sh (no loopback-only namespace here)")
    assert in_loopback_namespace()


def test_mlflow_server_round_trip(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment("fixture-check")
    run = client.create_run(exp_id)
    client.log_param(run.info.run_id, "p", "1")
    client.log_metric(run.info.run_id, "m", 0.5, step=3)
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params["p"] == "1" and got.data.metrics["m"] == 0.5
    assert mlflow_server.uri.startswith("http://127.0.0.1:")


def test_shared_images_are_real(set5_dir, set14_dir):
    from PIL import Image

    names = sorted(p.name for p in set5_dir.glob("*.png"))
    assert names == ["baby.png", "bird.png", "butterfly.png", "head.png", "woman.png"]
    assert len(list(set14_dir.glob("*.png"))) == 14
    with Image.open(set14_dir / "bridge.png") as im:
        assert im.mode == "L"
