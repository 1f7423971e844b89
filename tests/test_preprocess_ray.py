"""`preprocess --address`: the per-image work as Ray tasks on a real two-node cluster gives the
same shard bytes and manifest as a local run, and resumes the same way."""

from __future__ import annotations

import fixtures_preprocess
import pytest
from fixtures_preprocess import SMALL, manifest, shard_bytes
from helpers import run_cli

t91_small = fixtures_preprocess.t91_small


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}


@pytest.mark.cluster
def test_ray_tasks_write_the_local_bytes_and_resume(ray_cluster, t91_small, tmp_path):
    args = ["preprocess", "--images", str(t91_small), "--holdout", "1", *SMALL, "--scales", "2,4"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_cli(*args, "--out", str(local), "-j", "1", check=True)
    proc = run_cli(*args, "--out", str(remote), "--address", ray_cluster.address, check=True, timeout=300)
    assert "Traceback" not in proc.stderr and "Ray cluster at" in proc.stderr and "2 node(s)" in proc.stderr
    assert shard_bytes(remote) == shard_bytes(local) and len(shard_bytes(local)) > 2
    assert _same(manifest(remote), manifest(local))
    # resume after losing a shard, this time with the address from RAY_ADDRESS
    victim = sorted(remote.glob("*-train-*.tar"))[1]
    victim.unlink()
    again = run_cli(*args, "--out", str(remote), env={"RAY_ADDRESS": ray_cluster.address}, check=True, timeout=300)
    assert "resuming" in again.stderr
    assert shard_bytes(remote) == shard_bytes(local) and _same(manifest(remote), manifest(local))
    # no cluster there: one line, nothing written
    bad = run_cli(*args, "--out", str(tmp_path / "none"), "--address", "127.0.0.1:1", timeout=120)
    assert bad.returncode == 1 and "cannot connect to Ray cluster at 127.0.0.1:1" in bad.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "none").glob("*.tar"))
