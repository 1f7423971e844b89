"""`sr-pipeline train`'s config (:class:`TrainConfig`): recipe, data, scaling, checkpointing
and tracking.

The largest stage config, in its own module; it embeds a :class:`ModelConfig` and is checked
against the preset names, and knows nothing of how it is loaded (see ``resolve.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config.base import ConfigError, check_positive
from pipeline.config.model import ModelConfig
from pipeline.config.presets import PRESETS


@dataclass
class TrainConfig:
    """`sr-pipeline train`: recipe, data, scaling, checkpointing and tracking."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    # data
    shards: str = ""
    val_shards: str | None = None  # default: the valid split of `shards`
    val_data: str | None = None  # alternative: a folder of HR images (benchmark layout or plain)
    patch_size: int = 96  # HR patch side, as the reference's --patch_size
    augment: bool = True
    loader_workers: int = 2  # DataLoader processes per Ray worker; -1 = auto (cpus_per_worker - 1)
    skip_bad_shards: bool = False  # leave out shards that differ from the manifest (counted, warned)
    patches_per_sample: int = 1  # k steps in a row reuse a batch's samples, new crops (saves PNG decodes)
    shuffle_buffer: int = 256  # unused: the loader's global schedule mixes (kept so old configs load)
    # optimisation (spec section 4)
    epochs: int = 1500
    iters_per_epoch: int = 1000
    batch_size: int = 16  # global batch across all workers
    lr: float = 1e-4
    scale_lr: bool = False  # multiply lr by (global batch / 16) when the user changes the batch
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [300, 600, 900, 1200])
    gamma: float = 0.5
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    ema: float = 0.0  # EMA decay of weights; 0 = off (BasicSR uses 0.999)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # bf16 on a GPU that has it, else fp32 (silently)
    compile: bool = False  # torch.compile the model (falls back to eager, with a warning, without a compiler)
    seed: int = 1
    max_bad_steps: int = 5  # consecutive skipped (non-finite) steps before the job stops
    log_every: int = 50  # steps between metric points (where the workers read device values and agree)
    # checkpoints: every N steps (0 = auto: about checkpoint_minutes of training, measured)
    checkpoint_every: int = 0
    checkpoint_minutes: float = 5.0
    # how long a failing checkpoint upload is retried (2 s, doubling to 60 s) before the job fails on it
    upload_retry_s: float = 900.0
    # an upload request to object storage that receives nothing for this long fails (and is retried)
    upload_timeout_s: float = 30.0
    # validation, every N steps: a small fixed subset often, the whole valid set rarely and at the end
    val_every: int = 0  # steps between subset validations; 0 = at every epoch end
    val_subset: int = 10  # images of the subset (the --val-data folder, when given, is the subset)
    val_full_every: int = 0  # steps between whole-set validations; 0 = only at the end
    val_max_images: int = 0  # cap of the whole set; 0 = all
    hash_seed: int = 0
    # scaling (Ray Train ScalingConfig)
    workers: int = 1  # DDP workers; with workers_max, the minimum of an elastic range
    workers_max: int = 0  # > workers: elastic, between workers and workers_max (`--workers 4-8`)
    # elastic: how often a healthy worker group looks for room to grow (Ray's resize monitor)
    elastic_check_s: float = 60.0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    address: str | None = None
    dist_timeout_s: int = 1800  # collective timeout (TorchConfig): a hung rank fails after this
    # run / fault tolerance / tracking
    storage_path: str | None = None
    shared_storage: bool = False  # the user asserts a local storage path is a mount shared by all nodes
    run_name: str | None = None
    resume: bool = False
    max_failures: int = 0
    keep_checkpoints: int = 2
    experiment: str = "dnlan"
    tracking_uri: str | None = None
    register_model: bool = True
    # At the end of a run, how long the workers (each) and then the driver wait for a tracking
    # server that does not answer before giving up (what is not logged stays in the run's
    # journal for `sr-pipeline sync`): a hung server delays the end by about twice this.
    tracking_drain_s: float = 45.0

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        self.model.validate()
        for name in ("epochs", "iters_per_epoch", "batch_size", "patch_size", "workers", "val_subset",
                     "log_every", "patches_per_sample", "shuffle_buffer", "max_bad_steps", "dist_timeout_s",
                     "checkpoint_minutes"):
            check_positive(getattr(self, name), name)
        for name in ("val_every", "val_full_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = the default schedule), got {getattr(self, name)}")
        if self.checkpoint_every % self.log_every:
            # a resumed run must restart at a log point, or its first metric window differs
            raise ConfigError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every ({self.log_every})"
            )
        if self.loader_workers < -1:
            raise ConfigError(f"loader_workers must be >= 0 (or -1 / auto), got {self.loader_workers}")
        if self.patch_size % self.model.scale:
            raise ConfigError(
                f"patch_size ({self.patch_size}) must be divisible by the scale ({self.model.scale})"
            )
        if self.batch_size < max(self.workers, self.workers_max):
            raise ConfigError(
                f"batch_size is the global batch ({self.batch_size}); it must be >= workers "
                f"({max(self.workers, self.workers_max)})"
            )
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker and gpus_per_worker must be >= 0")
        if self.workers_max and self.workers_max < self.workers:
            raise ConfigError(f"workers_max ({self.workers_max}) must be >= workers ({self.workers}), or 0 (fixed)")
        if self.elastic_check_s <= 0:
            raise ConfigError(f"elastic_check_s must be > 0 seconds, got {self.elastic_check_s}")
        if self.upload_retry_s < 0:
            raise ConfigError(f"upload_retry_s must be >= 0 seconds, got {self.upload_retry_s}")
        if self.upload_timeout_s <= 0:
            raise ConfigError(f"upload_timeout_s must be > 0 seconds, got {self.upload_timeout_s}")
        if self.tracking_drain_s < 0:
            raise ConfigError(f"tracking_drain_s must be >= 0, got {self.tracking_drain_s}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        check_positive(self.keep_checkpoints, "keep_checkpoints")
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, got {self.milestones}")

    @property
    def per_worker_batch(self) -> int:
        """Largest per-worker batch; the global batch is split so ranks differ by at most one."""
        return -(-self.batch_size // self.workers)

    @property
    def effective_lr(self) -> float:
        """The learning rate used: ``lr``, times global batch / 16 when ``scale_lr`` is on."""
        return self.lr * (self.batch_size / 16 if self.scale_lr else 1.0)
