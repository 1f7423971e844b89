"""Which images go into which split, and the resume fingerprint of those inputs.

Two ways to name the inputs:

* ``--data-dir ROOT`` in the DIV2K layout: ``ROOT/DIV2K_train_HR`` is the train split and
  ``ROOT/DIV2K_valid_HR`` (optional) the valid split — what ``sr-pipeline download div2k``
  produces.
* ``--images DIR`` (train) plus, for the valid split, either ``--valid-images DIR2`` or
  ``--holdout N`` (the last N images of DIR by name). With neither, the valid split is empty.

Files with non-image suffixes are ignored with one warning (a README next to the photos should
not abort a run); files with image suffixes that do not decode are bad inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.imageio import IMAGE_SUFFIXES
from pipeline.preprocess.subimages import ImageTask, key_stems

DIV2K_TRAIN = "DIV2K_train_HR"
DIV2K_VALID = "DIV2K_valid_HR"


@dataclass
class Inputs:
    dataset: str
    roots: dict[str, str]
    tasks: dict[str, list[ImageTask]]
    ignored: list[str] = field(default_factory=list)


def scan_folder(folder: str | Path, what: str) -> tuple[list[Path], list[Path]]:
    """(image files sorted by name, ignored non-image files); UserError for missing/empty."""
    d = Path(folder)
    if not d.exists():
        raise UserError(f"{d}: {what} folder not found")
    if not d.is_dir():
        raise UserError(f"{d}: {what} is not a folder")
    try:
        entries = sorted(p for p in d.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise UserError(f"{d}: cannot list {what} folder ({exc.strerror})") from None
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
    ignored = [p for p in entries if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise UserError(f"{d}: no images in {what} folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, ignored


def _tasks(split: str, files: list[Path], root: Path) -> list[ImageTask]:
    sources = [str(p.relative_to(root)) for p in files]
    stems = key_stems(sources)
    return [
        # absolute, but not through symlinks: errors name the file the user has (a dangling
        # link is reported as itself, not as its missing target)
        ImageTask(split=split, index=i, path=os.path.abspath(p), source=src, stem=stem)
        for i, (p, src, stem) in enumerate(zip(files, sources, stems, strict=True))
    ]


def discover(cfg: PreprocessConfig) -> Inputs:
    """Resolve the configured inputs into per-split task lists (sorted, deterministic)."""
    if bool(cfg.data_dir) == bool(cfg.images):
        raise UserError("give exactly one of --data-dir (DIV2K layout) or --images (a folder of images)")
    if cfg.data_dir:
        if cfg.valid_images or cfg.holdout:
            raise UserError("--valid-images/--holdout go with --images; with --data-dir the valid split is DIV2K_valid_HR")
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise UserError(f"{root}: data folder not found")
        train_dir = root / DIV2K_TRAIN
        if not train_dir.is_dir():
            raise UserError(f"{root}: no {DIV2K_TRAIN}/ inside (expected the DIV2K layout; use --images for a plain folder)")
        train, ignored = scan_folder(train_dir, "train")
        valid: list[Path] = []
        if (root / DIV2K_VALID).is_dir():
            valid, ign = scan_folder(root / DIV2K_VALID, "valid")
            ignored += ign
        return Inputs(
            dataset="DIV2K",
            roots={"data_dir": str(root.resolve())},
            tasks={"train": _tasks("train", train, root), "valid": _tasks("valid", valid, root)},
            ignored=[str(p) for p in ignored],
        )
    if cfg.valid_images and cfg.holdout:
        raise UserError("give either --valid-images or --holdout, not both")
    root = Path(cfg.images)  # type: ignore[arg-type]
    train, ignored = scan_folder(root, "images")
    roots = {"images": str(root.resolve())}
    if cfg.holdout:
        if cfg.holdout >= len(train):
            raise UserError(f"{root}: --holdout {cfg.holdout} would leave no training images ({len(train)} found)")
        valid = train[-cfg.holdout :]
        train = train[: -cfg.holdout]
        return Inputs(
            dataset=root.resolve().name,
            roots=roots,
            tasks={"train": _tasks("train", train, root), "valid": _tasks("valid", valid, root)},
            ignored=[str(p) for p in ignored],
        )
    valid_tasks: list[ImageTask] = []
    if cfg.valid_images:
        vroot = Path(cfg.valid_images)
        valid, ign = scan_folder(vroot, "valid images")
        ignored += ign
        roots["valid_images"] = str(vroot.resolve())
        valid_tasks = _tasks("valid", valid, vroot)
    return Inputs(
        dataset=root.resolve().name,
        roots=roots,
        tasks={"train": _tasks("train", train, root), "valid": valid_tasks},
        ignored=[str(p) for p in ignored],
    )


def fingerprint(inputs: Inputs, params: dict[str, object], version: str) -> str:
    """Hash of everything that determines the shard bytes: parameters, code version, and every
    input file's name, size and mtime. A resume is only trusted when this matches."""
    files = []
    for split in ("train", "valid"):
        for t in inputs.tasks[split]:
            try:
                st = Path(t.path).stat()
            except FileNotFoundError:
                if not os.path.islink(t.path):
                    raise UserError(f"{t.path}: cannot read (file vanished)") from None
                st = Path(t.path).lstat()  # a dangling link: the worker reports it (or --skip-bad skips it)
            except OSError as exc:
                raise UserError(f"{t.path}: cannot read ({exc.strerror})") from None
            files.append([split, t.source, t.stem, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"params": params, "version": version, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
