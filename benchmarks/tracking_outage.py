"""Training speed while the tracking server is healthy, closed, frozen, and back (issue 12).

One `sr-pipeline train` job (local Ray, 2 DDP workers on CPU, tiny preset, one long epoch so no
validation interrupts the phases) logs to a real `mlflow server` through a small TCP proxy
run here. After a warm-up the benchmark switches the server's state every `--phase-steps`
steps, watching rank 0's journal, in `--rounds` cycles of:

1. healthy   - the baseline of this same run (from round 2 on, the previous recovery);
2. closed    - the proxy stops listening and drops its connections (connection refused);
3. frozen    - the proxy forwards, the server is SIGSTOPped (accepts, never answers);
4. recovered - SIGCONT, the proxy listens again.

Per phase: the median of the job's own ``train/samples_per_s`` (each point a window of
``log_every`` steps; the first window after a switch is left out) and the wall-clock rate from
the journal's timestamps; each as a ratio to the healthy phase of the same round. Target: every phase within 2 %
of healthy. At the end: whether MLflow holds every step the journal holds, once.

Must run in a loopback-only namespace here (it starts Ray):

    unshare -n sh -c 'ip link set lo up; python benchmarks/tracking_outage.py [--phase-steps 400 --rounds 2]'
"""

from __future__ import annotations

import os

os.environ.setdefault("SR_PIPELINE_QUIET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

BIN = Path(sys.executable).parent
PHASES = ("healthy", "closed", "frozen", "recovered")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """TCP forwarder 127.0.0.1:port -> the server; `close()` refuses connections until `open()`."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def start_server(root: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start")


def make_shards(root: Path, images: Path) -> Path:
    src = root / "images"
    src.mkdir()
    for name in sorted(images.glob("*.png"))[:12]:
        (src / name.name).symlink_to(name)
    out = root / "shards"
    subprocess.run([str(BIN / "sr-pipeline"), "preprocess", "--images", str(src), "--holdout", "2", "--out",
                    str(out), "--scales", "2", "--crop", "48", "--step", "48", "--shard-samples", "40", "-j", "1"],
                   check=True, capture_output=True)
    return out


def journal_records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def last_step(path: Path) -> int:
    return max([0] + [r["step"] for r in journal_records(path) if r.get("key") == "train/loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase-steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="cycles of the four phases (drift on a shared machine shows as round-to-round spread)")
    ap.add_argument("--images", default="/work/shared/data/train/T91")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sr-outage-"))
    server, port = start_server(root)
    proxy = Proxy(port)
    uri = f"http://127.0.0.1:{proxy.port}"
    shards = make_shards(root, Path(args.images))
    schedule = [(r, phase) for r in range(args.rounds) for phase in PHASES]
    steps = args.warmup + len(schedule) * args.phase_steps
    store = root / "store"
    cmd = [str(BIN / "sr-pipeline"), "train", "--shards", str(shards), "--preset", "tiny", "--workers", "2",
           "--cpus-per-worker", "1", "--epochs", "1", "--iters-per-epoch", str(steps), "--patch-size", "24",
           "--batch-size", "4", "--storage-path", str(store), "--no-dashboard", "--run-name", "outage",
           "--experiment", "bench-outage", "--tracking-uri", uri, "--val-max-images", "1", "--no-register",
           "--set", f"log_every={args.log_every}", "--set", "tracking_drain_s=20"]
    journal = store / "outage" / "tracking" / "journal.jsonl"
    bounds: dict[tuple[int, str], tuple[int, int]] = {}
    frozen = False
    t0 = time.monotonic()
    log = open(root / "train.log", "w")  # noqa: SIM115
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for i, (rnd, phase) in enumerate(schedule):
            start = args.warmup + i * args.phase_steps
            while last_step(journal) < start:
                if job.poll() is not None:
                    raise SystemExit(f"the job ended early (rc {job.returncode}): {(root / 'train.log').read_text()[-3000:]}")
                time.sleep(0.05)
            if phase == "healthy" and rnd > 0:
                pass  # the previous round's "recovered" state goes on
            elif phase == "closed":
                proxy.close()
            elif phase == "frozen":
                proxy.open()
                os.killpg(server.pid, signal.SIGSTOP)
                frozen = True
            elif phase == "recovered":
                os.killpg(server.pid, signal.SIGCONT)
                frozen = False
            bounds[(rnd, phase)] = (last_step(journal), start + args.phase_steps)
            print(f"{time.monotonic() - t0:6.1f}s step {bounds[(rnd, phase)][0]}: round {rnd + 1} {phase}", flush=True)
        rc = job.wait(timeout=1800)
    finally:
        if frozen:
            os.killpg(server.pid, signal.SIGCONT)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
    elapsed = time.monotonic() - t0

    records = journal_records(journal)
    rate = {r["step"]: r["value"] for r in records if r.get("key") == "train/samples_per_s"}
    stamp = {r["step"]: r["ts"] for r in records if r.get("key") == "train/loss"}
    rows: dict[tuple[int, str], tuple[list[float], float]] = {}
    for key, (first, end) in bounds.items():
        # leave out the window the switch happened in
        window = [s for s in sorted(rate) if first + args.log_every < s <= end]
        seconds = (stamp[window[-1]] - stamp[window[0]]) / 1000.0 if len(window) > 1 else 0.0
        wall = 4 * (window[-1] - window[0]) / seconds if seconds > 0 else float("nan")
        rows[key] = ([rate[s] for s in window], wall)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    run = client.search_runs([client.get_experiment_by_name("bench-outage").experiment_id])[0]
    in_mlflow = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    in_journal = sorted(stamp)
    tail = [line for line in (root / "train.log").read_text().splitlines() if "warning" in line or "MLflow" in line]

    import mlflow
    import ray
    import torch

    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"job: 2 workers x 1 CPU, tiny preset, global batch 4, patch 24, {steps} steps, log_every {args.log_every}; "
          f"exit code {rc}, {elapsed:.0f} s in all")
    print()
    print("| round | server | steps | samples/s (median of windows) | vs healthy (same round) | wall samples/s | vs healthy |")
    print("|---|---|---|---|---|---|---|")
    for rnd in range(args.rounds):
        base = statistics.median(rows[(rnd, "healthy")][0])
        base_wall = rows[(rnd, "healthy")][1]
        for phase in PHASES:
            values, wall = rows[(rnd, phase)]
            med = statistics.median(values)
            first, end = bounds[(rnd, phase)]
            print(f"| {rnd + 1} | {phase} | {first}-{end} ({len(values)} windows) | {med:.2f} | "
                  f"{100 * med / base:.1f} % | {wall:.2f} | {100 * wall / base_wall:.1f} % |")
    pooled = {phase: statistics.median(v for r in range(args.rounds) for v in rows[(r, phase)][0]) for phase in PHASES}
    print()
    print("all rounds: " + ", ".join(f"{phase} {pooled[phase]:.2f} ({100 * pooled[phase] / pooled['healthy']:.1f} %)"
                                      for phase in PHASES))
    print()
    print(f"train/loss steps: journal {len(in_journal)}, MLflow {len(in_mlflow)} "
          f"(duplicates: {len(in_mlflow) - len(set(in_mlflow))}, missing: {len(set(in_journal) - set(in_mlflow))}, "
          f"in step order: {in_mlflow == sorted(in_mlflow)})")
    for line in tail[-6:]:
        print(f"  log: {line.strip()[:220]}")
    proxy.close()
    os.killpg(server.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
