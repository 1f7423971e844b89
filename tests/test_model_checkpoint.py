"""Checkpoint I/O: our format, the official plain state_dict, strictness and hostile files."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.console import UserError
from pipeline.model import (
    build_model,
    export_state_dict,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_hash_mode,
)
from pipeline.model.statedict import first_mismatch, infer_architecture
from pipeline.model.torchfile import _clip, _one_line

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
@pytest.mark.parametrize("how", ["torch_zip", "legacy_pickle", "text_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, how: str):
    """``text_pickle`` is protocol 0: printable ASCII with no magic number, yet a real pickle
    that would run code, so it gets the security wording, not "not a PyTorch file"."""
    victim = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"a": torch.zeros(1)}, "x": _Evil(str(victim))}
    if how == "text_pickle":
        payload["state_dict"] = {"a": [0.0]}  # a tensor's storage would add raw bytes
    if how == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=0 if how == "text_pickle" else None)
    if how == "text_pickle":
        path.read_bytes().decode("ascii")  # the control: it really looks like a text file
    # sanity: an unrestricted unpickler really would create the file
    assert not victim.exists()
    for fn in (load_checkpoint, read_checkpoint):
        with pytest.raises(UserError) as err:
            fn(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert "refused" in str(err.value)
        msg = str(err.value)
        assert "possibly code" in msg and "Unsupported" in msg  # the unpickler's own reason
        assert "weights_only` set to `False`" not in msg  # never torch's "just disable it" advice
    assert not victim.exists()
    if how != "torch_zip":
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


class _System:
    def __reduce__(self):
        return (os.system, ("exit 3",))


def test_blocked_module_pickle_gets_the_security_wording(tmp_path: Path):
    """torch words a blocked module (os/posix) differently from an unknown global; both are
    refusals, and the unpickler's own sentence is what the line quotes."""
    path = tmp_path / "system.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "x": _System()}, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused to load: ") and "possibly code" in msg, msg
    assert "system" in msg and "blocked" in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


@pytest.mark.parametrize(
    "name,content,looks",
    [
        ("weights.json", b'{"head.0.weight": [[0.1, 0.2]], "scale": 2}\n', "a text file"),
        ("notes.pt", b"hello world\n", "a text file"),
        # 'c' is pickle's GLOBAL opcode: the unpickler reports an unsupported global here
        ("config.yaml", b"checkpoint: model.pt\nscale: 2\n", "a text file"),
        ("photo.pt", PNG_HEADER, "another binary format"),
    ],
)
def test_non_pytorch_files_are_not_reported_as_security_refusals(tmp_path: Path, name, content,
                                                                  looks):
    """JSON starts with '{', which the weights_only unpickler rejects as an unsupported
    operand: that is a wrong file, not a hostile one, and the message must say so."""
    path = tmp_path / name
    path.write_bytes(content)
    for fn in (load_checkpoint, read_checkpoint):
        with pytest.raises(UserError) as err:
            fn(path)
        msg = str(err.value)
        assert "not a PyTorch file at all" in msg and looks in msg, msg
        assert name in msg and "\n" not in msg
        assert "refused" not in msg and "code" not in msg
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.pt: not a readable PyTorch checkpoint: the file "
                                        r"is empty$"):
        load_checkpoint(tmp_path / "empty.pt")


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_named_truncated_in_a_complete_sentence(tmp_path: Path, keep):
    """torch says "[Errno 22] Invalid argument" for short cuts and a 300+ character miniz text
    for long ones; both are one plain diagnosis here, never a message cut mid-word."""
    data = save_checkpoint(tmp_path / "good.pt", small()).read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a readable PyTorch checkpoint")
    assert "the file was cut short" in msg and msg.endswith("?)")


def test_corrupt_zip_member_error_is_clipped_at_a_sentence(tmp_path: Path):
    """A complete archive with a damaged member header: torch's long miniz message is kept up
    to its last whole sentence that fits."""
    path = save_checkpoint(tmp_path / "m.pt", small())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        member = next(i for i in zf.infolist() if "/data/" in i.filename)
    data[member.header_offset: member.header_offset + 4] = b"\xff" * 4  # local header magic
    path.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and "not a readable PyTorch checkpoint (truncated or corrupt?)" in msg
    assert "archive is corrupted" in msg and msg.endswith(".")


