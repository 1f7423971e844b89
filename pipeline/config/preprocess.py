"""`sr-pipeline preprocess`'s config (:class:`PreprocessConfig`): images to WebDataset shards.

Separate from the training and evaluation configs: preprocessing has no model and no presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.base import ConfigError, check_positive, check_scale


@dataclass
class PreprocessConfig:
    """`sr-pipeline preprocess`: DIV2K (or any image folder) to WebDataset shards."""

    data_dir: str | None = None  # DIV2K layout: DIV2K_train_HR/ (train) and DIV2K_valid_HR/ (valid)
    images: str | None = None  # any folder of images: the train split
    valid_images: str | None = None  # with `images`: a folder of images for the valid split
    holdout: int = 0  # with `images`: move the last N images (by name) to the valid split
    out: str = ""
    scales: list[int] = field(default_factory=lambda: [2, 3, 4])
    crop: int = 480
    step: int = 240
    shard_samples: int = 64
    jobs: int = 0  # 0 = all cores
    skip_bad: bool = False
    png_compress_level: int = 1
    encoding: str = "raw"  # raw: uncompressed .npy members the loader crops without decoding | png
    min_size: int = 0  # skip images whose shorter side is below this many pixels (0: keep all)
    name: str | None = None  # shard-name prefix (default: from the input folder, e.g. div2k)
    address: str | None = None  # Ray cluster HOST:PORT (or $RAY_ADDRESS): per-image work as Ray tasks

    def validate(self) -> None:
        if not self.scales:
            raise ConfigError("preprocess.scales must name at least one scale")
        for s in self.scales:
            check_scale(s, "preprocess.scales")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"preprocess.scales has duplicates: {self.scales}")
        check_positive(self.crop, "preprocess.crop")
        check_positive(self.step, "preprocess.step")
        check_positive(self.shard_samples, "preprocess.shard_samples")
        if self.crop % 12:
            raise ConfigError(f"preprocess.crop must be a multiple of 12 (got {self.crop})")
        # Sub-image origins are multiples of `step`; LR crops start at origin / scale.
        if self.step % 12:
            raise ConfigError(f"preprocess.step must be a multiple of 12 so LR crops align (got {self.step})")
        if self.holdout < 0:
            raise ConfigError(f"preprocess.holdout must be >= 0, got {self.holdout}")
        if self.jobs < 0:
            raise ConfigError(f"preprocess.jobs must be >= 0 (0 = all cores), got {self.jobs}")
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"preprocess.png_compress_level must be in 0..9, got {self.png_compress_level}")
        if self.encoding not in ("raw", "png"):
            raise ConfigError(f"preprocess.encoding must be raw or png, got {self.encoding!r}")
        if self.step > self.crop:
            raise ConfigError(
                f"preprocess.step ({self.step}) is larger than preprocess.crop ({self.crop}): "
                "the pixels between sub-images would never be used"
            )
        if self.min_size < 0:
            raise ConfigError(f"preprocess.min_size must be >= 0, got {self.min_size}")
