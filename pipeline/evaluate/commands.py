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


_PRECISION_HELP = (
    "fp32 (default) | bf16 | fp16 | auto (bf16 where the GPU has it): autocast for the network "
    "on a GPU; hashing stays fp32; on a CPU everything runs fp32 (one warning)."
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
            help="Our checkpoint file, a Ray checkpoint folder (holding model.pt) or an official DNLAN state_dict; a comma list of one per scale (x2.pt,x3.pt,x4.pt) evaluates them all in one run."
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
            help="Comma list: Set5,Set14,B100,Urban100,Manga109 (all: the five), or folders of HR images."
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
    tile: Annotated[
        Opt[int], typer.Option(help="Overlap tiling: tile side in LR pixels (default 192).")
    ] = None,
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
    precision: Annotated[
        Opt[str],
        typer.Option(help=_PRECISION_HELP),
    ] = None,
    protocol: Annotated[
        Opt[str],
        typer.Option(
            help="standard (MATLAB-style, as papers report) | official (the DNLAN repository's own Python evaluation, for comparison)."
        ),
    ] = None,
    workers: Annotated[
        Opt[int],
        typer.Option(
            help="Spread the images over N Ray workers (one GPU each where the cluster has GPUs); results equal one worker's."
        ),
    ] = None,
    address: Annotated[
        Opt[str],
        typer.Option(
            help="Ray cluster for --workers (default: RAY_ADDRESS, else a local instance on 127.0.0.1)."
        ),
    ] = None,
) -> None:
    """PSNR/SSIM on the standard SR benchmarks (Y channel, shave = scale), as papers report them."""
    from pathlib import Path

    from pipeline import console
    from pipeline.evaluate.driver import evaluate
    from pipeline.evaluate.report import render_table

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
            "precision": precision,
            "workers": workers,
            "address": address,
            "protocol": protocol,
        },
    )
    result = evaluate(cfg)
    outcome = result.outcome
    typer.echo(
        render_table(
            outcome.summaries, outcome.label, with_bicubic=outcome.method != "bicubic",
            protocol=cfg.protocol,
        )
    )
    per_set = ", ".join(
        f"{b} x{s} {sec:.1f}s" for (b, s), sec in outcome.wall_seconds.items()
    )
    console.info(f"total time {outcome.total_seconds:.1f}s ({per_set})")
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
    tile: Annotated[
        Opt[int], typer.Option(help="Overlap tiling: tile side in LR pixels (default 192).")
    ] = None,
    tile_overlap: Annotated[
        Opt[int], typer.Option("--tile-overlap", help="Overlap tiling: context pixels (default 16).")
    ] = None,
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
    precision: Annotated[
        Opt[str],
        typer.Option(help=_PRECISION_HELP),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace existing files in --out (never the input images themselves).",
        ),
    ] = False,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing/--no-skip-existing",
            help="Leave outputs that already exist alone and skip their inputs (resume a folder).",
        ),
    ] = False,
    out_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Output format: png (lossless) | jpg | webp | same (the input's, PNG otherwise).",
        ),
    ] = "png",
    quality: Annotated[
        int, typer.Option(help="JPEG/WebP quality, 1-100.", min=1, max=100)
    ] = 95,
    keep_16bit: Annotated[
        bool,
        typer.Option(
            "--keep-16bit/--no-keep-16bit",
            help="16-bit PNG inputs give 16-bit PNG outputs (default: 8-bit, like every other input).",
        ),
    ] = False,
) -> None:
    """Super-resolve your own images and photos (any size, RGB/grey/alpha, EXIF orientation, ICC
    profile kept); inputs are never overwritten."""
    import tempfile
    from pathlib import Path

    from pipeline import console
    from pipeline.evaluate.methods import method_from_config
    from pipeline.evaluate.photos import collect_inputs, output_paths, output_suffix, upscale_files

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
            "precision": precision,
            "mlflow": False,
        },
    )
    if cfg.method == "bicubic" and not cfg.scales:
        raise console.UserError("--model bicubic needs --scale")
    output_suffix(Path("x.png"), out_format)  # a bad --format fails before anything else
    if skip_existing and overwrite:
        raise console.UserError("--skip-existing and --overwrite contradict each other; pick one")
    files = collect_inputs(inputs)
    s = cfg.scales[0] if cfg.scales else None
    if s is not None:  # refuse clashing outputs before loading a model (known scale only)
        output_paths(files, Path(out).expanduser(), s, overwrite, out_format, skip_existing)
    uri = None
    if cfg.run_id:
        from pipeline.tracking import check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking_uri)
        check_reachable(uri)
    with tempfile.TemporaryDirectory(prefix="sr-upscale-") as tmp:
        method = method_from_config(cfg, Path(tmp), uri)
        s = method.scales[0]
        summary = upscale_files(
            files,
            Path(out).expanduser(),
            method.upscalers[s],
            s,
            f" ({method.label})",
            overwrite=overwrite,
            fmt=out_format,
            quality=quality,
            keep_16bit=keep_16bit,
            skip_existing=skip_existing,
        )
    console.info(summary.line(Path(out).expanduser()))
    if summary.failed:
        raise console.UserError(
            f"{len(summary.failed)} of {len(files)} image(s) could not be upscaled: "
            + "; ".join(f"{p.name} ({why.split(': ', 1)[-1]})" for p, why in summary.failed)
        )


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
    app.command("upscale")(upscale_cmd)
    from pipeline.evaluate.export_commands import export_cmd

    app.command("export")(export_cmd)
