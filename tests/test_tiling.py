"""Tiled inference: exactness against whole-image output, the reference chop, self-ensemble, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluate import tiling


class ConvSR(nn.Module):
    """Small conv SR net: receptive field radius `layers` LR px (3x3 convs), pixel shuffle."""

    def __init__(self, scale: int = 2, feats: int = 8, layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        convs = [nn.Conv2d(3, feats, 3, padding=1)]
        convs += [nn.Conv2d(feats, feats, 3, padding=1) for _ in range(layers - 2)]
        convs += [nn.Conv2d(feats, 3 * scale * scale, 3, padding=1)]
        for c in convs:
            with torch.no_grad():
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.2)
                c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.05)
        layers_ = []
        for c in convs[:-1]:
            layers_ += [c, nn.ReLU()]
        self.body = nn.Sequential(*layers_, convs[-1], nn.PixelShuffle(scale))
        self.radius = layers

    def forward(self, x):
        return self.body(x)


class Nearest(nn.Module):
    """Pixel-local model (nearest upsampling) that tags its output with its call number."""

    def __init__(self, scale: int, tag: bool = False) -> None:
        super().__init__()
        self.scale, self.tag = scale, tag
        self.calls: list[tuple[int, int]] = []

    def forward(self, x):
        self.calls.append((x.shape[-2], x.shape[-1]))
        y = x.repeat_interleave(self.scale, -2).repeat_interleave(self.scale, -1)
        return y + 10.0 * len(self.calls) if self.tag else y


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """float64, so "identical" can be checked to 1e-12 (float32 convs of different input
    sizes round differently in the last bit)."""
    return torch.rand(
        (1, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


# ---------------------------------------------------------------------------------------------
# overlap tiling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [
        (5, 8, 2),
        (8, 8, 2),
        (9, 8, 2),
        (100, 24, 5),
        (257, 64, 16),
        (40, 10, 4),
        (360, 192, 16),
        (1020, 192, 16),
    ],
)
def test_axis_tiles_cover_with_context(length, tile, overlap):
    tiles = tiling.axis_tiles(length, tile, overlap)
    cores = [(a, b) for _, _, a, b in tiles]
    assert cores[0][0] == 0 and cores[-1][1] == length
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(cores[:-1], cores[1:], strict=True))
    for i0, i1, c0, c1 in tiles:
        assert i1 - i0 <= tile
        assert 0 <= i0 <= c0 < c1 <= i1 <= length
        assert c0 - i0 == overlap or i0 == c0 == 0
        assert i1 - c1 == overlap or i1 == c1 == length
    # the fewest windows: each covers at most tile - 2 * overlap new pixels (+ overlap at edges)
    core = tile - 2 * overlap
    assert len(tiles) == (1 if length <= tile else -(-(length - 2 * overlap) // core))
    sizes = [c1 - c0 for _, _, c0, c1 in tiles[1:-1]]
    assert not sizes or max(sizes) - min(sizes) <= 1  # balanced, no sliver at the end


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("h", "w"), [(37, 53), (20, 90), (64, 64), (7, 9)])
def test_overlap_equals_whole_when_receptive_field_fits(scale, h, w):
    model = ConvSR(scale=scale, layers=3).double().eval()
    lr = _image(h, w, seed=h * w)
    whole = tiling.forward_whole(model, lr)
    tiled = tiling.forward_overlap(model, lr, scale, tile=16, overlap=3)
    assert tiled.shape == (1, 3, scale * h, scale * w)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)


def test_overlap_too_small_for_receptive_field_differs():
    model = ConvSR(scale=2, layers=5).double().eval()  # radius 5 > overlap 2
    lr = _image(40, 40)
    diff = (
        tiling.forward_overlap(model, lr, 2, tile=12, overlap=2) - tiling.forward_whole(model, lr)
    ).abs()
    assert diff.max() > 1e-4  # the exactness test above could fail, i.e. it is meaningful


def test_overlap_progress_callback():
    seen = []
    tiling.forward_overlap(
        Nearest(2), _image(30, 50), 2, tile=16, overlap=2, on_tile=lambda d, t: seen.append((d, t))
    )
    total = len(tiling.axis_tiles(30, 16, 2)) * len(tiling.axis_tiles(50, 16, 2))
    assert seen == [(i, total) for i in range(1, total + 1)]


# ---------------------------------------------------------------------------------------------
# reference chop (spec section 5)
# ---------------------------------------------------------------------------------------------


def test_reference_tile_size_rounding():
    # h: //2 + 10, then += 4 - size % 4 (adds 4 on a multiple of 4); w: same with 8
    assert tiling.reference_tile_size(100, 100) == (64, 64)  # 60 -> 64 (h: +4), 60 -> 64 (w: +4)
    assert tiling.reference_tile_size(108, 108) == (68, 72)  # 64 -> 68, 64 -> 72
    assert tiling.reference_tile_size(101, 97) == (64, 64)  # 60 -> 64, 58 -> 64
    assert tiling.reference_tile_size(2, 2) == (12, 16)


def _expected_owner(h: int, w: int, scale: int) -> np.ndarray:
    """Which quadrant (1..4, call order) owns each HR pixel, from the spec's wording."""
    owner = np.empty((scale * h, scale * w), int)
    hh, wh = scale * (h // 2), scale * (w // 2)
    owner[:hh, :wh], owner[:hh, wh:], owner[hh:, :wh], owner[hh:, wh:] = 1, 2, 3, 4
    return owner


@pytest.mark.parametrize(("h", "w", "scale"), [(100, 140, 2), (61, 83, 3), (57, 50, 4)])
def test_reference_chop_stitching(h, w, scale):
    lr = _image(h, w, seed=1)
    model = Nearest(scale, tag=True)
    out = tiling.forward_reference_chop(model, lr, scale)
    h_size, w_size = tiling.reference_tile_size(h, w)
    assert model.calls == [(h_size, w_size)] * 4
    nearest = lr.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    tag = torch.round((out - nearest) / 10.0)[0, 0].numpy().astype(int)
    np.testing.assert_array_equal(tag, _expected_owner(h, w, scale))
    # every pixel came from its own position (the offsets inside each tile are right)
    torch.testing.assert_close(
        out - 10.0 * torch.from_numpy(tag).double(), nearest, rtol=0, atol=1e-12
    )


def test_reference_chop_recursion():
    h = w = 200
    model = Nearest(2, tag=False)
    out = tiling.forward_reference_chop(model, _image(h, w), 2, min_size=10_000)
    # level 1: 100+10=110 -> 112 (h, +2), 110 -> 112 (w, +2): 12544 >= 10000 -> recurse
    # level 2: 56+10=66 -> 68 (h), 66 -> 72 (w): 4896 < 10000 -> run
    assert model.calls == [(68, 72)] * 16
    assert out.shape == (1, 3, 400, 400)
    torch.testing.assert_close(out, tiling.forward_whole(Nearest(2), _image(h, w)))
    # the default min size (120000 LR px) never recurses on benchmark-sized images
    model = Nearest(2)
    tiling.forward_reference_chop(model, _image(h, w), 2)
    assert model.calls == [(112, 112)] * 4


@pytest.mark.parametrize("scale", [2, 4])
def test_reference_chop_exact_for_local_model(scale):
    # each output pixel is >= 10 LR px from its tile's inner edges: exact for radius <= 10
    model = ConvSR(scale=scale, layers=6).double().eval()
    lr = _image(70, 90, seed=3)
    torch.testing.assert_close(
        tiling.forward_reference_chop(model, lr, scale),
        tiling.forward_whole(model, lr),
        rtol=0,
        atol=1e-12,
    )


def test_reference_chop_small_image_runs_whole():
    model = Nearest(2)
    out = tiling.forward_reference_chop(model, _image(20, 20), 2)
    assert model.calls == [(20, 20)] and out.shape == (1, 3, 40, 40)


# ---------------------------------------------------------------------------------------------
# self-ensemble
# ---------------------------------------------------------------------------------------------


def test_self_ensemble_matches_numpy_average():
    model = ConvSR(scale=2, layers=3, seed=4).double().eval()
    lr = _image(12, 17, seed=2)
    got = tiling.self_ensemble(lambda x: tiling.forward_whole(model, x), lr)[0].numpy()
    # independent: numpy dihedral transforms of an HxWxC array
    img = lr[0].permute(1, 2, 0).numpy()
    outs = []
    for transpose in (False, True):
        for rot_flip_h in (False, True):
            for flip_w in (False, True):
                x = img.transpose(1, 0, 2) if transpose else img
                x = x[::-1] if rot_flip_h else x
                x = x[:, ::-1] if flip_w else x
                t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
                y = tiling.forward_whole(model, t)[0].permute(1, 2, 0).numpy()
                y = y[:, ::-1] if flip_w else y
                y = y[::-1] if rot_flip_h else y
                y = y.transpose(1, 0, 2) if transpose else y
                outs.append(y)
    want = np.mean(outs, axis=0).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-12)
    single = tiling.forward_whole(model, lr)[0].numpy()
    assert np.abs(got - single).max() > 1e-3  # the model is not equivariant: averaging mattered


