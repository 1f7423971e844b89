"""Benchmark folders: standard layout with shipped LR, plain folders, and every bad-input case."""

from __future__ import annotations

import shutil

import fixtures_evaluate
import numpy as np
import pytest
from helpers import run_cli

from pipeline.console import UserError
from pipeline.evaluate.benchmarks import load_sample, lr_file, resolve_benchmark, resolve_benchmarks
from pipeline.evaluate.runner import run_benchmarks
from pipeline.evaluate.upscalers import BicubicUpscaler
from pipeline.imageio import read_image, write_png
from pipeline.preprocess import imresize

mini_bench = fixtures_evaluate.mini_bench


def _bicubic(benches, scales):
    return run_benchmarks(
        {s: BicubicUpscaler(s) for s in scales},
        "bicubic",
        "Bicubic",
        benches,
        scales,
        figure_images=0,
    )


def test_names_aliases_and_layouts(shared_data, tmp_path, mini_bench):
    assert (
        resolve_benchmark("set14", shared_data).hr_dir == shared_data / "benchmark" / "Set14" / "HR"
    )
    assert (
        resolve_benchmark("Set5", shared_data / "benchmark").name == "Set5"
    )  # DIR/<Name> also works
    b = resolve_benchmark(str(mini_bench), None)  # a folder path with HR/
    assert (b.name, b.hr_dir, b.lr_root) == ("Mini", mini_bench / "HR", None)
    plain = resolve_benchmark(str(mini_bench / "HR"), None)  # a plain folder of HR images
    assert plain.hr_dir == mini_bench / "HR" and plain.name == "HR"
    assert [p.stem for p in plain.images()] == ["bird", "bridge", "butterfly"]


def test_shipped_lr_is_used_and_equals_generated(mini_bench, tmp_path):
    root = tmp_path / "Mini"
    shutil.copytree(mini_bench, root)
    lr_dir = root / "LR_bicubic" / "X3"
    lr_dir.mkdir(parents=True)
    for p in sorted((root / "HR").iterdir()):
        hr, _ = read_image(p, keep_gray=True)
        hr = hr[: hr.shape[0] // 3 * 3, : hr.shape[1] // 3 * 3]
        write_png(lr_dir / f"{p.stem}x3.png", imresize(hr, scale=1 / 3))
    shipped = resolve_benchmark(str(root), None)
    assert lr_file(shipped, root / "HR" / "bird.png", 3) == lr_dir / "birdx3.png"
    assert lr_file(shipped, root / "HR" / "bird.png", 2) is None  # no X2 folder: generate
    a = _bicubic([shipped], [3])
    b = _bicubic([resolve_benchmark(str(mini_bench), None)], [3])
    assert all(r.lr_source.endswith(f"{r.image}x3.png") for r in a.rows)
    assert all(r.lr_source == "generated" for r in b.rows)
    assert [r.psnr for r in a.rows] == [r.psnr for r in b.rows]


def test_unknown_benchmark_name(shared_data):
    with pytest.raises(
        UserError, match=r"unknown benchmark 'Set6' \(choose from Set5, Set14, B100"
    ):
        resolve_benchmark("Set6", shared_data)


def test_missing_benchmark_folder_and_data_dir(shared_data, tmp_path):
    with pytest.raises(
        UserError, match=r"benchmark/Urban100: benchmark folder not found .*DIR/benchmark/<Name>/HR"
    ):
        resolve_benchmark("Urban100", shared_data)
    with pytest.raises(UserError, match=r"nope: data folder not found"):
        resolve_benchmark("Set5", tmp_path / "nope")
    with pytest.raises(UserError, match=r"gone: benchmark folder not found"):
        resolve_benchmark(str(tmp_path / "gone"), None)


def test_missing_or_empty_hr(tmp_path):
    (tmp_path / "benchmark" / "Set5" / "LR_bicubic").mkdir(parents=True)
    with pytest.raises(UserError, match=r"Set5/HR: HR folder not found"):
        resolve_benchmarks(["Set5"], tmp_path)
    (tmp_path / "benchmark" / "Set5" / "HR").mkdir()
    with pytest.raises(UserError, match=r"Set5/HR: no images found"):
        resolve_benchmarks(["Set5"], tmp_path)


def test_lr_of_wrong_size_names_the_file(mini_bench, tmp_path):
    root = tmp_path / "Mini"
    shutil.copytree(mini_bench, root)
    lr_dir = root / "LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    for p in sorted((root / "HR").iterdir()):
        hr, _ = read_image(p, keep_gray=True)
        write_png(lr_dir / f"{p.stem}x2.png", imresize(hr, scale=0.5))
    bad = lr_dir / "birdx2.png"
    write_png(bad, np.zeros((40, 48, 3), np.uint8))  # HR bird is 96x100 -> LR must be 48x50
    bench = resolve_benchmark(str(root), None)
    with pytest.raises(UserError) as err:
        load_sample(bench, root / "HR" / "bird.png", 2, imresize)
    assert str(err.value) == f"{bad}: LR is 48x40 but bird.png is 96x100; expected 48x50 (HR / 2)"
    bad.unlink()
    with pytest.raises(UserError, match=r"birdx2.png: LR image missing for .*bird.png"):
        load_sample(bench, root / "HR" / "bird.png", 2, imresize)


def test_corrupt_hr_image_names_the_file(tmp_path):
    d = tmp_path / "Broken" / "HR"
    d.mkdir(parents=True)
    write_png(d / "ok.png", np.full((30, 30, 3), 128, np.uint8))
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    bench = resolve_benchmark(str(tmp_path / "Broken"), None)
    with pytest.raises(UserError, match=r"bad.png: "):
        _bicubic([bench], [2])


def test_cli_errors_are_one_line(shared_data, tmp_path):
    cases = [
        (["--benchmarks", "Set6", "--data-dir", str(shared_data)], "unknown benchmark 'Set6'"),
        (
            ["--benchmarks", "B100", "--data-dir", str(shared_data)],
            "B100: benchmark folder not found",
        ),
        (["--benchmarks", "Set5", "--data-dir", str(tmp_path / "x")], "data folder not found"),
        (
            ["--benchmarks", "Set5", "--data-dir", str(shared_data), "--scale", "5"],
            "scale must be 2, 3 or 4",
        ),
    ]
    for args, message in cases:
        proc = run_cli("evaluate", "--model", "bicubic", "--no-mlflow", *args)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            proc.stderr
        )
    proc = run_cli(
        "evaluate", "--benchmarks", "Set5", "--data-dir", str(shared_data), "--no-mlflow"
    )
    assert proc.returncode == 1 and "nothing to evaluate: give --checkpoint" in proc.stderr
