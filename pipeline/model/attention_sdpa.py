"""DNLA's chunk attention as one fused ``scaled_dot_product_attention`` call (the GPU path).

The blocked custom autograd function in :mod:`pipeline.model.attention` is tuned for CPU
caches; on a GPU the same math should run in a fused kernel (flash or memory-efficient
attention) that never materialises the ``cs x 3cs`` logits. The obstacle: DNLA needs each
query's log-sum-exp (it weights the hash rounds, spec step 10) *with its gradient*, and the
public SDPA returns only the normalised output.

The trick, exact in real arithmetic: append one extra "sink" key to every chunk whose logit is
a per-query constant ``c = ||q||`` (a column ``c`` on the query side, ``1`` on the sink key,
``0`` on the real keys) and whose value is a one-hot column (``1`` on the sink, ``0`` on the
real values). Then, with ``s`` the sink column of the output::

    s   = e^c / (e^lse + e^c)           ->  lse = c + log(1 - s) - log(s)
    out = (1 - s) * attention output    ->  out = out_sink[..., :F] / (1 - s)

and autograd through SDPA gives the gradients of both (``c`` is a detached constant: the
identities hold for any ``c``). ``c = ||q||`` keeps this well conditioned: keys are unit
vectors, so every logit is at most ``||q||``, and the token's own key (always in its own
chunk) reaches it; hence ``lse - c`` lies in ``[0, log(3 cs)]`` and ``s`` in
``[1 / (1 + 3 cs), 1/2]``, never near 0 or 1, even in bf16.

Semantics kept from the spec: scale 1 (raw queries against L2-normalised keys, no 1/sqrt(d)),
keys of [own, previous, next] chunk with cyclic wrap (the same ``adj`` table), duplicates and
self-matches included, nothing masked. Head dimensions are zero-padded to a multiple of 8 (and
in bf16/fp16, to one common size when that stays within 256, which makes the flash kernel
eligible).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FLASH_MAX_HEAD_DIM = 256
FLASH_DTYPES = (torch.bfloat16, torch.float16)
# bf16/fp16: pad q/k to v's head dim so the flash kernel is eligible (True), or leave q/k at
# the next multiple of 8 for the memory-efficient kernel (False); benchmarks/gpu.py times both
EQUAL_HEAD_DIMS = True


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def chunk_attention_sdpa(
    qs: Tensor, ks: Tensor, vs: Tensor, adj: Tensor, compute_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as the blocked function: ``(out (T, cs, F), lse (T, cs))`` in float32.

    qs, ks ``(T, cs, Cr)`` (ks normalised), vs ``(T, cs, F)``, adj ``(T, 3)`` chunk ids.
    ``compute_dtype`` (bf16/fp16) runs the fused kernel in that precision; the sink
    arithmetic before and after it stays float32.
    """
    t, cs, cr = qs.shape
    feats = vs.shape[-1]
    dtype = compute_dtype or qs.dtype
    d_qk, d_v = _round8(cr + 1), _round8(feats + 1)
    # flash (bf16/fp16 only) needs one head dim for q/k and v; elsewhere padding q/k up to
    # v's width (72 -> 200 at paper width) would only add work to the memory-efficient kernel
    if EQUAL_HEAD_DIMS and dtype in FLASH_DTYPES and max(d_qk, d_v) <= FLASH_MAX_HEAD_DIM:
        d_qk = d_v = max(d_qk, d_v)
    ids = adj.reshape(-1)
    # the sink logit, rounded to the kernel's precision so that the identities below use the
    # very logit the kernel used (a bf16 ||q|| of 20 is off by up to 0.08)
    c = torch.linalg.vector_norm(qs.detach(), dim=-1, keepdim=True).to(dtype).to(qs.dtype)

    # pad and cast once per chunk, then gather the [own, prev, next] copies (3x the rows) in
    # the kernel's dtype: the same values as gathering first, with a third of the copying
    q_aug = F.pad(torch.cat([qs, c], dim=-1), (0, d_qk - cr - 1)).to(dtype)
    keys = F.pad(ks, (0, d_qk - cr)).to(dtype).index_select(0, ids).view(t, 3 * cs, d_qk)
    vals = F.pad(vs, (0, d_v - feats)).to(dtype).index_select(0, ids).view(t, 3 * cs, d_v)
    sink_k = keys.new_zeros((1, 1, d_qk))
    sink_k[..., cr] = 1.0
    sink_v = vals.new_zeros((1, 1, d_v))
    sink_v[..., feats] = 1.0
    k_aug = torch.cat([keys, sink_k.expand(t, 1, d_qk)], dim=1)
    v_aug = torch.cat([vals, sink_v.expand(t, 1, d_v)], dim=1)

    o = F.scaled_dot_product_attention(
        q_aug.unsqueeze(1), k_aug.unsqueeze(1), v_aug.unsqueeze(1), scale=1.0,
    ).squeeze(1).to(qs.dtype)
    s = o[..., feats]
    kept = 1.0 - s
    out = o[..., :feats] / kept.unsqueeze(-1)
    lse = c.squeeze(-1) + torch.log(kept) - torch.log(s)
    return out, lse
