"""`sr-pipeline export`: a DNLAN as a file that runs without sr-pipeline, with fixed hashing.

What works, and why the others are refused (one line each, also in the README):

* ``torchscript`` works: TorchScript compiles the attention's Python control flow (chunk
  padding, the block loop), so one file serves any height and width, and it runs the same
  ATen kernels as our eager model (the same non-stable sort included), so its output equals
  ours (checked on a test image before the file is written).
* ``onnx`` is refused: DNLA sorts hash codes with a non-stable sort and many codes tie; ONNX
  has only TopK, whose tie order is defined (stable) and differs, so the buckets and therefore
  the output would not be ours.
* ``exported-program`` is refused: ``torch.export`` specialises the chunk padding
  (``H*W mod chunk_size``) on the example image, so the program rejects other sizes.

The attention layers are rebuilt for export by :class:`ScriptDNLA`: the same submodules and
the layer's fixed projection folded into a buffer (hashing is then part of the file, seed
included); the forward is the eager one without the training-only custom autograd function.
The file records what it fixes (hash mode and seed, scale, rgb_range, input range) in its
``extra/sr_pipeline.json`` and in a sidecar ``<file>.json``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from pipeline.console import UserError

FORMATS = ("torchscript", "onnx", "exported-program")
WHY_NOT = {
    "onnx": (
        "ONNX cannot express DNLA's hashing as sr-pipeline runs it: the bucket sort is "
        "non-stable and ONNX's TopK orders ties differently, so outputs would differ; use "
        "--format torchscript"
    ),
    "exported-program": (
        "torch.export specialises DNLA's chunk padding on the example image, so the program "
        "would reject other heights and widths; use --format torchscript"
    ),
}
METADATA_NAME = "sr_pipeline.json"


def _script_dnla_class():
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    class ScriptDNLA(nn.Module):
        """One DNLA layer in fixed hash mode, TorchScript-compilable (forward only)."""

        def __init__(self, layer: nn.Module, weights: Tensor, bits: int, key_eps: float,
                     block: int) -> None:
            super().__init__()
            self.conv_match = layer.conv_match
            self.conv_assembly = layer.conv_assembly
            self.register_buffer("weights", weights)  # (Cr, n_hashes * bits) float32
            self.n_hashes = int(layer.n_hashes)
            self.bits = int(bits)
            self.chunk_size = int(layer.chunk_size)
            self.res_scale = float(layer.res_scale)
            self.key_eps = float(key_eps)
            self.block = int(block)

        def forward(self, x: Tensor) -> Tensor:
            q_img = self.conv_match(x).to(torch.float32)
            v_img = self.conv_assembly(x).to(torch.float32)
            n, c, h, w = q_img.shape
            feats = v_img.shape[1]
            length = h * w
            nh, bits, cs = self.n_hashes, self.bits, self.chunk_size
            dev = x.device
            q = q_img.reshape(n, c, length).transpose(1, 2).contiguous()
            v = v_img.reshape(n, feats, length).transpose(1, 2).contiguous()
            # hash codes, round-major, float32 (as the eager fly_hash)
            act = torch.matmul(q, self.weights)
            on = (act > 0).view(n, length, nh, bits).to(torch.int64)
            powers = torch.pow(2, torch.arange(bits, device=dev, dtype=torch.int64))
            codes = (on * powers).sum(-1)
            codes = codes + torch.arange(nh, device=dev, dtype=torch.int64) * (1 << bits)
            codes = codes.transpose(1, 2).reshape(n, nh * length).to(torch.float32)
            # buckets, padded rounds, chunks
            n_chunks = (length + cs - 1) // cs
            pad = n_chunks * cs - length
            padded = n_chunks * cs
            order = torch.sort(codes, dim=-1).indices
            tokens = (order % length).view(n, nh, length)
            tail = (length - pad + torch.arange(pad, device=dev)) % length
            positions = torch.cat([torch.arange(length, device=dev), tail])
            fill = tokens.index_select(2, positions)
            offsets = (torch.arange(n, device=dev) * length).view(n, 1, 1)
            rows = (fill + offsets).reshape(-1)
            qs = q.reshape(n * length, c).index_select(0, rows).view(-1, cs, c)
            vs = v.reshape(n * length, feats).index_select(0, rows).view(-1, cs, feats)
            ks = F.normalize(qs, p=2.0, dim=-1, eps=self.key_eps)
            rounds = n * nh
            ch = torch.arange(n_chunks, device=dev)
            base = (torch.arange(rounds, device=dev) * n_chunks).view(rounds, 1)
            adj = torch.stack([base + ch, base + (ch - 1) % n_chunks, base + (ch + 1) % n_chunks],
                              dim=-1).reshape(rounds * n_chunks, 3)  # fmt: skip
            t = adj.shape[0]
            out = torch.empty((t, cs, feats), dtype=qs.dtype, device=dev)
            lse = torch.empty((t, cs), dtype=qs.dtype, device=dev)
            for s in range(0, t, self.block):
                e = min(t, s + self.block)
                ids = adj[s:e].reshape(-1)
                kb = ks.index_select(0, ids).view(e - s, 3 * cs, c)
                vb = vs.index_select(0, ids).view(e - s, 3 * cs, feats)
                logits = torch.bmm(qs[s:e], kb.transpose(1, 2))
                peak = logits.amax(-1, keepdim=True)
                probs = (logits - peak).exp()
                total = probs.sum(-1, keepdim=True)
                out[s:e] = torch.bmm(probs, vb) / total
                lse[s:e] = (peak + total.log()).squeeze(-1)
            out = out.view(n, nh, padded, feats)[:, :, :length]
            lse = lse.view(n, nh, padded)[:, :, :length]
            lse_tok = torch.zeros_like(lse).scatter(2, tokens, lse)
            weight = torch.softmax(lse_tok, dim=1).gather(2, tokens)
            contrib = out * weight.unsqueeze(-1)
            target = (tokens + offsets).reshape(-1)
            y = torch.zeros((n * length, feats), dtype=contrib.dtype, device=dev)
            y = y.index_add(0, target, contrib.reshape(-1, feats))
            y = y.view(n, length, feats).transpose(1, 2).reshape(n, feats, h, w)
            return y.to(x.dtype) * self.res_scale + x

    class ExportNet(nn.Module):
        """DNLAN's forward over its own submodules (no config object, nothing un-scriptable)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.sub_mean = net.sub_mean
            self.head = net.head
            self.body = net.body
            self.tail = net.tail
            self.add_mean = net.add_mean

        def forward(self, x: Tensor) -> Tensor:
            x = self.sub_mean(x)
            x = self.head(x)
            x = self.body(x) + x
            x = self.tail(x)
            return self.add_mean(x)

    return ScriptDNLA, ExportNet


