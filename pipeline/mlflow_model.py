"""The best model of a run as a real MLflow Model: loadable, servable, registered.

Why a pyfunc wrapper rather than the plain pytorch flavour: what users want from the registry
is an *upscaler* (uint8 image in, uint8 image out), and ours depends on more than the weights:
the tiling that bounds memory, the hash mode and seed that make DNLA deterministic, the
quantisation of the output. :class:`DnlanModel` therefore loads our checkpoint (strict,
``weights_only=True``, via :func:`pipeline.evaluate.methods.method_from_config`) and predicts
through exactly the code path of ``sr-pipeline upscale``, with the settings recorded in the
model's metadata (``sr_pipeline`` in MLmodel) and its ``model_config``. So
``mlflow.pyfunc.load_model("models:/dnlan-x2@champion").predict(lr)`` equals the PNG
``upscale`` writes, and ``mlflow models serve`` answers image requests.

Registry layout: one registered model per scale, ``dnlan-x{scale}``; every registration sets
the alias ``champion`` to the version with the best validation PSNR (``val_psnr`` tag).
``@latest`` needs no alias: MLflow reserves the name and resolves ``models:/dnlan-x2@latest``
to the newest version itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.console import UserError

MODEL_NAME = "model"  # name of the logged model inside the run
CHECKPOINT_ARTIFACT = "checkpoint"  # key of model.pt among the pyfunc model's artifacts
META_KEY = "sr_pipeline"  # our entry in the MLmodel's metadata
CHAMPION = "champion"
TAG_KIND = "sr_pipeline.kind"  # on the logged model: marks it as ours
KIND = "dnlan"

# The settings ``sr-pipeline upscale`` uses by default (see pipeline/evaluate/commands.py):
# a served model must give what `upscale` gives, so it is built from the same defaults.
DEFAULT_SETTINGS: dict[str, Any] = {
    "tiling": "overlap",
    "tile": 192,
    "tile_overlap": 16,
    "self_ensemble": False,
    "hash": "fixed",
    "hash_seed": 0,
    "use_ema": True,
}


def registered_name(scale: int) -> str:
    return f"dnlan-x{scale}"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


def build_upscaler(checkpoint: Path, settings: dict[str, Any]) -> tuple[Any, int]:
    """(upscaler, scale) for ``checkpoint``, built as ``sr-pipeline upscale`` builds it."""
    from pipeline.config import EvalConfig, load_config
    from pipeline.evaluate.methods import method_from_config

    overrides = {k: settings[k] for k in DEFAULT_SETTINGS if k in settings}
    overrides.update(
        checkpoint=str(checkpoint), mlflow=False, device=settings.get("device", "auto")
    )
    if settings.get("scale"):
        overrides["scales"] = [int(settings["scale"])]
    cfg = load_config(EvalConfig, overrides=overrides)
    method = method_from_config(cfg, checkpoint.parent, None)
    scale = method.scales[0]
    return method.upscalers[scale], scale


def upscale_array(upscaler: Any, scale: int, lr: np.ndarray) -> np.ndarray:
    """One HxWx3 uint8 image through ``upscale``'s per-image function."""
    from pipeline.evaluate.photo_io import Photo
    from pipeline.evaluate.photos import upscale_image

    return upscale_image(Photo(Path("<request>"), lr, None), upscaler, scale)


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _python_model_base() -> type:
    from mlflow.pyfunc import PythonModel

    return PythonModel


# MLflow warns at class creation that predict() has no type hints (under its own "once"
# filter, so only recording swallows it); the explicit signature given when logging is what
# validates requests, so the warning would be noise on every command that loads this module.
with warnings.catch_warnings(record=True):

    class DnlanModel(_python_model_base()):  # type: ignore[misc]
        """pyfunc: HxWx3 uint8 LR -> (s*H)x(s*W)x3 uint8 SR, one image per call.

        The ``scale`` param states the request's assumption; a model of another scale refuses the
        request instead of returning an image of an unexpected size.
        """

        def load_context(self, context: Any) -> None:
            settings = dict(context.model_config or {})
            path = Path(context.artifacts[CHECKPOINT_ARTIFACT])
            self._upscaler, self._scale = build_upscaler(path, settings)

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            wanted = (params or {}).get("scale")
            if wanted is not None and int(wanted) != self._scale:
                raise _bad_request(
                    f"this DNLAN model upscales x{self._scale}, but the request asks for x{int(wanted)}; "
                    f"use the dnlan-x{int(wanted)} model"
                )
            lr = np.asarray(model_input)
            if lr.ndim != 3 or lr.shape[2] != 3 or min(lr.shape[:2]) < 1:
                raise _bad_request(f"expected one HxWx3 uint8 image, got an array of shape {lr.shape}")
            if lr.dtype != np.uint8:
                if lr.size and (lr.min() < 0 or lr.max() > 255):
                    raise _bad_request("pixel values must be 0..255 (uint8)")
                lr = lr.astype(np.uint8)
            return upscale_array(self._upscaler, self._scale, lr)


# ---------------------------------------------------------------------------------------------
# Logging and registration
# ---------------------------------------------------------------------------------------------


