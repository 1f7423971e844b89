"""Benchmark datasets: the public archive's layout, plain HR folders, and LR generation.

Why this is more than a glob: the standard number depends on which LR an SR method sees. The
public ``benchmark.tar`` ships MATLAB-made LR images (``LR_bicubic/X{s}/<stem>x{s}.png``); when
they are absent we make LR with our MATLAB-exact ``imresize`` from HR cropped to a multiple of
the scale, which reproduces them bit for bit. A shipped LR whose size is not HR/scale means the
files do not belong together, and is refused rather than silently cropped into a wrong number.

:func:`check_files` applies those rules to every file of a run from the image headers alone,
before the first image is evaluated, so a bad file fails the run in seconds rather than hours
into a paper-size model's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.console import UserError
from pipeline.evaluate.metrics import SSIM_WINDOW, crop_to_multiple, match_sizes, rgb_to_gray
from pipeline.imageio import list_images, read_image

# Canonical names (the SNU archive's exact spelling) and accepted aliases.
KNOWN_BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
_ALIASES = {name.lower(): name for name in KNOWN_BENCHMARKS} | {"bsd100": "B100", "bsds100": "B100"}
LAYOUT_HINT = "expected DIR/benchmark/<Name>/HR/*.png"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark folder: ``hr_dir`` holds the ground truth; ``lr_root`` the shipped LR."""

    name: str
    root: Path
    hr_dir: Path
    lr_root: Path | None  # <root>/LR_bicubic when the standard layout is used

    def images(self) -> list[Path]:
        """HR files, sorted by name (the reference takes every file in HR/)."""
        return list_images(self.hr_dir)

    def lr_dir(self, scale: int) -> Path | None:
        """Folder of shipped LR images for ``scale``, or None to generate them."""
        if self.lr_root is None:
            return None
        d = self.lr_root / f"X{scale}"
        return d if d.is_dir() else None


@dataclass
class Sample:
    """An evaluation pair: HR cropped to exactly ``scale`` x LR size."""

    name: str
    hr: np.ndarray  # HxWx3 uint8, or HxW uint8 for grey ground truth
    lr: np.ndarray  # same channel layout as hr
    hr_path: Path
    lr_path: Path | None  # None when generated

    @property
    def grey(self) -> bool:
        return self.hr.ndim == 2


def canonical_name(name: str) -> str | None:
    return _ALIASES.get(name.strip().lower())


def resolve_benchmark(name: str, data_dir: str | Path | None) -> Benchmark:
    """A benchmark by archive name (looked up under ``data_dir``) or by folder path.

    A folder with an ``HR/`` subfolder is read in the standard layout; any other folder is
    taken as a plain folder of HR images (LR generated).
    """
    raw = name.strip()
    as_path = Path(raw).expanduser()
    canonical = canonical_name(raw)
    if canonical is None:
        if ("/" in raw or as_path.is_absolute() or raw.startswith(".")) or as_path.is_dir():
            if not as_path.is_dir():
                raise UserError(f"{as_path}: benchmark folder not found")
            return _from_folder(as_path.name, as_path)
        raise UserError(
            f"unknown benchmark {raw!r} (choose from {', '.join(KNOWN_BENCHMARKS)}, "
            "or give the path of a folder of HR images)"
        )
    if data_dir is None:
        raise UserError(f"{canonical}: no data folder given (--data-dir DIR; {LAYOUT_HINT})")
    base = Path(data_dir).expanduser()
    if not base.is_dir():
        raise UserError(f"{base}: data folder not found ({LAYOUT_HINT})")
    candidates = [base / "benchmark" / canonical, base / canonical]
    if base.name == canonical:
        candidates.insert(0, base)
    for root in candidates:
        if root.is_dir():
            return _from_folder(canonical, root)
    raise UserError(f"{candidates[0]}: benchmark folder not found ({LAYOUT_HINT})")


def _from_folder(name: str, root: Path) -> Benchmark:
    hr = root / "HR"
    if hr.is_dir():
        lr_root = root / "LR_bicubic"
        return Benchmark(name, root, hr, lr_root if lr_root.is_dir() else None)
    if (root / "LR_bicubic").is_dir():
        raise UserError(f"{hr}: HR folder not found next to LR_bicubic ({LAYOUT_HINT})")
    return Benchmark(name, root, root, None)


def resolve_benchmarks(names: list[str], data_dir: str | Path | None) -> list[Benchmark]:
    """All requested benchmarks, checked up front (folder exists, holds images)."""
    out = []
    seen = set()
    if any(n.strip().lower() == "all" for n in names):  # --benchmarks all: the standard five
        names = [n for n in names if n.strip().lower() != "all"] + list(KNOWN_BENCHMARKS)
    for name in names:
        bench = resolve_benchmark(name, data_dir)
        if bench.root in seen:
            continue
        seen.add(bench.root)
        bench.images()  # raises a one-line error for a missing/empty HR folder
        out.append(bench)
    if not out:
        raise UserError("no benchmarks given")
    return out