def scriptable(model: Any, hash_seed: int):
    """A copy of ``model`` whose DNLA layers carry their fixed projections, ready to script."""
    import copy

    import torch

    from pipeline.model import set_hash_mode
    from pipeline.model.attention import (
        BLOCK_ELEMENTS,
        KEY_EPS,
        DecoupledNonLocalAttention,
        bit_weights,
    )

    cfg = model.config
    if cfg.n_hashlength <= 0:
        raise UserError(
            "this model picks its hash length from the image size (n_hashlength 0); export "
            "needs a fixed n_hashlength"
        )
    ScriptDNLA, ExportNet = _script_dnla_class()
    net = copy.deepcopy(model).cpu().eval()
    set_hash_mode(net, "fixed", seed=hash_seed)
    block = max(1, BLOCK_ELEMENTS // (3 * cfg.chunk_size * cfg.chunk_size))
    for group in net.body:
        body = getattr(group, "body", None)
        if body is None:
            continue
        for i, layer in enumerate(body):
            if isinstance(layer, DecoupledNonLocalAttention):
                proj = layer.projection(cfg.n_hashlength, torch.device("cpu"))
                weights = bit_weights(proj).contiguous()
                body[i] = ScriptDNLA(layer, weights, cfg.n_hashlength, KEY_EPS, block)
    return ExportNet(net).eval()


def metadata(model: Any, hash_seed: int, source: str) -> dict[str, Any]:
    import dataclasses

    import torch

    from pipeline import __version__

    cfg = model.config
    return {
        "format": "torchscript",
        "model": "DNLAN",
        "scale": int(cfg.scale),
        "rgb_range": float(cfg.rgb_range),
        "hash_mode": "fixed",
        "hash_seed": int(hash_seed),
        "input": f"float32 (N, 3, H, W) RGB in [0, {cfg.rgb_range:g}], any H and W",
        "output": f"float32 (N, 3, {cfg.scale}H, {cfg.scale}W) in [0, {cfg.rgb_range:g}] "
        "(quantise: x255/rgb_range, clamp, round)",
        "model_config": dataclasses.asdict(cfg),
        "source": source,
        "sr_pipeline": __version__,
        "torch": torch.__version__,
    }


def export_model(model: Any, out: Path, fmt: str, hash_seed: int = 0, source: str = "",
                 overwrite: bool = False, check_size: tuple[int, int] = (23, 31)) -> dict[str, Any]:
    """Write ``model`` to ``out`` (and ``out.json``) in ``fmt``; returns the metadata.

    Before anything is written, the scripted model is run on a random ``check_size`` image and
    compared with the eager model in the same hash mode; a difference above 1e-4 is an error.
    """
    import torch

    from pipeline.imageio import atomic_write_bytes
    from pipeline.model import temporary_hash_mode

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt in WHY_NOT:
        raise UserError(WHY_NOT[fmt])
    sidecar = out.with_name(out.name + ".json")
    for p in (out, sidecar):
        if p.is_dir():
            raise UserError(f"{p}: is a folder; choose another export path")
        if p.exists() and not overwrite:
            raise UserError(f"{p}: already exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"{out.parent}: is a file, not a folder")
    scripted = torch.jit.script(scriptable(model, hash_seed))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, *check_size, generator=gen) * float(model.config.rgb_range)
    eager = model.cpu().eval()
    with torch.no_grad(), temporary_hash_mode(eager, "fixed", seed=hash_seed):
        want = eager(x)
    with torch.no_grad():
        got = scripted(x)
    diff = float((got - want).abs().max())
    if diff > 1e-4:
        raise UserError(f"exported model differs from ours by {diff:.2e} on a test image; not written")
    meta = metadata(model, hash_seed, source)
    meta["check"] = {"image": list(check_size), "max_abs_diff": diff}
    text = json.dumps(meta, indent=2, sort_keys=True)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={METADATA_NAME: text})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_bytes(sidecar, (text + "\n").encode())
    return meta