def test_clip_cuts_at_a_sentence_or_word_boundary():
    assert _clip("short  text\n here") == "short text here"
    sentences = "First cause here. " + "Second sentence is long. " * 20
    clipped = _clip(sentences, 100)
    assert len(clipped) <= 100 and clipped.endswith("long.") and sentences.startswith(clipped)
    words = " ".join(f"word{i}" for i in range(100))
    clipped = _clip(words, 60)
    assert len(clipped) <= 60 and clipped.endswith("…")
    body = clipped[:-1]
    assert words.startswith(body) and words[len(body)] == " "  # whole words only
    assert _clip("x" * 80, 50) == "x" * 49 + "…"


def test_one_line_never_cuts_a_word():
    """The error texts torch raises can be long; the line we show ends on a whole word."""
    words = [f"token{i:03d}" for i in range(80)]  # 80 * 9 characters, no sentence end
    line = _one_line(RuntimeError(" ".join(words) + "\nsecond line"))
    assert len(line) <= 300 and line.endswith("…") and "second" not in line
    assert line[:-1].split(" ") == words[: len(line[:-1].split(" "))]  # only whole tokens
    long_sentence = RuntimeError("The archive is damaged. " + "Try again later please. " * 30)
    line = _one_line(long_sentence)
    assert len(line) <= 300 and line.endswith("please.") and "…" not in line
    assert _one_line(ValueError("   ")) == "ValueError"


def _rewrite(path: Path, **changes) -> Path:
    ckpt = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "config_scale":
            ckpt["model_config"]["scale"] = value
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "changes,text",
    [
        ({"scale": 5}, "its scale entry is 5; scale must be 2, 3 or 4"),
        ({"scale": True}, "its scale entry is True; scale must be 2, 3 or 4"),
        ({"scale": 2.0}, "its scale entry is 2.0; scale must be 2, 3 or 4"),
        ({"scale": 3}, "its scale entry (3) disagrees with its model_config (scale 2)"),
        ({"scale": 5, "config_scale": 5}, "scale entry is 5; scale must be 2, 3 or 4"),
        ({"config_scale": 8}, "its scale entry (2) disagrees with its model_config (scale 8)"),
    ],
)
def test_scale_in_checkpoint_metadata_outside_2_3_4_is_refused(tmp_path: Path, changes, text):
    """Evaluation reads the ``scale`` entry on its own, so a bad one must never get through
    read_checkpoint, and load_checkpoint must not build some other scale instead."""
    path = _rewrite(save_checkpoint(tmp_path / "m.pt", small()), **changes)
    for fn in (read_checkpoint, load_checkpoint):
        with pytest.raises(UserError) as err:
            fn(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: damaged sr-pipeline checkpoint: ") and text in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize("bad", [5, 0, 1, -2, 8])
def test_scale_outside_2_3_4_is_refused_not_replaced(tmp_path: Path, bad: int):
    official = export_state_dict(tmp_path / "x2.pt", small())
    ours = save_checkpoint(tmp_path / "ours.pt", small())
    calls = [
        (official, {}),  # architecture read from the shapes
        (official, {"preset": "tiny", **SMALL}),
        (ours, {}),
    ]
    for path, kwargs in calls:
        with pytest.raises(ConfigError) as err:
            load_checkpoint(path, scale=bad, **kwargs)
        msg = str(err.value)
        assert str(path) in msg and f"scale {bad}" in msg and "must be 2, 3 or 4" in msg
        assert "\n" not in msg
        assert isinstance(err.value, UserError)  # shown by the CLI as one `error:` line


@pytest.mark.parametrize("bad", [2.0, True, "2"])
def test_requested_scale_must_be_an_integer_2_3_4(tmp_path: Path, bad):
    path = export_state_dict(tmp_path / "x2.pt", small())
    with pytest.raises(UserError, match=r"cannot load as scale .*: scale must be 2, 3 or 4$"):
        load_checkpoint(path, scale=bad)


def test_unexpected_upsampler_width_is_named_not_guessed(tmp_path: Path):
    state = small().state_dict()
    state["tail.0.0.weight"] = torch.zeros(40, 16, 3, 3)
    state["tail.0.0.bias"] = torch.zeros(40)
    with pytest.raises(UserError, match=r"'tail\.0\.0\.weight' has 40 output channels; expected "
                                        r"64 \(x2, x4\) or 144 \(x3\)"):
        infer_architecture(state)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"odd\.pt: .*tail\.0\.0\.weight"):
        load_checkpoint(tmp_path / "odd.pt")


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
