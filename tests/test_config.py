"""Configuration: presets, YAML files, overrides, validation, flattening."""

from __future__ import annotations

import pytest

from pipeline.config import (
    ConfigError,
    EvalConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    flatten,
    load_config,
    model_config,
)


def test_paper_preset_is_the_seed_command():
    cfg = load_config(TrainConfig, preset="paper", overrides={"model.scale": 3})
    m = cfg.model
    assert (m.scale, m.n_resgroups, m.n_resblocks, m.n_feats, m.reduction) == (3, 10, 4, 192, 2)
    assert (m.n_hashes, m.n_hashlength, m.chunk_size, m.res_scale, m.rgb_range) == (3, 7, 144, 0.1, 1.0)
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.gamma) == (1e-4, (0.9, 0.999), 1e-8, 0.5)
    assert cfg.milestones == [300, 600, 900, 1200]
    assert (cfg.batch_size, cfg.patch_size, cfg.iters_per_epoch, cfg.epochs) == (16, 96, 1000, 1500)


def test_tiny_and_paper128_presets():
    tiny = model_config("tiny", scale=4)
    assert (tiny.n_feats, tiny.n_resgroups, tiny.n_resblocks, tiny.scale) == (64, 2, 4, 4)
    assert model_config("paper128").n_feats == 128
    assert model_config("paper", n_feats=128).n_feats == 128


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: tiny\nworkers: 2\nmodel:\n  n_feats: 32\nmilestones: [2, 3]\n")
    cfg = load_config(TrainConfig, yaml_path=path, overrides={"workers": 4, "lr": None, "model.scale": 2})
    assert cfg.preset == "tiny"
    assert cfg.model.n_feats == 32  # file beats preset
    assert cfg.model.n_resgroups == 2  # preset beats defaults
    assert cfg.workers == 4  # CLI beats file
    assert cfg.lr == 4e-4  # None override ignored -> preset value
    assert cfg.milestones == [2, 3]


def test_cli_strings_are_coerced():
    cfg = load_config(EvalConfig, overrides={"scales": "2,4", "self_ensemble": "true", "tile": "64"})
    assert cfg.scales == [2, 4] and cfg.self_ensemble is True and cfg.tile == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": -2}, "workers must be > 0"),
        ({"model.scale": 5}, "model.scale must be 2, 3 or 4"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"epochs": "many"}, "epochs must be an integer"),
        ({"nonsense": 1}, "unknown option 'nonsense'"),
        ({"model.n_feats": 63}, "divisible by model.reduction"),
        ({"patch_size": 97, "model.scale": 2}, "patch_size (97) must be divisible"),
        ({"batch_size": 2, "workers": 4}, "global batch"),
    ],
)
def test_invalid_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, overrides=overrides)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainConfig, yaml_path=bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  n_feats: 100\n  reduction: 3\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml"):
        load_config(TrainConfig, yaml_path=wrong)
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, yaml_path=tmp_path / "missing.yaml")


def test_preprocess_scales_and_crop_validation():
    assert load_config(PreprocessConfig, overrides={"scales": "2,3"}).scales == [2, 3]
    with pytest.raises(ConfigError, match="multiple of 12"):
        load_config(PreprocessConfig, overrides={"crop": 100})
    with pytest.raises(ConfigError, match="2, 3 or 4"):
        load_config(PreprocessConfig, overrides={"scales": [8]})


def test_flatten_covers_every_field_as_strings():
    cfg = load_config(TrainConfig, preset="tiny")
    flat = flatten(cfg)
    assert flat["model.n_feats"] == "64"
    assert flat["milestones"] == "3"
    assert flat["betas"] == "0.9,0.999"
    assert flat["run_name"] == ""
    assert all(isinstance(v, str) for v in flat.values())
    # one param per leaf field
    n_leaves = len(TrainConfig.__dataclass_fields__) - 1 + len(ModelConfig.__dataclass_fields__)
    assert len(flat) == n_leaves


def test_per_worker_batch_keeps_global_batch():
    cfg = load_config(TrainConfig, overrides={"workers": 8})
    assert cfg.batch_size == 16 and cfg.per_worker_batch == 2
    cfg = load_config(TrainConfig, overrides={"workers": 3})
    assert cfg.per_worker_batch == 6


def test_yaml_with_wrong_types_or_bytes_is_one_line(tmp_path):
    wrong = tmp_path / "m.yaml"
    wrong.write_text("model: 5\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: 'model' must be a mapping"):
        load_config(TrainConfig, yaml_path=wrong)
    with pytest.raises(ConfigError, match=r"m\.yaml: 'model' must be a mapping"):
        load_config(EvalConfig, yaml_path=wrong)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ConfigError, match="not a text"):
        load_config(TrainConfig, yaml_path=binary)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        load_config(TrainConfig, overrides={"lr": value})
