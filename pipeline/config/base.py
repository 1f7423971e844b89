"""What every stage config shares: the error type, the valid scales, tiling defaults and the
two validation checks each ``validate()`` uses.

Separate so that the stage modules (model, preprocess, train, evaluate) and the loading
machinery depend on one small module instead of on each other.
"""

from __future__ import annotations

from pipeline.console import UserError

SCALES = (2, 3, 4)
# Overlap tiling, LR pixels, for the library and every command alike. 192/16 recomputes
# (192/160)^2 = 1.44x the pixels (96/16 would be 2.25x) and keeps a paper-model tile well
# under 1 GB (benchmarks/RESULTS.md).
DEFAULT_TILE = 192
DEFAULT_TILE_OVERLAP = 16


class ConfigError(UserError):
    """An invalid configuration value (one line: which field, what was wrong)."""


def check_scale(value: int, name: str) -> None:
    if value not in SCALES:
        raise ConfigError(f"{name} must be 2, 3 or 4 (got {value})")


def check_positive(value: float, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
