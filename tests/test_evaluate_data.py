"""Benchmark folders: standard layout with shipped LR, plain folders, and every bad-input case."""

from __future__ import annotations

import json
import shutil

import fixtures_evaluate
import numpy as np
import pytest
from helpers import run_cli

from pipeline.config import EvalConfig, load_config
from pipeline.console import UserError
from pipeline.evaluate.benchmarks import (
    check_files,
    image_size,
    load_sample,
    lr_file,
    resolve_benchmark,
    resolve_benchmarks,
)
from pipeline.evaluate.driver import check_inputs, prepare
from pipeline.evaluate.methods import BicubicUpscaler
from pipeline.evaluate.report import ResultWriter
from pipeline.evaluate.runner import run_benchmarks
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


# ---------------------------------------------------------------------------------------------
# every file checked before the loop; results kept when the loop fails anyway
# ---------------------------------------------------------------------------------------------


def _with_shipped_lr(mini_bench, tmp_path, scale: int):
    """A copy of Mini with MATLAB-equivalent LR files for ``scale`` (all correct)."""
    root = tmp_path / "Mini"
    shutil.copytree(mini_bench, root)
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    lr_dir.mkdir(parents=True)
    for p in sorted((root / "HR").iterdir()):
        hr, _ = read_image(p, keep_gray=True)
        hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
        write_png(lr_dir / f"{p.stem}x{scale}.png", imresize(hr, scale=1 / scale))
    return root, lr_dir


def test_bad_lr_of_the_last_image_fails_before_the_first_is_evaluated(
    mini_bench, tmp_path, sr_home
):
    root, lr_dir = _with_shipped_lr(mini_bench, tmp_path, 2)
    bad = lr_dir / "butterflyx2.png"  # butterfly sorts last: the loop would reach it last
    write_png(bad, np.zeros((40, 48, 3), np.uint8))  # HR butterfly is 101x98 -> LR 50x49
    cfg = load_config(EvalConfig, overrides={
        "method": "bicubic", "benchmarks": [str(root)], "scales": [2], "mlflow": False,
    })  # fmt: skip
    with pytest.raises(UserError) as err:
        prepare(cfg, tmp_path)  # the check happens here, not in the loop
    assert str(err.value) == (
        f"{bad}: LR is 48x40 but butterfly.png is 101x98; expected 50x49 (HR / 2)"
    )
    # end to end: one line, and no (empty) evaluation folder left behind
    proc = run_cli("evaluate", "--model", "bicubic", "--benchmarks", str(root), "--scale", "2",
                   "--no-mlflow")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {err.value}"
    assert "Mini x2:" not in proc.stderr  # no image was evaluated
    assert not (sr_home / "evaluations").exists() or not any((sr_home / "evaluations").iterdir())
    bad.unlink()
    proc = run_cli("evaluate", "--model", "bicubic", "--benchmarks", str(root), "--scale", "2",
                   "--no-mlflow", "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {bad}: LR image missing for {root / 'HR' / 'butterfly.png'}"
    )


