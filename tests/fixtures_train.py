"""Fixtures and helpers for the train tests: small real shards, fast CLI arguments, Ray state.

The shards are made once per session by the real `sr-pipeline preprocess` from a few T91
photographs: 48 px sub-images, x2 only, 19 samples per shard, so the train split has **3
shards with odd sample counts** (19, 19, 15): with 2 ranks the shards do not divide evenly,
which is exactly the case that hangs DDP when the loader is wrong. Every train test runs on
them. Three images are held out as the valid split: with 2 ranks, rank 0 scores two of them
and rank 1 one, so the reduced validation PSNR depends on both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

TRAIN_IMAGES = ("t1", "t2", "t3", "t5")
HOLDOUT_IMAGES = ("t6", "t7", "t9")  # sort last, so --holdout 3 takes them
SHARD_SAMPLES = 19


@pytest.fixture(scope="session")
def train_shards(t91_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = tmp_path_factory.mktemp("train_images")
    for name in (*TRAIN_IMAGES, *HOLDOUT_IMAGES):
        (images / f"{name}.png").symlink_to(t91_dir / f"{name}.png")  # read in place, never copied
    out = tmp_path_factory.mktemp("train_shards")
    run_cli(
        "preprocess", "--images", str(images), "--holdout", str(len(HOLDOUT_IMAGES)), "--out", str(out), "--scales", "2",
        "--crop", "48", "--step", "48", "--shard-samples", str(SHARD_SAMPLES), "-j", "1",
        check=True, timeout=300,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    counts = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    assert len(counts) == 3 and any(c % 2 for c in counts), counts  # the uneven case we want
    assert manifest["splits"]["valid"]["samples"] == len(HOLDOUT_IMAGES)
    return out


def shard_counts(shards: Path) -> list[int]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [s["samples"] for s in manifest["splits"]["train"]["shards"]]


def tiny_args(
    shards: Path, storage: Path, *, epochs: int = 2, iters: int = 6, workers: int = 2, extra: tuple[str, ...] = ()
) -> list[str]:
    """`sr-pipeline train` arguments for a seconds-long CPU job on the tiny preset."""
    return [
        "train", "--shards", str(shards), "--preset", "tiny", "--workers", str(workers),
        "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--patch-size", "24",
        "--batch-size", "4", "--storage-path", str(storage), "--no-dashboard",
        "--set", "dist_timeout_s=120", "--set", "log_every=2", *extra,
    ]


def cluster_args(cluster, tracking_uri: str) -> tuple[str, ...]:
    """Run on the two-node fixture: one worker per node (1 CPU each), shared /tmp storage."""
    return ("--address", cluster.address, "--cpus-per-worker", "1", "--shared-storage", "--tracking-uri", tracking_uri)


def _default_sigint() -> None:
    # A suite started in the background by a shell inherits SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored: the tests that press Ctrl-C would then press nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`sr-pipeline ...` in the background (own session, so it can be stopped as a group)."""
    from helpers import BIN

    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "sr-pipeline"), *args], stdout=handle, stderr=subprocess.STDOUT,
            env=dict(os.environ), start_new_session=True, preexec_fn=_default_sigint,
        )


