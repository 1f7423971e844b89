"""CLI commands of the operations area (`sr-pipeline ui`); registered by pipeline/cli.py.

Only typer and the standard library at import time: `sr-pipeline --help` must stay instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def ui(
    port: Annotated[int, typer.Option(help="Port to serve the UI on.")] = 5000,
    host: Annotated[
        str,
        typer.Option(help="Interface to bind. The UI has no authentication: keep 127.0.0.1 unless you know why not."),
    ] = "127.0.0.1",
    tracking_uri: Annotated[
        Optional[str],  # noqa: UP045 - typer needs the typing form on 3.10
        typer.Option(
            "--tracking-uri",
            help="Store to browse (default: MLFLOW_TRACKING_URI, else the local store train/evaluate use). "
            "An http(s) server is only printed: it already serves its own UI.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Server worker processes (1 is plenty for one user).")] = 1,
) -> None:
    """Browse runs in the MLflow UI, over the same store `train`, `evaluate` and `demo` use."""
    from pipeline.ops.ui import serve

    code = serve(host=host, port=port, tracking_uri=tracking_uri, workers=workers, echo=typer.echo)
    if code:
        raise typer.Exit(code)


def demo(
    data_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--data-dir", help="Use a real DIV2K root (DIV2K_train_HR/, DIV2K_valid_HR/) instead of the bundled photos."),
    ] = None,
    benchmark_dir: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--benchmark-dir", help="Folder holding benchmark/Set5|Set14/HR to evaluate on too (default: $SR_PIPELINE_HOME/data when present)."),
    ] = None,
    scale: Annotated[int, typer.Option(help="Upscaling factor (2, 3 or 4).")] = 2,
    workers: Annotated[int, typer.Option(help="Ray DDP workers (CPU).")] = 2,
    epochs: Annotated[int, typer.Option(help="Epochs of --iters-per-epoch steps (LR halved at 3/4).")] = 10,
    iters_per_epoch: Annotated[Optional[int], typer.Option("--iters-per-epoch", help="Steps per epoch (default: the tiny preset's).")] = None,  # noqa: UP045
    workdir: Annotated[Optional[str], typer.Option(help="Where photos, shards and evaluation files go (default: $SR_PIPELINE_HOME/demo).")] = None,  # noqa: UP045
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Training run name (default: demo-<time>).")] = None,  # noqa: UP045
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "demo",
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store `sr-pipeline ui` opens).")] = None,  # noqa: UP045
    address: Annotated[Optional[str], typer.Option(help="Existing Ray cluster (default: a local instance).")] = None,  # noqa: UP045
    json_path: Annotated[Optional[str], typer.Option("--json", help="Also write the outcome (run id, PSNRs) as JSON here.")] = None,  # noqa: UP045
) -> None:
    """The whole pipeline end to end on bundled photos, on CPU, in a few minutes: preprocess ->
    train (Ray, 2 workers) -> evaluate against bicubic -> MLflow."""
    import json

    from pipeline.config import SCALES
    from pipeline.console import UserError
    from pipeline.ops.demo import DemoOptions, as_dict, render, run_demo

    if scale not in SCALES:
        raise UserError(f"--scale must be 2, 3 or 4 (got {scale})")
    opts = DemoOptions(
        workdir=workdir, data_dir=data_dir, benchmark_dir=benchmark_dir, scale=scale, workers=workers,
        epochs=epochs, iters_per_epoch=iters_per_epoch, run_name=run_name, experiment=experiment,
        tracking_uri=tracking_uri, address=address,
    )
    result = run_demo(opts)
    if json_path:
        from pipeline.imageio import atomic_write_bytes

        atomic_write_bytes(json_path, json.dumps(as_dict(result), indent=2).encode())
    typer.echo(render(result))


def runs(
    tracking_uri: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--tracking-uri", help="Store to list (default: MLFLOW_TRACKING_URI, else the local store)."),
    ] = None,
    experiment: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--experiment", "-e", help="Only this experiment (repeatable; default: all)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Newest N runs.")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout instead of the table.")] = False,
) -> None:
    """The store's runs side by side: preset, scale, steps, best val/psnr, benchmark PSNR/SSIM."""
    import json

    from pipeline.ops.runs import as_json, collect, render
    from pipeline.tracking import redact_uri, resolve_uri

    uri = resolve_uri(tracking_uri)
    rows = collect(uri, experiment, limit)
    if json_out:
        typer.echo(json.dumps(as_json(rows), indent=2))
    elif not rows:
        typer.echo(f"no runs in {redact_uri(uri)}")
    else:
        typer.echo(render(rows))


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
    app.command("demo")(demo)
    app.command("runs")(runs)