def test_file_checks_read_headers_only(mini_bench, tmp_path):
    root, lr_dir = _with_shipped_lr(mini_bench, tmp_path, 2)
    bench = resolve_benchmark(str(root), None)
    lr = lr_dir / "birdx2.png"
    data = lr.read_bytes()
    lr.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut: only decoding sees it
    check_files(bench, root / "HR" / "bird.png", [2])
    assert image_size(lr) == (48, 50)
    with pytest.raises(UserError, match=r"birdx2.png: corrupt or truncated image"):
        load_sample(bench, root / "HR" / "bird.png", 2, imresize)
    (root / "HR" / "bird.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(UserError, match=r"HR/bird.png: "):
        check_files(bench, root / "HR" / "bird.png", [2])


def test_images_too_small_to_score_are_refused_up_front(tmp_path):
    d = tmp_path / "Tiny"
    d.mkdir()
    write_png(d / "a.png", np.full((40, 40, 3), 100, np.uint8))
    write_png(d / "b.png", np.full((18, 40, 3), 100, np.uint8))  # 16 usable rows at x4 (< 19)
    bench = resolve_benchmark(str(d), None)
    assert check_inputs([bench], [2, 3]) == 2  # x2: 18 >= 15, x3: 18 >= 17
    with pytest.raises(UserError) as err:
        check_inputs([bench], [2, 4])
    assert str(err.value).startswith(f"{d / 'b.png'}: image is 40x18 (40x16 after cropping to a "
                                     "multiple of 4), too small to score at x4 (needs at least "
                                     "19 px per side")  # fmt: skip


def test_results_are_written_while_the_loop_runs(mini_bench, tmp_path):
    bench = resolve_benchmark(str(mini_bench), None)
    seen = []

    def watch(writer):
        def on_update(outcome, group_done):
            writer.update(outcome, group_done)
            csv_rows = 0
            if writer.csv_path.exists():
                csv_rows = len(writer.csv_path.read_text().splitlines()) - 1
            seen.append((len(outcome.rows), group_done, csv_rows))

        return on_update

    eager = ResultWriter(tmp_path / "eager", flush_seconds=0.0)
    run_benchmarks({s: BicubicUpscaler(s) for s in (2, 3)}, "bicubic", "Bicubic", [bench], [2, 3],
                   figure_images=0, on_update=watch(eager))  # fmt: skip
    # after every image the CSV on disk holds every image scored so far
    assert seen == [(1, False, 1), (2, False, 2), (3, True, 3),
                    (4, False, 4), (5, False, 5), (6, True, 6)]  # fmt: skip
    seen.clear()
    lazy = ResultWriter(tmp_path / "lazy", flush_seconds=3600.0)
    run_benchmarks({s: BicubicUpscaler(s) for s in (2, 3)}, "bicubic", "Bicubic", [bench], [2, 3],
                   figure_images=0, on_update=watch(lazy))  # fmt: skip
    # within a benchmark x scale the flush is time-based; a completed pair is always written
    assert [c for _, _, c in seen] == [0, 0, 3, 3, 3, 6]
    assert [r["scale"] for r in json.loads(lazy.json_path.read_text())] == [2, 3]


def test_a_failure_mid_run_keeps_the_scores_already_computed(mini_bench, tmp_path):
    broken = tmp_path / "Broken"
    broken.mkdir()
    for name in ("bird", "bridge"):
        shutil.copy(mini_bench / "HR" / f"{name}.png", broken / f"{name}.png")
    data = (mini_bench / "HR" / "butterfly.png").read_bytes()
    (broken / "zebra.png").write_bytes(data[: len(data) // 2])  # valid header, truncated data
    out = tmp_path / "out"
    proc = run_cli("evaluate", "--model", "bicubic", "--benchmarks", f"{mini_bench},{broken}",
                   "--scale", "2", "--no-mlflow", "--out", str(out))  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {broken / 'zebra.png'}: corrupt or truncated image")
    assert lines[-2] == (
        f"warning: evaluation stopped after 5 of 6 images; their scores are in "
        f"{out / 'per_image.csv'} (1 complete benchmark/scale pair in summary.json)"
    )
    rows = (out / "per_image.csv").read_text().splitlines()[1:]
    assert [(r.split(",")[0], r.split(",")[2]) for r in rows] == [
        ("Mini", "bird"), ("Mini", "bridge"), ("Mini", "butterfly"),
        ("Broken", "bird"), ("Broken", "bridge"),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["benchmark"], r["scale"], r["images"]) for r in summary] == [("Mini", 2, 3)]
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["Mini_x2.png"]


def test_every_requested_scale_is_checked_up_front(mini_bench, tmp_path):
    root, _ = _with_shipped_lr(mini_bench, tmp_path, 2)
    _, lr3 = _with_shipped_lr(mini_bench, tmp_path / "again", 3)
    shutil.copytree(lr3, root / "LR_bicubic" / "X3")
    bench = resolve_benchmark(str(root), None)
    assert check_inputs([bench], [2, 3]) == 3
    bad = root / "LR_bicubic" / "X3" / "birdx3.png"  # bird sorts first, x3 is the second scale
    write_png(bad, np.zeros((10, 10, 3), np.uint8))
    assert check_inputs([bench], [2]) == 3  # x2 alone is fine
    with pytest.raises(UserError) as err:
        check_inputs([bench], [2, 3])
    assert str(err.value).startswith(f"{bad}: LR is 10x10 but bird.png is ")
    bad.unlink()  # X3 exists, so every image must have its LR there
    with pytest.raises(UserError) as err:
        check_inputs([bench], [2, 3])
    assert str(err.value) == f"{bad}: LR image missing for {root / 'HR' / 'bird.png'}"


def test_a_failure_on_the_first_image_leaves_no_folder(mini_bench, tmp_path):
    from pipeline.evaluate.driver import evaluate

    broken = tmp_path / "Broken"
    broken.mkdir()
    data = (mini_bench / "HR" / "butterfly.png").read_bytes()
    (broken / "a.png").write_bytes(data[: len(data) // 2])  # passes the header check
    out = tmp_path / "out"
    cfg = load_config(EvalConfig, overrides={
        "method": "bicubic", "benchmarks": [str(broken)], "scales": [2], "mlflow": False,
        "out": str(out), "save_images": True,
    })  # fmt: skip
    with pytest.raises(UserError, match=r"a.png: corrupt or truncated image"):
        evaluate(cfg, flush_seconds=0.0)
    assert not out.exists()
