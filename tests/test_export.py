"""`sr-pipeline export` (issue 15, item 4): a TorchScript file that reproduces our output on
real images of any size with the fixed hash and records what it fixes; ONNX and
exported-program refused in one line with the reason; an existing path refused."""

from __future__ import annotations

import json

import fixtures_evaluate
import numpy as np
import torch
from helpers import run_cli
from PIL import Image

from pipeline.evaluate.methods import ModelUpscaler
from pipeline.model import load_checkpoint

tiny_checkpoints = fixtures_evaluate.tiny_checkpoints


def test_torchscript_export_reproduces_our_output_at_any_size(tiny_checkpoints, tmp_path, set5_dir):
    out = tmp_path / "exports" / "tiny_x2.pt"
    proc = run_cli("export", str(tiny_checkpoints.ours_x2), "--out", str(out), "--hash-seed", "4")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (torchscript, x2, rgb_range 1, fixed hash seed 4" in proc.stderr
    side = json.loads((tmp_path / "exports" / "tiny_x2.pt.json").read_text())
    extra = {"sr_pipeline.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["sr_pipeline.json"]) == side
    assert (side["hash_mode"], side["hash_seed"], side["scale"], side["rgb_range"]) == ("fixed", 4, 2, 1.0)
    assert side["model_config"]["n_hashlength"] == 7

    up = ModelUpscaler(load_checkpoint(tiny_checkpoints.ours_x2), 2, tiling="none", hash_seed=4)
    with Image.open(set5_dir / "butterfly.png") as im:
        photo = np.asarray(im.convert("RGB"))[40:77, 30:71].copy()  # 41x37: real texture
    for lr in (photo, photo[:3, :40], photo[:1, :1], photo[:5, :7]):
        want = up.forward_float(lr)
        x = torch.from_numpy(lr.transpose(2, 0, 1).copy())[None].float() / 255
        with torch.no_grad():
            got = scripted(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, lr.shape


def test_onnx_export_through_onnxruntime_matches_ours(
    tiny_checkpoints, tmp_path, set5_dir, monkeypatch
):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "tiny_x2.onnx"
    proc = run_cli("export", str(tiny_checkpoints.ours_x2), "--out", str(out), "--format", "onnx")
    assert proc.returncode == 0, proc.stderr
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (props["hash_mode"], props["hash_seed"], props["scale"], props["rgb_range"]) == (
        "fixed", "0", "2", "1"
    )
    side = json.loads((tmp_path / "tiny_x2.onnx.json").read_text())
    assert json.loads(props["sr_pipeline"]) == side and side["format"] == "onnx"
    assert side["check"]["max_abs_diff"] <= 1e-3 and len(side["check"]["images"]) == 2

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    up = ModelUpscaler(load_checkpoint(tiny_checkpoints.ours_x2), 2, tiling="none", hash_seed=0)
    with Image.open(set5_dir / "bird.png") as im:
        photo = np.asarray(im.convert("RGB"))[60:108, 50:101].copy()  # 51x48, real
    real_sort = torch.sort
    for lr in (photo, photo[:3, :40], photo[:9, :5]):  # dynamic height and width
        want = up.forward_float(lr).numpy()
        x = (lr.transpose(2, 0, 1)[None].astype(np.float32) / 255)
        got = session.run(None, {"lr": x})[0]
        assert got.shape == want.shape
        # the issue asks for 1e-4; measured up to 1.3e-4 here, all of it from the tie order
        # of the bucket sort (torch's CPU sort is not stable, ONNX's TopK is):
        assert np.abs(got - want).max() <= 1e-3, lr.shape
        with monkeypatch.context() as mp:  # test oracle only: our model with a stable sort
            mp.setattr(torch, "sort", lambda t, dim=-1, **kw: real_sort(t, dim=dim, stable=True))
            stable = up.forward_float(lr).numpy()
        assert np.abs(got - stable).max() <= 1e-5, lr.shape


def test_formats_that_cannot_hold_the_model_and_existing_paths(tiny_checkpoints, tmp_path):
    out = tmp_path / "m.pt2"
    for fmt, start in (
        ("exported-program", "error: torch.export specialises DNLA's chunk padding"),
        ("tflite", "error: --format must be one of torchscript, onnx, exported-program"),
    ):
        proc = run_cli("export", str(tiny_checkpoints.ours_x2), "--out", str(out), "--format", fmt)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert not out.exists()
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"someone's file")
    proc = run_cli("export", str(tiny_checkpoints.ours_x2), "--out", str(taken))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {taken}: already exists; pass --overwrite to replace it"
    ]
    assert taken.read_bytes() == b"someone's file"
    assert not (tmp_path / "taken.pt.json").exists()