def test_self_ensemble_of_equivariant_model_is_identity():
    lr = _image(9, 14)
    out = tiling.self_ensemble(lambda x: tiling.forward_whole(Nearest(3), x), lr)
    torch.testing.assert_close(out, tiling.forward_whole(Nearest(3), lr))


def test_make_forward_composes_padding_tiling_and_ensemble():
    model = ConvSR(scale=2, layers=3).double().eval()
    lr = _image(5, 4)
    fwd = tiling.make_forward(
        model, 2, tiling="overlap", tile=16, overlap=4, ensemble=True, min_side=9
    )
    out = fwd(lr)
    assert out.shape == (1, 3, 10, 8)
    probe = Nearest(2)
    tiling.make_forward(probe, 2, tiling="none", min_side=9)(lr)
    assert probe.calls == [(9, 9)]
    with pytest.raises(ValueError, match="unknown tiling"):
        tiling.make_forward(model, 2, tiling="spiral")


# ---------------------------------------------------------------------------------------------
# peak memory of overlap tiling does not grow with the image (measured in fresh processes)
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from pipeline.evaluate import tiling

    kind, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if kind == "conv":
        F = 64
        model = nn.Sequential(nn.Conv2d(3, F, 3, padding=1), nn.ReLU(), nn.Conv2d(F, F, 3, padding=1),
                              nn.ReLU(), nn.Conv2d(F, F, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(F, 12, 3, padding=1), nn.PixelShuffle(2)).eval()
    else:  # a small real DNLAN: memory is dominated by DNLA's chunk attention
        from pipeline.model import build_model, set_hash_mode
        model = build_model("tiny", 2, n_feats=16, n_resgroups=1, n_resblocks=1).eval()
        set_hash_mode(model, "fixed", seed=0)

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    run = {
        "whole": lambda x: tiling.forward_whole(model, x),
        "overlap": lambda x: tiling.forward_overlap(model, x, 2, tile=64, overlap=8),
    }[mode]
    run(torch.rand(1, 3, 64, 64))  # warm-up: kernels, allocator pools
    lr = torch.rand(1, 3, size, size)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = hwm()
    out = run(lr)
    print(json.dumps({"before": before, "after": hwm(), "out": out.nbytes}))
    """
)


def _peak_growth(kind: str, mode: str, size: int) -> tuple[int, int]:
    """Peak RSS growth of one forward in a fresh process, and the output array's size."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, kind, mode, str(size)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["after"] - r["before"], r["out"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv", "dnlan"])
def test_overlap_peak_memory_bounded_as_image_grows(kind):
    growth_whole, _ = _peak_growth(kind, "whole", 512)
    small, _ = _peak_growth(kind, "overlap", 128)
    large, out_large = _peak_growth(kind, "overlap", 512)
    print(f"{kind}: whole 512^2 +{growth_whole / 1e6:.0f} MB; overlap 128^2 +{small / 1e6:.0f} MB, "
          f"512^2 +{large / 1e6:.0f} MB (output array {out_large / 1e6:.0f} MB)")  # fmt: skip
    # whole-image activations at 512^2 LR (conv: 64 ch x 262k px x 4 B = 67 MB per map; DNLA:
    # attention over 262k tokens): the measurement sees them, so the bound below is a real one
    assert growth_whole > 150e6, growth_whole
    # overlap tiling: 16x the pixels, yet beyond the output array itself the peak stays within
    # a few tiles' worth of activations (one tile is 64+2*8 = 80 px square)
    assert large - out_large < small + 20e6, (small, large, out_large)
    assert large < growth_whole / 5


# ---- batched inference and precision (issue 14) ----------------------------------------------


def _tiny_dnlan():
    from pipeline.model import build_model, set_hash_mode

    torch.manual_seed(0)
    model = build_model("tiny", 2, n_resgroups=1, n_resblocks=1, n_feats=16, chunk_size=48).eval()
    return set_hash_mode(model, "fixed", 3)


def test_batched_tiles_equal_one_at_a_time():
    """Float64 conv net: bitwise; DNLAN with fixed hashing: to float32 rounding."""
    conv = ConvSR(2).double()
    img = _image(37, 53)
    one = tiling.forward_overlap(conv, img, 2, 16, 4)
    calls = []
    for k in (2, 3, 64):
        batched = tiling.forward_overlap(conv, img, 2, 16, 4, batch_tiles=k,
                                         on_tile=lambda d, t: calls.append((d, t)))
        assert torch.equal(batched, one)
    assert calls[-1][0] == calls[-1][1]  # progress reaches the total

    model = _tiny_dnlan()
    lr = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    one = tiling.forward_overlap(model, lr, 2, 24, 6)
    batched = tiling.forward_overlap(model, lr, 2, 24, 6, batch_tiles=4)
    assert (batched - one).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="batch_tiles"):
        tiling.forward_overlap(model, lr, 2, 24, 6, batch_tiles=0)


def test_batched_images_equal_one_at_a_time():
    model = _tiny_dnlan()
    gen = torch.Generator().manual_seed(2)
    sizes = [(20, 24), (18, 30), (20, 24), (20, 24), (18, 30)]
    images = [torch.rand(1, 3, h, w, generator=gen) for h, w in sizes]
    forward = tiling.make_forward(model, 2, tiling="overlap", tile=16, overlap=4, min_side=8,
                                  batch_tiles=3)
    batched = tiling.forward_images(forward, images, max_batch=2)
    assert [tuple(o.shape) for o in batched] == [(1, 3, 2 * h, 2 * w) for h, w in sizes]
    for img, out in zip(images, batched, strict=True):
        assert (out - forward(img)).abs().max() <= 1e-5


def test_precision_wrapper_on_cpu_runs_fp32():
    """bf16 needs a CUDA GPU: on CPU the wrapper runs fp32 (the warning is resolve_precision's)."""
    model = _tiny_dnlan()
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(lr)
        assert tiling.with_precision(model, "fp32") is model
        for precision in ("bf16", "auto"):
            out = tiling.with_precision(model, precision)(lr)
            assert out.dtype == torch.float32 and torch.equal(out, ref)
