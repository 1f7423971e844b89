"""FLOP counting and MFU (pipeline/model/flops.py) against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import model_config
from pipeline.model import DecoupledNonLocalAttention
from pipeline.model.flops import PEAK_ENV, count_flops, mfu, model_flops, peak_tflops


def attention_hand_count(n, feats, h, w, cr, hashes, bits, chunk):
    """Spec section 2 by hand: (forward, backward) matrix-product FLOPs of one DNLA layer."""
    tokens = h * w
    chunks = -(-tokens // chunk)
    t = n * hashes * chunks  # chunks in all
    qk = 2 * t * chunk * 3 * chunk * cr  # logits over [own, prev, next]
    pv = 2 * t * chunk * 3 * chunk * feats  # probabilities times values
    conv = 2 * n * tokens * feats * (cr * 9 + feats)  # conv_match 3x3, conv_assembly 1x1
    hashing = 2 * n * tokens * cr * hashes * bits  # one product with the summed bit columns
    forward = conv + hashing + qk + pv
    # backward: convs twice (input and weight gradients); attention recomputes the logits,
    # then dV and dP (each a pv-sized product), dQ and dK (each qk-sized); no hash gradient
    backward = 2 * conv + 3 * qk + 2 * pv
    return forward, backward


@pytest.mark.parametrize("shape", [(2, 16, 12, 12, 16), (1, 32, 9, 11, 24)])
def test_attention_layer_flops_match_hand_count(shape):
    n, feats, h, w, chunk = shape
    layer = DecoupledNonLocalAttention(feats, 2, 3, chunk, 3)
    x = torch.randn(n, feats, h, w, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = layer(x)
    with FlopCounterMode(display=False) as bwd:
        y.sum().backward()
    expected = attention_hand_count(n, feats, h, w, feats // 2, 3, 3, chunk)
    assert (fwd.get_total_flops(), bwd.get_total_flops()) == expected


def test_tiny_model_flops_are_convolutions_plus_attention():
    cfg = model_config("tiny", 2)
    f, g, b, lr = cfg.n_feats, cfg.n_resgroups, cfg.n_resblocks, 24
    px = lr * lr
    mac_per_px = (
        3 * f * 9  # head
        + g * ((2 * b + 1) * f * f * 9)  # residual blocks and group convs
        + f * f * 9  # body conv
        + f * 4 * f * 9  # upsampler conv (at LR resolution)
        + 3 * 3 * 2  # sub_mean and add_mean 1x1 (add_mean at HR: 4 px per LR px)
    )
    tail = 2 * (4 * px) * f * 3 * 9  # last conv at HR
    attn_f, attn_b = attention_hand_count(1, f, lr, lr, f // cfg.reduction, cfg.n_hashes,
                                          cfg.n_hashlength, cfg.chunk_size)
    mac_per_px -= 3 * 3 * 2
    means = 2 * px * 9 + 2 * 4 * px * 9
    fwd_expected = 2 * px * mac_per_px + tail + means + g * attn_f
    counted = model_flops(cfg, 2 * lr)
    assert counted.forward == fwd_expected
    # backward: every conv twice except the input-side ones (no gradient to the image), and
    # sub_mean (frozen, before any trainable layer) not at all; add_mean needs the input grad
    assert counted.backward > 2 * counted.forward - 2 * (2 * px * 3 * f * 9) - 2 * means
    assert counted.train == counted.forward + counted.backward


def test_count_flops_is_per_sample_and_leaves_rng_alone():
    cfg = model_config("tiny", 2)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    one = model_flops(cfg, 48)
    assert torch.equal(torch.random.get_rng_state(), before)
    from pipeline.model import build_from_config

    two = count_flops(build_from_config(cfg), (2, 3, 24, 24), 2)
    assert two == one


def test_peak_table_override_and_mfu(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA L40S", "fp32") == 91.6
    assert peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert mfu(100.0, 1e12, "cpu") is None  # no peak on CPU
    assert mfu(100.0, 1e12, "cpu", peak=400.0) == pytest.approx(0.25)
    monkeypatch.setenv(PEAK_ENV, "500")
    assert peak_tflops("Some Future GPU", "bf16") == 500.0
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_ENV):
        peak_tflops("NVIDIA H200", "bf16")


def test_training_flops_only_where_an_mfu_can_be_reported():
    from pipeline.model.flops import training_flops_if_measurable

    # CPU: no peak, so the loop pays nothing for counting
    assert training_flops_if_measurable(model_config("tiny", 2), 48, torch.device("cpu"), "fp32") is None
