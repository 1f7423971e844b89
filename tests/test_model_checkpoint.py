"""Checkpoint I/O: our format, the official plain state_dict, strictness and hostile files."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline.console import UserError
from pipeline.model import (
    build_model,
    export_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_hash_mode,
)
from pipeline.model.checkpoint import first_mismatch, infer_architecture

SMALL = {"n_resgroups": 2, "n_resblocks": 1, "n_feats": 16, "chunk_size": 16, "n_hashlength": 3}


def small(scale: int = 2, **kw):
    return build_model("tiny", scale, **{**SMALL, **kw})


def same_output(a, b) -> bool:
    set_hash_mode(a, "fixed", 1)
    set_hash_mode(b, "fixed", 1)
    x = torch.rand(1, 3, 9, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_our_format_round_trip_needs_no_flags(tmp_path: Path):
    model = small(scale=3, res_scale=0.2)
    step = torch.tensor(12)
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, step=step, note="hello",
                           optimizer={"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]})
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "sr-pipeline/dnlan" and raw["format_version"] == 1
    assert raw["scale"] == 3 and raw["model_config"]["res_scale"] == 0.2
    assert raw["note"] == "hello" and torch.equal(raw["step"], step)
    assert list(raw["state_dict"]) == list(model.state_dict())

    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert loaded.attention_layers()[0].hash_mode == "stochastic"
    assert same_output(model, loaded)
    assert read_checkpoint(path)["note"] == "hello"
    # runtime options may be overridden, architecture may not
    assert load_checkpoint(path, chunk_size=32).config.chunk_size == 32
    assert load_checkpoint(path, preset="paper", scale=3).config.n_feats == 16
    with pytest.raises(UserError, match=r"scale=3.*scale=2"):
        load_checkpoint(path, scale=2)
    with pytest.raises(UserError, match="n_feats"):
        load_checkpoint(path, n_feats=64)


def test_save_rejects_values_weights_only_would_refuse(tmp_path: Path):
    model = small()
    with pytest.raises(TypeError, match="extra\\['rng'\\]"):
        save_checkpoint(tmp_path / "m.pt", model, rng=object())
    with pytest.raises(TypeError, match="clash"):
        save_checkpoint(tmp_path / "m.pt", model, scale=4)
    assert not list(tmp_path.iterdir())


def test_official_state_dict_strict_round_trip(tmp_path: Path):
    model = small(scale=4)
    path = export_state_dict(tmp_path / "model_x4.pt", model)
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, OrderedDict) and list(raw) == list(model.state_dict())
    assert list(raw)[0] == "a"
    # explicit preset + overrides (+ scale read from the upsampler when not given)
    loaded = load_checkpoint(path, preset="tiny", scale=4, **SMALL)
    assert same_output(model, loaded)
    assert load_checkpoint(path, preset="tiny", **SMALL).scale == 4
    # no flags: architecture read from the shapes
    inferred = load_checkpoint(path)
    assert (inferred.config.n_feats, inferred.config.n_resgroups, inferred.config.scale) == (16, 2, 4)
    assert inferred.config.chunk_size == 144  # runtime options from the paper preset
    assert read_checkpoint(path).keys() == {"state_dict"}
    # and a plain torch model with the same layout loads the exported file strictly
    fresh = small(scale=4)
    fresh.load_state_dict(raw, strict=True)


@pytest.mark.parametrize(
    "kwargs,key,ckpt_shape,model_shape",
    [
        ({"n_feats": 32}, "head.0.weight", "(16, 3, 3, 3)", "(32, 3, 3, 3)"),
        ({"reduction": 4}, "body.0.body.1.conv_match.0.weight", "(8, 16, 3, 3)", "(4, 16, 3, 3)"),
        ({"n_resblocks": 2}, "body.0.body.1.body.0.weight", "absent", "(16, 16, 3, 3)"),
        ({"scale": 3}, "tail.0.0.weight", "(64, 16, 3, 3)", "(144, 16, 3, 3)"),
        ({"scale": 4}, "tail.0.2.weight", "absent", "(64, 16, 3, 3)"),
    ],
)
def test_wrong_config_fails_naming_first_key_and_shapes(tmp_path: Path, kwargs, key, ckpt_shape,
                                                         model_shape):
    path = export_state_dict(tmp_path / "x2.pt", small(scale=2))
    opts = {**SMALL, **kwargs}
    scale = opts.pop("scale", 2)
    with pytest.raises(UserError) as err:
        load_checkpoint(path, preset="tiny", scale=scale, **opts)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert f"'{key}'" in msg and ckpt_shape in msg and model_shape in msg


def test_extra_checkpoint_key_and_paper_default_mismatch(tmp_path: Path):
    path = export_state_dict(tmp_path / "x4.pt", small(scale=4))
    with pytest.raises(UserError, match=r"'tail\.0\.2\.weight': shape \(64, 16, 3, 3\) in the "
                                        r"checkpoint, absent in the model"):
        load_checkpoint(path, preset="tiny", scale=2, **SMALL)
    # explicit scale with inferred architecture: wrong scale fails the same way
    with pytest.raises(UserError, match="tail.0.2.weight"):
        load_checkpoint(path, scale=2)
    # the paper preset on a small checkpoint fails on the very first conv
    with pytest.raises(UserError, match=r"'head\.0\.weight'.*\(16, 3, 3, 3\).*\(192, 3, 3, 3\)"):
        load_checkpoint(path, preset="paper")


def test_rgb_range_mismatch_is_reported(tmp_path: Path):
    path = export_state_dict(tmp_path / "m.pt", small(rgb_range=255))
    assert load_checkpoint(path).config.rgb_range == 255
    with pytest.raises(UserError, match="rgb_range 255"):
        load_checkpoint(path, preset="tiny", **SMALL)  # tiny preset says rgb_range 1


def test_ddp_style_module_prefix_is_accepted(tmp_path: Path):
    model = small()
    state = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    torch.save(state, tmp_path / "ddp.pt")
    assert same_output(model, load_checkpoint(tmp_path / "ddp.pt", preset="tiny", **SMALL))


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_zip", "legacy_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, how: str):
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"a": torch.zeros(1)}, "x": _Evil(str(victim))}
    if how == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    # sanity: an unrestricted unpickler really would create the file
    assert not victim.exists()
    for fn in (load_checkpoint, read_checkpoint):
        with pytest.raises(UserError) as err:
            fn(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert "refused" in str(err.value)
    assert not victim.exists()
    if how == "legacy_pickle":
        with open(path, "rb") as fh:
            pickle.load(fh)  # the control: plain pickle runs the payload
        assert victim.exists()


def test_bad_files_give_one_line_errors(tmp_path: Path):
    good = save_checkpoint(tmp_path / "good.pt", small())
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello world")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    future = torch.load(good, weights_only=True)
    future["format_version"] = 99
    torch.save(future, tmp_path / "future.pt")
    cases = {
        "missing.pt": "not found",
        "trunc.pt": "not a readable",
        "text.pt": "not a readable",
        "other.pt": "not a DNLAN checkpoint",
        "tensor.pt": "not a DNLAN checkpoint",
        "future.pt": "newer",
    }
    for name, text in cases.items():
        with pytest.raises(UserError) as err:
            load_checkpoint(tmp_path / name)
        msg = str(err.value)
        assert text in msg and name in msg and "\n" not in msg, msg
    with pytest.raises(UserError, match="directory"):
        read_checkpoint(tmp_path)
    assert zipfile.is_zipfile(good)  # the good file is untouched


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path: Path):
    path = save_checkpoint(tmp_path / "m.pt", small())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_checkpoint(path, small(), bad=object())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_first_mismatch_and_inference_helpers():
    a = small().state_dict()
    assert first_mismatch(a, a) is None
    b = OrderedDict(a)
    b.pop("a")
    assert "'a'" in first_mismatch(a, b)
    arch = infer_architecture(build_model("tiny", 3).state_dict())
    assert arch == {"n_feats": 64, "n_resgroups": 2, "n_resblocks": 4, "reduction": 2,
                    "scale": 3, "rgb_range": 1.0}
    with pytest.raises(UserError, match="not a DNLAN state_dict"):
        infer_architecture({"x": torch.zeros(1)})


def test_reference_layout_file_built_from_the_spec_loads_strictly(tmp_path: Path):
    """A plain state_dict written from spec 1.10's pattern alone (as the reference would save
    it for paper x4) loads into the paper preset with strict matching and no flags but scale."""
    from test_model_network import spec_keys

    gen = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for key, shape in spec_keys(10, 4, 192, 2, 4):
        state[key] = torch.randn(shape, generator=gen) * 0.01
    mean = torch.tensor([0.4488, 0.4371, 0.4040])
    state["a"] = torch.zeros(1)
    state["sub_mean.weight"] = state["add_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
    state["sub_mean.bias"], state["add_mean.bias"] = -mean, mean
    torch.save(state, tmp_path / "model_x4.pt")
    model = load_checkpoint(tmp_path / "model_x4.pt", preset="paper", scale=4)
    assert model.config.n_feats == 192 and model.scale == 4
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(UserError, match=r"'head\.0\.weight': shape \(192, 3, 3, 3\) in the "
                                        r"checkpoint, \(128, 3, 3, 3\) in the model"):
        load_checkpoint(tmp_path / "model_x4.pt", preset="paper128", scale=4)
