"""Typed configuration: one dataclass per stage, named presets, YAML files and CLI overrides.

Resolution order for every stage is *defaults -> preset -> YAML file -> CLI options*, and the
result is validated once, so a bad value is reported as one line that names the field (and the
file it came from) before any work starts. :func:`flatten` turns any config into the flat
``{"model.n_feats": "192", ...}`` mapping that is logged as MLflow params, so a run's page shows
every value that shaped it.

Presets bundle a model and a training recipe:

* ``paper``: the seed command of the reference implementation (spec section 4), per scale.
* ``paper128``: the same with ``n_feats 128`` (the reference's demo.sh).
* ``tiny``: a CPU-sized DNLAN (F 64, 2 groups) and a minutes-long recipe, for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pipeline.console import UserError

SCALES = (2, 3, 4)
# Overlap tiling, LR pixels, for the library and every command alike. 192/16 recomputes
# (192/160)^2 = 1.44x the pixels (96/16 would be 2.25x) and keeps a paper-model tile well
# under 1 GB (benchmarks/RESULTS.md).
DEFAULT_TILE = 192
DEFAULT_TILE_OVERLAP = 16


class ConfigError(UserError):
    """An invalid configuration value (one line: which field, what was wrong)."""


# ---------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------


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
        _check_scale(self.scale, "model.scale")
        for name in ("n_resgroups", "n_resblocks", "n_feats", "reduction", "n_hashes", "chunk_size"):
            _positive(getattr(self, name), f"model.{name}")
        if self.n_hashlength < 0:
            raise ConfigError(f"model.n_hashlength must be >= 0 (0 = automatic), got {self.n_hashlength}")
        if self.n_feats % self.reduction:
            raise ConfigError(
                f"model.n_feats ({self.n_feats}) must be divisible by model.reduction ({self.reduction})"
            )
        if self.rgb_range <= 0:
            raise ConfigError(f"model.rgb_range must be > 0, got {self.rgb_range}")


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
            _check_scale(s, "preprocess.scales")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"preprocess.scales has duplicates: {self.scales}")
        _positive(self.crop, "preprocess.crop")
        _positive(self.step, "preprocess.step")
        _positive(self.shard_samples, "preprocess.shard_samples")
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
            _positive(getattr(self, name), name)
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
        _positive(self.keep_checkpoints, "keep_checkpoints")
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


@dataclass
class EvalConfig:
    """`sr-pipeline evaluate`: the standard benchmark protocol (spec section 5).

    ``scales`` empty means automatic: the checkpoint's own scale for a model, 2, 3 and 4 for
    bicubic. ``preset`` and ``model`` only matter for official (plain state_dict) checkpoints;
    ours carry their config.
    """

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Literal["dnlan", "bicubic"] = "dnlan"
    checkpoint: str | None = None
    run_id: str | None = None
    model_uri: str | None = None  # an MLflow Model of ours, e.g. models:/dnlan-x2@champion
    use_ema: bool = True  # evaluate the EMA weights when the checkpoint holds them
    # Official state_dicts: read n_feats/depth/scale from the tensor shapes unless a preset or
    # model option is imposed (the CLI sets this false when --preset is given).
    official_from_shapes: bool = True
    data_dir: str | None = None
    benchmarks: list[str] = field(default_factory=lambda: ["Set5", "Set14", "B100", "Urban100", "Manga109"])
    scales: list[int] = field(default_factory=list)
    max_images: int = 0  # 0 = all images of each benchmark
    tiling: Literal["none", "reference", "overlap"] = "reference"
    tile: int = DEFAULT_TILE  # overlap tiling, LR pixels (see DEFAULT_TILE)
    tile_overlap: int = DEFAULT_TILE_OVERLAP
    self_ensemble: bool = False
    hash: Literal["fixed", "stochastic"] = "fixed"
    hash_seed: int = 0
    repeats: int = 1
    save_images: bool = False
    figure_images: int = 3  # rows of the comparison figure per benchmark and scale
    out: str | None = None  # folder for CSV, JSON, figures, images (default: under the home)
    json_path: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "dnlan-eval"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast for the network (auto: bf16 on a GPU that has it, else fp32); hashing stays fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # standard: MATLAB-style Y, SSIM on the valid region (what papers report); official: the
    # reference repository's own Python evaluation, for comparison (README "Evaluation protocol")
    protocol: Literal["standard", "official"] = "standard"
    workers: int = 1  # > 1: images spread over that many Ray actors (one GPU each if any)
    address: str | None = None  # Ray cluster for workers > 1 (default: RAY_ADDRESS or local)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        self.model.validate()
        for s in self.scales:
            _check_scale(s, "scale")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"scale lists a value twice: {self.scales}")
        if not self.benchmarks:
            raise ConfigError("benchmarks must name at least one benchmark")
        _positive(self.tile, "tile")
        if self.tile_overlap < 0 or 2 * self.tile_overlap >= self.tile:
            raise ConfigError(
                f"tile_overlap must be >= 0 and less than half the tile ({self.tile}), got {self.tile_overlap}"
            )
        _positive(self.repeats, "repeats")
        _positive(self.workers, "workers")
        if self.repeats > 1 and self.hash != "stochastic":
            raise ConfigError(
                "repeats > 1 needs hash=stochastic (fixed hashing gives the same number every time)"
            )
        if self.max_images < 0:
            raise ConfigError(f"max_images must be >= 0 (0 = all), got {self.max_images}")
        if self.figure_images < 0:
            raise ConfigError(f"figure_images must be >= 0, got {self.figure_images}")


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

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


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Flat ``{"a.b": "value"}`` view of a config, the form MLflow params take."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = "" if value is None else str(value)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe) of a config, e.g. to store in a checkpoint."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Mapping -> dataclass with type checks
# ---------------------------------------------------------------------------------------------


def from_mapping(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown option {prefix}{unknown[0]!r} (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_mapping(tp, value, prefix=name + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(items)
            if args and len(items) != len(args):
                raise ConfigError(f"{name} must have {len(args)} values, got {len(items)}")
            return tuple(_coerce(v, a, name) for v, a in zip(items, args, strict=True))
        return items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # nan slips through every `<= 0` check
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _check_scale(value: int, name: str) -> None:
    if value not in SCALES:
        raise ConfigError(f"{name} must be 2, 3 or 4 (got {value})")


def _positive(value: float, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _only_fields(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in d.items()}


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
