"""Checkpoints: our self-describing format and the reference's plain state_dict.

* Our format is a dict ``{"format": "sr-pipeline/dnlan", "format_version": 1,
  "model_config": {...}, "scale": int, "state_dict": {...}, **extra}``; loading needs no flags.
* The official format is a plain state_dict. Its architecture is taken from the preset
  (default ``paper``) plus ``scale`` and overrides; when the caller gives no preset and no
  overrides it is read from the tensor shapes instead, and the result is announced.

Every load uses ``torch.load(weights_only=True)`` (a pickle that would run code is refused) and
``strict`` key/shape matching: the reference silently keeps random weights on a mismatch, we
stop with one line naming the first mismatching key and both shapes.

This module holds the file formats (writing, reading, which config a file's weights get). The
safe load and its one-line diagnosis of a bad file are in :mod:`pipeline.model.torchfile`; the
strict matching and the architecture read from tensor shapes, which work on a state_dict
whatever its source, are in :mod:`pipeline.model.statedict`.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import console
from pipeline.config import SCALES, ConfigError, ModelConfig, from_mapping, model_config
from pipeline.console import UserError
from pipeline.imageio import atomic_write_bytes
from pipeline.model.dnlan import DNLAN, build_from_config
from pipeline.model.statedict import describe, infer_architecture, load_state_dict_strict
from pipeline.model.torchfile import load_weights_only

FORMAT = "sr-pipeline/dnlan"
FORMAT_VERSION = 1
# Options that change neither parameter shapes nor values: they may be overridden when loading
# one of our checkpoints (e.g. evaluating with another chunk size), the others may not.
RUNTIME_OPTIONS = ("n_hashes", "n_hashlength", "chunk_size")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The DNLAN inside DDP/DataParallel wrappers (their state_dict keys carry ``module.``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _cpu_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    return OrderedDict((k, v.detach().to("cpu").clone()) for k, v in model.state_dict().items())


def _atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through a temporary file in the same folder and a rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
          torch.device, torch.Size)


def _check_loadable(value: Any, where: str) -> None:
    """Fail at save time on values ``weights_only`` loading would refuse later."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"checkpoint key {where}[{k!r}] is not a plain str/int key")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} has type {type(value).__name__}, which weights_only loading "
        "refuses; store tensors, numbers, strings, lists or dicts"
    )


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write our format atomically. ``extra`` holds anything weights_only-loadable."""
    net = _unwrap(model)
    if not isinstance(net, DNLAN):
        raise TypeError(f"save_checkpoint expects a DNLAN model, got {type(net).__name__}")
    reserved = {"format", "format_version", "model_config", "scale", "state_dict"} & set(extra)
    if reserved:
        raise TypeError(f"extra keys clash with the checkpoint format: {', '.join(sorted(reserved))}")
    _check_loadable(extra, "extra")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(net.config),
        "scale": int(net.config.scale),
        "state_dict": _cpu_state_dict(net),
    }
    payload.update(extra)
    return _atomic_save(payload, path)


def export_state_dict(path: str | Path, model: nn.Module) -> Path:
    """A plain state_dict file (the reference's checkpoint format), written atomically."""
    net = _unwrap(model)
    if not isinstance(net, DNLAN):
        raise TypeError(f"export_state_dict expects a DNLAN model, got {type(net).__name__}")
    return _atomic_save(_cpu_state_dict(net), path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _valid_scale(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in SCALES


def _check_stored_scale(path: Path, ckpt: Mapping[str, Any]) -> None:
    """The ``scale`` entry is read on its own (e.g. to pick a benchmark's LR folder), so it must
    be a supported scale and agree with the stored model_config; never replaced by a guess."""
    scale = ckpt["scale"]
    if not _valid_scale(scale):
        raise UserError(
            f"{path}: damaged sr-pipeline checkpoint: its scale entry is {scale!r}; "
            "scale must be 2, 3 or 4"
        )
    config = ckpt["model_config"]
    stored = config.get("scale") if isinstance(config, Mapping) else None
    if stored != scale:
        raise UserError(
            f"{path}: damaged sr-pipeline checkpoint: its scale entry ({scale}) disagrees with "
            f"its model_config (scale {stored!r})"
        )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as a dict: ours as stored, an official one as ``{"state_dict": ...}``."""
    path = Path(path)
    obj = load_weights_only(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(
                f"{path}: checkpoint format version {version!r} is newer than this sr-pipeline "
                f"supports ({FORMAT_VERSION}); upgrade sr-pipeline"
            )
        for key in ("model_config", "scale", "state_dict"):
            if key not in obj:
                raise UserError(f"{path}: damaged sr-pipeline checkpoint: no {key!r} entry")
        if not _is_state_dict(obj["state_dict"]):
            raise UserError(f"{path}: damaged sr-pipeline checkpoint: 'state_dict' holds no tensors")
        _check_stored_scale(path, obj)
        return dict(obj)
    if _is_state_dict(obj):
        return {"state_dict": OrderedDict(obj)}
    kind = type(obj).__name__
    raise UserError(
        f"{path}: not a DNLAN checkpoint (found a {kind} that is neither an sr-pipeline "
        "checkpoint nor a plain state_dict of tensors)"
    )



# ---------------------------------------------------------------------------------------------
# Loading: which config the weights get
# ---------------------------------------------------------------------------------------------


def _config_from_ours(path: Path, ckpt: Mapping[str, Any], scale: int | None,
                      overrides: dict[str, Any]) -> ModelConfig:
    try:
        stored = from_mapping(ModelConfig, dict(ckpt["model_config"]))
        stored.validate()
    except ConfigError as exc:
        raise UserError(f"{path}: damaged sr-pipeline checkpoint: model_config: {exc}") from None
    requested = dict(overrides)
    if scale is not None:
        requested["scale"] = scale
    values = dataclasses.asdict(stored)
    for key, value in requested.items():
        if key not in values:
            raise UserError(f"unknown model option {key!r}")
        if key in RUNTIME_OPTIONS:
            values[key] = value
        elif value != values[key]:
            raise UserError(
                f"{path}: checkpoint was saved with {key}={values[key]!r}; the requested "
                f"{key}={value!r} does not match (our checkpoints carry their config: drop the option)"
            )
    cfg = from_mapping(ModelConfig, values)
    cfg.validate()
    return cfg


def _config_from_official(path: Path, state: Mapping[str, Tensor], preset: str | None,
                          scale: int | None, overrides: dict[str, Any]) -> ModelConfig:
    try:
        if preset is None and not overrides:
            arch = infer_architecture(state)
            if scale is not None:
                arch["scale"] = scale  # explicit scale wins; a wrong one fails the strict load
            cfg = model_config("paper", **arch)
            console.info(
                f"{path}: official state_dict; architecture read from its shapes: "
                f"{describe(cfg)} rgb_range={cfg.rgb_range:g} (other options from preset paper)"
            )
            return cfg
        if scale is None:
            scale = infer_architecture(state)["scale"]
            console.info(f"{path}: official state_dict; scale x{scale} read from the upsampler")
        return model_config(preset or "paper", scale, **overrides)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def load_checkpoint(path: str | Path, preset: str | None = None, scale: int | None = None,
                    **overrides: Any) -> DNLAN:
    """A DNLAN with the checkpoint's weights, in ``stochastic`` hash mode (call set_hash_mode).

    Ours: the config comes from the file; ``preset`` is ignored, ``scale`` and shape-relevant
    overrides must agree with it, runtime options (n_hashes, n_hashlength, chunk_size) may be
    overridden. Official: ``preset`` (default ``paper``) + ``scale`` + ``overrides``; with none
    of preset/overrides given, the architecture is read from the tensor shapes (announced).
    A ``scale`` outside 2/3/4 is a ConfigError for both formats (never replaced by another).
    """
    path = Path(path)
    if scale is not None and not _valid_scale(scale):
        # checked before anything else so that no path can quietly substitute another scale
        raise ConfigError(f"{path}: cannot load as scale {scale!r}: scale must be 2, 3 or 4")
    return model_from_checkpoint(read_checkpoint(path), path, preset, scale, **overrides)


def model_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path, preset: str | None = None,
                          scale: int | None = None, **overrides: Any) -> DNLAN:
    """:func:`load_checkpoint` on a dict :func:`read_checkpoint` already returned (``path``
    names it in messages), so a caller that also needs the step or the EMA weights reads the
    file once."""
    path = Path(path)
    if scale is not None and not _valid_scale(scale):
        raise ConfigError(f"{path}: cannot load as scale {scale!r}: scale must be 2, 3 or 4")
    if "format" in ckpt:
        cfg = _config_from_ours(path, ckpt, scale, overrides)
    else:
        cfg = _config_from_official(path, ckpt["state_dict"], preset, scale, overrides)
    model = build_from_config(cfg)
    return load_state_dict_strict(model, ckpt["state_dict"], str(path))
