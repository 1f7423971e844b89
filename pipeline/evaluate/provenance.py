"""How an evaluation's numbers were produced, recorded next to them.

Why: a plain, an overlap-tiled and a self-ensemble ("DNLAN+") evaluation of one checkpoint give
different numbers; without the settings beside them nobody can tell which is which, in a file
or in MLflow. One dict, built here once per evaluation, goes into ``summary.json`` (every
record), a ``provenance.json`` sidecar of ``per_image.csv``, and the MLflow run (params of a new
evaluation run, tags in both cases): tiling, tile, overlap, hash mode and seed, self-ensemble,
precision, the weights' sha256 and the training run they came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import EvalConfig

SIDECAR = "provenance.json"
PLUS_SUFFIX = "+"  # DNLAN+ : the self-ensemble, as papers name it


def plus_label(label: str, self_ensemble: bool) -> str:
    """``DNLAN`` -> ``DNLAN+`` for self-ensemble results (papers' name for them)."""
    return label + PLUS_SUFFIX if self_ensemble and not label.endswith(PLUS_SUFFIX) else label


def build(cfg: EvalConfig, method: Any) -> dict[str, Any]:
    """The settings behind this evaluation's numbers (bicubic: only what applies to it)."""
    from pipeline import __version__

    if method.name == "bicubic":
        return {"method": "bicubic", "label": method.label, "sr_pipeline": __version__}
    checkpoint = getattr(method, "checkpoint", None)
    sha = None
    if checkpoint and Path(checkpoint).is_file():
        from pipeline.mlflow_model import sha256_file

        sha = sha256_file(checkpoint)
    return {
        "method": method.name,
        "label": method.label,
        "tiling": cfg.tiling,
        "tile": cfg.tile,
        "tile_overlap": cfg.tile_overlap,
        "hash": cfg.hash,
        "hash_seed": cfg.hash_seed,
        "repeats": cfg.repeats,
        "self_ensemble": cfg.self_ensemble,
        "precision": getattr(cfg, "precision", "fp32"),  # inference runs in float32 unless told
        "ema": "(EMA weights)" in method.source or cfg.use_ema and _has_ema(checkpoint),
        "checkpoint": _where(cfg, checkpoint),
        "checkpoint_sha256": sha,
        "source_run": source_run(cfg, checkpoint),
        "model_uri": cfg.model_uri,
        "step": method.step,
        "sr_pipeline": __version__,
    }


def _where(cfg: EvalConfig, checkpoint: str | None) -> str | None:
    """Where the weights came from, as the user can find them again (not a temporary copy)."""
    if cfg.checkpoint or not checkpoint:
        return str(checkpoint) if checkpoint else None
    if cfg.run_id:
        return f"runs:/{cfg.run_id}/best_model/model.pt"
    if cfg.model_uri:
        return f"{cfg.model_uri} (artifacts/model.pt)"
    return str(checkpoint)


def _has_ema(checkpoint: str | None) -> bool:
    if not checkpoint:
        return False
    try:
        from pipeline.model import read_checkpoint

        return bool(read_checkpoint(checkpoint).get("ema_state_dict"))
    except Exception:
        return False


def source_run(cfg: EvalConfig, checkpoint: str | None) -> str | None:
    """The training run the weights came from: --run-id, the registered model's metadata, or
    the ``meta.json`` the trainer writes beside ``best_model/model.pt``."""
    if cfg.run_id and not cfg.checkpoint:
        return cfg.run_id
    if not checkpoint:
        return None
    path = Path(checkpoint)
    mlmodel = path.parent.parent / "MLmodel"  # <model>/artifacts/model.pt of an MLflow Model
    try:
        if mlmodel.is_file():
            import yaml

            meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
            return (meta.get("sr_pipeline") or {}).get("source_run")
        sidecar = path.parent / "meta.json"
        if sidecar.is_file():
            return json.loads(sidecar.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return None


def write_sidecar(out_dir: Path, provenance: dict[str, Any]) -> Path:
    from pipeline.imageio import atomic_write_bytes

    path = out_dir / SIDECAR
    atomic_write_bytes(path, (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode())
    return path


def as_strings(provenance: dict[str, Any]) -> dict[str, str]:
    """Flat ``provenance.<key>`` strings for MLflow params and tags (None -> "")."""
    return {f"provenance.{k}": "" if v is None else str(v) for k, v in provenance.items()}
