"""Training checkpoints (Ray Train) and the best-model export.

A Ray checkpoint directory holds two files:

* ``model.pt``: the model in our own format (:func:`pipeline.model.save_checkpoint`), so
  ``sr-pipeline evaluate --checkpoint <checkpoint dir>`` works on any checkpoint without
  model flags; with EMA on, the averaged weights ride along as ``ema_state_dict``.
* ``train_state.pt``: the rest of the training state: optimizer moments, LR schedule, the
  loss scaler, counters (epoch, step, best PSNR and its step, skipped steps, restarts, the
  checkpoint interval in force), **every rank's own RNG states** (torch CPU, its own CUDA
  device, numpy, python), the MLflow run id and the config.

What a resume restores, precisely, and why that makes it exact: everything above, at the
checkpoint's step, and each rank gets back its *own* RNG states (the stochastic hash draws
differ per rank after the first step's data, so rank 0's states on every rank would change
the continuation). The loader's position is the step itself: ``PatchStream(start_step=k)``
yields exactly the batches an uninterrupted stream yields from step k on. A rank with no
saved state (the world grew) derives one from ``(seed, rank, step)``: deterministic, though
not a continuation of anything.

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
    checkpoint_every: int = 0  # steps between checkpoints, once decided (0 = not yet)


def rng_state(device: Any = None) -> dict[str, Any]:
    """This process's RNG states: torch CPU, python, numpy, and `device`'s CUDA state only."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Any = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    if "cuda" in state and device is not None and getattr(device, "type", None) == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list):  # format 1 kept every visible GPU's state: take our own
            index = device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def derive_rng_state(seed: int, rank: int, step: int, device: Any = None) -> None:
    """RNG states for a rank the checkpoint has none for (a larger world): a pure function of
    (seed, rank, step), so every replay of the same resume draws the same numbers."""
    mixed = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed)
    if device is not None and getattr(device, "type", None) == "cuda":
        torch.cuda.manual_seed(mixed)


def restore_rank_rng(states: list[dict[str, Any]] | None, rank: int, seed: int, step: int, device: Any = None) -> str:
    """Put back this rank's own RNG states; returns how ("own", "derived" or "fresh")."""
    if states is None:
        return "fresh"
    if rank < len(states) and states[rank] is not None:
        set_rng_state(states[rank], device)
        return "own"
    derive_rng_state(seed, rank, step, device)
    return "derived"


def save(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    *,
    ema: torch.nn.Module | None = None,
    scaler: Any = None,
    rng: list[dict[str, Any]] | None = None,
    run_id: str | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Write ``model.pt`` + ``train_state.pt`` into `directory` (raw, unwrapped model).

    ``rng``: every rank's :func:`rng_state`, by rank (gathered by the caller); default: this
    process's own, as rank 0.
    """
    from pipeline.model import save_checkpoint

    directory = Path(directory)
    extra: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step}
    if ema is not None:
        extra["ema_state_dict"] = ema.state_dict()
    save_checkpoint(directory / MODEL_FILE, model, **extra)
    state = {
        "format": STATE_FORMAT,
        "format_version": 2,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "progress": asdict(progress),
        "rng_per_rank": rng if rng is not None else [rng_state()],
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
    scaler: Any = None,
    restore_rng: bool = True,
) -> tuple[Progress, dict[str, Any]]:
    """Restore everything from a checkpoint directory; returns (progress, train_state).

    ``restore_rng`` puts back rank 0's states in this process (a single-process caller); the
    training loop passes False and calls :func:`restore_rank_rng` with
    :func:`rng_states` of the state, once its setup has drawn what it draws.
    """
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
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(rng_states(state)[0])
    known = {f for f in Progress.__dataclass_fields__}
    return Progress(**{k: v for k, v in state["progress"].items() if k in known}), state


def rng_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-rank RNG states of a train state (format 1 stored rank 0's only)."""
    return state.get("rng_per_rank") or [state["rng"]]


def write_best(
    run_dir: str, model: torch.nn.Module, psnr: float, step: int, epoch: int, run_id: str | None
) -> None:
    """Save `model` as the run's best model (our format + plain state_dict + meta.json).

    meta.json marks the folder complete: it is removed first and written last, so a write cut
    short (a storage outage) leaves no best model rather than one whose files disagree."""
    from pipeline.model import export_state_dict, save_checkpoint

    meta = {"val_psnr": psnr, "step": step, "epoch": epoch, "mlflow_run_id": run_id}
    storage.delete(storage.join(run_dir, storage.BEST_DIR, "meta.json"))
    with tempfile.TemporaryDirectory(prefix="sr-best-") as tmp:
        save_checkpoint(Path(tmp) / MODEL_FILE, model, val_psnr=float(psnr), step=step, epoch=epoch)
        export_state_dict(Path(tmp) / PLAIN_FILE, model)
        storage.upload_dir(tmp, storage.join(run_dir, storage.BEST_DIR))
    storage.write_json(storage.join(run_dir, storage.BEST_DIR, "meta.json"), meta)  # last: marks complete


def read_best_meta(run_dir: str) -> dict[str, Any] | None:
    return storage.read_json(storage.join(run_dir, storage.BEST_DIR, "meta.json"))
