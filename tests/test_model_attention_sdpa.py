"""The fused SDPA formulation of DNLA's chunk attention against the oracle (spec section 2).

On CUDA the model runs it by default; here it is forced on CPU (``SDPA_MODE = "on"``) so its
math (adjacent-chunk gathering, the sink column that recovers the log-sum-exp, scale 1,
duplicates and self-matches kept, bucket order) is checked in float32, forward and backward.
The CUDA tests run the real GPU kernels in float32 and bf16 when a GPU is present.
"""

from __future__ import annotations

import pytest
import torch
from dnla_oracle import oracle_dnla
from test_model_attention import CASES, make_layer

import pipeline.model.attention as attention
from pipeline.model.attention import hash_length

CUDA = torch.cuda.is_available()


def compare(layer, x, tol):
    """The layer (current SDPA_MODE) against the oracle in float64 on the same device (so the
    bucket sort, whose tie order is device-specific, is the same sort)."""
    chunk = layer.chunk_size
    h, w = x.shape[-2:]
    projection = layer.projection(hash_length(h * w, chunk, layer.n_hashlength), x.device)
    y = layer(x)
    grad = torch.randn_like(y)
    inputs = [x, *layer.parameters()]
    g_fast = torch.autograd.grad(y, inputs, grad)

    feats, reduction = layer.conv_assembly[0].in_channels, layer.conv_assembly[0].in_channels // layer.match_channels
    ref_layer = make_layer(feats, chunk, layer.n_hashlength, reduction)
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer = ref_layer.to(x.device, torch.float64)
    xd = x.detach().double().requires_grad_(True)
    y_ref, _ = oracle_dnla(xd, ref_layer.conv_match, ref_layer.conv_assembly, projection,
                           chunk, layer.res_scale)
    g_ref = torch.autograd.grad(y_ref, [xd, *ref_layer.parameters()], grad.double())
    assert (y.double() - y_ref).abs().max() <= tol
    for a, b in zip(g_fast, g_ref, strict=True):
        assert (a.double() - b).abs().max() <= tol * max(1.0, float(b.abs().max()))


