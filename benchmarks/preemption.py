"""Work lost to a killed worker: step-level checkpoints vs one checkpoint per epoch (issue 12).

For each checkpoint policy, one `sr-pipeline train` job (local Ray, 2 DDP workers x 1 CPU,
tiny preset, `--max-failures 1`) runs until rank 0 has logged step `--kill-at` (a fraction of
the first epoch), then one Ray Train worker process is SIGKILLed, as when a machine dies. Ray
Train restarts the worker group from the last registered checkpoint; the job finishes. Per
policy:

* **steps redone**: the last step rank 0 had logged before the kill minus the step the
  restarted group resumed from (its "resumed from checkpoint at ... step N" line, or 0 when
  no checkpoint existed yet); the
  steps between the last log point and the kill are not counted, so this is a lower bound;
* **seconds lost**: from the kill until the restarted group logs a step beyond the old group's
  last log point (Ray's restart and the redone steps; the restart cost is in both policies);
* **checkpoint cost**: the same job without a kill, wall time of the whole command, against the
  per-epoch policy (what `--checkpoint-every` costs when nothing goes wrong).

The baseline is the per-epoch policy, what the code did before issue 12
(`--checkpoint-every` = `--iters`). Must run in a loopback-only namespace here (it starts Ray):

    unshare -n sh -c 'ip link set lo up; python benchmarks/preemption.py [--iters 300 --every 30]'
"""

from __future__ import annotations

import os

os.environ.setdefault("SR_PIPELINE_QUIET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tracking_outage import last_step, make_shards  # noqa: E402

BIN = Path(sys.executable).parent
RESUMED = re.compile(r"resumed from checkpoint at epoch \d+, step (\d+)")


def train_workers(session: int) -> list[int]:
    """Pids of the Ray Train worker processes of the job's own Ray instance (its session)."""
    import psutil

    def is_worker(p) -> bool:
        return os.getsid(p.pid) == session and "RayTrainWorker" in " ".join(p.cmdline())

    pids = []
    for p in psutil.process_iter():
        try:
            if is_worker(p) and not is_worker(p.parent()):
                pids.append(p.pid)
        except (ProcessLookupError, PermissionError, AttributeError, psutil.Error):
            continue
    return sorted(pids)


def run(root: Path, shards: Path, name: str, every: int, args, kill_at: int | None) -> dict[str, float]:
    store = root / "store"
    cmd = [str(BIN / "sr-pipeline"), "train", "--shards", str(shards), "--preset", "tiny", "--workers", "2",
           "--cpus-per-worker", "1", "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters),
           "--patch-size", str(args.patch), "--batch-size", "4", "--storage-path", str(store), "--no-dashboard",
           "--run-name", name, "--experiment", "bench-preemption", "--tracking-uri",
           f"sqlite:///{root / 'mlflow.db'}", "--val-max-images", "1", "--no-register", "--max-failures", "1",
           "--checkpoint-every", str(every), "--set", f"log_every={args.log_every}"]
    log_path = root / f"{name}.log"
    journal = store / name / "tracking" / "journal.jsonl"
    out: dict[str, float] = {}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if kill_at is not None:
            while (logged := last_step(journal)) < kill_at:
                if job.poll() is not None:
                    raise SystemExit(f"{name} ended early (rc {job.returncode}): {log_path.read_text()[-3000:]}")
                time.sleep(0.02)
            before = train_workers(job.pid)
            if not before:
                raise SystemExit(f"{name}: no Ray Train worker found to kill")
            os.kill(before[-1], signal.SIGKILL)
            t_kill = time.monotonic()
            out["killed_after"] = logged
            # Back where it was: once Ray Train has replaced the whole worker group (the old
            # group is gone then), the new group's first log point beyond the old one's last.
            while not (now := train_workers(job.pid)) or set(now) & set(before):
                if job.poll() is not None:
                    raise SystemExit(f"{name} ended without a restart: {log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            old_last = last_step(journal)
            while last_step(journal) <= old_last and job.poll() is None:
                time.sleep(0.05)
            out["seconds_lost"] = time.monotonic() - t_kill
        rc = job.wait(timeout=3600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
    out["wall_s"] = time.monotonic() - t0
    if rc != 0:
        raise SystemExit(f"{name} failed (rc {rc}): {log_path.read_text()[-3000:]}")
    if kill_at is not None:
        resumed = RESUMED.findall(log_path.read_text(errors="replace"))
        out["resumed_from"] = int(resumed[-1]) if resumed else 0  # no checkpoint yet: from the start
        out["steps_redone"] = out["killed_after"] - out["resumed_from"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="steps per epoch (the per-epoch policy's interval)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=30, help="--checkpoint-every of the step-level policy")
    ap.add_argument("--kill-at", type=float, default=0.8, help="kill when this fraction of epoch 1 is logged")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--patch", type=int, default=24)
    ap.add_argument("--images", default="/work/shared/data/train/T91")
    args = ap.parse_args()
    if args.every % args.log_every or args.iters % args.log_every:
        raise SystemExit("--every and --iters must be multiples of --log-every")

    root = Path(tempfile.mkdtemp(prefix="sr-preempt-"))
    shards = make_shards(root, Path(args.images))
    kill_at = int(args.iters * args.kill_at) // args.log_every * args.log_every
    policies = {"per epoch (before)": args.iters, f"every {args.every} steps": args.every}
    rows = {}
    for i, (label, every) in enumerate(policies.items()):
        print(f"{label}: killed run ...", flush=True)
        killed = run(root, shards, f"kill{i}", every, args, kill_at)
        print(f"{label}: uninterrupted run ...", flush=True)
        clean = run(root, shards, f"clean{i}", every, args, None)
        rows[label] = (killed, clean)

    import mlflow
    import ray
    import torch

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"job: 2 workers x 1 CPU, tiny preset, global batch 4, patch {args.patch}, {args.epochs} x {args.iters} steps, "
          f"log_every {args.log_every}; one worker SIGKILLed after step {kill_at} was logged")
    print()
    print("| checkpoints | killed after step | resumed from | steps redone | seconds lost | vs per epoch | "
          "uninterrupted wall s | vs per epoch |")
    print("|---|---|---|---|---|---|---|---|")
    base_killed, base_clean = next(iter(rows.values()))
    for label, (killed, clean) in rows.items():
        print(f"| {label} | {killed['killed_after']:.0f} | {killed['resumed_from']} | {killed['steps_redone']:.0f} | "
              f"{killed['seconds_lost']:.1f} | {killed['seconds_lost'] / base_killed['seconds_lost']:.2f}x | "
              f"{clean['wall_s']:.1f} | {clean['wall_s'] / base_clean['wall_s']:.2f}x |")


if __name__ == "__main__":
    main()
