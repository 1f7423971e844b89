"""Decoupled Non-Local Attention (DNLA), the fast path (spec section 2).

The result is the reference's: fly-hash on the raw match embedding, buckets sorted with the
default (non-stable) sort, chunks padded by duplicating each round's tail, raw queries against
L2-normalised keys of [own, previous, next] chunk with cyclic wrap, rounds combined by the
softmax of their log-sum-exp, scaled residual. What changes is only how it is computed:

* The 20 projection columns of one bit are summed once into a single integer-valued column
  (exact in float32), so hashing is one ``(L, Cr) @ (Cr, n_hashes * hl)`` product instead of a
  product with ``20 * hl`` columns followed by a sum. Bits can only differ from the
  step-by-step computation when an activation lies within float rounding of zero.
* Attention runs in a custom autograd function over blocks of chunks: the adjacent keys and
  values are gathered per block only (never three full copies), and the backward pass
  recomputes each block's probabilities from the saved queries, keys and log-sum-exp instead of
  keeping the ``chunk x 3 chunk`` probability matrices alive between forward and backward.
  Saved for backward: sorted queries/keys/values, the per-round outputs and log-sum-exp, i.e.
  what the gradient formula needs, nothing quadratic in the chunk size.
* Unsorting and the round combination are one weighted ``index_add`` into the output, so the
  per-round outputs are never copied back to image order.

Beyond the reference: any token count works (padding indices wrap cyclically when a round is
shorter than the padding, which is identical to the reference whenever the reference runs),
and hashing always runs in float32 with autocast disabled so that bits do not depend on the
compute precision; the attention itself also runs in float32 on CPU.

On CUDA under bf16/fp16 autocast the chunk attention runs instead as one fused
``scaled_dot_product_attention`` call in that precision (flash or memory-efficient kernels;
:mod:`pipeline.model.attention_sdpa` says how the log-sum-exp and its gradient are recovered);
in float32 the blocked function is faster on a GPU too (see ``SDPA_MODE``).
``SR_DNLA_SDPA=on|off`` overrides the choice (``on`` lets CPU tests check its math). The sort's
tie order on CUDA is the CUDA sort's, not the CPU's (spec quirk Q3), so fixed-hash outputs on
GPU and CPU agree to a tolerance, not bitwise (benchmarks/gpu.py measures it).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLING_RATIO = 0.1  # probability that a projection entry is 1
COLUMNS_PER_BIT = 20  # E / hl in the reference (embedding size 20 * hash length)
KEY_EPS = 5e-5  # key normalisation epsilon
MAX_BUCKET_BITS = 7  # auto hash length never exceeds 128 buckets
# logits per block of chunks: 4 MiB float32 keeps a block's chain (matmul, exp, matmul) in
# cache on CPU (measured: 1.4x faster than 16 MiB blocks at 96^2); GPUs prefer fewer, larger
# launches and have the memory for them
BLOCK_ELEMENTS = 1 << 20
BLOCK_ELEMENTS_CUDA = 1 << 25

HashMode = Literal["stochastic", "fixed"]

# Which formulation computes the chunk attention: "auto" = fused scaled_dot_product_attention
# on CUDA when the kernel runs in bf16/fp16 (autocast) and the blocked function below otherwise;
# "on" forces SDPA on any device and in any precision (how CPU tests check its math against the
# oracle); "off" forces the blocked function. Read once at import; tests and tools set the
# module attribute.
# Why fp32 stays blocked on CUDA (measured on an H200, benchmarks/gpu.py, one paper layer
# forward+backward at the x2 training shape): there is no fp32 flash kernel, and SDPA in fp32
# (memory-efficient or math kernel, plus the sink key and the head-dim padding) took 12.9 ms
# against 8.3 ms for the blocked function, whose large CUDA blocks already run as a few big
# batched matmuls; in bf16 SDPA took 7.6 ms.
SDPA_ENV = "SR_DNLA_SDPA"
SDPA_MODE = os.environ.get(SDPA_ENV, "auto").strip().lower() or "auto"
SDPA_DTYPES = (torch.bfloat16, torch.float16)


def uses_sdpa(device: torch.device, compute_dtype: torch.dtype | None = None) -> bool:
    """True when the chunk attention on ``device`` runs as fused SDPA (see ``SDPA_MODE``).

    ``compute_dtype`` is the kernel precision autocast asks for (None: float32)."""
    if SDPA_MODE in ("on", "1", "true"):
        return True
    if SDPA_MODE in ("off", "0", "false"):
        return False
    if SDPA_MODE != "auto":
        raise ValueError(f"{SDPA_ENV} must be auto, on or off, got {SDPA_MODE!r}")
    return device.type == "cuda" and compute_dtype in SDPA_DTYPES


# ---------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------


def hash_length(num_tokens: int, chunk_size: int, n_hashlength: int) -> int:
    """Bits per code: the configured length, or the reference's automatic rule when it is 0."""
    if n_hashlength > 0:
        return n_hashlength
    chunks = num_tokens // chunk_size
    buckets = min(chunks + chunks % 2, 1 << MAX_BUCKET_BITS)
    bits = 1
    while (1 << bits) < buckets:
        bits += 1
    return bits


