"""A state_dict against the DNLAN architecture: strict matching, and the architecture it implies.

The reference's checkpoints are plain state_dicts with no config, and the reference loads them
non-strictly (a mismatch silently keeps random weights). What is here works on the tensors
alone, whatever file they came from: :func:`load_state_dict_strict` stops with one line naming
the first mismatching key and both shapes, :func:`infer_architecture` reads the shape-determined
options back from the keys and shapes, and the ``rgb_range`` a model was made with is read back
from its MeanShift bias. Kept apart from :mod:`pipeline.model.checkpoint` (files and our format)
because none of it depends on the file a state_dict came from, and `evaluate` also uses it on
its own (a checkpoint's EMA weights, the scale of an official file).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.console import UserError
from pipeline.model.dnlan import DIV2K_RGB_MEAN, DNLAN


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


def describe(cfg: ModelConfig) -> str:
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
            f"{source}: checkpoint does not fit the model ({describe(model.config)}): {problem}"
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

