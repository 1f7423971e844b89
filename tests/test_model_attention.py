"""The DNLA fast path against the step-by-step oracle of spec section 2 (tests/dnla_oracle.py)."""

from __future__ import annotations

import pytest
import torch
from dnla_oracle import oracle_codes, oracle_dnla

from pipeline.model import DecoupledNonLocalAttention
from pipeline.model.attention import (
    adjacent_chunks,
    binarize,
    bit_weights,
    chunk_layout,
    dnla_core,
    draw_projection,
    fly_hash,
    hash_length,
    padded_positions,
)


def make_layer(feats: int, chunk: int, bits: int, reduction: int = 2, hashes: int = 3, seed=0):
    torch.manual_seed(seed)
    layer = DecoupledNonLocalAttention(feats, reduction, hashes, chunk, bits, res_scale=0.1)
    layer.set_hash_mode("fixed", 100 + seed)
    return layer


CASES = [
    # (batch, feats, h, w, chunk, n_hashlength, reduction)
    (2, 16, 12, 12, 16, 3, 2),  # divisible by the chunk size
    (2, 16, 9, 11, 16, 3, 2),  # not divisible: tail padding
    (1, 32, 20, 17, 36, 0, 4),  # automatic hash length
    (1, 16, 5, 7, 144, 7, 2),  # fewer tokens than half a chunk (the reference fails here)
    (1, 16, 8, 8, 144, 7, 2),
    (2, 8, 1, 1, 144, 7, 2),  # a single token
    (1, 64, 24, 24, 144, 7, 2),  # 4 chunks per round at the paper's chunk size
    (1, 16, 10, 10, 48, 2, 2),  # 3 chunks per round, pad 44
    (1, 16, 9, 10, 48, 2, 2),  # 2 chunks per round: previous == next
    (1, 192, 24, 30, 144, 7, 2),  # the paper's layer width (Cr 96), 5 chunks per round
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_fast_path_matches_oracle_forward_and_backward(case):
    batch, feats, h, w, chunk, n_bits, reduction = case
    layer = make_layer(feats, chunk, n_bits, reduction)
    x = torch.randn(batch, feats, h, w, requires_grad=True)
    bits = hash_length(h * w, chunk, n_bits)
    projection = layer.projection(bits, x.device)

    y_fast = layer(x)
    y_ref, codes_ref = oracle_dnla(
        x, layer.conv_match, layer.conv_assembly, projection, chunk, layer.res_scale
    )
    _, codes_fast = dnla_core(layer.conv_match(x), layer.conv_assembly(x), projection, chunk)
    assert torch.equal(codes_fast, codes_ref)
    assert (y_fast - y_ref).abs().max() <= 1e-5

    grad = torch.randn_like(y_fast)
    inputs = [x, *layer.parameters()]
    g_fast = torch.autograd.grad(y_fast, inputs, grad)
    g_ref = torch.autograd.grad(y_ref, inputs, grad)
    for a, b in zip(g_fast, g_ref, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= 1e-5 * scale


def test_fast_path_matches_oracle_on_pure_attention_gradients():
    """Gradients of the attention output alone (no residual) w.r.t. q and v embeddings."""
    torch.manual_seed(3)
    q = torch.randn(2, 8, 10, 13, requires_grad=True)
    v = torch.randn(2, 16, 10, 13, requires_grad=True)
    projection = binarize(draw_projection(2, 8, 3, generator=torch.Generator().manual_seed(5)))
    y, _ = dnla_core(q, v, projection, 24)

    class Split(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, _):
            return self.t

    y_ref, _ = oracle_dnla(torch.zeros(2, 16, 10, 13), Split(q), Split(v), projection, 24, 1.0)
    assert (y - y_ref).abs().max() <= 1e-5
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [q, v], g), torch.autograd.grad(y_ref, [q, v], g),
                    strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


def test_hash_bit_ties_are_counted_and_vanishingly_rare():
    """Summing the 20 columns first may flip a bit only where the activation is ~0.

    Over many random embeddings we count code disagreements between the fast hash and the
    oracle's literal one; every disagreement must sit within float rounding of zero, and the
    rate must be tiny.
    """
    gen = torch.Generator().manual_seed(0)
    tokens = 0
    flips = 0
    worst_margin = 0.0
    for trial in range(20):
        cr, nh, bits = (32, 3, 7) if trial % 2 else (96, 3, 7)
        q = torch.randn(2, 10000, cr, generator=gen) * (10.0 ** (trial % 5 - 2))
        u = draw_projection(nh, cr, bits, generator=gen)
        p = binarize(u)
        fast = fly_hash(q, bit_weights(p), nh, bits)
        ref = oracle_codes(q, u)
        differ = fast != ref
        tokens += fast.numel()
        if differ.any():
            # locate the activations of the differing codes, in float64
            exact = torch.einsum("ntc,hcj->nhtj", q.double(),
                                 p[0].double().view(nh, cr, bits, 20).sum(-1))
            exact = exact.reshape(2, nh * 10000, bits)[differ]
            size = (q.abs().double().sum(-1).max() * 20).item()
            margin = (exact.abs().min(-1).values / size).max().item()
            worst_margin = max(worst_margin, margin)
            flips += int(differ.sum())
    assert tokens == 1_200_000
    assert flips / tokens < 1e-5, f"{flips} code(s) of {tokens} differ"
    assert worst_margin < 1e-5  # every flip is a rounding tie: |activation| << its magnitude
    # deliberately constructed exact tie: a zero activation gives bit 0 in both
    zero = torch.zeros(1, 4, 8)
    u = draw_projection(1, 8, 2, generator=gen)
    assert torch.equal(fly_hash(zero, bit_weights(binarize(u)), 1, 2), oracle_codes(zero, u))


def test_bit_weights_sum_each_bits_columns():
    u = draw_projection(2, 5, 3, generator=torch.Generator().manual_seed(1))
    p = binarize(u)
    w = bit_weights(p)
    assert w.shape == (5, 6)
    assert torch.equal(w[:, 1 * 3 + 2], p[0, 1, :, 40:60].float().sum(-1))
    assert p.float().mean().item() == pytest.approx(0.1, abs=0.03)


def test_layout_helpers():
    assert chunk_layout(144, 144) == (1, 0)
    assert chunk_layout(145, 144) == (2, 143)
    assert chunk_layout(1, 144) == (1, 143)
    # reference padding: copy of the last `pad` rows when pad <= L
    assert padded_positions(10, 4, torch.device("cpu")).tolist() == list(range(10)) + [8, 9]
    # beyond the reference: cyclic when the round is shorter than the padding
    assert padded_positions(3, 8, torch.device("cpu")).tolist() == [0, 1, 2, 1, 2, 0, 1, 2]
    adj = adjacent_chunks(2, 3, torch.device("cpu")).tolist()
    assert adj == [[0, 2, 1], [1, 0, 2], [2, 1, 0], [3, 5, 4], [4, 3, 5], [5, 4, 3]]


def test_stochastic_layer_redraws_and_fixed_layer_does_not():
    layer = DecoupledNonLocalAttention(16, 2, 3, 16, 3)
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))
        layer.set_hash_mode("fixed", 4)
        assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("chunks_per_block", [1, 2, 5])
def test_blocked_attention_matches_oracle(monkeypatch, chunks_per_block):
    """Blocks of chunks (incl. a ragged last block) give the single-block result."""
    import pipeline.model.attention as attention

    chunk = 16
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", chunks_per_block * 3 * chunk * chunk)
    assert attention._block_size(chunk, torch.device("cpu")) == chunks_per_block
    layer = make_layer(16, chunk, 3, seed=2)
    x = torch.randn(2, 16, 11, 13, requires_grad=True)  # 9 chunks per round, 54 in all
    projection = layer.projection(3, x.device)
    y_fast = layer(x)
    y_ref, _ = oracle_dnla(x, layer.conv_match, layer.conv_assembly, projection, chunk, 0.1)
    assert (y_fast - y_ref).abs().max() <= 1e-5
    grad = torch.randn_like(y_fast)
    inputs = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(y_fast, inputs, grad),
                    torch.autograd.grad(y_ref, inputs, grad), strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))
