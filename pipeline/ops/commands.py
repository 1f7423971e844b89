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


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
