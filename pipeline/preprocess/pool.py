"""Where the per-image work runs: spawned worker processes on this machine, or Ray tasks
across a cluster (``preprocess --address``). Either way the parent gets results back in input
order (:func:`ordered_results`) and stays the only writer, which is what makes the shards the
same bytes whatever ran the work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pipeline import console
from pipeline.console import UserError
from pipeline.preprocess.subimages import ImageResult, ImageTask, SampleParams, process_image

_NOTE_ENV = "SR_PIPELINE_PREPROCESS_NOTE"  # file where a worker leaves why it could not start
_GUARD_HINT = (
    "the preprocess API was called again while a worker process imported your script "
    "(workers are spawned, which re-imports the main module): put the call under "
    "`if __name__ == \"__main__\":`"
)
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _worker_init(parent: int) -> None:
    """Workers leave Ctrl-C to the parent (which then cancels cleanly) and exit by themselves if
    the parent is killed (a pool worker would otherwise wait on its task queue forever)."""
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def local_pool(jobs: int) -> Iterator[ProcessPoolExecutor]:
    """Spawned workers with one BLAS thread each: `jobs` processes, not jobs x BLAS threads."""
    import multiprocessing
    import tempfile

    saved = {k: os.environ.get(k) for k in (*_BLAS_ENV, _NOTE_ENV)}
    os.environ.update({k: "1" for k in _BLAS_ENV})  # inherited by workers spawned from here on
    fd, note = tempfile.mkstemp(prefix="sr-preprocess-note-")
    os.close(fd)
    os.environ[_NOTE_ENV] = note
    ex = ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init, initargs=(os.getpid(),),
    )
    try:
        yield ex
    except UserError as exc:
        if "a worker process died" in str(exc) and _read_note(note):
            raise UserError(_read_note(note)) from None
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):
            os.unlink(note)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_note(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def refuse_unguarded_reentry() -> None:
    """Fail in one line when a spawned worker re-imports a script that calls the preprocess
    API at module level (no ``__main__`` guard): without this, each worker would start a
    preprocess of its own and the parent would only see its pool die."""
    import multiprocessing

    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    note = os.environ.get(_NOTE_ENV)
    if note:  # tell the parent, whose own error is the one the user reads
        with contextlib.suppress(OSError):
            Path(note).write_text(_GUARD_HINT)
    raise UserError(_GUARD_HINT)


def ordered_results(
    ex: ProcessPoolExecutor, tasks: list[ImageTask], params: SampleParams, window: int
) -> Iterator[ImageResult]:
    """Results in task order with at most `window` images in flight (bounded memory)."""
    pending: dict[int, Future] = {}
    nxt = 0
    for i in range(len(tasks)):
        while nxt < len(tasks) and nxt < i + window:
            pending[nxt] = ex.submit(process_image, tasks[nxt], params)
            nxt += 1
        fut = pending.pop(i)
        try:
            yield fut.result()
        except MemoryError:
            raise UserError(f"{tasks[i].path}: out of memory while preparing this image") from None
        except BrokenProcessPool:
            raise UserError(
                f"{tasks[i].path}: a worker process died while preparing this image (out of memory? try fewer --jobs)"
            ) from None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_jobs(jobs: int) -> int:
    return jobs if jobs > 0 else _cpu_count()


# ---------------------------------------------------------------------------------------------
# Ray tasks across a cluster (`preprocess --address`)
# ---------------------------------------------------------------------------------------------


def _on_node(task: ImageTask, params: SampleParams) -> ImageResult:
    """The Ray task: one image, read from the path the driver sees. A file that is missing on
    this node (but was there for the driver) is a cluster set-up problem, not a bad image, so
    it fails the run even with --skip-bad instead of silently dropping the image."""
    if not os.path.lexists(task.path):
        import socket

        raise FileNotFoundError(
            f"{task.path}: not found on Ray node {socket.gethostname()} (with --address the input images must be "
            "on storage every node mounts at the same path)"
        )
    return process_image(task, params)


class _RayFuture:
    def __init__(self, ref, path: str) -> None:
        self.ref, self.path = ref, path

    def result(self) -> ImageResult:
        import ray

        try:
            return ray.get(self.ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
            if isinstance(cause, FileNotFoundError):
                raise UserError(str(cause)) from None
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise UserError(f"{self.path}: Ray task failed ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})") from None
        except ray.exceptions.RayError as exc:  # a worker or node died, out of memory, ...
            raise UserError(f"{self.path}: Ray task failed ({type(exc).__name__}; out of memory or a node lost?)") from None


class _RayExecutor:
    def __init__(self, fn) -> None:
        self._fn = fn

    def submit(self, fn, task: ImageTask, params: SampleParams) -> _RayFuture:  # noqa: ARG002 - same call as a pool
        return _RayFuture(self._fn.remote(task, params), task.path)


@contextlib.contextmanager
def ray_pool(address: str) -> Iterator[tuple[_RayExecutor, int]]:
    """(executor, task slots): one 1-CPU Ray task per image on the cluster at `address`.

    Only images and their samples cross the network; the driver (this process) keeps ordering
    and writing, so shards, manifest and resume are exactly those of a local run."""
    import ray

    from pipeline.info import check_reachable

    check_reachable(address)  # seconds, not ray.init's long retries
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, runtime_env={"env_vars": {k: "1" for k in _BLAS_ENV}},
                 logging_level="WARNING", log_to_driver=True)
    except Exception as exc:  # ConnectionError, RuntimeError, ... depending on the phase
        raise UserError(f"cannot connect to the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") from None
    try:
        fn = ray.remote(num_cpus=1, max_retries=3)(_on_node)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        console.info(f"preprocessing on the Ray cluster at {address}: {slots} CPU(s) on {nodes} node(s)")
        yield _RayExecutor(fn), slots
    finally:
        ray.shutdown()


@contextlib.contextmanager
def executor(jobs: int, address: str | None) -> Iterator[tuple[object, int]]:
    """(executor, images in flight): local worker processes, or Ray tasks when `address`."""
    if address:
        with ray_pool(address) as (ex, slots):
            yield ex, slots
    else:
        with local_pool(jobs) as ex:
            yield ex, jobs
