"""CLI commands of the evaluate stage: `sr-pipeline evaluate` and `sr-pipeline upscale`.

Thin: parse options into an :class:`pipeline.config.EvalConfig` and call the library. Only
typer, the standard library and pipeline.config are imported at module level, so that
`sr-pipeline --help` stays instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Opt = Optional  # noqa: UP045 - typer needs the typing form on 3.10

_TILING_HELP = (
    "reference (the paper's recursive chop) | overlap (bounded memory) | none (whole image)"
)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _load(preset, config, set_, overrides):
    from pipeline.config import EvalConfig, load_config, parse_sets

    merged = dict(parse_sets(set_))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if preset is not None:
        merged["official_from_shapes"] = False  # an explicit preset is imposed, not inferred
    return load_config(EvalConfig, preset=preset, yaml_path=config, overrides=merged)


def evaluate_cmd(
    checkpoint: Annotated[
        Opt[str],
        typer.Option(
            help="Our checkpoint file, a Ray checkpoint folder (holding model.pt) or an official DNLAN state_dict."
        ),
    ] = None,
    run_id: Annotated[
        Opt[str],
        typer.Option(
            "--run-id",
            help="MLflow run whose best_model/model.pt to evaluate (with --checkpoint: that file instead); results are logged to that run unless --no-mlflow.",
        ),
    ] = None,
    model_uri: Annotated[
        Opt[str],
        typer.Option(
            "--model-uri",
            help="A registered MLflow Model of ours, e.g. models:/dnlan-x2@champion (evaluated into a new run).",
        ),
    ] = None,
    model: Annotated[
        Opt[str],
        typer.Option(
            "--model", help="dnlan (needs --checkpoint or --run-id) | bicubic (the baseline)."
        ),
    ] = None,
    benchmarks: Annotated[
        Opt[str],
        typer.Option(
            help="Comma list: Set5,Set14,B100,Urban100,Manga109, or folders of HR images."
        ),
    ] = None,
    scale: Annotated[
        Opt[str],
        typer.Option(help="Scale(s), e.g. 4 or 2,3,4 (default: the checkpoint's; bicubic: 2,3,4)."),
    ] = None,
    data_dir: Annotated[
        Opt[str],
        typer.Option(
            "--data-dir",
            help="Folder holding benchmark/<Name>/HR (default: the data folder under SR_PIPELINE_HOME).",
        ),
    ] = None,
    preset: Annotated[
        Opt[str],
        typer.Option(help="Architecture of an official state_dict: paper | paper128 | tiny."),
    ] = None,
    config: Annotated[
        Opt[str], typer.Option("--config", "-c", help="YAML file with evaluate options.")
    ] = None,
    set_: Annotated[
        Opt[list[str]],
        typer.Option("--set", help="Override one value: KEY=VALUE (e.g. model.n_feats=128)."),
    ] = None,
    tiling: Annotated[Opt[str], typer.Option(help=_TILING_HELP)] = None,
    tile: Annotated[Opt[int], typer.Option(help="Overlap tiling: tile side in LR pixels.")] = None,
    tile_overlap: Annotated[
        Opt[int],
        typer.Option("--tile-overlap", help="Overlap tiling: context pixels on each inner side."),
    ] = None,
    self_ensemble: Annotated[
        Opt[bool],
        typer.Option("--self-ensemble/--no-self-ensemble", help="Average the 8 flips/transposes."),
    ] = None,
    hash_mode: Annotated[
        Opt[str],
        typer.Option(
            "--hash",
            help="fixed (deterministic, default) | stochastic (the reference's random projections).",
        ),
    ] = None,
    hash_seed: Annotated[
        Opt[int],
        typer.Option(
            "--hash-seed", help="Seed of the fixed projections (or of the first stochastic repeat)."
        ),
    ] = None,
    repeats: Annotated[
        Opt[int],
        typer.Option(help="With --hash stochastic: evaluate K times, report mean and std."),
    ] = None,
    max_images: Annotated[
        Opt[int],
        typer.Option(
            "--max-images", help="Only the first N images of each benchmark (quick checks)."
        ),
    ] = None,
    save_images: Annotated[
        Opt[bool],
        typer.Option("--save-images/--no-save-images", help="Write the SR PNGs under OUT/images."),
    ] = None,
    out: Annotated[
        Opt[str],
        typer.Option(
            help="Folder for the CSV, JSON, figures and images (default: a new folder under SR_PIPELINE_HOME/evaluations)."
        ),
    ] = None,
    json_path: Annotated[
        Opt[str], typer.Option("--json", help="Also write the table as JSON to this path.")
    ] = None,
    mlflow: Annotated[
        Opt[bool], typer.Option("--mlflow/--no-mlflow", help="Log results to MLflow (default on).")
    ] = None,
    tracking_uri: Annotated[
        Opt[str],
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store).",
        ),
    ] = None,
    experiment: Annotated[
        Opt[str], typer.Option(help="MLflow experiment for new evaluation runs.")
    ] = None,
    ema: Annotated[
        Opt[bool],
        typer.Option(
            "--ema/--no-ema", help="Use the EMA weights when the checkpoint has them (default)."
        ),
    ] = None,
    device: Annotated[Opt[str], typer.Option(help="auto | cpu | cuda")] = None,
) -> None:
    """PSNR/SSIM on the standard SR benchmarks (Y channel, shave = scale), as papers report them."""
    from pathlib import Path

    from pipeline import console
    from pipeline.evaluate.report import render_table
    from pipeline.evaluate.runner import evaluate

    cfg = _load(
        preset,
        config,
        set_,
        {
            "checkpoint": checkpoint,
            "run_id": run_id,
            "model_uri": model_uri,
            "method": model,
            "benchmarks": _split(benchmarks),
            "scales": _split(scale),
            "data_dir": data_dir,
            "tiling": tiling,
            "tile": tile,
            "tile_overlap": tile_overlap,
            "self_ensemble": self_ensemble,
            "hash": hash_mode,
            "hash_seed": hash_seed,
            "repeats": repeats,
            "max_images": max_images,
            "save_images": save_images,
            "out": out,
            "json_path": json_path,
            "mlflow": mlflow,
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "use_ema": ema,
            "device": device,
        },
    )
    result = evaluate(cfg)
    outcome = result.outcome
    typer.echo(
        render_table(outcome.summaries, outcome.label, with_bicubic=outcome.method != "bicubic")
    )
    console.info(f"per-image results: {result.csv_path}")
    if result.figure_paths:
        console.info(f"figures: {Path(result.figure_paths[0]).parent}")
    if cfg.save_images:
        console.info(f"SR images: {result.out_dir / 'images'}")
    if cfg.json_path:
        console.info(f"JSON table: {cfg.json_path}")


def upscale_cmd(
    inputs: Annotated[
        list[str], typer.Argument(help="Image files and/or folders of images.", show_default=False)
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Output folder (created); files are named <stem>_x<scale>.png. Existing files "
            "are refused unless --overwrite."
        ),
    ],
    checkpoint: Annotated[
        Opt[str],
        typer.Option(help="Our checkpoint, a Ray checkpoint folder or an official state_dict."),
    ] = None,
    run_id: Annotated[
        Opt[str], typer.Option("--run-id", help="MLflow run whose best_model/model.pt to use.")
    ] = None,
    model: Annotated[Opt[str], typer.Option("--model", help="dnlan (default) | bicubic.")] = None,
    scale: Annotated[
        Opt[int], typer.Option(help="Scale (default: the checkpoint's; required for bicubic).")
    ] = None,
    preset: Annotated[
        Opt[str],
        typer.Option(help="Architecture of an official state_dict: paper | paper128 | tiny."),
    ] = None,
    set_: Annotated[
        Opt[list[str]], typer.Option("--set", help="Override one value: KEY=VALUE.")
    ] = None,
    tiling: Annotated[str, typer.Option(help=_TILING_HELP)] = "overlap",
    tile: Annotated[int, typer.Option(help="Overlap tiling: tile side in LR pixels.")] = 192,
    tile_overlap: Annotated[
        int, typer.Option("--tile-overlap", help="Overlap tiling: context pixels.")
    ] = 16,
    self_ensemble: Annotated[
        bool,
        typer.Option("--self-ensemble/--no-self-ensemble", help="Average the 8 flips/transposes."),
    ] = False,
    hash_mode: Annotated[str, typer.Option("--hash", help="fixed | stochastic")] = "fixed",
    hash_seed: Annotated[int, typer.Option("--hash-seed")] = 0,
    tracking_uri: Annotated[
        Opt[str], typer.Option("--tracking-uri", help="MLflow tracking URI for --run-id.")
    ] = None,
    ema: Annotated[
        bool, typer.Option("--ema/--no-ema", help="Use EMA weights when present.")
    ] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace existing files in --out (never the input images themselves).",
        ),
    ] = False,
) -> None:
    """Super-resolve your own images (PNG/JPEG, any size, RGB/grey/alpha); inputs are never overwritten."""
    import tempfile
    from pathlib import Path

    from pipeline import console
    from pipeline.evaluate.methods import method_from_config
    from pipeline.evaluate.photos import collect_inputs, output_paths, upscale_files

    cfg = _load(
        preset,
        None,
        set_,
        {
            "checkpoint": checkpoint,
            "run_id": run_id,
            "method": model,
            "scales": [scale] if scale is not None else None,
            "tiling": tiling,
            "tile": tile,
            "tile_overlap": tile_overlap,
            "self_ensemble": self_ensemble,
            "hash": hash_mode,
            "hash_seed": hash_seed,
            "tracking_uri": tracking_uri,
            "use_ema": ema,
            "device": device,
            "mlflow": False,
        },
    )
    if cfg.method == "bicubic" and not cfg.scales:
        raise console.UserError("--model bicubic needs --scale")
    files = collect_inputs(inputs)
    s = cfg.scales[0] if cfg.scales else None
    if s is not None:  # refuse clashing outputs before loading a model (known scale only)
        output_paths(files, Path(out).expanduser(), s, overwrite)
    uri = None
    if cfg.run_id:
        from pipeline.tracking import check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking_uri)
        check_reachable(uri)
    with tempfile.TemporaryDirectory(prefix="sr-upscale-") as tmp:
        method = method_from_config(cfg, Path(tmp), uri)
        s = method.scales[0]
        written = upscale_files(
            files,
            Path(out).expanduser(),
            method.upscalers[s],
            s,
            f" ({method.label})",
            overwrite=overwrite,
        )
    console.info(f"wrote {len(written)} image(s) to {Path(out).expanduser()}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("upscale")(upscale_cmd)
