"""The whole table in one command (issue 15, item 3): `--benchmarks all`, one checkpoint per
scale, total and per-set times, and `--workers N` on a real two-node Ray cluster giving the
same numbers as one worker."""

from __future__ import annotations

import fixtures_evaluate
import pytest
from helpers import run_cli
from PIL import Image

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate.benchmarks import KNOWN_BENCHMARKS
from pipeline.evaluate.driver import evaluate

mini_bench = fixtures_evaluate.mini_bench
tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def test_all_benchmarks_all_scales_one_command(tmp_path, set5_dir):
    data = tmp_path / "data"
    for i, name in enumerate(KNOWN_BENCHMARKS):
        hr = data / "benchmark" / name / "HR"
        hr.mkdir(parents=True)
        with Image.open(set5_dir / "bird.png") as im:
            im.convert("RGB").crop((i * 10, 0, i * 10 + 48, 36)).save(hr / f"img{i}.png")
    proc = run_cli("evaluate", "--model", "bicubic", "--benchmarks", "all", "--scale", "2,3,4",
                   "--data-dir", str(data), "--no-mlflow", "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in KNOWN_BENCHMARKS:
        assert name in proc.stdout
    timing = [line for line in proc.stderr.splitlines() if line.startswith("total time ")]
    assert len(timing) == 1
    for name in KNOWN_BENCHMARKS:
        for s in (2, 3, 4):
            assert f"{name} x{s} " in timing[0]


def _cfg(bench, tmp_path, **kw) -> EvalConfig:
    values = {"benchmarks": [str(bench)], "mlflow": False, "out": str(tmp_path / "out"),
              "figure_images": 1, "device": "cpu"}  # fmt: skip
    values.update(kw)
    return load_config(EvalConfig, overrides=values)


@pytest.mark.cluster
@pytest.mark.slow
def test_workers_on_two_nodes_equal_one_worker(
    ray_cluster, mini_bench, tiny_checkpoints, tmp_path, capfd
):
    """Two checkpoints (x2, x4) in one run, stochastic hashing with two repeats (per-image
    seeds must travel with the work), self-ensemble: the same rows from 2 Ray workers."""
    ckpts = f"{tiny_checkpoints.ours_x2},{tiny_checkpoints.ours_x4}"
    common = {"checkpoint": ckpts, "hash": "stochastic", "repeats": 2, "self_ensemble": True,
              "tiling": "overlap", "tile": 40, "tile_overlap": 8}  # fmt: skip
    one = evaluate(_cfg(mini_bench, tmp_path / "one", **common))
    two = evaluate(
        _cfg(mini_bench, tmp_path / "two", workers=2, address=ray_cluster.address, **common)
    )

    def key(report):
        return [(r.benchmark, r.scale, r.image, r.repeat, r.psnr, r.ssim, r.bicubic_psnr)
                for r in report.outcome.rows]  # fmt: skip

    assert "evaluating on 2 Ray worker(s), one CPU each (2 node(s))" in capfd.readouterr().err
    assert key(two) == key(one)
    assert [s.scale for s in one.outcome.summaries] == [2, 4]
    assert [(s.psnr, s.ssim, s.psnr_std) for s in two.outcome.summaries] == [
        (s.psnr, s.ssim, s.psnr_std) for s in one.outcome.summaries
    ]
    assert set(two.outcome.wall_seconds) == {("Mini", 2), ("Mini", 4)}
    assert two.csv_path.read_text().count("\n") == one.csv_path.read_text().count("\n")
