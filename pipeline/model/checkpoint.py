"""Checkpoints: our self-describing format and the reference's plain state_dict.

* Our format is a dict ``{"format": "sr-pipeline/dnlan", "format_version": 1,
  "model_config": {...}, "scale": int, "state_dict": {...}, **extra}``; loading needs no flags.
* The official format is a plain state_dict. Its architecture is taken from the preset
  (default ``paper``) plus ``scale`` and overrides; when the caller gives no preset and no
  overrides it is read from the tensor shapes instead, and the result is announced.

Every load uses ``torch.load(weights_only=True)`` (a pickle that would run code is refused) and
``strict`` key/shape matching: the reference silently keeps random weights on a mismatch, we
stop with one line naming the first mismatching key and both shapes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import pickletools
import re
import zipfile
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
from pipeline.model.dnlan import DIV2K_RGB_MEAN, DNLAN, build_from_config

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


ONE_LINE_LIMIT = 300
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = b"\x80"  # a pickle of protocol >= 2: torch.save's legacy format (or a raw pickle)


def _clip(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """``text`` on one line, at most ``limit`` characters, never cut mid-word.

    Prefers ending at the last complete sentence that fits (torch's messages put the cause
    first and the advice after); otherwise cuts at a word boundary and marks it with ``…``.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
    if ends and ends[-1] >= limit // 4:
        return head[: ends[-1]]
    cut = head.rfind(" ", 0, limit)
    return (head[:cut] if cut > 0 else head[: limit - 1]).rstrip(" ,;:") + "…"


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _clip(lines[0]) if lines else type(exc).__name__


def _refusal_reason(exc: BaseException) -> str | None:
    """The weights_only unpickler's own reason when it refused the file, else None.

    torch re-raises the unpickler's error ``from None`` inside paragraphs whose advice is to
    allow-list globals or pass ``weights_only=False`` (the opposite of what to do with an
    unknown file); the original error is still the exception's ``__context__``. Its first
    sentence (e.g. ``Unsupported global: GLOBAL print was not an allowed global by default.``)
    is what the user needs.
    """
    if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in str(exc):
        return None
    inner = exc.__context__
    text = " ".join(str(inner).split()) if isinstance(inner, pickle.UnpicklingError) else ""
    match = re.match(r"(.+?[.!?])(?=\s|$)", text)
    return _clip(match.group(1) if match else text, 200) or "rejected by the weights_only loader"


def _is_pickle_stream(path: Path) -> bool:
    """Whether the file opens with one complete pickle (opcodes parse up to STOP).

    Pickle protocols 0 and 1 are printable or arbitrary bytes with no magic number, so a text
    file cannot be told apart from an old-protocol pickle by its first bytes; parsing the
    opcodes (without executing any) can. Text that is not a pickle fails within a few bytes.
    """
    try:
        with open(path, "rb") as fh:
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(fh))
    except Exception:  # any parse failure (unknown opcode, truncated argument) means "no"
        return False