class Given(torch.nn.Module):
    """Stands in for a conv in the oracle: returns a given embedding (so both sides hash the
    same float32 embedding, whatever precision produced it)."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, _):
        return self.t


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_sdpa_formulation_matches_oracle_on_cpu(monkeypatch, case):
    monkeypatch.setattr(attention, "SDPA_MODE", "on")
    batch, feats, h, w, chunk, n_bits, reduction = case
    layer = make_layer(feats, chunk, n_bits, reduction)
    x = torch.randn(batch, feats, h, w, requires_grad=True)
    assert attention.uses_sdpa(x.device)
    compare(layer, x, 1e-5)


def test_sdpa_mode_switch(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attention, "SDPA_MODE", "auto")
    # auto: SDPA for a bf16/fp16 kernel on CUDA only (blocked wins in fp32 on a GPU, measured)
    assert not attention.uses_sdpa(cpu) and not attention.uses_sdpa(cpu, torch.bfloat16)
    assert not attention.uses_sdpa(gpu) and not attention.uses_sdpa(gpu, torch.float32)
    assert attention.uses_sdpa(gpu, torch.bfloat16) and attention.uses_sdpa(gpu, torch.float16)
    monkeypatch.setattr(attention, "SDPA_MODE", "off")
    assert not attention.uses_sdpa(gpu, torch.bfloat16)
    monkeypatch.setattr(attention, "SDPA_MODE", "on")
    assert attention.uses_sdpa(cpu) and attention.uses_sdpa(gpu, torch.float32)
    monkeypatch.setattr(attention, "SDPA_MODE", "sometimes")
    with pytest.raises(ValueError, match=attention.SDPA_ENV):
        attention.uses_sdpa(cpu)


def test_sdpa_and_blocked_paths_give_the_same_layer_output(monkeypatch):
    """Same codes and buckets in both formulations: outputs agree to float32 rounding."""
    layer = make_layer(32, 36, 0, 4, seed=4)
    x = torch.randn(2, 32, 14, 15)
    with torch.no_grad():
        monkeypatch.setattr(attention, "SDPA_MODE", "off")
        blocked = layer(x)
        monkeypatch.setattr(attention, "SDPA_MODE", "on")
        fused = layer(x)
    assert (blocked - fused).abs().max() <= 1e-5


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the fused SDPA kernels run on CUDA only")
@pytest.mark.parametrize("case", CASES[-4:], ids=lambda c: "x".join(map(str, c)))
def test_sdpa_on_cuda_matches_oracle_fp32(monkeypatch, case):
    # forced: in fp32, auto picks the blocked function on CUDA; SR_DNLA_SDPA=on still runs this
    monkeypatch.setattr(attention, "SDPA_MODE", "on")
    batch, feats, h, w, chunk, n_bits, reduction = case
    layer = make_layer(feats, chunk, n_bits, reduction).cuda()
    x = torch.randn(batch, feats, h, w, device="cuda", requires_grad=True)
    assert attention.uses_sdpa(x.device)
    # TF32 off: the comparison is about the attention, not the convolutions' precision
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    compare(layer, x, 1e-4)


# max |error| relative to the largest reference value (outputs) / gradient (measured on CPU:
# bf16 0.005 / 0.033, fp16 0.0007 / 0.004, with the paper's layer width)
LOW_PRECISION_TOL = {torch.bfloat16: (2e-2, 8e-2), torch.float16: (5e-3, 2e-2)}


def low_precision_case(device, dtype, autocast):
    """Paper-width embeddings (Cr 96, F 192, 5 chunks per round) through the SDPA kernel in
    ``dtype``, against the float64 oracle given the same float32 embeddings."""
    torch.manual_seed(1)
    q = torch.randn(2, 96, 24, 30, device=device, requires_grad=True)
    v = torch.randn(2, 192, 24, 30, device=device, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    projection = attention.binarize(attention.draw_projection(3, 96, 7, generator=gen)).to(device)
    if autocast:  # the model's way: dnla_core picks autocast's dtype for the kernel
        with torch.autocast("cuda", dtype=dtype):
            y, _ = attention.dnla_core(q, v, projection, 144)
    else:
        n, cr, h, w = q.shape
        qt = q.reshape(n, cr, h * w).transpose(1, 2)
        vt = v.reshape(n, 192, h * w).transpose(1, 2)
        codes = attention.fly_hash(qt, attention.bit_weights(projection), 3, 7)
        y = attention.sparse_attention(qt, vt, codes, 3, 144, dtype)
        y = y.transpose(1, 2).reshape(n, 192, h, w)
    qd, vd = q.detach().double().requires_grad_(True), v.detach().double().requires_grad_(True)
    y_ref, _ = oracle_dnla(torch.zeros_like(vd), Given(qd), Given(vd), projection, 144, 1.0)
    tol_out, tol_grad = LOW_PRECISION_TOL[dtype]
    assert (y.detach().double() - y_ref).abs().max() <= tol_out * float(y_ref.abs().max())
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, [q, v], g.float()), torch.autograd.grad(y_ref, [qd, vd], g),
                    strict=True):
        assert (a.double() - b).abs().max() <= tol_grad * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("dtype,equal", [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)])
def test_sdpa_low_precision_kernel_on_cpu(monkeypatch, dtype, equal):
    """The sink arithmetic survives a bf16/fp16 kernel (CPU SDPA in that dtype), with q/k
    padded to v's head dim (flash-eligible) or not (the memory-efficient kernel's layout)."""
    from pipeline.model import attention_sdpa

    monkeypatch.setattr(attention, "SDPA_MODE", "on")
    monkeypatch.setattr(attention_sdpa, "EQUAL_HEAD_DIMS", equal)
    low_precision_case("cpu", dtype, autocast=False)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the fused SDPA kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_on_cuda_low_precision_matches_oracle(monkeypatch, dtype):
    """Under autocast the fused kernel runs in bf16/fp16 (hashing stays float32)."""
    monkeypatch.setattr(attention, "SDPA_MODE", "auto")
    low_precision_case("cuda", dtype, autocast=True)
