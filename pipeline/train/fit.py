"""Running the TorchTrainer from the driver: build it, run it, stop it cleanly on Ctrl-C.

A same ``RunConfig(name, storage_path)`` resumes from the last checkpoint;
``FailureConfig(max_failures)`` restarts a dead worker group. The driver shows progress from
the run's MLflow metrics (:func:`training_progress`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import console
from pipeline.config import TrainConfig, to_dict
from pipeline.train import storage
from pipeline.train.job import JobSpec
from pipeline.train.sender import bounded


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during fit(): the workers were asked to stop (or abandoned); checkpoints are kept."""


def fit(cfg: TrainConfig, job: JobSpec, run_name: str, storage_path: str, use_gpu: bool, backend: str):
    """Build the TorchTrainer and run it (a rerun with the same name resumes).

    Ctrl-C (and SIGTERM, see :func:`sigterm_as_interrupt`): the first one writes a stop
    request into the run's storage; the workers see it
    within seconds, leave after the same step on every rank and return (the last checkpoint
    stays the one to resume from), and :class:`Interrupted` is raised once fit() is back. A
    second one stops waiting at once.

    Why fit() runs in a thread: in the main thread, Ray Train installs its own SIGINT handler
    (it aborts the run, then exits the process on the third Ctrl-C, without saying what to do
    next). Python lets only the main thread install signal handlers, so from another thread
    Ray cannot, and Ctrl-C reaches this function as KeyboardInterrupt, through public APIs
    only (no Ray internals to override).
    """
    import threading

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "job": dataclasses.asdict(job)},
        torch_config=TorchConfig(backend=backend, timeout_s=cfg.dist_timeout_s),
        scaling_config=scaling_config(cfg, use_gpu, resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray's per-report INFO lines drown ours
        ),
    )
    ended: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            ended["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            ended["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="sr-pipeline-fit", daemon=True).start()
    asked = False
    with sigterm_as_interrupt() as received:
        # Wait in time.sleep, not Thread.join: a Ctrl-C that interrupts join() can leave the thread
        # marked as stopped while it still runs (CPython's bpo-45274 handling), losing the result.
        while not done.is_set():
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                if asked:
                    raise Interrupted() from None
                asked = True
                request_stop(job.run_dir, "SIGTERM" if received else "Ctrl-C")
                received.clear()
    if "error" in ended:
        raise ended["error"]
    result = ended["result"]
    if asked and (result.metrics or {}).get("epoch") != cfg.epochs:  # not finished before it stopped
        raise Interrupted()
    return result


def scaling_config(cfg: TrainConfig, use_gpu: bool, resources: dict[str, float]):
    """Ray Train's ScalingConfig; an elastic group checks for room to grow every ``elastic_check_s``."""
    from ray.train import ScalingConfig

    workers = workers_spec(cfg)
    extra = {"elastic_resize_monitor_interval_s": float(cfg.elastic_check_s)} if isinstance(workers, tuple) else {}
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources, **extra)


def workers_spec(cfg: TrainConfig) -> int | tuple[int, int]:
    """Ray Train's ``num_workers``: a (min, max) pair makes the worker group elastic.

    Elastic: Ray Train starts with as many workers as the cluster holds (at least min), and
    after a worker group fails (a node left) restarts with as many as are left, from the last
    checkpoint; while healthy it looks for room to grow every ``elastic_check_s`` (a minute). The global batch stays
    ``batch_size`` whatever the world size (each rank takes its share, see the loop).
    """
    return (cfg.workers, cfg.workers_max) if cfg.workers_max > cfg.workers else cfg.workers


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While fit() waits, SIGTERM (a scheduler's or a spot node's stop) acts like Ctrl-C.

    The handler raises KeyboardInterrupt in the main thread, so the first SIGTERM asks the
    workers to stop at their next log point, write a checkpoint and exit, and a second one
    stops waiting. Yields a list that holds the signal number while one is being handled.
    Outside the main thread (a library caller) nothing is installed.
    """
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_term(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def request_stop(run_dir: str, why: str = "Ctrl-C") -> None:
    """Ask the workers to stop (see :func:`fit`); if the request cannot be written, stop now."""
    try:
        storage.write_json(storage.join(run_dir, storage.STOP_REQUEST_FILE), {"requested": time.time()})
    except Exception as exc:
        console.warn(f"cannot write the stop request ({' '.join(str(exc).split())[:200]}): stopping at once")
        raise Interrupted() from None
    console.info(f"stopping ({why}): the workers stop at their next log point, write a checkpoint and exit; "
                 f"{why} again to stop at once")


@contextmanager
def training_progress(tracking_uri: str, run_id: str, epochs: int, iters: int) -> Iterator[None]:
    """A progress bar in the driver, fed from the run's latest ``train/epoch`` metric.

    The workers log to MLflow; polling the run every few seconds keeps the driver free of any
    coupling to Ray Train internals (and shows resumed runs at their real position).
    """
    import threading

    from mlflow.tracking import MlflowClient

    stop = threading.Event()
    client = MlflowClient(tracking_uri=tracking_uri)
    with console.progress_bar("training", total=epochs * iters, unit="step") as bar:

        def update() -> None:
            try:
                metrics = client.get_run(run_id).data.metrics
            except Exception:  # a tracking hiccup only delays the bar
                return
            step = min(round(metrics.get("train/epoch", 0.0) * iters), epochs * iters)
            if step > bar.done:
                bar.advance(step - bar.done)

        def poll() -> None:
            while not stop.wait(5.0):
                update()

        thread = threading.Thread(target=poll, name="train-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            # A hung tracking server must not hold up the end: the poller is a daemon, and the
            # last update gets a few seconds (the bar then stays where it was).
            thread.join(timeout=1)
            if not thread.is_alive():
                bounded(update, 5.0)
