"""The network's wiring against the step-by-step oracle of spec section 1 (tests/dnlan_oracle.py).

Model and oracle share one state_dict (looked up by key) and the documented fixed projections;
everything else (convs, skips, scalings, upsampler, mean shifts, DNLA) is computed separately.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dnlan_oracle import oracle_dnlan

from pipeline.model import build_model, set_hash_mode
from pipeline.model import dnlan as dnlan_module

SEED = 5


def tiny(scale: int, **kw):
    opts = {"n_resgroups": 2, "n_resblocks": 2, "n_feats": 16, "chunk_size": 16,
            "n_hashlength": 3, "n_hashes": 2, "res_scale": 0.1}
    opts.update(kw)
    torch.manual_seed(scale)
    model = build_model("tiny", scale, **opts)
    # default init leaves the group branch small next to the skips; larger weights make every
    # wiring mistake (a lost res_scale, a missing skip) move the output far beyond tolerance
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("weight"):
                p.mul_(2.0)
    return set_hash_mode(model, "fixed", SEED)


def run_oracle(model, x, state=None):
    cfg = dataclasses.asdict(model.config)
    del cfg["n_feats"], cfg["reduction"]  # the oracle reads widths from the weights' shapes
    return oracle_dnlan(x, state if state is not None else model.state_dict(),
                        hash_seed=SEED, **cfg)


def tolerance(ref: torch.Tensor) -> float:
    return 1e-5 * max(1.0, ref.abs().max().item())


def oracle_error(model, x) -> tuple[float, float]:
    """(max |model - oracle|, tolerance): the one comparison every test here makes."""
    with torch.no_grad():
        y = model(x)
        ref = run_oracle(model, x)
    assert y.shape == ref.shape
    return (y - ref).abs().max().item(), tolerance(ref)


# Wiring mistakes the oracle must catch, written as the product's own forward with one change.
def _group_without_res_scale(self, x):
    return self.body(x) + x


def _group_res_scale_on_skip(self, x):
    return (self.body(x) + x) * self.res_scale


def _network_without_global_skip(self, x):
    return self.add_mean(self.tail(self.body(self.head(self.sub_mean(x)))))


MUTATIONS = {
    "group res_scale dropped": (dnlan_module.ResidualGroup, _group_without_res_scale),
    "group res_scale on the skip too": (dnlan_module.ResidualGroup, _group_res_scale_on_skip),
    "global skip dropped": (dnlan_module.DNLAN, _network_without_global_skip),
}


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(12, 12), (9, 11)])  # 144 tokens = 9 chunks; 99: padded tail
def test_network_matches_oracle(scale, size):
    model = tiny(scale)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        ref = run_oracle(model, x)
    assert y.shape == ref.shape == (2, 3, scale * size[0], scale * size[1])
    assert (y - ref).abs().max() <= tolerance(ref)


@pytest.mark.parametrize(
    "scale,size,opts",
    [
        (2, (10, 10), {"n_hashlength": 0, "chunk_size": 12}),  # automatic hash length
        (3, (5, 7), {"chunk_size": 144, "n_hashlength": 7, "n_hashes": 3}),  # pad > tokens
        (4, (7, 6), {"rgb_range": 255.0, "res_scale": 0.5, "n_resgroups": 3, "n_resblocks": 1}),
    ],
)
def test_network_matches_oracle_across_options(scale, size, opts):
    model = tiny(scale, **opts)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    x = x * model.config.rgb_range
    with torch.no_grad():
        y = model(x)
        ref = run_oracle(model, x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= tolerance(ref)


def test_network_gradients_match_oracle():
    """Backward through the same wiring: input and every trainable weight, compared by key."""
    model = tiny(3)
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(3))
    x_model = x.clone().requires_grad_(True)
    x_oracle = x.clone().requires_grad_(True)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().clone().requires_grad_(k in trainable)
             for k, v in model.state_dict().items()}
    y = model(x_model)
    ref = run_oracle(model, x_oracle, state)
    assert (y - ref).abs().max() <= tolerance(ref)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(grad)
    ref.backward(grad)
    pairs = [("input", x_model.grad, x_oracle.grad)]
    pairs += [(k, p.grad, state[k].grad) for k, p in model.named_parameters() if p.requires_grad]
    assert len(pairs) == 1 + sum(p.requires_grad for p in model.parameters())
    for name, got, want in pairs:
        assert got is not None and want is not None, name
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_oracle_comparison_catches_wiring_mutations(monkeypatch, mutation):
    """The comparison above is not vacuous: patching the product's forward to lose the group
    res_scale or the global skip makes the very same check fail by orders of magnitude."""
    model = tiny(2)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    error, tol = oracle_error(model, x)
    assert error <= tol  # the control: unpatched, model and oracle agree
    cls, forward = MUTATIONS[mutation]
    monkeypatch.setattr(cls, "forward", forward)
    error, tol = oracle_error(model, x)
    assert error > 100 * tol, f"{mutation}: oracle missed it (max |diff| {error:.3g})"
