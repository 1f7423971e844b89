"""Resume: kill the real `sr-pipeline preprocess` process mid-way, rerun, compare bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_preprocess import copy_images, shard_bytes
from helpers import BIN, _session_pids, run_cli, stop_session

ARGS = ["--crop", "96", "--step", "48", "--shard-samples", "8", "-j", "1"]


@pytest.fixture
def set14_copy(set14_dir: Path, tmp_path: Path) -> Path:
    return copy_images(set14_dir, tmp_path / "set14", sorted(p.name for p in set14_dir.glob("*.png")))


def _start(images: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "sr-pipeline"), "preprocess", "--images", str(images), "--holdout", "1", "--out", str(out), *ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _wait_for_shards(proc: subprocess.Popen, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("*-train-*.tar"))) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no shards appeared")


def _journaled(out: Path) -> set[str]:
    names = set()
    for line in (out / ".preprocess-journal.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "shard":
            names.add(rec["name"])
    return names


def _stat(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_identical_shards(set14_copy, tmp_path):
    ref = tmp_path / "ref"
    run_cli("preprocess", "--images", str(set14_copy), "--holdout", "1", "--out", str(ref), *ARGS, check=True)
    expected = shard_bytes(ref)
    assert len(expected) > 20

    for sig in (signal.SIGKILL, signal.SIGINT):
        out = tmp_path / f"out-{sig.name}"
        proc = _start(set14_copy, out)
        try:
            _wait_for_shards(proc, out, 5)
            os.kill(proc.pid, sig)  # the main process only: workers must notice by themselves
            proc.wait(30)
            deadline = time.monotonic() + 15
            while _session_pids(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _session_pids(proc.pid), "worker processes outlived the killed run"
        finally:
            stop_session(proc)
        kept = {n: s for n, s in _stat(out).items() if n in _journaled(out)}
        if sig == signal.SIGINT:
            assert proc.returncode == 130  # the CLI's exit code for Ctrl-C
            assert not list(out.glob(".*.tmp")), "Ctrl-C left a temporary shard behind"
            stderr = proc.stderr.read()
            assert "Traceback" not in stderr
            assert (f"interrupted: {len(kept)} complete shard(s) kept in {out}; "
                    "rerun the same command to resume") in stderr, stderr
            assert len([line for line in stderr.splitlines() if "interrupted" in line]) == 1, stderr
        else:
            assert proc.returncode == -signal.SIGKILL
        assert not (out / "manifest.json").exists()
        partial = shard_bytes(out)
        assert 0 < len(partial) < len(expected)
        for name, data in partial.items():  # nothing under a final name is partial
            assert data == expected[name], name
        assert kept

        rerun = run_cli("preprocess", "--images", str(set14_copy), "--holdout", "1", "--out", str(out), *ARGS, check=True)
        assert f"{len(kept)} complete shard(s) kept" in rerun.stderr
        assert shard_bytes(out) == expected
        after = _stat(out)
        assert all(after[n] == s for n, s in kept.items()), "complete shards were rewritten"
        ref_manifest = json.loads((ref / "manifest.json").read_text())
        new_manifest = json.loads((out / "manifest.json").read_text())
        assert new_manifest["splits"] == ref_manifest["splits"]
        assert not list(out.glob(".*.tmp"))


def test_damaged_or_missing_shard_is_rebuilt_alone(t91_dir, tmp_path):
    images = copy_images(t91_dir, tmp_path / "imgs", ["t1.png", "t2.png", "t3.png"])
    out = tmp_path / "out"
    args = ["--images", str(images), "--out", str(out), "--crop", "48", "--step", "24", "--shard-samples", "16", "--scales", "2", "-j", "1"]
    run_cli("preprocess", *args, check=True)
    expected = shard_bytes(out)
    names = sorted(expected)
    assert len(names) >= 4
    damaged, missing = names[1], names[2]
    (out / damaged).write_bytes(b"garbage")
    (out / missing).unlink()
    (out / "manifest.json").unlink()
    before = _stat(out)
    proc = run_cli("preprocess", *args, check=True)
    assert f"{len(names) - 2} complete shard(s) kept" in proc.stderr
    assert shard_bytes(out) == expected
    after = _stat(out)
    assert {n for n in names if after[n] != before.get(n)} == {damaged, missing}
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][-1]["samples"] < 16
    (out / names[-1]).unlink()  # the last, shorter shard
    run_cli("preprocess", *args, check=True)
    assert shard_bytes(out) == expected
