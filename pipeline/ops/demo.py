"""`sr-pipeline demo`: the whole pipeline end to end, offline, on a CPU, in a few minutes.

Why these pieces: a new user should see every stage do its real work, not a toy path. So the
demo calls the same library functions as the commands (preprocess -> train with Ray Train
DDP on 2 CPU workers -> evaluate), writes into the same default MLflow store the `ui` command
opens, and only swaps the data: real photographs bundled with scikit-image (loaded from the
installed package, no download) stand in for DIV2K. One photo is held out from training; the
model is validated and evaluated on it (and on a benchmark folder when one is present), always
next to the bicubic baseline computed by the same code.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import console, defaults
from pipeline.console import UserError

# scikit-image's bundled colour photographs (they ship inside the wheel: no network).
TRAIN_PHOTOS = ("astronaut", "coffee", "immunohistochemistry", "motorcycle_left", "motorcycle_right", "rocket")
HELDOUT_PHOTOS = ("chelsea",)
BENCHMARK_NAMES = ("Set5",)  # small enough for the 5-minute budget; `evaluate` does the rest


@dataclass
class DemoOptions:
    """Knobs of the demo; everything else comes from the `tiny` preset and stage defaults."""

    workdir: str | None = None  # default: $SR_PIPELINE_HOME/demo
    data_dir: str | None = None  # a real DIV2K root instead of the bundled photos
    benchmark_dir: str | None = None  # folder holding benchmark/<Name>/HR (default: home data dir)
    scale: int = 2
    workers: int = 2
    epochs: int = 10  # ~2 CPU minutes of training on 2 cores: clearly above bicubic, well within 5 min
    iters_per_epoch: int | None = None
    run_name: str | None = None
    experiment: str = "demo"
    tracking_uri: str | None = None
    address: str | None = None
    extra_train: dict[str, object] = field(default_factory=dict)


@dataclass
class DemoResult:
    run_id: str | None
    run_name: str
    experiment: str
    tracking_uri: str
    rows: list[tuple[str, int, float, float]]  # (benchmark, scale, model psnr, bicubic psnr)
    seconds: float
    eval_dir: str


def write_photos(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Save bundled photos as PNG (atomically; kept across reruns)."""
    from skimage import data

    from pipeline.imageio import write_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            if name.startswith("motorcycle_"):
                left, right, _ = data.stereo_motorcycle()
                image = left if name.endswith("left") else right
            else:
                image = getattr(data, name)()
            write_png(path, image[..., :3])
        paths.append(path)
    return paths


def find_benchmarks(explicit: str | None) -> tuple[str | None, list[str]]:
    """(data dir, names) of the benchmark sets present, e.g. after `download benchmarks`."""
    root = Path(explicit).expanduser() if explicit else defaults.data_dir()
    if explicit and not (root / "benchmark").is_dir():
        raise UserError(f"{root}: no benchmark/ folder (expected benchmark/<Name>/HR/*.png)")
    names = [n for n in BENCHMARK_NAMES if (root / "benchmark" / n / "HR").is_dir()]
    return (str(root), names) if names else (None, [])


