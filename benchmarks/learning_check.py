"""Learning check: does `tiny` learn super-resolution in ~15 CPU minutes?

Everything goes through the product: `sr-pipeline preprocess` cuts the 91 T91 images into
96 px sub-images (x2), `sr-pipeline train --preset tiny` trains one worker on a local Ray
instance validating on Set5 every epoch (Y-channel PSNR, shave 2, fixed hash, reference chop),
and `sr-pipeline evaluate --run-id` scores the best model on Set5 x2 at the end. The bicubic
baseline (33.66 dB in the literature) is recomputed here with our MATLAB-style imresize.

The epoch count is chosen from a short calibration of the training step so that the steps
take about --minutes of wall time on this machine (validation adds about 10%).

    unshare -n sh -c 'ip link set lo up; python benchmarks/learning_check.py [--minutes 15]'
"""

from __future__ import annotations

import os

os.environ.setdefault("SR_PIPELINE_QUIET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import TrainConfig, load_config  # noqa: E402

BIN = Path(sys.executable).parent
DATA = Path(os.environ.get("SR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def bicubic_set5(set5: Path) -> float:
    from pipeline.evaluate.metrics import psnr
    from pipeline.imageio import list_images, read_image
    from pipeline.preprocess import imresize

    values = []
    for path in list_images(set5):
        hr, _ = read_image(path)
        hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
        values.append(psnr(imresize(imresize(hr, scale=0.5), scale=2.0), hr, 2))
    return float(np.mean(values))


def step_seconds(cfg: TrainConfig, threads: int) -> float:
    """Median seconds of one tiny training step (random data, same shapes as training)."""
    from pipeline.model import build_from_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    lp = cfg.patch_size // 2
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        x, y = torch.rand(cfg.batch_size, 3, lp, lp), torch.rand(cfg.batch_size, 3, 2 * lp, 2 * lp)
        torch.nn.functional.l1_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def run(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed; see {log}:\n{log.read_text()[-3000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-time budget for the training steps")
    ap.add_argument("--iters", type=int, default=100, help="iterations per epoch (one validation each)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run's files here (default: a temp dir)")
    args = ap.parse_args()

    cfg = load_config(TrainConfig, preset="tiny")
    t91, set5 = DATA / "train" / "T91", DATA / "benchmark" / "Set5" / "HR"
    load0 = os.getloadavg()
    base = bicubic_set5(set5)
    per_step = step_seconds(cfg, os.cpu_count() or 1)
    epochs = max(2, round(args.minutes * 60 / (per_step * args.iters)))
    milestones = [max(1, round(0.75 * epochs))]

    work = args.keep or Path(tempfile.mkdtemp(prefix="learning-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SR_PIPELINE_HOME=str(work / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    shards = work / "shards"
    run([str(BIN / "sr-pipeline"), "preprocess", "--images", str(t91), "--out", str(shards), "--scales", "2",
         "--crop", "96", "--step", "48", "--shard-samples", "64"], env, work / "preprocess.log")
    manifest = json.loads((shards / "manifest.json").read_text())
    t0 = time.perf_counter()
    proc = run([str(BIN / "sr-pipeline"), "train", "--shards", str(shards), "--preset", "tiny", "--workers", "1",
                "--cpus-per-worker", str(os.cpu_count() or 1), "--epochs", str(epochs), "--iters-per-epoch",
                str(args.iters), "--set", f"milestones={milestones[0]}", "--val-data", str(set5),
                "--no-dashboard", "--experiment", "learning-check", "--run-name", "learning-check"],
               env, work / "train.log")
    train_wall = time.perf_counter() - t0
    run_id = proc.stdout.strip().splitlines()[-1]
    result = work / "eval.json"
    run([str(BIN / "sr-pipeline"), "evaluate", "--run-id", run_id, "--benchmarks", "Set5", "--scale", "2",
         "--data-dir", str(DATA / "benchmark"), "--json", str(result), "--no-mlflow"], env, work / "evaluate.log")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'home' / 'mlflow.db'}")
    curve = [(m.step, m.value) for m in client.get_metric_history(run_id, "val/psnr")]
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    rate = statistics.median(m.value for m in client.get_metric_history(run_id, "train/samples_per_s"))
    evaluated = json.loads(result.read_text())
    load1 = os.getloadavg()

    print(f"# learning check: tiny (x2) on T91 ({manifest['splits']['train']['samples']} sub-images of 96 px), "
          f"1 worker, batch {cfg.batch_size}, HR patch {cfg.patch_size}, lr {cfg.lr:g} halved at epoch {milestones[0]}")
    print(f"# {epochs} epochs x {args.iters} steps planned from a {per_step:.2f} s/step calibration; "
          f"train wall time {train_wall / 60:.1f} min (incl. Ray start and Set5 validation); median {rate:.1f} samples/s")
    print(f"{'epoch':>5s} {'step':>6s} {'train loss':>10s} {'Set5 PSNR':>10s}")
    for i, (step, value) in enumerate(curve, 1):
        near = min(loss, key=lambda s: abs(s - step)) if loss else None
        print(f"{i:5d} {step:6d} {loss.get(near, float('nan')):10.4f} {value:10.3f}")
    best = max(v for _, v in curve)
    print(f"bicubic Set5 x2 (our imresize, Y, shave 2): {base:.3f} dB")
    print(f"best validation PSNR: {best:.3f} dB; `sr-pipeline evaluate` of the registered best model: "
          f"{json.dumps(evaluated)[:400]}")
    print(f"target: above bicubic -> {'met' if best > base else 'MISSED'} ({best - base:+.2f} dB)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"load avg before/after {load0[0]:.1f}/{load1[0]:.1f}; files in {work}")


if __name__ == "__main__":
    main()
