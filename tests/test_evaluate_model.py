"""Evaluating real (tiny) DNLAN checkpoints: every source format, determinism, stochastic repeats,
tiling, and every bad-checkpoint case (one clear line naming the file, no code ever run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import fixtures_evaluate
import numpy as np
import pytest
import torch
from helpers import run_cli

from pipeline.config import EvalConfig, load_config
from pipeline.console import UserError
from pipeline.evaluate.driver import evaluate

mini_bench = fixtures_evaluate.mini_bench
tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def _cfg(bench, tmp_path, **kw) -> EvalConfig:
    values = {
        "benchmarks": [str(bench)],
        "mlflow": False,
        "out": str(tmp_path / "out"),
        "figure_images": 1,
    }
    values.update(kw)
    preset = values.pop("preset", None)
    if preset is not None:
        values["official_from_shapes"] = False
    return load_config(EvalConfig, preset=preset, overrides=values)


def _psnrs(report):
    return [r.psnr for r in report.outcome.rows]


@pytest.fixture(scope="module")
def baseline(mini_bench, tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    return evaluate(
        _cfg(mini_bench, tmp, checkpoint=str(tiny_checkpoints.ours_x2), save_images=True)
    )


def test_our_checkpoint_evaluates(baseline):
    s = baseline.outcome.summaries
    assert [(x.benchmark, x.scale, x.images) for x in s] == [("Mini", 2, 3)]
    assert np.isfinite(s[0].psnr) and 0 < s[0].ssim < 1
    assert baseline.outcome.label == "DNLAN"
    # grey bridge goes through the model as 3 channels and is compared on the grey scale
    bridge = next(r for r in baseline.outcome.rows if r.image == "bridge")
    assert bridge.grey
    saved = sorted(p.name for p in (baseline.out_dir / "images" / "Mini" / "x2").iterdir())
    assert saved == ["bird_x2.png", "bridge_x2.png", "butterfly_x2.png"]
    fig = baseline.figure_paths[0]
    from PIL import Image

    with Image.open(fig) as im:  # three panels: HR | bicubic | DNLAN
        assert im.width > 3 * 192


def test_deterministic_by_default(baseline, mini_bench, tiny_checkpoints, tmp_path):
    again = evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ours_x2)))
    assert _psnrs(again) == _psnrs(baseline)
    other = evaluate(
        _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ours_x2), hash_seed=7)
    )
    assert _psnrs(other) != _psnrs(baseline)  # the seed picks the projection


def test_ray_dir_and_official_state_dict_give_the_same_numbers(
    baseline, mini_bench, tiny_checkpoints, tmp_path
):
    ray = evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ray_dir_x2)))
    assert _psnrs(ray) == _psnrs(baseline)
    # official format: a plain state_dict under the reference's key names
    state = torch.load(tiny_checkpoints.official_x2, weights_only=True)
    keys = list(state)
    assert keys[:7] == ["a", "sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias",
                        "head.0.weight", "head.0.bias"]  # fmt: skip
    assert "body.0.body.4.conv_match.0.weight" in state and "body.2.weight" in state
    assert keys[-4:] == ["tail.0.0.weight", "tail.0.0.bias", "tail.1.weight", "tail.1.bias"]
    inferred = evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.official_x2)))
    assert _psnrs(inferred) == _psnrs(baseline)
    preset = evaluate(
        _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.official_x2), preset="tiny")
    )
    assert _psnrs(preset) == _psnrs(baseline)


def test_stochastic_repeats_report_mean_and_std(mini_bench, tiny_checkpoints, tmp_path):
    cfg = _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ours_x2), hash="stochastic", repeats=3,
               benchmarks=[str(mini_bench / "HR")], max_images=1)  # fmt: skip
    rep = evaluate(cfg)
    s = rep.outcome.summaries[0]
    per_repeat = [r.psnr for r in rep.outcome.rows]
    assert s.repeats == 3 and len(per_repeat) == 3 and len(set(per_repeat)) > 1
    assert s.psnr == pytest.approx(np.mean(per_repeat)) and s.psnr_std == pytest.approx(
        np.std(per_repeat, ddof=1)
    )
    assert s.psnr_std > 0
    assert [r.psnr for r in evaluate(cfg).outcome.rows] == per_repeat  # reproducible draws


def test_tiling_modes_and_self_ensemble(baseline, mini_bench, tiny_checkpoints, tmp_path):
    ck = str(tiny_checkpoints.ours_x2)
    whole = evaluate(_cfg(mini_bench, tmp_path, checkpoint=ck, tiling="none"))
    over = evaluate(
        _cfg(mini_bench, tmp_path, checkpoint=ck, tiling="overlap", tile=32, tile_overlap=8)
    )
    ens = evaluate(_cfg(mini_bench, tmp_path, checkpoint=ck, tiling="none", self_ensemble=True))
    # DNLA is non-local, so tiles change the result a little (the convolutions alone would not)
    diffs = np.abs(np.subtract(_psnrs(over), _psnrs(whole)))
    print("DNLAN tiny, overlap(32, 8) vs whole, |dPSNR| per image:", diffs)
    assert diffs.max() < 0.5
    assert _psnrs(ens) != _psnrs(whole)


def test_dnlan_overlap_tiles_close_to_whole_image(tiny_checkpoints):
    from pipeline.evaluate import tiling
    from pipeline.model import load_checkpoint, set_hash_mode

    model = set_hash_mode(load_checkpoint(tiny_checkpoints.ours_x2).eval(), "fixed", seed=0)
    lr = torch.rand((1, 3, 64, 72), generator=torch.Generator().manual_seed(0))
    whole = tiling.forward_whole(model, lr)
    tiled = tiling.forward_overlap(model, lr, 2, tile=40, overlap=10)
    diff = (tiled - whole).abs()
    mse = float((diff**2).mean())
    print(
        f"DNLAN tiny x2, 64x72 LR, overlap(40, 10) vs whole: max |d| {diff.max():.2e}, PSNR {10 * np.log10(1 / mse):.1f} dB"
    )
    assert diff.max() < 0.05 and 10 * np.log10(1 / mse) > 50


# ---------------------------------------------------------------------------------------------
# bad checkpoints
# ---------------------------------------------------------------------------------------------


def test_wrong_scale_and_wrong_config(mini_bench, tiny_checkpoints, tmp_path):
    with pytest.raises(
        UserError, match=r"tiny_x4.pt: checkpoint is for x4, but --scale 2 was requested"
    ):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ours_x4), scales=[2]))
    with pytest.raises(UserError, match=r"official_x2.pt: checkpoint is for x2, but --scale 3"):
        evaluate(
            _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.official_x2), scales=[3])
        )
    with pytest.raises(
        UserError,
        match=r"official_x2.pt: checkpoint does not fit the model .*'head.0.weight': shape \(64, 3, 3, 3\) in the checkpoint, \(192, 3, 3, 3\)",
    ):
        evaluate(
            _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.official_x2), preset="paper")
        )
    with pytest.raises(UserError, match=r"tiny_x2.pt: checkpoint was saved with n_feats=64"):
        evaluate(
            _cfg(
                mini_bench,
                tmp_path,
                checkpoint=str(tiny_checkpoints.ours_x2),
                **{"model.n_feats": 32},
            )
        )
    with pytest.raises(UserError, match=r"one scale \(x2\); --scale asks for 2,3"):
        evaluate(
            _cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ours_x2), scales=[2, 3])
        )


def test_ray_folders(mini_bench, tiny_checkpoints, tmp_path):
    with pytest.raises(
        UserError, match=r"a Ray run folder, not one checkpoint; pick one of its checkpoints"
    ):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tiny_checkpoints.ray_dir_x2.parent)))
    best = tmp_path / "run" / "best_model"
    best.mkdir(parents=True)
    (best / "model.pt").write_bytes(tiny_checkpoints.ours_x2.read_bytes())
    (tmp_path / "run" / "checkpoint_000001").mkdir()
    from pipeline.evaluate.model_source import checkpoint_file

    assert checkpoint_file(tmp_path / "run") == best / "model.pt"  # a run folder: its best model
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: folder holds no model.pt"):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(tmp_path / "empty")))


def test_not_a_state_dict_and_truncated(mini_bench, tiny_checkpoints, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "note": "no tensors"}, junk)
    with pytest.raises(UserError, match=r"junk.pt: not a DNLAN checkpoint"):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(junk)))
    data = tiny_checkpoints.ours_x2.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        UserError, match=r"cut.pt: not a readable PyTorch checkpoint \(truncated or corrupt"
    ):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(cut)))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"notes.pt: not a readable PyTorch checkpoint"):
        evaluate(_cfg(mini_bench, tmp_path, checkpoint=str(text)))


_EVIL = textwrap.dedent(
    """
    import os, pickle, sys, torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + sys.argv[2],))

    if sys.argv[1] == "torch":
        torch.save({"state_dict": Evil()}, sys.argv[3])
    else:
        with open(sys.argv[3], "wb") as f:
            pickle.dump(Evil(), f)
    """
)


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_runs_no_code(mini_bench, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil_{kind}.pt"
    subprocess.run([sys.executable, "-c", _EVIL, kind, str(marker), str(evil)], check=True)
    assert not marker.exists()
    # the payload is live: unsafe loading (in a separate process) really runs it
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        env={**os.environ, "PYTHONPATH": ""}, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    assert marker.exists(), "control: the pickle should run code when loaded unsafely"
    marker.unlink()
    proc = run_cli("evaluate", "--checkpoint", str(evil), "--benchmarks", str(mini_bench), "--no-mlflow",
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {evil}: refused to load"), proc.stderr
    assert not marker.exists()