def registered_checkpoints(run_dir: Path) -> list[dict]:
    """Checkpoints Ray Train's controller has registered (what a restart resumes from).

    Files on disk are not enough: the controller collects reports when it polls the workers
    (every 2 s), so a checkpoint written just before a crash may never be registered.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 240, count: int = 1) -> None:
    """Until Ray Train has registered `count` checkpoints of the run (or the job ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(registered_checkpoints(run_dir)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before checkpoint {count}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {count} in {run_dir} after {timeout:.0f}s")


def session_workers(proc) -> list[int]:
    """Pids of the Ray Train workers of the local Ray instance that `proc` started (its
    session); their DataLoader processes (forked, same title) are left out."""
    import psutil

    def is_worker(p) -> bool:
        return os.getsid(p.pid) == proc.pid and "RayTrainWorker" in " ".join(p.cmdline())

    pids = []
    for p in psutil.process_iter():
        try:
            if is_worker(p) and not is_worker(p.parent()):
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, AttributeError, psutil.Error):
            continue
    return sorted(pids)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, after: str | None = None, timeout: float = 240) -> None:
    """Until `text` appears in a CLI log (after the first `after`, when given): workers' lines
    reach the driver's output within a second, the cheapest sign of how far a job is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if after is not None:
            content = content.partition(after)[2]
        if text in content:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {text!r} appeared in {log}")
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {log} after {timeout:.0f}s")


def losses(uri: str, run_id: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")}


def train_workers(dashboard_url: str, state: str | None = "ALIVE") -> list:
    """Ray Train worker actors of the cluster, from Ray's state API."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")]
    if state:
        filters.append(("state", "=", state))
    return list_actors(address=dashboard_url, filters=filters, detail=True, raise_on_missing_output=False)


def runs_named(uri: str, experiment: str, ray_run_name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`sr.ray_run_name` = '{ray_run_name}'")


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def cli_warnings(log: str) -> list[str]:
    """`warning:` lines of a train command's output (the driver's and the workers' via Ray)."""
    return [line for line in log.splitlines() if "warning:" in line]


def valid_pairs(shards: Path, scale: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, LR, HR) of every valid sample, read straight from the tar files (not via the
    train stage's readers), in shard and member order."""
    import io
    import tarfile

    from PIL import Image

    manifest = json.loads((shards / "manifest.json").read_text())
    pairs = []
    for shard in manifest["splits"]["valid"]["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, kind = member.name.partition(".")
                members.setdefault(key, {})[kind] = tar.extractfile(member).read()
        def image(files: dict[str, bytes], name: str) -> np.ndarray:  # raw (.npy) or PNG member
            if f"{name}.npy" in files:
                return np.lib.format.read_array(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False)
            return np.asarray(Image.open(io.BytesIO(files[f"{name}.png"])).convert("RGB"))

        for key, files in members.items():
            pairs.append((key, image(files, f"lr_x{scale}"), image(files, "hr")))
    return pairs


def plain_y_psnr(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """The benchmark PSNR written out from its definition (not pipeline.evaluate.metrics):
    ITU-R BT.601 luma of 0..255 RGB, `shave` border pixels dropped, peak 255, capped at 100 dB."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    y_sr = 16.0 + sr.astype(np.float64) @ weights
    y_hr = 16.0 + hr.astype(np.float64) @ weights
    diff = (y_sr - y_hr)[shave:-shave, shave:-shave]
    mse = float(np.mean(diff**2))
    return 100.0 if mse == 0 else min(10.0 * np.log10(255.0**2 / mse), 100.0)


def mean_psnr(model, pairs, scale: int, hash_seed: int = 0) -> float:
    """Mean Y-PSNR of `model` over all pairs, in this one process: fixed hash mode, the
    reference's chop (it changes a non-local model's output, so validation uses it too),
    outputs rounded to uint8, scored with :func:`plain_y_psnr`."""
    import torch

    from pipeline.evaluate.tiling import forward_reference_chop
    from pipeline.model import set_hash_mode

    model.eval()
    set_hash_mode(model, "fixed", seed=hash_seed)
    values = []
    for _, lr, hr in pairs:
        x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1))).float().unsqueeze(0) / 255.0
        with torch.no_grad():
            y = forward_reference_chop(model, x, scale)
        sr = np.clip(np.round(y[0].permute(1, 2, 0).double().numpy() * 255.0), 0, 255).astype(np.uint8)
        values.append(plain_y_psnr(sr, hr, scale))
    return float(np.mean(values))


def state_digest(state_dict) -> str:
    """SHA-256 of a state_dict (names and raw bytes, in order), as each rank tags its own."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()
