"""The best model of a run as an MLflow Model: registry aliases, pyfunc predict == `upscale`,
`mlflow models serve` on loopback, `evaluate --model-uri`, one-line errors.

The registered models are built the way `train` builds them (best_model/ written by the loop's
write_best, uploaded by sync.upload_best, registered by register_best) from tiny random
models, on the real MLflow server fixture, without a Ray training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import fixtures_evaluate
import numpy as np
import pytest
from helpers import BIN, free_port, run_cli, stop_session
from mlflow.tracking import MlflowClient

from pipeline.imageio import read_image

mini_bench = fixtures_evaluate.mini_bench


def _train_like_run(uri: str, root: Path, seed: int, psnr: float, step: int) -> tuple[str, Path]:
    """A run holding a tiny x2 model as train leaves it; returns (run id, best model.pt)."""
    import torch

    from pipeline.model import build_model
    from pipeline.train import checkpoint, tracking
    from pipeline.train.sync import upload_best

    run_id, _ = tracking.open_run(uri, "model-registry-test", f"tiny-{seed}", str(root / f"run{seed}"))
    torch.manual_seed(seed)
    run_dir = str(root / f"run{seed}")
    checkpoint.write_best(run_dir, build_model("tiny", 2), psnr, step, 1, run_id)
    assert upload_best(uri, run_id, run_dir)  # what the end of a training run does
    assert checkpoint.read_best_meta(run_dir)["step"] == step
    version = tracking.register_best(uri, run_id, 2, psnr, step)
    assert version is not None
    assert tracking.register_best(uri, run_id, 2, psnr, step) == version  # rerun: no duplicate
    return run_id, Path(run_dir) / "best_model" / "model.pt"


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    best = _train_like_run(mlflow_server.uri, root, seed=0, psnr=21.5, step=40)
    worse = _train_like_run(mlflow_server.uri, root, seed=1, psnr=20.0, step=60)
    return {"best": best, "worse": worse}


def _lr(shared_data: Path) -> np.ndarray:
    img, _ = read_image(shared_data / "benchmark" / "Set5" / "HR" / "butterfly.png")
    return np.ascontiguousarray(img[100:131, 80:117])  # odd sizes, 31x37


def test_registered_model_predicts_like_upscale_and_serves(mlflow_server, registry, shared_data, tmp_path):
    import mlflow

    client = MlflowClient(mlflow_server.uri)
    champion = client.get_model_version_by_alias("dnlan-x2", "champion")
    assert champion.run_id == registry["best"][0]  # best val PSNR, although not the newest
    assert champion.tags["val_psnr"] == "21.5000"
    run = client.get_run(registry["best"][0])
    assert [f"models:/{o.model_id}" for o in run.outputs.model_outputs] == [champion.source]  # run page

    lr = _lr(shared_data)
    src = tmp_path / "in" / "lr.png"
    src.parent.mkdir()
    from pipeline.imageio import write_png

    write_png(src, lr)
    run_cli("upscale", str(src), "--checkpoint", str(registry["best"][1]), "--out", str(tmp_path / "out"),
            check=True)  # fmt: skip
    expected, _ = read_image(tmp_path / "out" / "lr_x2.png")

    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/dnlan-x2@champion")
        latest = mlflow.pyfunc.load_model("models:/dnlan-x2@latest")  # MLflow resolves @latest
        reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/dnlan-x2@champion")).read_text()
    finally:
        mlflow.set_tracking_uri(None)
    meta = model.metadata.metadata["sr_pipeline"]
    assert {k: meta[k] for k in ("tiling", "tile", "tile_overlap", "hash", "hash_seed", "scale")} == {
        "tiling": "overlap", "tile": 192, "tile_overlap": 16, "hash": "fixed", "hash_seed": 0, "scale": 2,
    }  # fmt: skip
    from pipeline.mlflow_model import sha256_file

    assert meta["checkpoint_sha256"] == sha256_file(registry["best"][1])
    assert meta["source_run"] == registry["best"][0]
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, -1, 3)
    assert "sr-pipeline==" in reqs and "torch==" in reqs
    sr = model.predict(lr)
    assert sr.dtype == np.uint8 and sr.shape == (62, 74, 3)
    assert np.abs(sr.astype(int) - expected.astype(int)).max() <= 1
    assert f"models:/{latest.metadata.model_id}" == client.get_model_version("dnlan-x2", "2").source
    assert not np.array_equal(latest.predict(lr), sr)  # another model really
    with pytest.raises(Exception, match="upscales x2, but the request asks for x4"):
        model.predict(lr, params={"scale": 4})

    # `mlflow models serve` on loopback answers an image request
    port = free_port()
    # MLflow starts `uvicorn` by name: the venv's bin must be on PATH, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/dnlan-x2@champion", "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            body = _post_when_up(port, {"inputs": lr.tolist(), "params": {"scale": 2}}, proc, tmp_path)
            served = np.asarray(json.loads(body)["predictions"], dtype=np.uint8)
            assert np.array_equal(served, sr)
            with pytest.raises(urllib.error.HTTPError) as err:
                _post(port, {"inputs": lr.tolist(), "params": {"scale": 3}})
            assert err.value.code == 400
            assert "upscales x2, but the request asks for x3" in err.value.read().decode()
        finally:
            stop_session(proc)


def _post(port: int, payload: dict) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


def _post_when_up(port: int, payload: dict, proc: subprocess.Popen, tmp_path: Path) -> bytes:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {(tmp_path / 'serve.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return _post(port, payload)
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError((tmp_path / "serve.log").read_text()[-3000:])
        time.sleep(0.5)


def test_evaluate_model_uri_and_its_errors(mlflow_server, registry, mini_bench, tmp_path):
    common = ["--benchmarks", str(mini_bench), "--max-images", "1", "--tracking-uri", mlflow_server.uri]
    proc = run_cli("evaluate", "--model-uri", "models:/dnlan-x2@champion", *common,
                   "--json", str(tmp_path / "uri.json"), "--out", str(tmp_path / "a"), check=True)  # fmt: skip
    run_cli("evaluate", "--checkpoint", str(registry["best"][1]), *common, "--no-mlflow",
            "--json", str(tmp_path / "file.json"), "--out", str(tmp_path / "b"), check=True)  # fmt: skip
    by_uri, by_file = (json.loads((tmp_path / f).read_text()) for f in ("uri.json", "file.json"))
    assert by_uri[0]["psnr"] == by_file[0]["psnr"] and by_uri[0]["scale"] == 2
    assert "MLflow model models:/dnlan-x2@champion" in proc.stderr
    from pipeline.mlflow_model import sha256_file

    prov = by_uri[0]["provenance"]  # the registered weights are traced back to their run
    assert prov["source_run"] == registry["best"][0] and prov["model_uri"] == "models:/dnlan-x2@champion"
    assert prov["checkpoint_sha256"] == sha256_file(registry["best"][1])

    missing = run_cli("evaluate", "--model-uri", "models:/no-such-model@champion", *common)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("error: MLflow model models:/no-such-model@champion not found at ")

    # a registered model that is not ours (the pre-MLflow-Model layout: a folder of files)
    client = MlflowClient(mlflow_server.uri)
    run_id = registry["worse"][0]
    client.create_registered_model("not-a-dnlan")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/best_model"
    client.create_model_version("not-a-dnlan", source=source, run_id=run_id)
    other = run_cli("evaluate", "--model-uri", "models:/not-a-dnlan/1", *common)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines() == [
        "error: MLflow model models:/not-a-dnlan/1 is not an sr-pipeline DNLAN model (no sr_pipeline "
        "metadata and artifacts/model.pt in its MLmodel)"
    ]
