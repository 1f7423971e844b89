"""Whole-image, reference-chop and overlap-tiled inference, plus the x8 self-ensemble.

Why several ways to run one model on one image:

* ``forward_whole``: the plain forward; memory grows with the image (DNLA's attention holds
  ``n_hashes * L * 3 * chunk_size`` logits, so a 2K LR image needs tens of GB).
* ``forward_reference_chop``: the reference's recursive four-quadrant split (spec section 5),
  reproduced exactly (tile-size rounding, stitching, recursion) so our numbers are comparable
  with published ones, which were all computed through it.
* ``forward_overlap``: fixed-size tiles with ``overlap`` LR pixels of context on every inner
  side; each output pixel comes from the one tile whose *core* holds it, so peak memory is
  bounded by the tile size for any image, and a network whose receptive field fits in the
  overlap gives exactly the whole-image output (no seams by construction).
* ``self_ensemble``: mean over the 8 dihedral transforms (the reference's ``forward_x8``).

Speed on a GPU (issue 14): ``forward_overlap(..., batch_tiles=k)`` runs up to ``k`` tiles of the
same shape through the model at once, ``forward_images`` batches whole images whose sizes
agree, and ``with_precision`` runs the model under bf16/fp16 autocast (DNLA hashes in float32
whatever the precision). With fixed hashing a batch computes what one-at-a-time computes (one
projection per layer for every sample; convolution kernels may round differently per batch
size, ~1e-7). With stochastic hashing a batch shares one draw, so results differ from
one-at-a-time as any two draws do. CUDA graphs are not used: DNLA's sort and gathers are
shape-static per tile, but the fixed projections are created lazily and the tiles of one
image come in a few shapes; capturing is left for when a GPU can measure its gain.

All functions take ``lr`` as a float tensor (N, 3, h, w) in [0, rgb_range] and return
(N, 3, s*h, s*w), without gradients. The trainer's validation runs through the same
reference chop, so its ``val/psnr`` sees the tiling the benchmark numbers use by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Forward = Callable[["torch.Tensor"], "torch.Tensor"]

REFERENCE_SHAVE = 10
REFERENCE_MIN_SIZE = 120_000


def _model_fn(model) -> Forward:
    return model if callable(model) else model.forward


def with_precision(model, precision: str = "fp32") -> Forward:
    """The model's forward under autocast for ``precision`` (fp32/bf16/fp16/auto), returning
    float32. A precision the device cannot run falls back to fp32 silently here: callers
    resolve it once with :func:`pipeline.device.resolve_precision`, which warns."""
    fn = _model_fn(model)
    if precision == "fp32":
        return fn

    def run(x: torch.Tensor) -> torch.Tensor:
        from pipeline.device import autocast

        with autocast(x.device, precision):
            return fn(x).float()

    return run


def forward_whole(model, lr: torch.Tensor) -> torch.Tensor:
    """One forward over the whole image."""
    import torch

    with torch.no_grad():
        return _model_fn(model)(lr)


def reference_tile_size(h: int, w: int, shave: int = REFERENCE_SHAVE) -> tuple[int, int]:
    """Quadrant size of the reference chop: half + shave, then always *up* by 1-4 (h) / 1-8 (w).

    ``size += 4 - size % 4`` adds 4 when the size is already a multiple of 4 (the reference's
    rounding, kept because it decides which pixels each tile sees).
    """
    h_size = h // 2 + shave
    h_size += 4 - h_size % 4
    w_size = w // 2 + shave
    w_size += 8 - w_size % 8
    return h_size, w_size


def forward_reference_chop(
    model,
    lr: torch.Tensor,
    scale: int,
    shave: int = REFERENCE_SHAVE,
    min_size: int = REFERENCE_MIN_SIZE,
) -> torch.Tensor:
    """The reference's ``forward_chop``: four overlapping corner quadrants, recursive.

    Quadrants (top-left, top-right, bottom-left, bottom-right) are anchored at the image
    corners; a quadrant with at least ``min_size`` LR pixels is chopped again, smaller ones
    are run one by one. Each output pixel is taken from exactly one quadrant (no blending).
    When a rounded quadrant would be larger than the image (LR sides below ~24-28 px), the
    reference's slicing breaks; we run such small inputs whole instead of failing.
    """
    import torch

    fn = _model_fn(model)
    _, _, h, w = lr.shape
    h_half, w_half = h // 2, w // 2
    h_size, w_size = reference_tile_size(h, w, shave)
    if h_size > h or w_size > w:
        with torch.no_grad():
            return fn(lr)
    tiles = [
        lr[..., 0:h_size, 0:w_size],
        lr[..., 0:h_size, w - w_size : w],
        lr[..., h - h_size : h, 0:w_size],
        lr[..., h - h_size : h, w - w_size : w],
    ]
    outs = []
    with torch.no_grad():
        for tile in tiles:
            if h_size * w_size < min_size:
                outs.append(fn(tile))
            else:
                outs.append(forward_reference_chop(model, tile, scale, shave, min_size))
    H, W = scale * h, scale * w
    hh, wh = scale * h_half, scale * w_half
    Hs, Ws = scale * h_size, scale * w_size
    first = outs[0]
    out = first.new_empty((first.shape[0], first.shape[1], H, W))
    out[..., 0:hh, 0:wh] = outs[0][..., 0:hh, 0:wh]
    out[..., 0:hh, wh:W] = outs[1][..., 0:hh, Ws - W + wh : Ws]
    out[..., hh:H, 0:wh] = outs[2][..., Hs - H + hh : Hs, 0:wh]
    out[..., hh:H, wh:W] = outs[3][..., Hs - H + hh : Hs, Ws - W + wh : Ws]
    return out


def axis_tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as ``(in_start, in_end, core_start, core_end)`` in LR pixels.

    Cores partition ``[0, length)``; each window is its core plus exactly ``overlap`` pixels
    of context on every side that is not the image border, and is at most ``tile`` long.
    The fewest windows that satisfy this are used, with cores balanced in size: fixed-size
    windows would leave a sliver core at the end and recompute up to twice the pixels.
    """
    if tile <= 0 or overlap < 0 or 2 * overlap >= tile:
        raise ValueError(f"need tile > 2 * overlap >= 0, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [(0, length, 0, length)]
    core = tile - 2 * overlap
    # Edge windows need context on one side only, so they carry `overlap` extra core pixels;
    # the remaining length is split into n near-equal parts of at most `core` pixels.
    inner = length - 2 * overlap
    n = -(-inner // core)
    cuts = [0] + [overlap + (i * inner) // n for i in range(1, n)] + [length]
    return [
        (max(0, a - overlap), min(length, b + overlap), a, b)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]


def forward_overlap(
    model,
    lr: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    on_tile: Callable[[int, int], None] | None = None,
    batch_tiles: int = 1,
) -> torch.Tensor:
    """Tiled forward with bounded memory: tiles of ``tile`` LR px, ``overlap`` px of context.

    Only the output array (the SR image itself) grows with the image; model activations are
    those of ``batch_tiles`` tiles. With ``batch_tiles > 1`` tiles of equal shape (most of
    them: window sizes differ by at most a pixel or two) go through the model together.
    ``on_tile(done, total)`` is called after each model call (progress bars).
    """
    import torch

    if batch_tiles < 1:
        raise ValueError(f"batch_tiles must be >= 1, got {batch_tiles}")
    fn = _model_fn(model)
    n, _, h, w = lr.shape
    windows = [(y, x) for y in axis_tiles(h, tile, overlap) for x in axis_tiles(w, tile, overlap)]
    if batch_tiles == 1:  # one by one, in raster order (the stochastic hash's draw order)
        groups = [[win] for win in windows]
    else:
        by_shape: dict[tuple[int, int], list] = {}
        for y, x in windows:
            by_shape.setdefault((y[1] - y[0], x[1] - x[0]), []).append((y, x))
        groups = [g[i : i + batch_tiles] for g in by_shape.values() for i in range(0, len(g), batch_tiles)]
    out = None
    done = 0
    with torch.no_grad():
        for group in groups:
            batch = torch.cat([lr[..., iy0:iy1, ix0:ix1] for (iy0, iy1, _, _), (ix0, ix1, _, _) in group])
            sr = fn(batch)
            if out is None:
                out = sr.new_empty((n, sr.shape[1], scale * h, scale * w))
            for j, ((iy0, _, cy0, cy1), (ix0, _, cx0, cx1)) in enumerate(group):
                out[..., scale * cy0 : scale * cy1, scale * cx0 : scale * cx1] = sr[
                    j * n : (j + 1) * n,
                    :,
                    scale * (cy0 - iy0) : scale * (cy1 - iy0),
                    scale * (cx0 - ix0) : scale * (cx1 - ix0),
                ]
            del sr, batch
            done += len(group)
            if on_tile is not None:
                on_tile(done, len(windows))
    assert out is not None
    return out


def forward_images(
    forward_fn: Forward, images: list[torch.Tensor], max_batch: int = 8
) -> list[torch.Tensor]:
    """Run ``forward_fn`` over LR images ``(1, 3, h, w)``, batching those of equal size.

    Returns the outputs in input order. ``forward_fn`` is any composite from
    :func:`make_forward` (tiling works per batch: all images of a batch share the tiles).
    """
    import torch

    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(images)
    for members in by_shape.values():
        for start in range(0, len(members), max_batch):
            part = members[start : start + max_batch]
            sr = forward_fn(torch.cat([images[i] for i in part]))
            for j, i in enumerate(part):
                outs[i] = sr[j : j + 1]
    return outs  # type: ignore[return-value]


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    return x


def _undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    if k & 1:
        y = y.flip(-1)
    if k & 2:
        y = y.flip(-2)
    if k & 4:
        y = y.transpose(-1, -2)
    return y


def self_ensemble(forward_fn: Forward, lr: torch.Tensor) -> torch.Tensor:
    """Mean of ``forward_fn`` over the 8 flips/transposes of ``lr``, each transformed back.

    A running sum keeps only one extra output in memory (the reference concatenates all 8).
    """
    import torch

    total = None
    with torch.no_grad():
        for k in range(8):
            y = _undo_dihedral(forward_fn(_dihedral(lr, k)), k)
            total = y.clone() if total is None else total.add_(y)
    assert total is not None
    return total / 8.0


def pad_to_min_side(
    forward_fn: Forward, lr: torch.Tensor, scale: int, min_side: int
) -> torch.Tensor:
    """Run ``forward_fn`` on ``lr`` replicate-padded (bottom/right) to ``min_side`` px, then crop.

    DNLA needs at least ``chunk_size / 2`` tokens per attention call (spec quirk Q7); users'
    images may be smaller than that.
    """
    import torch.nn.functional as F

    _, _, h, w = lr.shape
    ph, pw = max(0, min_side - h), max(0, min_side - w)
    if ph == 0 and pw == 0:
        return forward_fn(lr)
    padded = F.pad(lr, (0, pw, 0, ph), mode="replicate")
    return forward_fn(padded)[..., : scale * h, : scale * w]


def make_forward(
    model,
    scale: int,
    tiling: str = "reference",
    tile: int = 96,
    overlap: int = 16,
    ensemble: bool = False,
    min_side: int = 1,
    on_tile: Callable[[int, int], None] | None = None,
    precision: str = "fp32",
    batch_tiles: int = 1,
) -> Forward:
    """Compose tiling, padding for tiny inputs and the optional self-ensemble into one function.

    ``precision`` wraps every model call in autocast (see :func:`with_precision`);
    ``batch_tiles`` batches overlap tiles (see :func:`forward_overlap`).
    """
    model = with_precision(model, precision)
    if tiling == "none":

        def base(x):
            return forward_whole(model, x)

    elif tiling == "reference":

        def base(x):
            return forward_reference_chop(model, x, scale)

    elif tiling == "overlap":

        def base(x):
            return forward_overlap(model, x, scale, tile, overlap, on_tile=on_tile, batch_tiles=batch_tiles)

    else:
        raise ValueError(f"unknown tiling {tiling!r} (none, reference, overlap)")

    def padded(x):
        return pad_to_min_side(base, x, scale, min_side)

    if ensemble:
        return lambda x: self_ensemble(padded, x)
    return padded
