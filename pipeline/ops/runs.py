"""`sr-pipeline runs`: the store's runs side by side, in a terminal or as JSON.

Why: comparing a few trainings (preset, scale, steps, best validation PSNR) and their benchmark
numbers should not need a browser. The MLflow UI's compare view shows the same keys; this is
the terminal's view of them. Evaluation columns follow the metric layout
``eval/<set>/x<s>/psnr|ssim`` (``psnr_plus``/``ssim_plus`` for self-ensemble, shown as
``DNLAN+``), one column per set and scale found in the listed runs.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.console import UserError

_EVAL_KEY = re.compile(r"^eval/(?P<set>.+)/x(?P<scale>\d+)/(?P<metric>psnr|ssim)(?P<plus>_plus)?$")


@dataclass
class RunRow:
    run_id: str
    name: str
    experiment: str
    kind: str  # train | evaluate | other
    status: str
    start: str  # local time, ISO-like
    duration_s: float | None
    preset: str | None
    scale: str | None
    steps: int | None
    best_val_psnr: float | None
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "Set5 x2[+]" -> {psnr, ssim}


def _kind(run: Any) -> str:
    tags = run.data.tags
    if tags.get("sr_pipeline.stage") == "evaluate":
        return "evaluate"
    if tags.get("mlflow.source.name") == "sr-pipeline train" or "sr.ray_run_name" in tags:
        return "train"
    return "other"


def _evals(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        m = _EVAL_KEY.match(key)
        if m:
            column = f"{m['set']} x{m['scale']}{'+' if m['plus'] else ''}"
            out.setdefault(column, {})[m["metric"]] = value
    return dict(sorted(out.items()))


def _last_step(client: Any, run_id: str, key: str) -> tuple[int | None, float | None]:
    """(largest step, largest value) of a metric's history; (None, None) when absent."""
    history = client.get_metric_history(run_id, key)
    if not history:
        return None, None
    return max(m.step for m in history), max(m.value for m in history)


def collect(tracking_uri: str, experiments: list[str] | None = None, limit: int = 50) -> list[RunRow]:
    """The newest ``limit`` runs of the given experiments (default: all active ones)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_reachable

    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    check_reachable(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    if experiments:
        exps = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise UserError(f"--experiment {name!r}: no such experiment in the store")
            exps.append(exp)
    else:
        exps = client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    if not names:
        return []
    runs = client.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    now_ms = time.time() * 1000
    for run in runs:
        info, data = run.info, run.data
        kind = _kind(run)
        steps = best = None
        if kind == "train":
            steps, _ = _last_step(client, info.run_id, "train/loss")
            _, best = _last_step(client, info.run_id, "val/psnr")
        end = info.end_time or (now_ms if info.status == "RUNNING" else None)
        params = data.params
        rows.append(RunRow(
            run_id=info.run_id,
            name=info.run_name or info.run_id[:8],
            experiment=names.get(info.experiment_id, info.experiment_id),
            kind=kind,
            status=info.status,
            start=time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000)) if info.start_time else "",
            duration_s=round((end - info.start_time) / 1000, 1) if end and info.start_time else None,
            preset=params.get("preset"),
            scale=params.get("model.scale") or params.get("scales"),
            steps=steps,
            best_val_psnr=best,
            evals=_evals(data.metrics),
        ))
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(rows: list[RunRow]) -> str:
    """A plain-text table (no colour codes): one line per run, one column per set and scale."""
    columns = sorted({c for r in rows for c in r.evals})
    head = ["run", "experiment", "kind", "preset", "scale", "steps", "best val/psnr",
            *(f"{c} PSNR/SSIM" for c in columns), "status", "duration"]  # fmt: skip
    table = []
    for r in rows:
        cells = [
            r.name, r.experiment, r.kind, r.preset or "-", r.scale or "-",
            "-" if r.steps is None else str(r.steps),
            "-" if r.best_val_psnr is None else f"{r.best_val_psnr:.3f}",
        ]  # fmt: skip
        for c in columns:
            v = r.evals.get(c)
            cells.append(
                "-" if not v else f"{v.get('psnr', float('nan')):.3f}/{v.get('ssim', float('nan')):.4f}"
            )
        cells += [r.status, _duration(r.duration_s)]
        table.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(head), "  ".join("-" * w for w in widths), *(line(c) for c in table)]
    note = "(PSNR/SSIM: Y channel, shave = scale; '+' = self-ensemble, DNLAN+)" if columns else ""
    return "\n".join(out) + (f"\n{note}" if note else "")


def as_json(rows: list[RunRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