def signature(scale: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    image = TensorSpec(np.dtype(np.uint8), (-1, -1, 3))
    return ModelSignature(
        inputs=Schema([image]),
        outputs=Schema([image]),
        params=ParamSchema([ParamSpec("scale", "long", int(scale))]),
    )


def input_example(side: int = 24) -> np.ndarray:
    """A small deterministic RGB gradient (every model accepts 24x24: tiny inputs are padded)."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x + y) * 255 // (2 * side - 2)],
                    axis=2).astype(np.uint8)


def requirements() -> list[str]:
    """What the wrapper imports at load time, pinned to what logged it (no slow inference)."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow
    import torch

    from pipeline import __version__

    reqs = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__}", f"numpy=={np.__version__}"]
    for dist in ("pillow", "pyyaml"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{dist}=={version(dist)}")
    reqs.append(f"sr-pipeline=={__version__}")
    return reqs


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging and ``models:/`` downloads read the global tracking and registry
    URIs: set both for the call only, then put back what was there (None: MLflow's default),
    as MLflow's own temporary-URI helper does."""
    import mlflow

    previous = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def model_metadata(checkpoint: Path, run_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What the served model is: scale, architecture, serving settings, provenance."""
    from pipeline.model import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    config = ckpt.get("model_config") or {}
    scale = int(ckpt.get("scale") or config.get("scale"))
    return {
        **DEFAULT_SETTINGS,
        "scale": scale,
        "model_config": config,
        "checkpoint_sha256": sha256_file(checkpoint),
        "source_run": run_id,
        "val_psnr": meta.get("val_psnr"),
        "step": meta.get("step"),
    }


def log_model(uri: str, run_id: str, best_dir: str | Path) -> str | None:
    """Log ``best_dir/model.pt`` as an MLflow Model output of the run; returns its model id.

    A second call for the same step returns the model already logged (train reruns).
    """
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    best_dir = Path(best_dir)
    checkpoint = best_dir / "model.pt"
    meta_file = best_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    step = int(meta.get("step", 0) or 0)
    existing = logged_model_of(MlflowClient(tracking_uri=uri), run_id, step)
    if existing is not None:
        return existing
    info = model_metadata(checkpoint, run_id, meta)
    scale = info["scale"]
    settings = {k: v for k, v in info.items() if k in DEFAULT_SETTINGS or k == "scale"}
    with _tracking_uri(uri), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints", category=UserWarning)
        logged = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=step,
            python_model=str(Path(__file__).with_name("mlflow_model_entry.py")),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            model_config=settings,
            signature=signature(scale),
            input_example=(input_example(), {"scale": scale}),
            pip_requirements=requirements(),
            metadata={META_KEY: info},
            tags={TAG_KIND: KIND, "sr_pipeline.scale": str(scale), "sr_pipeline.step": str(step)},
        )
    return logged.model_id


def logged_model_of(client: Any, run_id: str, step: int | None = None) -> str | None:
    """Id of our model logged by ``run_id`` (at ``step`` when given; else the latest one)."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    best: tuple[int, str] | None = None
    for out in outputs:
        if step is not None and out.step != step:
            continue
        try:
            model = client.get_logged_model(out.model_id)
        except Exception:  # deleted
            continue
        if model.tags.get(TAG_KIND) != KIND:
            continue
        if best is None or out.step >= best[0]:
            best = (out.step, out.model_id)
    return best[1] if best else None


def register(uri: str, run_id: str, scale: int, psnr: float, step: int) -> str | None:
    """Register the run's logged model as a version of ``dnlan-x{scale}``; move ``champion``.

    Idempotent for a rerun with nothing new (same logged model: same version). Returns the
    version, or None when the run has no logged model (its logging failed and was reported).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    model_id = logged_model_of(client, run_id, step) or logged_model_of(client, run_id)
    if model_id is None:
        return None
    name = registered_name(scale)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(
            name, description=f"DNLAN x{scale} super-resolution models trained by sr-pipeline"
        )
    version = None
    for existing in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if existing.source == f"models:/{model_id}" or existing.tags.get("step") == str(step):
            version = str(existing.version)
    if version is None:
        with _tracking_uri(uri):  # the registry resolves models:/<id> sources with the global URI
            created = client.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=run_id,
                model_id=model_id,
                tags={"val_psnr": f"{psnr:.4f}", "step": str(step), "scale": str(scale)},
                description=f"best validation PSNR {psnr:.4f} dB (Y channel) at step {step}",
            )
        version = str(created.version)
    update_champion(client, name)
    return version


def update_champion(client: Any, name: str) -> str | None:
    """Point ``champion`` at the version with the best ``val_psnr`` (newest wins a tie)."""
    best: tuple[float, int] | None = None
    for v in client.search_model_versions(f"name='{name}'"):
        try:
            psnr = float(v.tags.get("val_psnr", "nan"))
        except ValueError:
            continue
        if not np.isfinite(psnr):
            continue
        key = (psnr, int(v.version))
        if best is None or key > best:
            best = key
    if best is None:
        return None
    client.set_registered_model_alias(name, CHAMPION, str(best[1]))
    return str(best[1])


# ---------------------------------------------------------------------------------------------
# Reading a registered model back (``evaluate --model-uri``)
# ---------------------------------------------------------------------------------------------


def download_checkpoint(model_uri: str, tracking_uri: str, dst: Path) -> Path:
    """Our checkpoint inside the MLflow Model at ``model_uri``; one-line errors otherwise."""
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import check_reachable, redact_uri

    if not model_uri.startswith(("models:/", "runs:/")):
        raise UserError(f"--model-uri {model_uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/...")
    check_reachable(tracking_uri)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        with _tracking_uri(tracking_uri):
            local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri))
    except (MlflowException, OSError) as exc:
        first = " ".join(str(exc).strip().splitlines()[0].split())[:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"MLflow model {model_uri} not found at {redact_uri(tracking_uri)} ({first})") from None
    mlmodel = local / "MLmodel"
    meta = {}
    if mlmodel.is_file():
        meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
    checkpoint = local / "artifacts" / "model.pt"
    if META_KEY not in meta or not checkpoint.is_file():
        raise UserError(f"MLflow model {model_uri} is not an sr-pipeline DNLAN model (no {META_KEY} metadata "
                        "and artifacts/model.pt in its MLmodel)")
    return checkpoint