def benchmark_files(bench: Benchmark, max_images: int = 0) -> list[Path]:
    """The HR files a run evaluates: all of them, or the first ``max_images`` (0 = all)."""
    files = bench.images()
    return files[:max_images] if max_images else files


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header; the pixels are not decoded (fast for any size)."""
    from PIL import Image

    from pipeline.imageio import decode_errors

    if not Path(path).exists():
        raise UserError(f"{path}: file not found")
    with decode_errors(path, corrupt="corrupt image header"), Image.open(path) as img:
        return img.size


def min_hr_side(scale: int) -> int:
    """Smallest HR side (after cropping to a multiple of ``scale``) the protocol can score:
    ``scale`` px shaved from both borders must leave room for one SSIM window."""
    return 2 * scale + SSIM_WINDOW


def _lr_size_error(
    lr_path: Path, lr_wh: tuple[int, int], hr_path: Path, hr_wh: tuple[int, int], scale: int
) -> UserError | None:
    want = (hr_wh[0] // scale, hr_wh[1] // scale)
    if lr_wh == want:
        return None
    return UserError(
        f"{lr_path}: LR is {lr_wh[0]}x{lr_wh[1]} but {hr_path.name} is "
        f"{hr_wh[0]}x{hr_wh[1]}; expected {want[0]}x{want[1]} (HR / {scale})"
    )


def check_files(bench: Benchmark, hr_path: Path, scales: list[int]) -> None:
    """One HR file and its shipped LR files for ``scales``, from the headers: present, readable,
    sizes that belong together, large enough to score. Raises the first problem as one line."""
    hr_wh = image_size(hr_path)
    for scale in scales:
        used = (hr_wh[0] // scale * scale, hr_wh[1] // scale * scale)
        if min(used) < min_hr_side(scale):
            cropped = "" if used == hr_wh else (
                f" ({used[0]}x{used[1]} after cropping to a multiple of {scale})"
            )
            raise UserError(
                f"{hr_path}: image is {hr_wh[0]}x{hr_wh[1]}{cropped}, too small to score at "
                f"x{scale} (needs at least {min_hr_side(scale)} px per side: {scale} px shaved from "
                f"each border plus the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window)"
            )
        lp = lr_file(bench, hr_path, scale)
        if lp is not None:
            err = _lr_size_error(lp, image_size(lp), hr_path, hr_wh, scale)
            if err is not None:
                raise err


def lr_file(bench: Benchmark, hr_path: Path, scale: int) -> Path | None:
    """Shipped LR for ``hr_path`` (``<stem>x{s}<ext>``), None when LR must be generated.

    When the archive has an ``X{s}`` folder, every HR image must have its LR there.
    """
    d = bench.lr_dir(scale)
    if d is None:
        return None
    for suffix in (hr_path.suffix, ".png"):
        p = d / f"{hr_path.stem}x{scale}{suffix}"
        if p.is_file():
            return p
    raise UserError(f"{d / f'{hr_path.stem}x{scale}.png'}: LR image missing for {hr_path}")


Resize = Callable[..., np.ndarray]


def load_sample(bench: Benchmark, hr_path: Path, scale: int, resize: Resize) -> Sample:
    """Read HR (grey kept as grey), read or generate LR, crop HR to ``scale`` x LR size.

    ``resize`` is ``pipeline.preprocess.imresize`` (passed in, so this module does not import
    the preprocess stage). Pixels are decoded here, so a file whose header passed
    :func:`check_files` but whose data is truncated fails here, naming the file.
    """
    hr, _ = read_image(hr_path, keep_gray=True)
    lp = lr_file(bench, hr_path, scale)
    if lp is None:
        hr = crop_to_multiple(hr, scale)
        if hr.shape[0] == 0 or hr.shape[1] == 0:
            raise UserError(f"{hr_path}: image smaller than the scale ({scale})")
        lr = resize(hr, scale=1.0 / scale)
        return Sample(hr_path.stem, hr, np.asarray(lr, dtype=np.uint8), hr_path, None)
    lr, _ = read_image(lp, keep_gray=hr.ndim == 2)
    if hr.ndim == 2 and lr.ndim == 3:
        lr = np.clip(np.round(rgb_to_gray(lr)), 0, 255).astype(np.uint8)
    if hr.ndim == 3 and lr.ndim == 2:
        lr = np.repeat(lr[:, :, None], 3, axis=2)
    err = _lr_size_error(lp, (lr.shape[1], lr.shape[0]), hr_path, (hr.shape[1], hr.shape[0]), scale)
    if err is not None:
        raise err
    return Sample(hr_path.stem, match_sizes(hr, lr.shape, scale), lr, hr_path, lp)
