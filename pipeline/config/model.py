"""The DNLAN model's hyper-parameters (:class:`ModelConfig`).

Its own module because every stage embeds it (training builds the network from it, evaluation
rebuilds one, checkpoints store it) and the model package imports it without the stage configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.base import ConfigError, check_positive, check_scale


@dataclass
class ModelConfig:
    """DNLAN hyper-parameters, named exactly as the reference's command-line options."""

    scale: int = 2
    n_resgroups: int = 10
    n_resblocks: int = 4
    n_feats: int = 192
    reduction: int = 2
    n_hashes: int = 3
    n_hashlength: int = 7
    chunk_size: int = 144
    res_scale: float = 0.1
    rgb_range: float = 1.0

    def validate(self) -> None:
        check_scale(self.scale, "model.scale")
        for name in ("n_resgroups", "n_resblocks", "n_feats", "reduction", "n_hashes", "chunk_size"):
            check_positive(getattr(self, name), f"model.{name}")
        if self.n_hashlength < 0:
            raise ConfigError(f"model.n_hashlength must be >= 0 (0 = automatic), got {self.n_hashlength}")
        if self.n_feats % self.reduction:
            raise ConfigError(
                f"model.n_feats ({self.n_feats}) must be divisible by model.reduction ({self.reduction})"
            )
        if self.rgb_range <= 0:
            raise ConfigError(f"model.rgb_range must be > 0, got {self.rgb_range}")
