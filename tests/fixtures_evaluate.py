"""Fixtures for the evaluate tests: small benchmark folders cut from the real images, and real
tiny DNLAN checkpoints written by pipeline.model (our format, official plain state_dict, Ray
checkpoint folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.imageio import read_image, write_png


def crop_image(src: Path, dst: Path, top: int, left: int, h: int, w: int) -> np.ndarray:
    img, _ = read_image(src, keep_gray=True)
    out = img[top : top + h, left : left + w]
    write_png(dst, out)
    return out


@pytest.fixture(scope="session")
def mini_bench(tmp_path_factory, shared_data: Path) -> Path:
    """DATA/benchmark/Mini/HR: two RGB crops and a crop of the grey bridge, odd sizes."""
    root = tmp_path_factory.mktemp("mini_data")
    hr = root / "benchmark" / "Mini" / "HR"
    hr.mkdir(parents=True)
    b = shared_data / "benchmark"
    crop_image(b / "Set5" / "HR" / "butterfly.png", hr / "butterfly.png", 60, 50, 98, 101)
    crop_image(b / "Set5" / "HR" / "bird.png", hr / "bird.png", 90, 80, 100, 96)
    crop_image(b / "Set14" / "HR" / "bridge.png", hr / "bridge.png", 200, 150, 97, 99)
    return root / "benchmark" / "Mini"


@dataclass
class TinyCheckpoints:
    ours_x2: Path
    ours_x4: Path
    official_x2: Path
    ray_dir_x2: Path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    import torch

    from pipeline.model import build_model, export_state_dict, save_checkpoint

    d = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    m2 = build_model("tiny", 2)
    torch.manual_seed(1)
    m4 = build_model("tiny", 4)
    ray_dir = d / "checkpoint_000003"
    ray_dir.mkdir()
    return TinyCheckpoints(
        ours_x2=save_checkpoint(d / "tiny_x2.pt", m2),
        ours_x4=save_checkpoint(d / "tiny_x4.pt", m4),
        official_x2=export_state_dict(d / "official_x2.pt", m2),
        ray_dir_x2=save_checkpoint(ray_dir / "model.pt", m2, epoch=3).parent,
    )
