"""The DNLAN network (spec section 1), with the reference's exact state_dict layout.

Submodules are registered in the reference's order and under its names (``a``, ``sub_mean``,
``add_mean``, ``head``, ``body``, ``tail``) so that an official checkpoint loads with
``strict=True`` and the state_dict we export loads into the official code. Modules are also
constructed in the reference's order, so with the same global seed the default initialisation
consumes the RNG in the same sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.model.attention import DecoupledNonLocalAttention, HashMode

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding ``sign * rgb_range * mean``.

    Its weights are frozen ``nn.Parameter``s rather than buffers because the reference's are:
    they are in official checkpoints and in its parameter count.
    """

    def __init__(self, rgb_range: float, sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(DIV2K_RGB_MEAN))
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    """conv-ReLU-conv plus identity (the reference's RCAB with its channel attention removed)."""

    def __init__(self, feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(feats, feats), nn.ReLU(inplace=True), conv3x3(feats, feats))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ResidualGroup(nn.Module):
    """``n_resblocks`` blocks, one DNLA, one conv; the branch is scaled by ``res_scale``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        f = cfg.n_feats
        layers: list[nn.Module] = [ResBlock(f) for _ in range(cfg.n_resblocks)]
        layers.append(
            DecoupledNonLocalAttention(
                f,
                reduction=cfg.reduction,
                n_hashes=cfg.n_hashes,
                chunk_size=cfg.chunk_size,
                n_hashlength=cfg.n_hashlength,
                res_scale=cfg.res_scale,
            )
        )
        layers.append(conv3x3(f, f))
        self.body = nn.Sequential(*layers)
        self.res_scale = cfg.res_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.res_scale + x


def upsampler(scale: int, feats: int) -> nn.Sequential:
    """EDSR-style sub-pixel upsampler: keys ``0`` (and ``2`` for x4), as the reference."""
    layers: list[nn.Module] = []
    if scale in (2, 4):
        for _ in range(2 if scale == 4 else 1):
            layers += [conv3x3(feats, 4 * feats), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [conv3x3(feats, 9 * feats), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"scale must be 2, 3 or 4, got {scale}")
    return nn.Sequential(*layers)


class DNLAN(nn.Module):
    """Decoupled Non-Local Attention Network.

    ``a`` is the reference's unused parameter, kept so that checkpoints match key for key. It
    is frozen (``requires_grad=False``) and listed in ``_ddp_params_and_buffers_to_ignore``, so
    DDP neither waits for its gradient nor needs ``find_unused_parameters=True``; optimisers
    built over trainable parameters skip it, which is what Adam effectively did to it anyway.
    """

    # DDP matches this list against "a" in one place and f"{module_name}.{name}" (".a" for the
    # root module) when it builds its reducer (torch 2.x), so both spellings are listed.
    _ddp_params_and_buffers_to_ignore = ("a", ".a")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = dataclasses.replace(cfg)
        f = cfg.n_feats
        self.a = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.sub_mean = MeanShift(cfg.rgb_range, sign=-1)
        self.add_mean = MeanShift(cfg.rgb_range, sign=+1)
        self.head = nn.Sequential(conv3x3(3, f))
        groups: list[nn.Module] = [ResidualGroup(cfg) for _ in range(cfg.n_resgroups)]
        groups.append(conv3x3(f, f))
        self.body = nn.Sequential(*groups)
        self.tail = nn.Sequential(upsampler(cfg.scale, f), conv3x3(f, 3))

    @property
    def scale(self) -> int:
        return self.config.scale

    def attention_layers(self) -> list[DecoupledNonLocalAttention]:
        return [m for m in self.modules() if isinstance(m, DecoupledNonLocalAttention)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.sub_mean(x)
        x = self.head(x)
        x = self.body(x) + x
        x = self.tail(x)
        return self.add_mean(x)


def build_from_config(cfg: ModelConfig) -> DNLAN:
    """A freshly initialised DNLAN (hash mode ``stochastic``, as the reference)."""
    return DNLAN(cfg)


def build_model(preset: str = "paper", scale: int = 2, **overrides) -> DNLAN:
    """DNLAN from a preset (``paper``, ``paper128``, ``tiny``) plus reference-named overrides."""
    from pipeline.config import model_config

    return build_from_config(model_config(preset, scale, **overrides))


def set_hash_mode(model: nn.Module, mode: HashMode, seed: int = 0) -> nn.Module:
    """Switch every DNLA layer of ``model`` (DDP-wrapped or not) to ``mode``.

    In ``fixed`` mode layer ``i`` (in module order) uses ``seed + i``; the projection is drawn
    lazily on first use, once per hash length, and then reused.
    """
    if mode not in ("stochastic", "fixed"):
        raise ValueError(f"hash mode must be 'stochastic' or 'fixed', got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, DecoupledNonLocalAttention)]
    for i, layer in enumerate(layers):
        layer.set_hash_mode(mode, seed + i if mode == "fixed" else None)
    return model


def hash_mode_of(model: nn.Module) -> str:
    """``stochastic``, ``fixed`` or ``mixed`` (layers disagree); ``none`` without DNLA layers."""
    modes = {m.hash_mode for m in model.modules() if isinstance(m, DecoupledNonLocalAttention)}
    if not modes:
        return "none"
    return modes.pop() if len(modes) == 1 else "mixed"


@contextlib.contextmanager
def temporary_hash_mode(model: nn.Module, mode: HashMode, seed: int = 0) -> Iterator[nn.Module]:
    """Run a block (e.g. validation during training) in ``mode``; restore every layer after.

    Restoring a fixed layer redraws the same projection from its stored seed.
    """
    layers = [m for m in model.modules() if isinstance(m, DecoupledNonLocalAttention)]
    saved = [(layer.hash_mode, layer.hash_seed) for layer in layers]
    set_hash_mode(model, mode, seed)
    try:
        yield model
    finally:
        for layer, (old_mode, old_seed) in zip(layers, saved, strict=True):
            layer.set_hash_mode(old_mode, old_seed)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
