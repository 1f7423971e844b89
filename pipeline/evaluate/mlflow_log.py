"""Logging an evaluation to MLflow: a new run, or attached to the training run it evaluates.

Metric names follow the project contract, ``eval/<Benchmark>/x<scale>/psnr`` and ``.../ssim``
(plus ``psnr_std``/``ssim_std`` for stochastic repeats), so the training run's page shows its
benchmark numbers next to ``val/psnr``. The per-image CSV, the JSON table and the figures
become artifacts. Tracking never costs the results: the files are on disk before anything is
logged, and every logging call is retried, a final failure being a warning. (A ``--run-id`` that
does not exist is an error, but it is caught before the evaluation starts.)

Steps: an evaluation's metrics are logged at the training step of the evaluated weights when the
checkpoint records it (our trainer's checkpoints and best model do), so ``eval/...`` lines up
with ``val/psnr`` on the run's step axis; otherwise (official files, bicubic) at step 0. When
that step already holds a value of one of the metrics being logged (the same checkpoint
evaluated again, e.g. with another tiling or self-ensemble, or a second official file), the
evaluation goes to the next free step instead: one past the largest step those metrics have.
So every evaluation is its own point in the history, never a second value at one step (unless
reading the history fails, which is warned about), and one evaluation's metrics share one step.
The step used is recorded in the tag ``eval.step`` (new runs) or ``eval.<out folder>.step`` (a
training run given by ``--run-id``; its artifacts go to ``evaluation/<out folder>``, so
re-using an output folder name for the same run replaces that name's tags and files, while
the metrics still get their own step). MLflow's run page shows each metric's value at its
largest step, i.e. the evaluation of the latest-trained weights (or the latest re-evaluation),
not necessarily the newest evaluation; the full history is in the metric's chart. Folder and
benchmark names are made key-safe with :func:`key_part`.

Self-ensemble ("DNLAN+") results are logged as ``psnr_plus``/``ssim_plus`` beside ``psnr``/
``ssim``: never the same key as a plain evaluation, yet in the same ``eval/<set>/x<s>/`` group,
so MLflow's compare view lines runs up by benchmark and scale. How each evaluation was made
(:mod:`pipeline.evaluate.provenance`) is logged as ``provenance.*`` params (new runs) and tags
(``eval.provenance.*`` on a new run, ``eval.<out folder>.provenance.*`` on a training run), and
as the ``provenance.json`` artifact.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING

from pipeline import console
from pipeline.config import EvalConfig, flatten
from pipeline.tracking import experiment_id, redact_uri, run_url, safe_params, with_retries

if TYPE_CHECKING:
    from pipeline.evaluate.results import EvalReport


def key_part(name: str) -> str:
    """``name`` made safe as one component of an MLflow metric or tag key.

    Benchmark and output folder names come from the user's folders; MLflow refuses a whole
    batch for one key with, e.g., a parenthesis in it, which would lose every metric of the
    evaluation. Characters outside letters, digits, ``_ - . space`` become ``_``.
    """
    safe = re.sub(r"[^\w.\- ]", "_", name)
    return safe if safe.strip(". ") else "_"


def metric_values(report: EvalReport) -> dict[str, float]:
    """``eval/<Benchmark>/x<s>/psnr|ssim`` (and std for repeats) -> value; non-finite dropped."""
    out: dict[str, float] = {}
    plus = "_plus" if (report.outcome.provenance or {}).get("self_ensemble") else ""
    for s in report.outcome.summaries:
        base = f"eval/{key_part(s.benchmark)}/x{s.scale}"
        values = {f"psnr{plus}": s.psnr, f"ssim{plus}": s.ssim}
        if s.repeats > 1:
            values |= {f"psnr{plus}_std": s.psnr_std, f"ssim{plus}_std": s.ssim_std}
        for name, value in values.items():
            if math.isfinite(value):
                out[f"{base}/{name}"] = float(value)
    return out


def run_params(cfg: EvalConfig, report: EvalReport) -> dict[str, str]:
    """The flattened config, with ``model.*`` replaced by the network actually evaluated.

    ``cfg.model`` is only the preset used for official state_dicts; our checkpoints carry their
    own config, and bicubic has none, so logging ``cfg.model`` as-is would mislabel the run.
    """
    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith("model.")}
    config = report.outcome.model_config
    if config is not None:
        flat.update({f"model.{k}": str(v) for k, v in config.items()})
    else:
        flat.pop("preset", None)
    return flat


def choose_step(client, run_id: str | None, keys: list[str], trained_step: int | None) -> int:
    """The step to log this evaluation at (see the module docstring)."""
    want = trained_step if trained_step is not None else 0
    if run_id is None:  # a new run has no history
        return want
    taken: set[int] = set()
    for key in keys:
        history = with_retries(
            client.get_metric_history, run_id, key, what=f"MLflow history of {key}"
        )
        taken.update(int(m.step) for m in history or [])
    return want if want not in taken else max(taken) + 1


def log_evaluation(cfg: EvalConfig, report: EvalReport, uri: str) -> tuple[str | None, str | None]:
    """Log metrics, params (new runs only) and artifacts; returns (run id, browser link)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate.provenance import SIDECAR, as_strings

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    values = metric_values(report)
    prov = as_strings(report.outcome.provenance or {})
    tags = [
        RunTag("sr_pipeline.stage", "evaluate"),
        RunTag("eval.method", report.outcome.method),
        RunTag("eval.source", report.outcome.source[:5000]),
    ]
    if cfg.run_id:
        # its existence was checked before the evaluation (driver.prepare); a failure now is the
        # server's, and costs only the logging
        run = with_retries(client.get_run, cfg.run_id, what="MLflow get_run")
        if run is None:
            return None, None
        run_id = cfg.run_id
        exp_id = run.info.experiment_id
        artifact_path = f"evaluation/{key_part(report.out_dir.name)}"
        step = choose_step(client, run_id, list(values), report.outcome.step)
        prefix = f"eval.{key_part(report.out_dir.name)}"
        tags = [
            RunTag(f"{prefix}.method", report.outcome.method),
            RunTag(f"{prefix}.step", str(step)),
            *(RunTag(f"{prefix}.{k}", v[:5000]) for k, v in prov.items()),
        ]
        params: list[Param] = []  # a training run's params are its own; never overwrite them
    else:
        exp_id = experiment_id(cfg.experiment, uri)
        name = f"eval-{report.outcome.method}-{report.out_dir.name}"
        run = with_retries(client.create_run, exp_id, run_name=name, what="MLflow create_run")
        if run is None:
            return None, None
        run_id = run.info.run_id
        artifact_path = "evaluation"
        flat = run_params(cfg, report)
        flat["tracking_uri"] = redact_uri(uri)
        flat.update(prov)
        params = [Param(k, v) for k, v in safe_params(flat).items()]
        step = choose_step(client, None, list(values), report.outcome.step)
        tags.append(RunTag("eval.step", str(step)))
        tags += [RunTag(f"eval.{k}", v[:5000]) for k, v in prov.items()]
    metrics = [Metric(k, v, now, step) for k, v in values.items()]
    with_retries(
        client.log_batch, run_id, metrics=metrics, params=params, tags=tags, what="MLflow log_batch"
    )
    sidecar = report.out_dir / SIDECAR
    for path in (report.csv_path, report.json_path, *([sidecar] if sidecar.is_file() else [])):
        with_retries(
            client.log_artifact,
            run_id,
            str(path),
            artifact_path,
            what=f"MLflow upload of {path.name}",
        )
    if report.figure_paths:
        folder = report.figure_paths[0].parent
        with_retries(
            client.log_artifacts,
            run_id,
            str(folder),
            f"{artifact_path}/figures",
            what="MLflow upload of figures",
        )
    if not cfg.run_id:
        with_retries(client.set_terminated, run_id, what="MLflow set_terminated")
    link = run_url(uri, exp_id, run_id)
    console.info(
        f"logged to MLflow run {run_id} at step {step}"
        + (f": {link}" if link else f" ({redact_uri(uri)})")
    )
    return run_id, link
