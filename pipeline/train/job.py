"""What the driver resolves for the workers before anything starts: the :class:`JobSpec`.

Its own module because both sides need it: the driver fills it (:func:`resolve_data`, then
the run's ids) and every worker rebuilds it from the train-loop config. Only the standard
library at import time, so the driver can read the manifest before Ray or torch load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.console import UserError


@dataclass
class JobSpec:
    """What the driver resolved for the workers (absolute paths, counts, ids)."""

    train_shards: list[str]
    train_counts: list[int]
    val_shards: list[str] = field(default_factory=list)
    val_folder: str | None = None
    val_count: int = 0
    run_dir: str = ""  # <storage>/<run name>, where best_model/ goes
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    lr: float = 1e-4  # effective learning rate (after optional batch scaling)


def resolve_data(cfg: TrainConfig) -> JobSpec:
    """Shard lists and counts from the manifest(s); validation source; clear errors."""
    from pipeline.preprocess.manifest import read_manifest, shard_paths

    if not cfg.shards:
        raise UserError("--shards is required: the folder written by `sr-pipeline preprocess`")
    shards_dir = Path(cfg.shards).expanduser().resolve()
    manifest = read_manifest(shards_dir)
    scales = [int(s) for s in manifest.get("params", {}).get("scales", [])]
    scale = cfg.model.scale
    if scales and scale not in scales:
        raise UserError(f"{shards_dir}: shards hold scales {scales}, not x{scale} (rerun preprocess with --scales {scale})")
    train = manifest["splits"].get("train") or {}
    train_paths = [str(p) for p in shard_paths(shards_dir, "train")]
    if not train_paths:
        raise UserError(f"{shards_dir}: the manifest lists no train shards")
    counts_by_name = {s["name"]: int(s["samples"]) for s in train.get("shards", [])}
    train_counts = [counts_by_name.get(Path(p).name, 0) for p in train_paths]
    crop = manifest.get("params", {}).get("crop")
    if crop and cfg.patch_size > int(crop):
        raise UserError(f"--patch-size {cfg.patch_size} is larger than the shards' sub-images ({crop} px)")

    job = JobSpec(train_shards=train_paths, train_counts=train_counts, lr=cfg.effective_lr)
    if cfg.val_data:
        folder = Path(cfg.val_data).expanduser().resolve()
        from pipeline.imageio import list_images

        n = len(list_images(folder))  # one-line error when missing/empty
        job.val_folder = str(folder)
        job.val_count = min(n, cfg.val_max_images) if cfg.val_max_images else n
    else:
        val_dir = Path(cfg.val_shards).expanduser().resolve() if cfg.val_shards else shards_dir
        val_manifest = manifest if val_dir == shards_dir else read_manifest(val_dir)
        valid = val_manifest["splits"].get("valid") or {}
        job.val_shards = [str(p) for p in shard_paths(val_dir, "valid")] if valid.get("shards") else []
        n = int(valid.get("samples", 0))
        job.val_count = min(n, cfg.val_max_images) if cfg.val_max_images else n
        if not job.val_shards or job.val_count == 0:
            raise UserError(
                f"{val_dir}: no validation images (the manifest's valid split is empty); "
                "give --val-data FOLDER (e.g. a Set5/HR folder) or --val-shards DIR"
            )
    return job
