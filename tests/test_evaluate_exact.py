"""Exact output for any image size, one LR-to-SR path, and right numbers and words (issue 15,
items 1 and 5): tiny and thin images equal whole-image inference with random and trained
weights; validation, evaluate and upscale share one path; fp16 state_dicts give the right
rgb_range; errors name the real size and the real missing key; one checkpoint read."""

from __future__ import annotations

import fixtures_evaluate
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import EvalConfig, load_config
from pipeline.console import UserError
from pipeline.evaluate.infer import lr_tensor, quantize_tensor
from pipeline.evaluate.methods import ModelUpscaler, method_from_config
from pipeline.model import build_model, export_state_dict, load_checkpoint, save_checkpoint
from pipeline.model import set_hash_mode as model_hash_mode

tiny_checkpoints = fixtures_evaluate.tiny_checkpoints

# 1x1 .. 8x8 (corners, diagonal, odd mixes), strips and the 3x40 and 5x7
SIZES = [(1, 1), (1, 8), (8, 1), (2, 3), (4, 4), (6, 5), (7, 2), (8, 8), (3, 40), (40, 3), (5, 7)]


def _trained_tiny(set5_dir) -> torch.nn.Module:
    """A tiny x2 DNLAN after a few Adam steps on real patches: weights no longer random."""
    from pipeline.preprocess import imresize

    torch.manual_seed(3)
    model = build_model("tiny", 2)
    with Image.open(set5_dir / "butterfly.png") as im:
        hr = np.asarray(im.convert("RGB"))[:48, :48]
    lr = imresize(hr, scale=0.5)
    x = torch.from_numpy(lr.transpose(2, 0, 1).copy())[None].float() / 255
    y = torch.from_numpy(hr.transpose(2, 0, 1).copy())[None].float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    first = None
    for _ in range(4):
        opt.zero_grad()
        loss = (model(x) - y).abs().mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first  # it did learn something
    return model.eval()


@pytest.fixture(scope="module")
def models(set5_dir):
    torch.manual_seed(0)
    return {"random": build_model("tiny", 2).eval(), "trained": _trained_tiny(set5_dir)}


@pytest.mark.parametrize("weights", ["random", "trained"])
def test_tiny_and_thin_images_equal_whole_image_inference(models, weights):
    model = models[weights]
    rng = np.random.default_rng(0)
    ups = {
        tiling: ModelUpscaler(model, 2, tiling=tiling, hash_mode="fixed", hash_seed=5)
        for tiling in ("reference", "overlap")
    }
    assert ups["overlap"].tile == EvalConfig().tile == 192  # one tile default
    for h, w in SIZES:
        lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        model_hash_mode(model, "fixed", seed=5)
        with torch.no_grad():
            whole = model(lr_tensor(lr, 1.0))
        for tiling, up in ups.items():
            got = up.forward_float(lr)
            assert got.shape == (1, 3, 2 * h, 2 * w)
            diff = (got - whole).abs().max().item()
            assert diff <= 1e-5, (tiling, h, w, diff)
            np.testing.assert_array_equal(up(lr), quantize_tensor(whole, 1.0), err_msg=f"{h}x{w}")


def test_validation_evaluate_and_upscale_share_one_path(models, set5_dir):
    """Training validation's super_resolve gives exactly evaluate's output (reference chop)."""
    from pipeline.model import temporary_hash_mode
    from pipeline.train.validation import super_resolve

    model = models["trained"]
    with Image.open(set5_dir / "bird.png") as im:
        lr = np.asarray(im.convert("RGB"))[10:43, 20:81].copy()  # 61x33: odd, chopped
    up = ModelUpscaler(model, 2, tiling="reference", hash_mode="fixed", hash_seed=7)
    ours = up(lr)
    with temporary_hash_mode(model, "fixed", seed=7):
        val = super_resolve(model, lr, 2, 1.0, torch.device("cpu"))
    np.testing.assert_array_equal(val, ours)


def test_two_upscalers_on_one_model_keep_their_hash_modes(models):
    model = models["random"]
    lr = np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    fixed = ModelUpscaler(model, 2, tiling="none", hash_mode="fixed", hash_seed=0)
    before = fixed(lr)
    other = ModelUpscaler(model, 2, tiling="none", hash_mode="fixed", hash_seed=99)
    stochastic = ModelUpscaler(model, 2, tiling="none", hash_mode="stochastic", hash_seed=0)
    assert not np.array_equal(other(lr), before)  # another seed really hashes differently
    stochastic(lr)
    np.testing.assert_array_equal(fixed(lr), before)
    np.testing.assert_array_equal(stochastic(lr, 3), stochastic(lr, 3))