def projection_shape(n_hashes: int, match_channels: int, bits: int) -> tuple[int, int, int, int]:
    return (1, n_hashes, match_channels, COLUMNS_PER_BIT * bits)


def draw_projection(
    n_hashes: int,
    match_channels: int,
    bits: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One ``torch.rand`` call of the reference's shape, float32: the only RNG use of a layer."""
    shape = projection_shape(n_hashes, match_channels, bits)
    return torch.rand(shape, dtype=torch.float32, device=device, generator=generator)


def binarize(uniform: Tensor) -> Tensor:
    """The sparse binary projection (bool): each entry is set with probability 0.1."""
    return uniform > 1 - SAMPLING_RATIO


def bit_weights(projection: Tensor) -> Tensor:
    """Sum each bit's 20 columns once: ``(1, nh, Cr, 20*hl)`` bool -> ``(Cr, nh*hl)`` float32.

    Entries are small non-negative integers (at most 20), exact in every float format, so the
    result is also safe to cache across ``.half()`` or device moves.
    """
    _, n_hashes, channels, columns = projection.shape
    bits = columns // COLUMNS_PER_BIT
    w = projection[0].to(torch.float32).view(n_hashes, channels, bits, COLUMNS_PER_BIT).sum(-1)
    return w.permute(1, 0, 2).reshape(channels, n_hashes * bits)


def fly_hash(q: Tensor, weights: Tensor, n_hashes: int, bits: int) -> Tensor:
    """Bucket codes with round offsets, ``(N, nh*L)`` float32, round-major like the reference.

    ``q`` is the raw (un-centred) match embedding ``(N, L, Cr)``. Runs in float32 with autocast
    off, so the bits do not depend on the precision the rest of the network uses.
    """
    n, length, _ = q.shape
    with torch.autocast(q.device.type, enabled=False):
        act = torch.matmul(q.detach().to(torch.float32), weights)  # (N, L, nh*hl)
    on = (act > 0).view(n, length, n_hashes, bits).to(torch.int64)
    powers = 2 ** torch.arange(bits, device=q.device, dtype=torch.int64)
    codes = (on * powers).sum(-1)  # (N, L, nh)
    codes = codes + torch.arange(n_hashes, device=q.device, dtype=torch.int64) * (1 << bits)
    # float32 like the reference: the non-stable sort's tie order is then the reference's
    return codes.transpose(1, 2).reshape(n, n_hashes * length).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Chunked attention over [own, previous, next] chunk
# ---------------------------------------------------------------------------------------------


def chunk_layout(num_tokens: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, padding rows) per hash round."""
    n_chunks = -(-num_tokens // chunk_size)
    return n_chunks, n_chunks * chunk_size - num_tokens


def padded_positions(num_tokens: int, chunk_size: int, device: torch.device) -> Tensor:
    """Positions (within a round's sorted order) that fill the padded round.

    The reference appends a copy of the last ``pad`` rows; position ``(L - pad + i) mod L``
    is exactly that when ``pad <= L`` and wraps around cyclically when the round is shorter
    than the padding (where the reference fails).
    """
    _, pad = chunk_layout(num_tokens, chunk_size)
    own = torch.arange(num_tokens, device=device)
    tail = (num_tokens - pad + torch.arange(pad, device=device)) % num_tokens
    return torch.cat([own, tail])


def adjacent_chunks(rounds: int, n_chunks: int, device: torch.device) -> Tensor:
    """``(rounds * n_chunks, 3)`` flat chunk ids of [own, previous, next], cyclic per round."""
    c = torch.arange(n_chunks, device=device)
    base = (torch.arange(rounds, device=device) * n_chunks)[:, None]
    own = base + c
    prev = base + (c - 1) % n_chunks
    nxt = base + (c + 1) % n_chunks
    return torch.stack([own, prev, nxt], dim=-1).reshape(rounds * n_chunks, 3)


def _block_size(chunk_size: int, device: torch.device) -> int:
    budget = BLOCK_ELEMENTS_CUDA if device.type == "cuda" else BLOCK_ELEMENTS
    return max(1, budget // (3 * chunk_size * chunk_size))


def _key_blocks(k: Tensor, v: Tensor, adj: Tensor, cs: int):
    """Blocks of chunks with their gathered [own, prev, next] keys and values.

    Yields ``(start, end, chunk ids, keys (B, 3cs, Cr), values (B, 3cs, F))``; only one block's
    adjacent keys/values exist at a time, which bounds the transient memory.
    """
    t = adj.shape[0]
    step = _block_size(cs, k.device)
    for s in range(0, t, step):
        e = min(t, s + step)
        ids = adj[s:e].reshape(-1)
        kb = k.index_select(0, ids).view(e - s, 3 * cs, k.shape[-1])
        vb = v.index_select(0, ids).view(e - s, 3 * cs, v.shape[-1])
        yield s, e, ids, kb, vb


class _AdjacentChunkAttention(torch.autograd.Function):
    """softmax(q k^T) v over each chunk's [own, prev, next] keys, plus the log-sum-exp.

    q, k: ``(T, cs, Cr)`` (k already normalised), v: ``(T, cs, F)``, adj: ``(T, 3)`` chunk ids.
    Returns out ``(T, cs, F)`` and lse ``(T, cs)``. The backward recomputes probabilities per
    block from q, k and lse (flash-attention style), so nothing of size ``cs x 3cs`` is kept.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, adj: Tensor) -> tuple[Tensor, Tensor]:
        t, cs, _ = q.shape
        feats = v.shape[-1]
        out = torch.empty((t, cs, feats), dtype=q.dtype, device=q.device)
        lse = torch.empty((t, cs), dtype=q.dtype, device=q.device)
        for s, e, _ids, kb, vb in _key_blocks(k, v, adj, cs):
            logits = torch.bmm(q[s:e], kb.transpose(1, 2))
            peak = logits.amax(-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # un-normalised, in place
            total = probs.sum(-1, keepdim=True)
            torch.bmm(probs, vb, out=out[s:e])
            out[s:e].div_(total)
            lse[s:e] = (peak + total.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, adj, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_lse: Tensor | None):
        q, k, v, adj, out, lse = ctx.saved_tensors
        cs = q.shape[1]
        feats = v.shape[-1]
        if d_out is None:
            d_out = torch.zeros_like(out)
        d_out = d_out.contiguous()
        # d logits = p * (d_out . v - d_out . out + d_lse)
        shift = (d_out * out).sum(-1)
        if d_lse is not None:
            shift = shift - d_lse
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        for s, e, ids, kb, vb in _key_blocks(k, v, adj, cs):
            probs = torch.bmm(q[s:e], kb.transpose(1, 2)).sub_(lse[s:e, :, None]).exp_()
            dvb = torch.bmm(probs.transpose(1, 2), d_out[s:e])
            dlogits = torch.bmm(d_out[s:e], vb.transpose(1, 2))
            dlogits.sub_(shift[s:e, :, None]).mul_(probs)
            del probs
            torch.bmm(dlogits, kb, out=dq[s:e])
            dkb = torch.bmm(dlogits.transpose(1, 2), q[s:e])
            dk.index_add_(0, ids, dkb.view(-1, cs, dkb.shape[-1]))
            dv.index_add_(0, ids, dvb.view(-1, cs, feats))
        return dq, dk, dv, None


def sparse_attention(
    q: Tensor,
    v: Tensor,
    codes: Tensor,
    n_hashes: int,
    chunk_size: int,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Bucketed attention given the hash codes (spec steps 4-10).

    q: ``(N, L, Cr)`` raw match embedding, v: ``(N, L, F)``, codes: ``(N, nh*L)``.
    Returns ``(N, L, F)`` in image token order. Everything runs in float32, except the fused
    SDPA kernel (CUDA), which runs in ``compute_dtype`` when one is given (autocast's).
    """
    n, length, channels = q.shape
    feats = v.shape[-1]
    device = q.device
    n_chunks, _ = chunk_layout(length, chunk_size)
    padded = n_chunks * chunk_size

    order = torch.sort(codes, dim=-1).indices  # non-stable, as the reference
    tokens = (order % length).view(n, n_hashes, length)  # token at each sorted position
    fill = tokens[:, :, padded_positions(length, chunk_size, device)]  # (N, nh, padded)
    rows = (fill + (torch.arange(n, device=device) * length)[:, None, None]).reshape(-1)

    qs = q.reshape(n * length, channels).index_select(0, rows)
    vs = v.reshape(n * length, feats).index_select(0, rows)
    qs = qs.view(-1, chunk_size, channels)
    vs = vs.view(-1, chunk_size, feats)
    ks = F.normalize(qs, p=2.0, dim=-1, eps=KEY_EPS)
    adj = adjacent_chunks(n * n_hashes, n_chunks, device)
    if uses_sdpa(device, compute_dtype):
        from pipeline.model.attention_sdpa import chunk_attention_sdpa

        out, lse = chunk_attention_sdpa(qs, ks, vs, adj, compute_dtype)
    else:
        out, lse = _AdjacentChunkAttention.apply(qs, ks, vs, adj)

    out = out.view(n, n_hashes, padded, feats)[:, :, :length]
    lse = lse.view(n, n_hashes, padded)[:, :, :length]
    # weight of each round at each token: softmax over rounds of the token's log-sum-exp
    lse_tok = torch.zeros_like(lse).scatter(2, tokens, lse)
    weight = torch.softmax(lse_tok, dim=1).gather(2, tokens)  # back in sorted order
    contrib = out * weight.unsqueeze(-1)
    target = (tokens + (torch.arange(n, device=device) * length)[:, None, None]).reshape(-1)
    y = torch.zeros((n * length, feats), dtype=contrib.dtype, device=device)
    y = y.index_add(0, target, contrib.reshape(-1, feats))
    if y.requires_grad:
        # the incoming gradient is a transposed view (image layout); its backward gathers rows
        y.register_hook(lambda g: g.contiguous())
    return y.view(n, length, feats)


def dnla_core(q_img: Tensor, v_img: Tensor, projection: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """DNLA from the two embeddings and a binary projection; returns ``(y, codes)``.

    q_img ``(N, Cr, H, W)``, v_img ``(N, F, H, W)``, projection ``(1, nh, Cr, 20*hl)`` bool.
    y is ``(N, F, H, W)`` float32 (before the residual), codes ``(N, nh*L)`` float32.
    """
    n, channels, h, w = q_img.shape
    feats = v_img.shape[1]
    n_hashes = projection.shape[1]
    bits = projection.shape[-1] // COLUMNS_PER_BIT
    # the precision autocast asked for, before it is switched off (only SDPA on CUDA uses it)
    lowp = None
    if q_img.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        lowp = torch.get_autocast_dtype("cuda")
    with torch.autocast(q_img.device.type, enabled=False):
        # token-major copies: the bucket gathers read whole rows, which must be contiguous
        # (gathering rows of the channel-major view costs a cache miss per element)
        q = q_img.to(torch.float32).reshape(n, channels, h * w).transpose(1, 2).contiguous()
        v = v_img.to(torch.float32).reshape(n, feats, h * w).transpose(1, 2).contiguous()
        codes = fly_hash(q, bit_weights(projection).to(q.device), n_hashes, bits)
        y = sparse_attention(q, v, codes, n_hashes, chunk_size, lowp)
        y = y.transpose(1, 2).reshape(n, feats, h, w)
    return y, codes


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class DecoupledNonLocalAttention(nn.Module):
    """The reference's ``FlyNonLocalSparseAttention``: same submodule names, same parameters.

    Hash modes: ``stochastic`` draws a fresh projection from the global torch RNG at every
    forward (the reference); ``fixed`` reuses a projection drawn once from
    ``hash_seed + layer_index`` with a CPU generator. Fixed projections are plain attributes
    (never in the state_dict, never broadcast by DDP) and are copied to the input's device.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        n_hashes: int = 3,
        chunk_size: int = 144,
        n_hashlength: int = 7,
        res_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(f"channels ({channels}) must be divisible by reduction ({reduction})")
        self.match_channels = channels // reduction
        self.conv_match = nn.Sequential(nn.Conv2d(channels, self.match_channels, 3, padding=1))
        self.conv_assembly = nn.Sequential(nn.Conv2d(channels, channels, 1))
        self.n_hashes = n_hashes
        self.chunk_size = chunk_size
        self.n_hashlength = n_hashlength
        self.res_scale = res_scale
        self.hash_mode: HashMode = "stochastic"
        self.hash_seed: int | None = None
        self._fixed: dict[tuple[int, str], Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"n_hashes={self.n_hashes}, chunk_size={self.chunk_size}, "
            f"n_hashlength={self.n_hashlength}, res_scale={self.res_scale}, hash={self.hash_mode}"
        )

    def set_hash_mode(self, mode: HashMode, seed: int | None = None) -> None:
        """``fixed`` needs the layer's own seed (the model-level helper adds the layer index)."""
        if mode not in ("stochastic", "fixed"):
            raise ValueError(f"hash mode must be 'stochastic' or 'fixed', got {mode!r}")
        if mode == "fixed" and seed is None:
            raise ValueError("fixed hash mode needs a seed")
        self.hash_mode = mode
        self.hash_seed = seed if mode == "fixed" else None
        self._fixed = {}

    def projection(self, bits: int, device: torch.device) -> Tensor:
        """The binary projection for this call (draws from the global RNG when stochastic)."""
        if self.hash_mode == "stochastic":
            return binarize(draw_projection(self.n_hashes, self.match_channels, bits, device=device))
        key = (bits, str(device))
        if key not in self._fixed:
            self._draw_fixed(key, bits, device)
        return self._fixed[key]

    @torch.compiler.disable
    def _draw_fixed(self, key: tuple[int, str], bits: int, device: torch.device) -> None:
        """Draw and cache a fixed projection, eagerly: a CPU generator cannot live inside a
        compiled graph. Under torch.compile this breaks the graph on the first call only; the
        recompile that follows finds the cached projection (a constant of the graph)."""
        gen = torch.Generator(device="cpu").manual_seed(int(self.hash_seed))
        u = draw_projection(self.n_hashes, self.match_channels, bits, generator=gen)
        self._fixed[key] = binarize(u).to(device)

    def forward(self, x: Tensor) -> Tensor:
        q = self.conv_match(x)
        v = self.conv_assembly(x)
        bits = hash_length(x.shape[-2] * x.shape[-1], self.chunk_size, self.n_hashlength)
        y, _ = dnla_core(q, v, self.projection(bits, x.device), self.chunk_size)
        return y.to(x.dtype) * self.res_scale + x
