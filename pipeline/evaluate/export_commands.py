"""CLI command `sr-pipeline export` (see :mod:`pipeline.evaluate.export`).

Thin, like the other stage commands: only typer and the standard library at module level, so
that `sr-pipeline --help` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pipeline.evaluate.commands import _load

Opt = Optional  # noqa: UP045 - typer needs the typing form on 3.10


def export_cmd(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="Our checkpoint, a Ray checkpoint folder or an official state_dict.",
            show_default=False,
        ),
    ],
    out: Annotated[str, typer.Option(help="File to write (a sidecar OUT.json is written too).")],
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="torchscript (works) | onnx | exported-program (refused, with the reason).",
        ),
    ] = "torchscript",
    hash_seed: Annotated[
        int, typer.Option("--hash-seed", help="Seed of the fixed hash projections baked in.")
    ] = 0,
    preset: Annotated[
        Opt[str],
        typer.Option(help="Architecture of an official state_dict: paper | paper128 | tiny."),
    ] = None,
    set_: Annotated[
        Opt[list[str]], typer.Option("--set", help="Override one value: KEY=VALUE.")
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="Use EMA weights when present.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace an existing export.")
    ] = False,
) -> None:
    """Write the model as a file that runs without sr-pipeline (fixed hashing, any image size)."""
    from pathlib import Path

    from pipeline import console
    from pipeline.evaluate import model_source
    from pipeline.evaluate.export import FORMATS, WHY_NOT, export_model

    if out_format not in FORMATS:
        raise console.UserError(f"--format must be one of {', '.join(FORMATS)}, got {out_format!r}")
    if out_format in WHY_NOT:  # before reading a possibly large checkpoint
        raise console.UserError(WHY_NOT[out_format])
    cfg = _load(preset, None, set_, {"checkpoint": checkpoint, "use_ema": ema, "mlflow": False})
    source = model_source.read_source(model_source.checkpoint_file(checkpoint))
    model, desc = model_source.load_model(source, cfg, source.facts.scale)
    dst = Path(out).expanduser()
    meta = export_model(model, dst, out_format, hash_seed, desc, overwrite=overwrite)
    console.info(
        f"wrote {dst} ({out_format}, x{meta['scale']}, rgb_range {meta['rgb_range']:g}, fixed "
        f"hash seed {hash_seed}; max difference from sr-pipeline on a test image "
        f"{meta['check']['max_abs_diff']:.1e}) and {dst.name}.json"
    )
