"""Finding and loading the network to evaluate: a file, a Ray checkpoint folder, an MLflow run.

Why a module of its own: the sources a user may point at (our checkpoint file or the
reference's plain state_dict; a Ray Train checkpoint directory with ``model.pt``; a training
run folder with ``best_model/model.pt``; an MLflow run whose artifacts hold
``best_model/model.pt``) must all end in the same strict, pickle-safe
loader (:func:`pipeline.model.load_checkpoint`), with one-line errors that name the file.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import console
from pipeline.config import EvalConfig, model_config
from pipeline.console import UserError

RAY_MODEL_FILE = "model.pt"
RUN_ARTIFACT = "best_model/model.pt"


def checkpoint_file(path: str | Path) -> Path:
    """The weights file behind ``path``: the file itself, ``model.pt`` in a Ray checkpoint
    folder, or ``best_model/model.pt`` in a training run folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: checkpoint not found")
    if p.is_dir():
        candidate = p / RAY_MODEL_FILE
        if candidate.is_file():
            return candidate
        best = p / "best_model" / RAY_MODEL_FILE
        if best.is_file():  # a training run folder: its best model by validation PSNR
            console.info(f"{p}: training run folder; evaluating its best model {best}")
            return best
        nested = sorted(p.glob(f"checkpoint_*/{RAY_MODEL_FILE}"))
        if nested:
            raise UserError(
                f"{p}: a Ray run folder, not one checkpoint; pick one of its checkpoints, "
                f"e.g. {nested[-1].parent}"
            )
        raise UserError(f"{p}: folder holds no {RAY_MODEL_FILE} (expected a Ray checkpoint folder)")
    return p


def require_run(run_id: str, tracking_uri: str) -> Any:
    """The MLflow run ``run_id`` (an ``mlflow.entities.Run``), or a one-line error."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import check_reachable, redact_uri

    check_reachable(tracking_uri)
    try:
        return MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"MLflow run {run_id!r} not found at {redact_uri(tracking_uri)} ({_first_line(exc)})"
        ) from None


def download_run_model(run_id: str, tracking_uri: str, dst: Path) -> Path:
    """Fetch ``best_model/model.pt`` of an MLflow run into ``dst``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    require_run(run_id, tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        names = {a.path for a in client.list_artifacts(run_id, "best_model")}
    except MlflowException as exc:
        raise UserError(
            f"MLflow run {run_id}: cannot list artifacts ({_first_line(exc)})"
        ) from None
    if RUN_ARTIFACT not in names:
        raise UserError(
            f"MLflow run {run_id} has no {RUN_ARTIFACT} artifact (was it trained by sr-pipeline "
            "and did it reach a validation?)"
        )
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(run_id, RUN_ARTIFACT, str(dst))
    except (MlflowException, OSError) as exc:
        raise UserError(
            f"MLflow run {run_id}: downloading {RUN_ARTIFACT} failed ({_first_line(exc)})"
        ) from None
    return Path(local)


def download_mlflow_model(model_uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """Our checkpoint inside an MLflow Model (``models:/dnlan-x2@champion``), or one line."""
    if tracking_uri is None:
        raise UserError("--model-uri needs MLflow tracking (give --tracking-uri or the default store)")
    from pipeline.mlflow_model import download_checkpoint

    return download_checkpoint(model_uri, tracking_uri, dst)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split())[:200] if text else type(exc).__name__


@contextmanager
def _no_pickle_protocol_warning() -> Iterator[None]:
    """torch warns about old pickle protocols before refusing or reading a file; the one-line
    error (or success) says everything the user needs, so keep stderr to that line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
        yield


def model_overrides(cfg: EvalConfig) -> tuple[str | None, dict[str, Any]]:
    """(preset, overrides) the user asked for, relative to the preset's own model config.

    Both empty/None when nothing was given, which lets the model loader read an official
    state_dict's architecture from its shapes.
    """
    base = dataclasses.asdict(model_config(cfg.preset, cfg.model.scale))
    given = dataclasses.asdict(cfg.model)
    overrides = {k: v for k, v in given.items() if k != "scale" and v != base[k]}
    preset = None if cfg.official_from_shapes and not overrides else cfg.preset
    return preset, overrides


@dataclasses.dataclass(frozen=True)
class CheckpointFacts:
    scale: int
    step: int | None  # training step of the weights (None: official file or not recorded)


@dataclasses.dataclass
class LoadedModel:
    """One read of a checkpoint: what it says about itself, and (after :func:`load_model`)
    the network. Reading it once matters for large files on network storage."""

    path: Path
    ckpt: dict[str, Any]
    facts: CheckpointFacts


def read_source(path: Path) -> LoadedModel:
    """Read ``path`` (once) and the facts the caller checks before building the network."""
    from pipeline.model import read_checkpoint

    with _no_pickle_protocol_warning():
        ckpt = read_checkpoint(path)
    return LoadedModel(path, ckpt, facts_of(path, ckpt))


def load_model(source: LoadedModel, cfg: EvalConfig, scale: int | None) -> tuple[Any, str]:
    """The network (eval mode, CPU) and a short description of where it came from."""
    from pipeline.model.checkpoint import model_from_checkpoint
    from pipeline.model.statedict import load_state_dict_strict

    path, ckpt = source.path, source.ckpt
    preset, overrides = model_overrides(cfg)
    with _no_pickle_protocol_warning():
        model = model_from_checkpoint(ckpt, path, preset=preset, scale=scale, **overrides)
    desc = str(path)
    if cfg.use_ema:
        ema = ckpt.get("ema_state_dict")
        if ema:
            load_state_dict_strict(model, ema, f"{path} (ema_state_dict)")
            desc += " (EMA weights)"
            console.info(f"{path}: evaluating the EMA weights (use --no-ema for the raw ones)")
    return model.eval(), desc


def facts_of(path: Path, ckpt: dict[str, Any]) -> CheckpointFacts:
    """The scale recorded in our checkpoint (or inferred from an official one's upsampler), and
    the training step our trainer records, which places an evaluation on the run's step axis."""
    from pipeline.model.statedict import infer_architecture

    step = ckpt.get("step")
    step = int(step) if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    if "scale" in ckpt:
        return CheckpointFacts(int(ckpt["scale"]), step)
    try:
        return CheckpointFacts(int(infer_architecture(ckpt["state_dict"])["scale"]), step)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def checkpoint_facts(path: Path) -> CheckpointFacts:
    """:func:`facts_of` for a path (reads the file)."""
    return read_source(path).facts
