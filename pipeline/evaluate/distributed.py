"""`evaluate --workers N`: the benchmark images spread over Ray actors, one GPU each where the
cluster has GPUs (one CPU each otherwise), on a local Ray instance or ``--address``.

Why actors and not tasks: each worker holds the network once (moved to its own device) and
scores image after image; a task per image would ship and load the model every time.

Why the results equal one worker's: every image is scored by the same function
(:func:`pipeline.evaluate.scoring.evaluate_file`), the hash mode and per-image seeds are applied
per image (``ModelUpscaler``), and ``ActorPool.map`` returns results in file order, so the
driver's bookkeeping (rows, summaries, figures, files) runs exactly as for one process. Only
the timings differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import console
from pipeline.console import UserError


class _Worker:
    """One Ray actor: the method's upscalers on this worker's device."""

    def __init__(self, upscalers: dict[int, Any], is_bicubic: bool, repeats: int, label: str,
                 device: str, protocol: str) -> None:
        from pipeline.device import select_device
        from pipeline.evaluate.methods import ModelUpscaler

        dev = select_device(device)
        self.upscalers = {
            s: dataclasses.replace(u, device=dev) if isinstance(u, ModelUpscaler) else u
            for s, u in upscalers.items()
        }
        self.is_bicubic, self.repeats, self.label = is_bicubic, repeats, label
        self.protocol = protocol

    def run(self, bench, scale: int, path: Path):
        from pipeline.evaluate.scoring import evaluate_file

        return evaluate_file(
            self.upscalers[scale], self.is_bicubic, bench, path, scale, self.repeats, self.label,
            self.protocol,
        )


def portable(upscalers: dict[int, Any]) -> dict[int, Any]:
    """Copies to ship to the workers: on the CPU (a CUDA tensor would not load on a CPU-only
    worker; each worker moves the model to its own device) and without the driver's progress
    callbacks (they hold the terminal's progress bar). The driver runs no image itself."""
    from pipeline.evaluate.methods import ModelUpscaler

    return {
        s: dataclasses.replace(u, on_tile=None, device="cpu") if isinstance(u, ModelUpscaler) else u
        for s, u in upscalers.items()
    }


def _actor_options(workers: int) -> dict[str, Any]:
    """One GPU per actor when the cluster has GPUs, else one CPU; refuse what cannot be placed
    (a pending actor would wait forever)."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if gpus:
        if workers > gpus:
            raise UserError(f"--workers {workers}: the Ray cluster has {gpus} GPU(s), one per worker")
        return {"num_gpus": 1, "num_cpus": 0}
    if workers > cpus:
        raise UserError(f"--workers {workers}: the Ray cluster has {cpus} CPU(s), one per worker")
    return {"num_cpus": 1}


@contextmanager
def ray_images(
    upscalers: dict[int, Any], is_bicubic: bool, repeats: int, label: str, workers: int,
    address: str | None, device: str = "auto", protocol: str = "standard",
) -> Iterator[Any]:
    """An ``images(bench, scale, files)`` source for ``run_benchmarks`` backed by Ray actors.

    Connects like ``train`` does (a local instance binds 127.0.0.1 only) and disconnects after;
    the actors end with the context.
    """
    import ray
    from ray.util import ActorPool

    from pipeline.train.cluster import connect

    connect(address, dashboard=False)
    try:
        opts = _actor_options(workers)
        ref = ray.put(portable(upscalers))
        cls = ray.remote(_Worker)
        actors = [
            cls.options(**opts, scheduling_strategy="SPREAD").remote(ref, is_bicubic, repeats, label, device, protocol)
            for _ in range(workers)
        ]
        where = "GPU" if opts.get("num_gpus") else "CPU"
        nodes = len({n["NodeID"] for n in ray.nodes() if n.get("Alive")})
        console.info(f"evaluating on {workers} Ray worker(s), one {where} each ({nodes} node(s))")
        pool = ActorPool(actors)

        def images(bench, scale: int, files: list[Path]):
            try:
                yield from pool.map(lambda a, p: a.run.remote(bench, scale, p), files)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, UserError):  # a bad file: the same line as locally
                    raise UserError(str(exc.cause)) from None
                raise

        yield images
    finally:
        ray.shutdown()
