"""Named presets (``paper``, ``paper128``, ``tiny``): a model plus a training recipe, and
:func:`model_config`, a validated model from a preset.

Separate so that the train and evaluate configs can check a preset name, and the model package
can build a preset's model, without importing the YAML and override machinery.

* ``paper``: the seed command of the reference implementation (spec section 4), per scale.
* ``paper128``: the same with ``n_feats 128`` (the reference's demo.sh).
* ``tiny``: a CPU-sized DNLAN (F 64, 2 groups) and a minutes-long recipe, for tests and the demo.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config.base import ConfigError
from pipeline.config.convert import from_mapping
from pipeline.config.model import ModelConfig

# Values only where they differ from the dataclass defaults (which are the paper's).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "paper128": {"model": {"n_feats": 128}},
    "tiny": {
        "model": {"n_resgroups": 2, "n_resblocks": 4, "n_feats": 64},
        "patch_size": 48,
        "batch_size": 8,
        "epochs": 4,
        "iters_per_epoch": 40,
        "lr": 4e-4,
        "milestones": [3],
        "loader_workers": 1,
        # CPU training shares the cores with PNG decoding: cut 4 patches per decoded sub-image
        "patches_per_sample": 4,
        "log_every": 5,
        "cpus_per_worker": 1.0,
    },
}


def preset_values(name: str, scale: int | None = None) -> dict[str, Any]:
    """The preset's nested values, for the given scale (presets are defined per scale)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    values = _deep_copy(PRESETS[name])
    values["preset"] = name
    if scale is not None:
        values.setdefault("model", {})["scale"] = scale
    return values


def model_config(preset: str = "paper", scale: int = 2, **overrides: Any) -> ModelConfig:
    """A validated :class:`ModelConfig` from a preset plus reference-named overrides."""
    values = preset_values(preset, scale).get("model", {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    values.update(overrides)
    cfg = from_mapping(ModelConfig, values)
    cfg.validate()
    return cfg


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}

