"""What `evaluate` hands back: a table, a per-image CSV, JSON for scripts, comparison figures.

Files are written atomically (temporary name, then rename) so an interrupted run never leaves a
half CSV under the final name, and :class:`ResultWriter` rewrites them while the loop runs, so
an interrupted run keeps the scores it already paid for. Figures are drawn with Pillow only (no
matplotlib dependency).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.imageio import atomic_write_bytes, write_png

if TYPE_CHECKING:
    from pipeline.evaluate.results import FigureRow, ImageRow, Outcome, Summary


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def format_seconds(value: float) -> str:
    """Three significant digits (0.00870, 1.23, 12.3, 123; whole numbers from 100 up, at most
    six decimals), so a fast method's column does not collapse to 0.0 while a slow one's stays
    short."""
    if not math.isfinite(value):
        return "-"
    if value <= 0:
        return "0"
    rounded = float(f"{value:.2e}")  # to 3 significant digits first: 9.996 -> 10.0, not 10.00
    digits = min(6, max(0, 2 - math.floor(math.log10(rounded))))
    return f"{rounded:.{digits}f}"


def render_table(
    summaries: list[Summary], label: str, with_bicubic: bool = True, protocol: str = "standard"
) -> str:
    """Plain-text table (stdout stays machine-friendly: no colour codes).

    ``with_bicubic`` adds the bicubic baseline of the same images next to the method.
    ``seconds`` is the time spent in the method itself (summed over images and repeats; reading
    files and computing metrics excluded), ``ms/img`` the same per image and repeat.
    """
    stochastic = any(s.repeats > 1 for s in summaries)
    head = ["benchmark", "scale", f"{label} PSNR", "SSIM"]
    if stochastic:
        head.insert(3, "± std")
        head.append("± std")
    if with_bicubic:
        head += ["bicubic PSNR", "SSIM"]
    head += ["images", "seconds", "ms/img"]
    rows = []
    for s in summaries:
        row = [s.benchmark, f"x{s.scale}", _fmt(s.psnr, 3), _fmt(s.ssim, 4)]
        if stochastic:
            row.insert(3, _fmt(s.psnr_std, 4))
            row.append(_fmt(s.ssim_std, 4))
        if with_bicubic:
            row += [_fmt(s.bicubic_psnr, 3), _fmt(s.bicubic_ssim, 4)]
        runs = s.images * s.repeats
        row += [
            str(s.images),
            format_seconds(s.seconds),
            format_seconds(1000.0 * s.seconds / runs) if runs else "-",
        ]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    note = "PSNR/SSIM on Y (BT.601), shave = scale; seconds = time in the method"
    if protocol == "official":
        note = ("official repository's protocol (grey repeated to RGB before Y; SSIM offset-free, "
                "whole image); shave = scale; seconds = time in the method")  # fmt: skip
    if stochastic:
        note += f"; mean ± sample std over {summaries[0].repeats} random hash draws"
    return "\n".join(lines) + f"\n({note})"


def write_csv(path: Path, rows: list[ImageRow]) -> Path:
    """One line per image (and repeat) with PSNR/SSIM of the method and of bicubic."""
    from pipeline.evaluate.results import ImageRow

    buf = io.StringIO()
    names = [f.name for f in fields(ImageRow)]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        d = asdict(row)
        for k in ("psnr", "bicubic_psnr"):
            d[k] = _fmt(d[k], 4) if math.isfinite(d[k]) else "inf"
        for k in ("ssim", "bicubic_ssim"):
            d[k] = f"{d[k]:.6f}"
        d["seconds"] = f"{d['seconds']:.4f}"
        writer.writerow(d)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def summary_records(summaries: list[Summary]) -> list[dict]:
    """The JSON table: {benchmark, scale, psnr, ssim, images, seconds} plus std/bicubic fields."""
    out = []
    for s in summaries:
        rec = {
            "benchmark": s.benchmark,
            "scale": s.scale,
            "psnr": s.psnr,
            "ssim": s.ssim,
            "images": s.images,
            "seconds": round(s.seconds, 6),
            "repeats": s.repeats,
            "psnr_std": s.psnr_std,
            "ssim_std": s.ssim_std,
            "bicubic_psnr": s.bicubic_psnr,
            "bicubic_ssim": s.bicubic_ssim,
        }
        for k, v in rec.items():
            if isinstance(v, float) and not math.isfinite(v):
                rec[k] = None  # JSON has no inf/nan
        out.append(rec)
    return out


def write_json(path: Path, summaries: list[Summary], provenance: dict | None = None) -> Path:
    """The summary records; with ``provenance``, every record carries it (self-describing)."""
    records = summary_records(summaries)
    if provenance is not None:
        records = [{**r, "provenance": provenance} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(records, indent=2) + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------------
# comparison figure
# ---------------------------------------------------------------------------------------------

_PANEL = 192  # displayed size of each crop (nearest-neighbour enlarged, so pixels stay visible)
_PAD = 6
_TEXT_H = 18


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img


def _enlarge(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(_rgb(img)).resize((size, size), Image.Resampling.NEAREST))


def comparison_figure(
    rows: list[FigureRow], title: str, label: str, with_sr: bool = True
) -> np.ndarray:
    """HR crop | bicubic | method, one row per image, with the PSNR of the whole image (not of
    the crop; on Y, the mean over repeats for the method) under each panel.

    ``with_sr=False`` (the bicubic baseline itself) leaves out the third, identical panel.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = 3 if with_sr else 2
    width = cols * _PANEL + (cols + 1) * _PAD
    row_h = _PANEL + _TEXT_H + _PAD
    height = _TEXT_H + _PAD + len(rows) * row_h + _PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, 3), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = _TEXT_H + _PAD + r * row_h
        panels = [
            (row.hr, f"HR {row.image}"),
            (row.bicubic, f"Bicubic {_fmt(row.bicubic_psnr, 2)} dB"),
            (row.sr, f"{label} {_fmt(row.psnr, 2)} dB"),
        ][:cols]
        for c, (img, caption) in enumerate(panels):
            x = _PAD + c * (_PANEL + _PAD)
            canvas.paste(Image.fromarray(_enlarge(img, _PANEL)), (x, y))
            draw.text((x, y + _PANEL + 3), caption, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def write_figures(folder: Path, outcome: Outcome) -> list[Path]:
    """One PNG per benchmark and scale: ``<Benchmark>_x<scale>.png``."""
    paths = []
    for (bench, scale), rows in outcome.figures.items():
        folder.mkdir(parents=True, exist_ok=True)
        with_sr = outcome.method != "bicubic"
        what = f"HR | bicubic | {outcome.label}" if with_sr else "HR | bicubic"
        title = f"{bench} x{scale}: {what} (PSNR on Y, shave {scale})"
        path = folder / f"{bench}_x{scale}.png"
        write_png(path, comparison_figure(rows, title, outcome.label, with_sr))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# keeping the files current while the loop runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Written:
    csv_path: Path
    json_path: Path
    figure_paths: list[Path]


class ResultWriter:
    """Keeps ``per_image.csv`` and ``summary.json`` in ``out_dir`` current during the loop.

    Why: a paper-size model can take hours over all benchmarks, and a failure at image N (a
    truncated file, out of memory, Ctrl-C, a killed job) must not lose the scores of the images
    before it. The files are rewritten (atomically) after every benchmark x scale and, within
    one, after the first image that ends ``flush_seconds`` or more after the last write; so a
    killed process loses about that much work (plus the image in progress), and
    rewriting a few hundred CSV lines never costs a noticeable share of the run. The folder is
    created by the first write, so a run that fails before any image leaves no empty folder.
    ``summary.json`` lists only completed benchmark x scale pairs (an average over part of a
    benchmark is not its number); the CSV has every image scored so far.
    """

    def __init__(self, out_dir: Path, flush_seconds: float = 30.0, provenance: dict | None = None) -> None:
        self.out_dir = out_dir
        self.flush_seconds = flush_seconds
        self.provenance = provenance
        self.latest: Outcome | None = None
        self._last_flush = time.monotonic()

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "per_image.csv"

    @property
    def json_path(self) -> Path:
        return self.out_dir / "summary.json"

    def update(self, outcome: Outcome, group_done: bool) -> None:
        """Called after every image (``group_done`` after the last of a benchmark x scale)."""
        self.latest = outcome
        if group_done or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.write(outcome)

    def write(self, outcome: Outcome, figures: bool = False) -> Written:
        """Rewrite the CSV and JSON (and, at the end, the figures) from ``outcome``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.csv_path, outcome.rows)
        write_json(self.json_path, outcome.summaries, self.provenance)
        if self.provenance is not None:  # the CSV's sidecar: same settings, for every row
            from pipeline.evaluate.provenance import write_sidecar

            write_sidecar(self.out_dir, self.provenance)
        paths = write_figures(self.out_dir / "figures", outcome) if figures else []
        self._last_flush = time.monotonic()
        return Written(self.csv_path, self.json_path, paths)
