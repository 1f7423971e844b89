"""The `evaluate` command's body: check every input, run the loop, keep and log the results.

:func:`prepare` resolves and checks everything before the long loop (benchmark folders, every
file the loop will read, the tracking server and run, the method), so bad input fails in
seconds; :func:`evaluate` then runs :func:`pipeline.evaluate.runner.run_benchmarks` in this
process or over Ray actors, keeps results on disk as they come (and the partial ones after a
failure), and writes the report and logs to MLflow. Kept apart from the loop, which knows
nothing of configs, files on disk or MLflow.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import console, defaults
from pipeline.config import EvalConfig
from pipeline.evaluate.benchmarks import (
    Benchmark,
    benchmark_files,
    check_files,
    resolve_benchmarks,
)
from pipeline.evaluate.methods import Method, method_from_config
from pipeline.evaluate.results import EvalReport
from pipeline.evaluate.runner import ImageSource, local_images, run_benchmarks

if TYPE_CHECKING:
    from pipeline.evaluate.report import ResultWriter


@dataclass
class Prepared:
    """Everything resolved and checked before the long loop starts, so bad input fails in
    seconds: the benchmark folders; every HR file and every shipped LR file the run will read
    (present, image header readable, LR exactly HR/scale, large enough to score; headers only,
    no pixels decoded); the tracking server and the run given by ``--run-id``; the method.

    A file whose header is fine but whose pixel data is truncated can only fail when the loop
    decodes it; :func:`evaluate` then keeps the results of the images before it.
    """

    benchmarks: list[Benchmark]
    method: Method
    tracking_uri: str | None
    out_dir: Path
    images: int = 0  # images the loop will evaluate per scale, all benchmarks together


def _default_out_dir(method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return defaults.home() / "evaluations" / f"{stamp}-{method}"


def check_inputs(benchmarks: list[Benchmark], scales: list[int], max_images: int = 0) -> int:
    """Check every file the loop will read (see :class:`Prepared`); returns the image count."""
    work = [(b, p) for b in benchmarks for p in benchmark_files(b, max_images)]
    for bench, path in console.track(work, "checking benchmark files", unit="img"):
        check_files(bench, path, scales)
    return len(work)


def prepare(cfg: EvalConfig, workdir: Path) -> Prepared:
    """Resolve benchmarks and tracking first (cheap checks), then the method to evaluate, then
    every input file for the method's scales (which a checkpoint decides)."""
    benches = resolve_benchmarks(cfg.benchmarks, cfg.data_dir or defaults.data_dir())
    uri = None
    if cfg.mlflow or cfg.run_id or cfg.model_uri:
        from pipeline.tracking import check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking_uri)
        check_reachable(uri)
        if cfg.run_id and cfg.checkpoint and cfg.mlflow:
            # results go to that run: make sure it exists before hours of evaluation
            # (without --checkpoint the run's model is downloaded, which checks it anyway)
            from pipeline.evaluate.model_source import require_run

            require_run(cfg.run_id, uri)
    method = method_from_config(cfg, workdir, uri)
    images = check_inputs(benches, method.scales, cfg.max_images)
    out_dir = Path(cfg.out).expanduser() if cfg.out else _default_out_dir(method.name)
    return Prepared(benches, method, uri, out_dir, images)


def evaluate(cfg: EvalConfig, flush_seconds: float = 30.0) -> EvalReport:
    """Run the whole `evaluate` command: resolve and check, loop, write files, log to MLflow.

    Results are kept on disk while the loop runs (:class:`report.ResultWriter`); when the loop
    fails, the images scored so far are written before the error propagates, with a warning
    saying where. The ``--json`` table, which scripts take as the complete answer, is written
    only by a complete run, and nothing is logged to MLflow for a failed one.
    """
    from pipeline.evaluate import report

    with tempfile.TemporaryDirectory(prefix="sr-eval-") as tmp:
        prep = prepare(cfg, Path(tmp))
        m = prep.method
        console.info(
            f"evaluating {m.source} on {', '.join(b.name for b in prep.benchmarks)} "
            f"at x{', x'.join(map(str, m.scales))}"
            + (f" (tiling {cfg.tiling}, hash {cfg.hash})" if m.name != "bicubic" else "")
            + (" with the official repository's protocol" if cfg.protocol == "official" else "")
        )
        from pipeline.evaluate import provenance

        prov = provenance.build(cfg, m)
        writer = report.ResultWriter(prep.out_dir, flush_seconds, provenance=prov)
        repeats = cfg.repeats if m.name != "bicubic" else 1
        try:
            with _image_source(cfg, m, repeats) as images:
                outcome = run_benchmarks(
                    m.upscalers,
                    m.name,
                    m.label,
                    prep.benchmarks,
                    m.scales,
                    repeats=repeats,
                    max_images=cfg.max_images,
                    figure_images=cfg.figure_images,
                    save_dir=prep.out_dir / "images" if cfg.save_images else None,
                    on_update=writer.update,
                    images=images,
                )
        except BaseException:
            _keep_partial(writer, prep.images * len(m.scales))
            raise
        outcome.source = m.source
        outcome.model_config = m.model_config
        outcome.step = m.step
        outcome.provenance = prov
        written = writer.write(outcome, figures=True)
        if cfg.json_path:
            report.write_json(Path(cfg.json_path).expanduser(), outcome.summaries, prov)
        result = EvalReport(
            outcome, prep.out_dir, written.csv_path, written.json_path, written.figure_paths
        )
        if prep.tracking_uri is not None and cfg.mlflow:
            from pipeline.evaluate.mlflow_log import log_evaluation

            result.run_id, result.run_link = log_evaluation(cfg, result, prep.tracking_uri)
        return result


@contextlib.contextmanager
def _image_source(cfg: EvalConfig, m: Method, repeats: int) -> Iterator[ImageSource]:
    """This process for one worker; Ray actors for ``--workers N`` (N > 1)."""
    if cfg.workers <= 1:
        yield local_images(m.upscalers, m.name == "bicubic", repeats, m.label, cfg.protocol)
        return
    from pipeline.evaluate.distributed import ray_images

    with ray_images(
        m.upscalers, m.name == "bicubic", repeats, m.label, cfg.workers, cfg.address, cfg.device,
        cfg.protocol,
    ) as images:
        yield images


def _keep_partial(writer: ResultWriter, total: int) -> None:
    """After a failure: write what was scored (if anything) and say where, in one line."""
    done = writer.latest
    if done is None or not done.rows:
        return
    try:
        writer.write(done, figures=True)
    except Exception as exc:  # the original error matters more than this one
        console.warn(f"could not keep the partial results in {writer.out_dir}: {exc}")
        return
    pairs = len(done.summaries)
    console.warn(
        f"evaluation stopped after {done.images_done} of {total} images; their scores are in "
        f"{writer.csv_path} ({pairs} complete benchmark/scale pair{'' if pairs == 1 else 's'} "
        f"in {writer.json_path.name})"
    )
