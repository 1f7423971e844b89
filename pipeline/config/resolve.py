"""Resolving a stage config: *defaults -> preset -> YAML file -> CLI options*, then validation.

:func:`load_config` is what every command calls; :func:`read_yaml` reads a config file and
:func:`parse_sets` turns ``--set KEY=VALUE`` options into overrides. Separate from the stage
configs so that they stay plain dataclasses and this order lives in one place.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config.base import ConfigError
from pipeline.config.convert import from_mapping
from pipeline.config.presets import preset_values
from pipeline.console import UserError

C = TypeVar("C")


def load_config(
    cls: type[C],
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Build a stage config: defaults -> preset -> YAML file -> overrides, then validate.

    ``overrides`` uses dotted keys for nested fields (``"model.n_feats"``); ``None`` values are
    ignored so unset CLI options do not mask the file or the preset. A YAML file may name its
    own preset (``preset: tiny``); an explicit ``preset`` argument wins over it.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    file_values: dict[str, Any] = {}
    if yaml_path is not None:
        file_values = read_yaml(yaml_path)
    has_preset = any(f.name == "preset" for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    file_model = file_values.get("model", {})
    if not isinstance(file_model, dict):
        raise ConfigError(f"{yaml_path}: 'model' must be a mapping of model options, got {file_model!r}")
    scale = overrides.get("model.scale") or file_model.get("scale")
    values: dict[str, Any] = {}
    chosen = preset or file_values.get("preset")
    if has_preset:
        values = preset_values(chosen or "paper", scale)
        values = _only_fields(cls, values)
    elif chosen:
        raise ConfigError(f"{cls.__name__} takes no preset")
    _deep_update(values, file_values)
    if preset:
        values["preset"] = preset
    for key, value in overrides.items():
        _set_dotted(values, key, value)
    source = f" (in {yaml_path})" if yaml_path else ""
    try:
        cfg = from_mapping(cls, values)
        cfg.validate()  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise ConfigError(f"{exc}{source}") from None
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping of option: value")
    return data


def _only_fields(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """``["model.n_feats=128", "lr=2e-4"]`` -> overrides for :func:`pipeline.config.load_config`."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out
