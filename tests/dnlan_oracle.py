"""The whole-network oracle: DNLAN's forward written step by step from spec section 1.

It owns no modules: every convolution is ``F.conv2d`` on tensors looked up BY KEY in a
state_dict (spec 1.10's names), so a model and this oracle fed the same state_dict must agree
unless the model's wiring differs from the spec (a lost scaling, a skip in the wrong place, a
block order swapped). The attention is ``dnla_oracle.oracle_dnla`` (spec section 2) with the
projection re-derived here from the documented fixed-mode rule, and the hash length from
spec 2 step 2, so nothing is borrowed from ``pipeline.model``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from dnla_oracle import oracle_dnla
from torch import Tensor

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # spec 1.2


def conv(x: Tensor, state: Mapping[str, Tensor], key: str) -> Tensor:
    """Spec 1.1: every conv is stride 1, padding k // 2, with bias."""
    weight = state[f"{key}.weight"]
    return F.conv2d(x, weight, state[f"{key}.bias"], padding=weight.shape[-1] // 2)


def conv_fn(state: Mapping[str, Tensor], key: str) -> Callable[[Tensor], Tensor]:
    return lambda x: conv(x, state, key)


def oracle_hash_length(tokens: int, chunk_size: int, n_hashlength: int) -> int:
    """Spec 2 step 2, literally."""
    if n_hashlength > 0:
        return n_hashlength
    nb = min(tokens // chunk_size + (tokens // chunk_size) % 2, 128)
    hl = 1
    while 2**hl < nb:
        hl += 1
    return hl


def fixed_projection(seed: int, n_hashes: int, match_channels: int, bits: int) -> Tensor:
    """The documented fixed mode: one ``torch.rand`` of the reference's shape (spec 2 step 3)
    from a CPU generator seeded with the layer's seed, binarised at ``> 1 - 0.1``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    uniform = torch.rand((1, n_hashes, match_channels, 20 * bits), generator=gen)
    return uniform > 1 - 0.1


def oracle_dnlan(
    x: Tensor,
    state: Mapping[str, Tensor],
    *,
    n_resgroups: int,
    n_resblocks: int,
    scale: int,
    res_scale: float,
    n_hashes: int,
    chunk_size: int,
    n_hashlength: int,
    rgb_range: float,
    hash_seed: int,
) -> Tensor:
    """Spec 1.1 data flow; DNLA layer ``g`` (group order) hashes with ``hash_seed + g``."""
    mean = torch.tensor(DIV2K_MEAN, dtype=x.dtype).view(1, 3, 1, 1) * rgb_range

    # 1.2 sub_mean: subtract rgb_range * DIV2K mean (identity weight, std 1)
    h = x - mean
    # 1.3 head
    f0 = conv(h, state, "head.0")

    # 1.4 residual groups
    feat = f0
    for g in range(n_resgroups):
        group_in = feat
        t = group_in
        for b in range(n_resblocks):  # plain residual blocks, unscaled
            block = f"body.{g}.body.{b}.body"
            t = conv(F.relu(conv(t, state, f"{block}.0")), state, f"{block}.2") + t
        dnla = f"body.{g}.body.{n_resblocks}"
        match_channels = state[f"{dnla}.conv_match.0.weight"].shape[0]
        bits = oracle_hash_length(t.shape[-2] * t.shape[-1], chunk_size, n_hashlength)
        projection = fixed_projection(hash_seed + g, n_hashes, match_channels, bits)
        t, _ = oracle_dnla(
            t,
            conv_fn(state, f"{dnla}.conv_match.0"),
            conv_fn(state, f"{dnla}.conv_assembly.0"),
            projection,
            chunk_size,
            res_scale,
        )
        t = conv(t, state, f"body.{g}.body.{n_resblocks + 1}")
        feat = t * res_scale + group_in  # group output: body(x) * res_scale + x

    # 1.5 body conv, then the unscaled global skip
    feat = conv(feat, state, f"body.{n_resgroups}") + f0

    # 1.6 upsampler and last conv
    if scale == 3:
        feat = F.pixel_shuffle(conv(feat, state, "tail.0.0"), 3)
    elif scale in (2, 4):
        for i in range(scale // 2):
            feat = F.pixel_shuffle(conv(feat, state, f"tail.0.{2 * i}"), 2)
    else:
        raise NotImplementedError(f"scale {scale}")
    out = conv(feat, state, "tail.1")

    # 1.2 add_mean; no clamp
    return out + mean
