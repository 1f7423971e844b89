"""The console script itself: help for every command, version, info, one-line errors."""

from __future__ import annotations

import json

import pytest
import typer
from helpers import in_loopback_namespace, run_cli

from pipeline import __version__
from pipeline.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_root_help_lists_commands():
    proc = run_cli("--help", check=True)
    for name in COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    proc = run_cli(command, "--help", check=True)
    assert "Usage" in proc.stdout and "--help" in proc.stdout


def test_version():
    proc = run_cli("--version", check=True)
    assert proc.stdout.strip() == f"sr-pipeline {__version__}"


def test_info_reports_environment(sr_home):
    proc = run_cli("info", "--json", check=True)
    report = json.loads(proc.stdout)
    assert set(report["packages"]) >= {"torch", "ray", "mlflow", "webdataset"}
    assert report["packages"]["torch"].startswith("2.")
    assert report["cpu_count"] >= 1
    assert isinstance(report["accelerator"]["cuda_available"], bool)
    assert report["mlflow_tracking_uri"] == f"sqlite:///{sr_home / 'mlflow.db'}"
    text = run_cli("info", check=True).stdout
    assert "mlflow tracking" in text and "torch" in text


def test_info_follows_mlflow_tracking_uri(sr_home):
    proc = run_cli("info", "--json", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}, check=True)
    assert json.loads(proc.stdout)["mlflow_tracking_uri"] == "http://127.0.0.1:5999"


@pytest.mark.cluster
def test_info_against_two_node_cluster(ray_cluster):
    proc = run_cli("info", "--address", ray_cluster.address, "--json", check=True, timeout=180)
    cluster = json.loads(proc.stdout)["ray_cluster"]
    assert cluster["alive_nodes"] == 2
    assert cluster["total_cpus"] == 2
    assert sum(n["is_head"] for n in cluster["nodes"]) == 1
    if in_loopback_namespace():
        assert all(n["address"].startswith("127.") for n in cluster["nodes"])
    text = run_cli("info", "--address", ray_cluster.address, check=True, timeout=180).stdout
    assert "2 node(s) alive" in text


def test_info_unreachable_cluster_is_one_line():
    proc = run_cli("info", "--address", "127.0.0.1:1", timeout=180)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["config", "train", "--set", "workers=-1"], "workers must be > 0"),
        (["config", "train", "--preset", "bogus"], "unknown preset"),
        (["config", "model", "--scale", "5"], "must be 2, 3 or 4"),
        (["config", "nope"], "unknown stage"),
        (["config", "train", "--set", "noequals"], "KEY=VALUE"),
    ],
)
def test_config_errors_are_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_config_show_flat_and_yaml(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("preset: tiny\nepochs: 9\n")
    flat = run_cli("config", "train", "-c", str(cfg), "--scale", "3", "--flat", check=True).stdout
    assert "epochs=9" in flat and "model.scale=3" in flat and "model.n_feats=64" in flat
    text = run_cli("config", "evaluate", "--set", "tiling=overlap", check=True).stdout
    assert "tiling: overlap" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["preprocess", "--jobs", "abc"], "Invalid value for '--jobs'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["train", "--bogus", "1"], "No such option: --bogus"),
        (["config"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_not_a_panel(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "--help" in lines[0] and "Traceback" not in proc.stderr