def _file_kind(path: Path) -> str:
    """What the bytes say: ``empty``, ``zip``, ``pickle``, ``text`` or ``binary``."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_PROTO) or _is_pickle_stream(path):
        return "pickle"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the 512-byte window is still text
        if exc.start < len(head) - 3:
            return "binary"
    return "binary" if b"\x00" in head else "text"


def _load_error(path: Path, exc: BaseException) -> UserError:
    """One line that tells a security refusal apart from a file that is simply not a checkpoint."""
    try:
        kind = _file_kind(path)
    except OSError as err:
        return UserError(f"{path}: cannot read the checkpoint: {err.strerror or err}")
    if kind == "empty":
        return UserError(f"{path}: not a readable PyTorch checkpoint: the file is empty")
    if kind in ("text", "binary"):
        looks = "a text file, e.g. JSON or YAML" if kind == "text" else "another binary format"
        return UserError(
            f"{path}: not a readable PyTorch checkpoint: it is not a PyTorch file at all "
            f"(neither a zip archive nor a binary pickle as torch.save writes; it looks like {looks})"
        )
    if kind == "zip" and not zipfile.is_zipfile(path):
        # torch reports this as a miniz error or a bare "[Errno 22]" depending on the length
        return UserError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): its zip archive "
            "has no end record, so the file was cut short (an interrupted copy or download?)"
        )
    reason = _refusal_reason(exc)
    if reason is not None:
        if reason.startswith("Unsupported operand"):
            what = ("uses pickle instructions that torch.save never writes for plain weights "
                    "(corrupt, or possibly code)")
        else:
            what = "contains pickled objects that are not plain weights (possibly code)"
        return UserError(
            f"{path}: refused to load: the file {what}; only tensors and plain data are "
            f"accepted ({reason})"
        )
    return UserError(
        f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_one_line(exc)}"
    )


def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise UserError(f"{path}: not a checkpoint file (it is a directory or special file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable"
        raise _load_error(path, exc) from None


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
    obj = _torch_load(path)
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


def _strip_module_prefix(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state


def _shape(t: Tensor | None) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def first_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str | None:
    """Describe the first key (in model order, then checkpoint order) that does not match."""
    for key, ref in expected.items():
        other = found.get(key)
        if other is None or tuple(other.shape) != tuple(ref.shape):
            return (
                f"first mismatching key {key!r}: shape {_shape(other)} in the checkpoint, "
                f"{_shape(ref)} in the model"
            )
    for key, other in found.items():
        if key not in expected:
            return (
                f"first mismatching key {key!r}: shape {_shape(other)} in the checkpoint, "
                "absent in the model"
            )
    return None


def _describe(cfg: ModelConfig) -> str:
    return (
        f"scale={cfg.scale} n_feats={cfg.n_feats} n_resgroups={cfg.n_resgroups} "
        f"n_resblocks={cfg.n_resblocks} reduction={cfg.reduction}"
    )


def load_state_dict_strict(model: DNLAN, state: Mapping[str, Tensor], source: str) -> DNLAN:
    """Strict load with a one-line error, plus a check that MeanShift matches ``rgb_range``."""
    state = _strip_module_prefix(state)
    problem = first_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(
            f"{source}: checkpoint does not fit the model ({_describe(model.config)}): {problem}"
        )
    model.load_state_dict(state, strict=True)
    stored = _rgb_range_of(state)
    if stored is not None and not math.isclose(stored, model.config.rgb_range, rel_tol=1e-3):
        raise UserError(
            f"{source}: checkpoint was made with rgb_range {stored:g} (from sub_mean.bias) but the "
            f"model config says rgb_range {model.config.rgb_range:g}"
        )
    return model


def _rgb_range_of(state: Mapping[str, Tensor]) -> float | None:
    """rgb_range as ``sub_mean`` stores it (bias = -rgb_range * DIV2K mean), to the precision
    of the stored dtype.

    A half-precision bias holds only ~3 significant digits (1.0 comes back as 0.9998), so the
    value is the simplest decimal (fewest digits, integers first) within that precision of
    the mean over the three channels: 1 and 255 from an fp16 file, not 0.9998 and 254.9.
    """
    bias = state.get("sub_mean.bias")
    if bias is None or bias.numel() != 3:
        return None
    values = [-float(b) / m for b, m in zip(bias.double().tolist(), DIV2K_RGB_MEAN, strict=True)]
    value = sum(values) / 3
    eps = torch.finfo(bias.dtype).eps if bias.dtype.is_floating_point else 1e-7
    tol = 4 * eps * abs(value)
    for digits in range(7):
        candidate = round(value, digits)
        if abs(candidate - value) <= tol:
            return float(candidate)
    return value


def _attention_index(state: Mapping[str, Tensor]) -> int:
    found = [
        int(m.group(1))
        for k in state
        if (m := re.fullmatch(r"body\.0\.body\.(\d+)\.conv_match\.0\.weight", k))
    ]
    if not found:
        raise KeyError("body.0.body.<n_resblocks>.conv_match.0.weight")
    return min(found)


def infer_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Shape-determined options of an official state_dict (n_feats, depth, reduction, scale).

    Runtime options (hashes, chunk size, res_scale) cannot be read from weights; the caller
    takes them from the ``paper`` preset.
    """
    state = _strip_module_prefix(state)
    try:
        feats = int(state["head.0.weight"].shape[0])
        groups = 0
        while f"body.{groups}.body.0.body.0.weight" in state:
            groups += 1
        # The attention layer follows the residual blocks of a group, so its index is the
        # block count; counting blocks up to the first gap would blame the wrong key when a
        # block in the middle is missing.
        blocks = _attention_index(state)
        for i in range(blocks):
            key = f"body.0.body.{i}.body.0.weight"
            if key not in state:
                raise KeyError(key)
        match = state[f"body.0.body.{blocks}.conv_match.0.weight"]
        reduction = feats // int(match.shape[0])
        up = int(state["tail.0.0.weight"].shape[0])
        if "tail.0.2.weight" in state:
            scale = 4
        elif up == 9 * feats:
            scale = 3
        elif up == 4 * feats:
            scale = 2
        else:
            raise UserError(
                f"not a DNLAN state_dict: upsampler 'tail.0.0.weight' has {up} output channels; "
                f"expected {4 * feats} (x2, x4) or {9 * feats} (x3) for n_feats {feats}"
            )
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        raise UserError(f"not a DNLAN state_dict: expected key {exc} is missing") from None
    arch: dict[str, Any] = {
        "n_feats": feats,
        "n_resgroups": groups,
        "n_resblocks": blocks,
        "reduction": reduction,
        "scale": scale,
    }
    rgb = _rgb_range_of(state)
    if rgb is not None and rgb > 0:
        arch["rgb_range"] = rgb
    return arch


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
                f"{_describe(cfg)} rgb_range={cfg.rgb_range:g} (other options from preset paper)"
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