def run_demo(opts: DemoOptions) -> DemoResult:
    from pipeline.config import EvalConfig, PreprocessConfig, TrainConfig, load_config
    from pipeline.evaluate.driver import evaluate
    from pipeline.preprocess.run import run_preprocess
    from pipeline.tracking import redact_uri, resolve_uri
    from pipeline.train.launcher import train

    start = time.monotonic()
    work = Path(opts.workdir).expanduser().resolve() if opts.workdir else defaults.home() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = resolve_uri(opts.tracking_uri)
    scale = opts.scale

    # 1. data -> shards
    if opts.data_dir:
        console.info(f"[1/4] preprocess: DIV2K at {opts.data_dir}")
        pre = load_config(PreprocessConfig, overrides={
            "data_dir": opts.data_dir, "out": str(work / f"shards-div2k-x{scale}"), "scales": [scale],
        })
        heldout_dir = Path(opts.data_dir) / "DIV2K_valid_HR"
    else:
        photos = work / "photos"
        write_photos(photos / "train", TRAIN_PHOTOS)
        write_photos(photos / "heldout", HELDOUT_PHOTOS)
        heldout_dir = photos / "heldout"
        console.info(
            f"[1/4] preprocess: {len(TRAIN_PHOTOS)} bundled photos for training, "
            f"{len(HELDOUT_PHOTOS)} held out ({', '.join(HELDOUT_PHOTOS)}), into WebDataset shards"
        )
        pre = load_config(PreprocessConfig, overrides={
            "images": str(photos / "train"), "valid_images": str(heldout_dir),
            "out": str(work / f"shards-x{scale}"), "scales": [scale],
            "crop": 192, "step": 96, "shard_samples": 16,
        })
    run_preprocess(pre)

    # 2. train
    overrides: dict[str, object] = {
        "shards": pre.out, "model.scale": scale, "workers": opts.workers, "use_gpu": "no",
        "epochs": opts.epochs, "iters_per_epoch": opts.iters_per_epoch, "run_name": opts.run_name
        or time.strftime("demo-%Y%m%d-%H%M%S"), "experiment": opts.experiment,
        "tracking_uri": opts.tracking_uri, "address": opts.address,
    }
    # one LR halving three quarters of the way, as the paper's schedule does at scale
    overrides["milestones"] = [max(1, (3 * opts.epochs) // 4)]
    if opts.data_dir:
        overrides["val_max_images"] = 2
    overrides.update(opts.extra_train)
    tcfg = load_config(TrainConfig, preset="tiny", overrides=overrides)
    console.info(
        f"[2/4] train: DNLAN tiny x{scale}, {tcfg.workers} Ray workers on CPU (gloo DDP), "
        f"{tcfg.epochs} epochs x {tcfg.iters_per_epoch} steps, global batch {tcfg.batch_size}"
    )
    outcome = train(tcfg)

    # 3. evaluate the best model on the held-out photo(s) and benchmarks, next to bicubic
    bench_dir, bench_names = find_benchmarks(opts.benchmark_dir)
    benchmarks = [str(heldout_dir), *bench_names]
    console.info(f"[3/4] evaluate: best checkpoint on {', '.join([heldout_dir.name, *bench_names])} at x{scale}")
    ecfg = load_config(EvalConfig, overrides={
        "method": "dnlan", "run_id": outcome.mlflow_run_id, "checkpoint": None if outcome.mlflow_run_id else outcome.run_dir,
        "benchmarks": benchmarks, "data_dir": bench_dir, "scales": [scale], "tiling": "overlap",
        "tracking_uri": opts.tracking_uri, "out": str(work / "evaluation" / outcome.run_name),
        "max_images": 2 if opts.data_dir else 0,
    })
    report = evaluate(ecfg)
    rows = [(s.benchmark, s.scale, s.psnr, s.bicubic_psnr) for s in report.outcome.summaries]

    # 4. where to look
    result = DemoResult(
        run_id=outcome.mlflow_run_id, run_name=outcome.run_name, experiment=tcfg.experiment,
        tracking_uri=redact_uri(tracking_uri), rows=rows, seconds=time.monotonic() - start,
        eval_dir=str(report.out_dir),
    )
    return result


def render(result: DemoResult) -> str:
    lines = [
        f"[4/4] demo finished in {result.seconds / 60:.1f} min",
        f"  MLflow run id:  {result.run_id}  (run {result.run_name!r}, experiment {result.experiment!r})",
        f"  tracking store: {result.tracking_uri}",
        "  PSNR (Y, shave = scale) of the trained tiny DNLAN against bicubic:",
    ]
    for bench, scale, psnr, bicubic in result.rows:
        lines.append(f"    {bench:<12} x{scale}  DNLAN {psnr:6.2f} dB   bicubic {bicubic:6.2f} dB   ({psnr - bicubic:+.2f} dB)")
    from pipeline.tracking import ui_command

    lines += [
        "  (a few CPU minutes of training; the paper recipe trains 1.5 M steps on GPUs: cluster/README.md)",
        f"  tables, CSV and figures: {result.eval_dir}",
        f"browse the run: {ui_command(result.tracking_uri)}   then open http://127.0.0.1:5000",
    ]
    return "\n".join(lines)


def as_dict(result: DemoResult) -> dict[str, object]:
    return dataclasses.asdict(result)
