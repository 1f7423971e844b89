"""Logging an evaluation to MLflow: a new run, or attached to the training run it evaluates.

Metric names follow the project contract, ``eval/<Benchmark>/x<scale>/psnr`` and ``.../ssim``
(plus ``psnr_std``/``ssim_std`` for stochastic repeats), so the training run's page shows its
benchmark numbers next to ``val/psnr``. The per-image CSV, the JSON table and the figures
become artifacts. Tracking never costs the results: every call is retried and a final failure
is a warning (the files are on disk already).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pipeline import console
from pipeline.config import EvalConfig, flatten
from pipeline.console import UserError
from pipeline.tracking import experiment_id, redact_uri, run_url, safe_params, with_retries

if TYPE_CHECKING:
    from pipeline.evaluate.runner import EvalReport


def metric_values(report: EvalReport) -> dict[str, float]:
    """``eval/<Benchmark>/x<s>/psnr|ssim`` (and std for repeats) -> value; non-finite dropped."""
    out: dict[str, float] = {}
    for s in report.outcome.summaries:
        base = f"eval/{s.benchmark}/x{s.scale}"
        values = {"psnr": s.psnr, "ssim": s.ssim}
        if s.repeats > 1:
            values |= {"psnr_std": s.psnr_std, "ssim_std": s.ssim_std}
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


def log_evaluation(cfg: EvalConfig, report: EvalReport, uri: str) -> tuple[str | None, str | None]:
    """Log metrics, params (new runs only) and artifacts; returns (run id, browser link)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in metric_values(report).items()]
    tags = [
        RunTag("sr_pipeline.stage", "evaluate"),
        RunTag("eval.method", report.outcome.method),
        RunTag("eval.source", report.outcome.source[:5000]),
    ]
    if cfg.run_id:
        try:
            run = client.get_run(cfg.run_id)
        except MlflowException as exc:
            raise UserError(
                f"MLflow run {cfg.run_id!r} not found at {redact_uri(uri)}: {exc}"
            ) from None
        run_id = cfg.run_id
        exp_id = run.info.experiment_id
        artifact_path = f"evaluation/{report.out_dir.name}"
        tags = [RunTag(f"eval.{report.out_dir.name}.method", report.outcome.method)]
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
        params = [Param(k, v) for k, v in safe_params(flat).items()]
    with_retries(
        client.log_batch, run_id, metrics=metrics, params=params, tags=tags, what="MLflow log_batch"
    )
    for path in (report.csv_path, report.json_path):
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
        f"logged to MLflow run {run_id}" + (f": {link}" if link else f" ({redact_uri(uri)})")
    )
    return run_id, link
