"""Typed configuration: one dataclass per stage, named presets, YAML files and CLI overrides.

Resolution order for every stage is *defaults -> preset -> YAML file -> CLI options*, and the
result is validated once, so a bad value is reported as one line that names the field (and the
file it came from) before any work starts. :func:`flatten` turns any config into the flat
``{"model.n_feats": "192", ...}`` mapping that is logged as MLflow params, so a run's page shows
every value that shaped it.

The package re-exports its public API; import names from ``pipeline.config``. Modules:

* ``base``: :class:`ConfigError`, the valid scales, tiling defaults, shared validation checks.
* ``model``, ``preprocess``, ``train``, ``evaluate``: one stage config each.
* ``presets``: the named presets (``paper``, ``paper128``, ``tiny``) and :func:`model_config`.
* ``convert``: mapping -> typed dataclass (:func:`from_mapping`) and back (:func:`to_dict`,
  :func:`flatten`).
* ``resolve``: :func:`load_config` (the resolution order above), :func:`read_yaml`,
  :func:`parse_sets` (``--set KEY=VALUE``).

Nothing here imports torch, Ray or MLflow (PyYAML only inside :func:`read_yaml`), so every
command module can import its config at top level and ``sr-pipeline --help`` stays instant.
"""

from pipeline.config.base import DEFAULT_TILE, DEFAULT_TILE_OVERLAP, SCALES, ConfigError
from pipeline.config.convert import flatten, from_mapping, to_dict
from pipeline.config.evaluate import EvalConfig
from pipeline.config.model import ModelConfig
from pipeline.config.preprocess import PreprocessConfig
from pipeline.config.presets import PRESETS, model_config, preset_values
from pipeline.config.resolve import load_config, parse_sets, read_yaml
from pipeline.config.train import TrainConfig

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_TILE_OVERLAP",
    "PRESETS",
    "SCALES",
    "ConfigError",
    "EvalConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "flatten",
    "from_mapping",
    "load_config",
    "model_config",
    "parse_sets",
    "preset_values",
    "read_yaml",
    "to_dict",
]
