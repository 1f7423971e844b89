"""Training throughput of the `tiny` preset: real shard loader vs synthetic batches; 1 vs 2 workers.

Part A (one process, no Ray): the same training step (tiny DNLAN, L1, Adam, global batch 8,
HR patch 48, x2) fed (a) from pre-made uint8 batches in memory, (b) from the real shard loader
over raw shards and (c) over PNG shards (`PatchStream` + one DataLoader process, as `tiny` runs
it). Ratio (b)/(a): how much the input pipeline slows training down. Target (issue 11): >= 97%.

Part B (the product path): `sr-pipeline train` on a local Ray instance with 1 worker (2 CPUs)
and with 2 DDP workers (1 CPU each), same global batch; samples/s and data-wait fraction are
read back from the MLflow run (median over the logged windows after the first epoch).

Shards: sub-images of 480 px (the DIV2K layout) made by the real preprocess code from Set14
photographs upscaled to 2040 px (DIV2K's size; DIV2K itself is not on this machine).
Anything that starts Ray must run in a loopback-only namespace here:

    unshare -n sh -c 'ip link set lo up; python benchmarks/train.py [--seconds 40] [--epochs 3]'
"""

from __future__ import annotations

import os

os.environ.setdefault("SR_PIPELINE_QUIET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import make_shards, make_sources  # noqa: E402

from pipeline.config import TrainConfig, load_config  # noqa: E402
from pipeline.model import build_from_config  # noqa: E402
from pipeline.train import data  # noqa: E402

BIN = Path(sys.executable).parent


def part_a(cfg: TrainConfig, shards: dict[str, tuple[list[str], list[int]]], seconds: float,
           rounds: int = 16) -> tuple[dict[str, float], dict[str, float]]:
    """Samples/s of the real step (forward, L1, backward, Adam) fed synthetic vs real batches.

    The inputs alternate in `rounds` short windows on the same model; each round gives a ratio
    to the synthetic window next to it, and the median ratio is reported: load from other
    processes on a shared machine that hits one window only moves one ratio. Returns (overall
    samples/s per input, median ratio to synthetic per input).
    """
    def stream(name: str) -> data.PatchStream:
        paths, counts = shards[name]
        return data.PatchStream(paths, counts, 2, cfg.patch_size, cfg.batch_size, seed=0,
                                patches_per_sample=cfg.patches_per_sample)

    fixed = [stream("raw").batch(step) for step in range(16)]  # 16 real batches, reused

    def synthetic() -> Iterator:
        while True:
            yield from fixed

    inputs = {"synthetic": synthetic()}
    for name in shards:
        inputs[name] = iter(data.make_train_loader(stream(name), cfg.loader_workers, pin_memory=False))
    # what --loader-workers auto picks at 1 CPU per worker: no loader process, raw reads in-process
    inputs["raw, in-process"] = iter(data.make_train_loader(stream("raw"), 0, pin_memory=False))
    torch.manual_seed(0)
    model = build_from_config(cfg.model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    dev = torch.device("cpu")

    def step(batches: Iterator) -> None:
        lr_u8, hr_u8 = next(batches)
        x, y = data.to_model_range(lr_u8, dev, 1.0), data.to_model_range(hr_u8, dev, 1.0)
        loss = torch.nn.functional.l1_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for it in inputs.values():  # warm-up (loader processes start, shards get indexed)
        for _ in range(3):
            step(it)
    totals = {k: [0, 0.0] for k in inputs}
    ratios: dict[str, list[float]] = {k: [] for k in inputs}
    for _ in range(rounds):
        window = {}
        for name, it in inputs.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / rounds:
                step(it)
                n += cfg.batch_size
            dt = time.perf_counter() - t0
            totals[name][0] += n
            totals[name][1] += dt
            window[name] = n / dt
        for name in inputs:
            ratios[name].append(window[name] / window["synthetic"])
    return ({k: n / t for k, (n, t) in totals.items()}, {k: statistics.median(v) for k, v in ratios.items()})


def part_b(shards: Path, home: Path, workers: int, epochs: int, iters: int) -> tuple[float, float, float]:
    """(median samples/s, median data-wait, wall seconds) of a real `sr-pipeline train` job."""
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, SR_PIPELINE_HOME=str(home))
    env.pop("MLFLOW_TRACKING_URI", None)
    cpus = "2" if workers == 1 else "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "sr-pipeline"), "train", "--shards", str(shards), "--preset", "tiny", "--workers", str(workers),
         "--cpus-per-worker", cpus, "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--no-dashboard",
         "--val-max-images", "1", "--val-every", str(epochs), "--no-register", "--run-name", f"bench-{workers}w", "--experiment", "bench-train"],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train with {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    run_id = proc.stdout.strip().splitlines()[-1]
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    after = lambda key: [m.value for m in client.get_metric_history(run_id, key) if m.step > iters]  # noqa: E731
    return statistics.median(after("train/samples_per_s")), statistics.median(after("train/data_wait")), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="measuring time per variant in part A")
    ap.add_argument("--epochs", type=int, default=3, help="part B epochs")
    ap.add_argument("--iters", type=int, default=60, help="part B iterations per epoch")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--skip-ray", action="store_true", help="part A only")
    args = ap.parse_args()
    cfg = load_config(TrainConfig, preset="tiny")
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        make_sources(tmp / "src", args.images)
        shards = {enc: make_shards(tmp / "src" / "hr", tmp / enc, enc, holdout=1) for enc in ("raw", "png")}
        counts = shards["raw"][1]

        rates, ratio = part_a(cfg, shards, args.seconds)
        synth, real = rates["synthetic"], rates["raw"]
        print(f"# train benchmark, tiny preset: batch {cfg.batch_size}, HR patch {cfg.patch_size}, x2, "
              f"{cfg.loader_workers} loader process, patches_per_sample {cfg.patches_per_sample}; "
              f"{sum(counts)} sub-images of 480 px in {len(counts)} shards")
        print("## A. one process, torch threads = all cores")
        print(f"{'input':40s} {'samples/s':>10s} {'median ratio to synthetic':>26s}")
        print(f"{'synthetic in-memory batches':40s} {synth:10.2f} {1.0:25.1%}")
        print(f"{'real loader, raw shards (1 proc)':40s} {real:10.2f} {ratio['raw']:25.1%}")
        print(f"{'real loader, PNG shards (1 proc)':40s} {rates['png']:10.2f} {ratio['png']:25.1%}")
        inproc = "raw, in-process"
        print(f"{'real loader, raw shards, in-process':40s} {rates[inproc]:10.2f} {ratio[inproc]:25.1%}")
        print(f"target: real loader (raw) >= 97% of synthetic -> {'met' if ratio['raw'] >= 0.97 else 'MISSED'} "
              f"({ratio['raw']:.1%}, median of 16 paired windows)")
        shards = tmp / "raw"
        if not args.skip_ray:
            print(f"## B. sr-pipeline train on a local Ray instance ({args.epochs} epochs x {args.iters} steps, global batch {cfg.batch_size})")
            print(f"{'workers':>8s} {'samples/s':>10s} {'data wait':>10s} {'wall s':>8s}")
            rows = []
            for workers in (1, 2):
                rate, wait, wall = part_b(shards, tmp / f"home{workers}", workers, args.epochs, args.iters)
                rows.append(rate)
                print(f"{workers:8d} {rate:10.2f} {wait:10.1%} {wall:8.0f}")
            print(f"2 workers vs 1: {rows[1] / rows[0]:.2f}x (2 cores in all: DDP splits the same cores)")
    load1 = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"load avg before/after {load0[0]:.1f}/{load1[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
