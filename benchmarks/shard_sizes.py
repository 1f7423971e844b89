"""Disk size of the two shard encodings: measured PNG/raw ratios on real photos, and DIV2K's
raw size computed from its sub-image geometry.

    python benchmarks/shard_sizes.py [--crop 96] [--step 48]

Measured: both encodings of the same real photos (T91 and Set14 from ../shared/data, scales
2,3,4), summed per member kind (HR, LR x2/x3/x4) from the tar members, so the PNG/raw ratio
of each kind is a measurement. Computed: a DIV2K train shard sample with the defaults (480 px
HR crop) has fixed raw member sizes (128-byte .npy header + H*W*3 bytes, each member padded to
512-byte tar blocks plus a 512-byte header), and BasicSR's list of DIV2K800 sub-images at the
same crop and step has 32,592 entries (meta_info_DIV2K800sub_GT.txt). DIV2K's PNG size is that
raw size times the ratio measured here: an estimate, since DIV2K photos are larger and
smoother than T91/Set14 (PNG likely compresses them better than measured here).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("SR_PIPELINE_QUIET", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIV2K_TRAIN_SUBIMAGES = 32592  # BasicSR meta_info_DIV2K800sub_GT.txt, crop 480, step 240
KINDS = ("hr", "lr_x2", "lr_x3", "lr_x4")


def member_bytes(out: Path) -> dict[str, int]:
    """Bytes in the tars per member kind, counting each member's header and block padding."""
    totals = dict.fromkeys((*KINDS, "json", "other"), 0)
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                kind = m.name.split(".")[1] if m.name.count(".") >= 1 else "other"
                kind = kind if kind in totals else "other"
                totals[kind] += 512 + (m.size + 511) // 512 * 512
    return totals


def npy_member(h: int, w: int) -> int:
    """Tar bytes of one raw member: 512 header + (128-byte .npy header + pixels) padded to 512."""
    return 512 + (128 + h * w * 3 + 511) // 512 * 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--step", type=int, default=48)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding train/T91 and benchmark/Set14/HR")
    args = ap.parse_args()

    import numpy as np

    from pipeline.config import PreprocessConfig
    from pipeline.preprocess.run import run_preprocess

    data = Path(args.data)
    sets = {"T91": data / "train" / "T91", "Set14": data / "benchmark" / "Set14" / "HR"}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"numpy {np.__version__}; {date.today()}")
    print(f"measured: crop {args.crop}, step {args.step}, scales 2,3,4, train split only\n")
    print("| photos | member | raw bytes | png bytes | png / raw |")
    print("| --- | --- | --- | --- | --- |")
    ratios: dict[str, list[float]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for label, folder in sets.items():
            sizes = {}
            for enc in ("raw", "png"):
                out = Path(tmp) / f"{label}-{enc}"
                cfg = PreprocessConfig(images=str(folder), out=str(out), crop=args.crop, step=args.step,
                                       encoding=enc, scales=[2, 3, 4])
                cfg.validate()
                run_preprocess(cfg)
                sizes[enc] = member_bytes(out)
            for k in KINDS:
                r = sizes["png"][k] / sizes["raw"][k]
                ratios[k].append(r)
                print(f"| {label} | {k} | {sizes['raw'][k]:,} | {sizes['png'][k]:,} | {r:.3f} |")
    print("\nDIV2K train (800 images, crop 480, step 240): raw computed, png = raw x the highest ratio measured above")
    per = {"hr": npy_member(480, 480), "lr_x2": npy_member(240, 240), "lr_x3": npy_member(160, 160),
           "lr_x4": npy_member(120, 120)}
    json_member = 1024  # the sample's JSON (< 512 bytes) with its tar header
    print("| scales | raw bytes / sample | raw GB (computed) | png GB (estimate) |")
    print("| --- | --- | --- | --- |")
    for scales in ((2,), (3,), (4,), (2, 3, 4)):
        kinds = ["hr", *(f"lr_x{s}" for s in scales)]
        raw = sum(per[k] for k in kinds) + json_member
        png = sum(per[k] * max(ratios[k]) for k in kinds) + json_member
        n = DIV2K_TRAIN_SUBIMAGES
        print(f"| x{','.join(map(str, scales))} | {raw:,} | {raw * n / 1e9:.1f} | {png * n / 1e9:.1f} |")


if __name__ == "__main__":
    main()
