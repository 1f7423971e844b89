"""The correctness oracle: DNLA written step by step from spec section 2, nothing clever.

Every step is the literal description: the full ``20*hl``-column projection, a per-bit sum of
activations, float codes with round offsets, the default (non-stable) sort and its inverse,
padding by copying each round's tail, three materialised copies of the adjacent chunks, an
explicit log-sum-exp. It is slow and memory-hungry on purpose; the fast path in
``pipeline.model.attention`` must agree with it. The only extension beyond the reference is the
one the product documents: padding indices wrap cyclically when a round is shorter than the
padding (identical to the reference whenever the reference runs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def oracle_codes(q: Tensor, uniform_or_binary: Tensor) -> Tensor:
    """Spec step 3 on ``q`` (N, L, Cr): codes (N, nh*L) float32 with round offsets."""
    n, length, _ = q.shape
    if uniform_or_binary.dtype == torch.bool:
        proj = uniform_or_binary.to(torch.float32)
    else:
        proj = (uniform_or_binary > 1 - 0.1).to(torch.float32)
    _, n_hashes, _, columns = proj.shape
    bits = columns // 20
    # activations on the raw, un-centred embedding: A[n, h, t, e]
    act = torch.einsum("ntc,hce->nhte", q.to(torch.float32), proj[0])
    sums = act.reshape(n, n_hashes, length, bits, 20).sum(-1)
    on = (sums > 0).to(torch.float32)
    powers = torch.tensor([2.0**j for j in range(bits)], dtype=torch.float32, device=q.device)
    codes = torch.einsum("nhtj,j->nht", on, powers)
    offsets = torch.arange(n_hashes, dtype=torch.float32, device=q.device).view(1, n_hashes, 1) * (2**bits)
    return (codes + offsets).reshape(n, n_hashes * length).detach()


def oracle_dnla(
    x: Tensor,
    conv_match: torch.nn.Module,
    conv_assembly: torch.nn.Module,
    projection: Tensor,
    chunk_size: int,
    res_scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(output, codes)``; output includes the residual ``Y * res_scale + x``."""
    n, feats, h, w = x.shape
    length = h * w
    q = conv_match(x).reshape(n, -1, length).permute(0, 2, 1)  # (N, L, Cr)
    v = conv_assembly(x).reshape(n, feats, length).permute(0, 2, 1)  # (N, L, F)
    channels = q.shape[-1]
    n_hashes = projection.shape[1]

    codes = oracle_codes(q, projection)

    # step 4: sort and undo
    idx = torch.sort(codes, dim=-1).indices
    undo = torch.sort(idx, dim=-1).indices
    mod = idx % length
    qs = torch.gather(q, 1, mod.unsqueeze(-1).expand(-1, -1, channels))
    vs = torch.gather(v, 1, mod.unsqueeze(-1).expand(-1, -1, feats))
    qs = qs.reshape(n, n_hashes, length, channels)
    vs = vs.reshape(n, n_hashes, length, feats)

    # step 5: pad each round with a copy of its last rows
    pad = chunk_size - length % chunk_size if length % chunk_size else 0
    if pad:
        if pad <= length:
            qs = torch.cat([qs, qs[:, :, -pad:]], dim=2)
            vs = torch.cat([vs, vs[:, :, -pad:]], dim=2)
        else:
            tail = [(length - pad + i) % length for i in range(pad)]
            qs = torch.cat([qs, qs[:, :, tail]], dim=2)
            vs = torch.cat([vs, vs[:, :, tail]], dim=2)
    n_chunks = qs.shape[2] // chunk_size
    qs = qs.reshape(n, n_hashes, n_chunks, chunk_size, channels)
    vs = vs.reshape(n, n_hashes, n_chunks, chunk_size, feats)

    # step 6: normalised keys
    norm = qs.norm(p=2, dim=-1, keepdim=True).clamp_min(5e-5)
    keys = qs / norm

    # step 7: own, previous, next chunk (cyclic)
    keys = torch.cat([keys, torch.roll(keys, 1, dims=2), torch.roll(keys, -1, dims=2)], dim=3)
    vals = torch.cat([vs, torch.roll(vs, 1, dims=2), torch.roll(vs, -1, dims=2)], dim=3)

    # step 8: attention per chunk
    logits = torch.einsum("bhcie,bhcje->bhcij", qs, keys)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse)
    out = torch.einsum("bhcij,bhcje->bhcie", probs, vals)
    out = out.reshape(n, n_hashes, -1, feats)[:, :, :length]
    lse = lse.reshape(n, n_hashes, -1)[:, :, :length]

    # step 9: unsort
    out = out.reshape(n, n_hashes * length, feats)
    out = torch.gather(out, 1, undo.unsqueeze(-1).expand(-1, -1, feats))
    lse = torch.gather(lse.reshape(n, n_hashes * length), 1, undo)
    out = out.reshape(n, n_hashes, length, feats)
    lse = lse.reshape(n, n_hashes, length, 1)

    # step 10: combine rounds
    weights = torch.exp(lse - torch.logsumexp(lse, dim=1, keepdim=True))
    y = (out * weights).sum(dim=1)

    # step 11: residual
    y = y.permute(0, 2, 1).reshape(n, feats, h, w)
    return y * res_scale + x, codes
