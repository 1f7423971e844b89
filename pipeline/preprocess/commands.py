"""CLI commands of the preprocess stage: `sr-pipeline preprocess` and `sr-pipeline download`.

Thin wrappers: parse options, build the config, call the library. Only typer, the standard
library and pipeline.config are imported at module level so `sr-pipeline --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import PreprocessConfig, load_config


def preprocess(
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="DIV2K root holding DIV2K_train_HR/ and (optionally) DIV2K_valid_HR/. Default: $SR_PIPELINE_HOME/data when it holds DIV2K_train_HR/.")] = None,  # noqa: UP045
    images: Annotated[Optional[str], typer.Option("--images", help="Any folder of images instead of the DIV2K layout: the train split.")] = None,  # noqa: UP045
    valid_images: Annotated[Optional[str], typer.Option("--valid-images", help="With --images: a folder of images for the valid split.")] = None,  # noqa: UP045
    holdout: Annotated[Optional[int], typer.Option("--holdout", help="With --images: use the last N images (by name) as the valid split.")] = None,  # noqa: UP045
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder for shards and manifest.json, or object storage (s3://BUCKET/PREFIX, gs://..., credentials from the environment). Default: $SR_PIPELINE_HOME/data/shards.")] = None,  # noqa: UP045
    scales: Annotated[Optional[str], typer.Option("--scales", help="LR scales to store, e.g. 2,3,4 (the default).")] = None,  # noqa: UP045
    crop: Annotated[Optional[int], typer.Option("--crop", help="Train sub-image side in HR pixels (multiple of 12; default 480).")] = None,  # noqa: UP045
    step: Annotated[Optional[int], typer.Option("--step", help="Stride between train sub-images (multiple of 12; default 240).")] = None,  # noqa: UP045
    shard_samples: Annotated[Optional[int], typer.Option("--shard-samples", help="Samples per shard (the last shard of a split may hold fewer; default 64).")] = None,  # noqa: UP045
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Worker processes (default: all cores).")] = None,  # noqa: UP045
    skip_bad: Annotated[Optional[bool], typer.Option("--skip-bad/--no-skip-bad", help="Skip unreadable images and list them in the manifest instead of stopping.")] = None,  # noqa: UP045
    png_compress_level: Annotated[Optional[int], typer.Option("--png-compress-level", help="zlib level 0-9 for the stored PNGs (default 1: fastest; higher levels save little space for much more CPU).")] = None,  # noqa: UP045
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="raw (default: uncompressed .npy arrays the train loader crops without decoding; larger) or png (smaller, decoded per sample).")] = None,  # noqa: UP045
    min_size: Annotated[Optional[int], typer.Option("--min-size", help="Drop images whose shorter side is below N pixels (counted, and listed in the manifest's skipped).")] = None,  # noqa: UP045
    name: Annotated[Optional[str], typer.Option("--name", help="Shard-name prefix, e.g. t91 -> t91-train-000000.tar (default: from the input folder; div2k for the DIV2K layout).")] = None,  # noqa: UP045
    address: Annotated[Optional[str], typer.Option("--address", help="Run the per-image work as Ray tasks on the cluster at HOST:PORT (default: $RAY_ADDRESS if set, else local processes). Inputs must be at the same path on every node; this process writes the shards.")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option("--force", help="Replace a finished dataset in --out that was made with other settings (without it, that is an error).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Only re-hash the shards in --out against manifest.json.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file with preprocess options (CLI options win).")] = None,  # noqa: UP045
) -> None:
    """Cut DIV2K (or any image folder) into WebDataset shards: HR sub-images with MATLAB-bicubic LR.

    Resumable: rerun the same command after a crash or Ctrl-C and complete shards are kept.
    A finished dataset in --out made with other settings is only replaced with --force.
    """
    from pipeline import defaults
    from pipeline.preprocess import run as preprocess_run

    if verify:
        preprocess_run.verify(out or defaults.data_dir() / "shards")
        return
    overrides = {
        "data_dir": data_dir, "images": images, "valid_images": valid_images, "holdout": holdout,
        "out": out, "scales": scales, "crop": crop, "step": step, "shard_samples": shard_samples,
        "jobs": jobs, "skip_bad": skip_bad, "png_compress_level": png_compress_level,
        "encoding": encoding, "min_size": min_size, "name": name, "address": address,
    }
    cfg = load_config(PreprocessConfig, yaml_path=config, overrides=overrides)
    if not cfg.data_dir and not cfg.images:
        home_data = defaults.data_dir()
        if (home_data / "DIV2K_train_HR").is_dir():
            cfg.data_dir = str(home_data)
        else:
            from pipeline.console import UserError

            raise UserError(
                "give --data-dir (DIV2K layout) or --images DIR "
                f"(or run `sr-pipeline download div2k` first, which fills {home_data})"
            )
    if not cfg.out:
        cfg.out = str(defaults.data_dir() / "shards")
    try:
        preprocess_run.run_preprocess(cfg, force=force)
    except KeyboardInterrupt:
        # run_preprocess has already said what is kept and how to resume: exit with Ctrl-C's
        # usual code without the CLI's generic "interrupted" line after it.
        raise SystemExit(130) from None


def download(
    what: Annotated[str, typer.Argument(help="div2k (DIV2K train+valid HR) | benchmarks (Set5, Set14, B100, Urban100, Manga109)")],
    dest: Annotated[Optional[str], typer.Option("--dest", help="Where to extract. Default: $SR_PIPELINE_HOME/data.")] = None,  # noqa: UP045
    url: Annotated[Optional[str], typer.Option("--url", help="Base URL to fetch the archives from instead of the official one (also $SR_PIPELINE_DOWNLOAD_URL).")] = None,  # noqa: UP045
    keep_archive: Annotated[bool, typer.Option("--keep-archive", help="Keep the downloaded archive after extracting it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Extract again and replace existing files that differ from the archive's (other files and folders in --dest are kept).")] = False,
) -> None:
    """Download and safely extract the official datasets (resumes an interrupted download)."""
    from pipeline import defaults
    from pipeline.preprocess import download as dl

    dl.download(what, Path(dest) if dest else defaults.data_dir(), base_url=url, keep_archive=keep_archive, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("preprocess")(preprocess)
    app.command("download")(download)
