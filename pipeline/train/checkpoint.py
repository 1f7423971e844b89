"""Training checkpoints (Ray Train) and the best-model export.

A Ray checkpoint directory holds two files:

* ``model.pt``: the model in our own format (:func:`pipeline.model.save_checkpoint`), so
  ``sr-pipeline evaluate --checkpoint <checkpoint dir>`` works on any checkpoint without
  model flags; with EMA on, the averaged weights ride along as ``ema_state_dict``.
* ``train_state.pt``: the rest of the training state: optimizer moments, LR schedule,
  counters (epoch, step, best PSNR and its step, skipped steps, restarts), the torch/numpy/
  python RNG states, the MLflow run id and the config.

What a resume restores, precisely: weights, EMA, optimizer, schedule, counters and RNG
states, at the end of the checkpoint's epoch. What it does not: the data stream. The loader's
position is not saved; :class:`pipeline.train.data.PatchStream` is reseeded from
``(seed, stream, start_step)``, so the resumed run trains on different patches than an
uninterrupted one would: the same optimisation continued, not a bit-exact replay.

Both are read back with ``torch.load(weights_only=True)``: only tensors and plain containers
are stored (RNG states of numpy/python as lists, never pickled objects).

The best model by validation PSNR is kept outside Ray's rotation, in
``<run dir>/best_model/`` (``model.pt`` in our format and ``state_dict.pt``, the plain
state_dict the official code loads), so "keep the last K" never deletes it.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.console import UserError
from pipeline.train import storage

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
PLAIN_FILE = "state_dict.pt"
STATE_FORMAT = "sr-pipeline/train-state"


@dataclass
class Progress:
    """Counters that survive restarts (stored in ``train_state.pt``)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # iterations completed (skipped non-finite steps included)
    best_psnr: float = -math.inf
    best_step: int = -1
    skipped_steps: int = 0  # non-finite losses skipped, over the whole run
    restarts: list[int] = field(default_factory=list)  # steps at which the run was resumed


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    *,
    ema: torch.nn.Module | None = None,
    run_id: str | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` + ``train_state.pt`` into `directory` (raw, unwrapped model)."""
    from pipeline.model import save_checkpoint

    directory = Path(directory)
    extra: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step}
    if ema is not None:
        extra["ema_state_dict"] = ema.state_dict()
    save_checkpoint(directory / MODEL_FILE, model, **extra)
    state = {
        "format": STATE_FORMAT,
        "format_version": 1,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_state(),
        "mlflow_run_id": run_id,
        "config": config or {},
    }
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)


def load(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> tuple[Progress, dict[str, Any]]:
    """Restore everything from a checkpoint directory; returns (progress, train_state)."""
    from pipeline.model import read_checkpoint

    directory = Path(directory)
    ckpt = read_checkpoint(directory / MODEL_FILE)
    model.load_state_dict(ckpt["state_dict"])
    if ema is not None:
        ema.load_state_dict(ckpt.get("ema_state_dict", ckpt["state_dict"]))
    path = directory / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable training state ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: not an sr-pipeline training state")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return Progress(**state["progress"]), state


def write_best(
    run_dir: str, model: torch.nn.Module, psnr: float, step: int, epoch: int, run_id: str | None
) -> None:
    """Save `model` as the run's best model (our format + plain state_dict + meta.json)."""
    from pipeline.model import export_state_dict, save_checkpoint

    meta = {"val_psnr": psnr, "step": step, "epoch": epoch, "mlflow_run_id": run_id}
    with tempfile.TemporaryDirectory(prefix="sr-best-") as tmp:
        save_checkpoint(Path(tmp) / MODEL_FILE, model, val_psnr=float(psnr), step=step, epoch=epoch)
        export_state_dict(Path(tmp) / PLAIN_FILE, model)
        storage.upload_dir(tmp, storage.join(run_dir, storage.BEST_DIR))
    storage.write_json(storage.join(run_dir, storage.BEST_DIR, "meta.json"), meta)  # last: marks complete


def read_best_meta(run_dir: str) -> dict[str, Any] | None:
    return storage.read_json(storage.join(run_dir, storage.BEST_DIR, "meta.json"))