@pytest.mark.parametrize("rgb_range", [1.0, 255.0])
def test_fp16_state_dict_reads_the_right_rgb_range(tmp_path, rgb_range):
    from pipeline.model.statedict import infer_architecture

    torch.manual_seed(0)
    model = build_model("tiny", 2, rgb_range=rgb_range)
    half = {k: v.half() for k, v in model.state_dict().items()}
    bf16 = {k: v.bfloat16() for k, v in model.state_dict().items()}
    assert infer_architecture(half)["rgb_range"] == rgb_range  # not 0.9998 / 254.9
    assert infer_architecture(bf16)["rgb_range"] == rgb_range
    assert infer_architecture(model.state_dict())["rgb_range"] == rgb_range
    path = tmp_path / "half.pt"
    torch.save(half, path)
    assert load_checkpoint(path).config.rgb_range == rgb_range


def test_missing_residual_block_names_that_block(tmp_path):
    torch.manual_seed(0)
    state = build_model("tiny", 2).state_dict()
    cut = {k: v for k, v in state.items() if not k.startswith("body.0.body.2.")}
    path = tmp_path / "cut.pt"
    torch.save(cut, path)
    with pytest.raises(UserError, match=r"cut\.pt: .*'body\.0\.body\.2\.body\.0\.weight' is missing"):
        load_checkpoint(path)
    with pytest.raises(UserError, match=r"'body\.0\.body\.2\.body\.0\.weight': shape absent"):
        load_checkpoint(path, preset="tiny", scale=2)


def test_checkpoint_is_read_once_per_evaluation(tmp_path, monkeypatch):
    import pipeline.model.checkpoint as ck

    torch.manual_seed(0)
    model = build_model("tiny", 2)
    path = save_checkpoint(tmp_path / "m.pt", model, ema_state_dict=model.state_dict(), step=9)
    reads = []
    real_load = torch.load

    def counting_load(*args, **kwargs):
        reads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ck.torch, "load", counting_load)
    cfg = load_config(EvalConfig, overrides={"checkpoint": str(path), "mlflow": False})
    method = method_from_config(cfg, tmp_path, None)
    assert method.step == 9 and "EMA" in method.source
    assert len(reads) == 1


def test_too_small_image_names_its_real_size(tmp_path):
    from pipeline.evaluate.benchmarks import resolve_benchmarks
    from pipeline.evaluate.driver import check_inputs

    hr = tmp_path / "bench"
    hr.mkdir()
    Image.new("RGB", (200, 17)).save(hr / "strip.png")
    benches = resolve_benchmarks([str(hr)], None)
    with pytest.raises(UserError, match=r"strip\.png: image is 200x17 \(198x15 after cropping to "
                                        r"a multiple of 3\), too small to score at x3 \(needs at "
                                        r"least 17 px"):
        check_inputs(benches, [3])


def test_official_state_dict_tiny_image_evaluate_path(tiny_checkpoints, tmp_path):
    """An official file through method_from_config: a 1x1 and a 2x9 image, no padding."""
    cfg = load_config(EvalConfig, overrides={"checkpoint": str(tiny_checkpoints.official_x2),
                                             "mlflow": False, "device": "cpu"})
    up = method_from_config(cfg, tmp_path, None).upscalers[2]
    for shape in ((1, 1, 3), (2, 9, 3), (4, 4)):
        lr = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
        model_hash_mode(up.model, "fixed", seed=0)
        with torch.no_grad():
            whole = quantize_tensor(up.model(lr_tensor(lr, up.rgb_range)), up.rgb_range)
        np.testing.assert_array_equal(up(lr), whole)


def test_export_of_official_format_unchanged(tmp_path):
    """export_state_dict still writes a plain state_dict that the reader infers rgb_range from."""
    torch.manual_seed(0)
    path = export_state_dict(tmp_path / "o.pt", build_model("tiny", 3))
    assert load_checkpoint(path).config.scale == 3


def test_precision_request_survives_a_copy_for_another_device(models, capsys):
    """On a CPU, bf16 falls back to fp32 with one warning; the request itself is kept, so the
    copy a GPU worker makes (dataclasses.replace with its device) runs what was asked."""
    import dataclasses

    up = ModelUpscaler(models["random"], 2, tiling="none", precision="bf16")
    assert "--precision bf16 needs a CUDA GPU; running in fp32 on cpu" in capsys.readouterr().err
    assert (up.precision, up._precision) == ("bf16", "fp32")
    copy = dataclasses.replace(up, device="cpu")
    assert copy.precision == "bf16"
    lr = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(copy(lr), ModelUpscaler(models["random"], 2, tiling="none")(lr))
