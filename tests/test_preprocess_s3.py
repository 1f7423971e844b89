"""`preprocess --out s3://...` against a real S3-API server on 127.0.0.1 (moto, tests/fixtures_s3.py)."""

from __future__ import annotations

import json

import fixtures_preprocess
import pyarrow.fs as pafs
import pytest
from fixtures_preprocess import SMALL, shard_bytes
from helpers import free_port, run_cli

from pipeline.config import PreprocessConfig
from pipeline.console import UserError
from pipeline.preprocess import manifest as mf
from pipeline.preprocess.run import run_preprocess

t91_small = fixtures_preprocess.t91_small


def _objects(server, prefix: str) -> dict[str, bytes]:
    fs = server.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(f"{server.bucket}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.base_name] = f.read()
    return out


def _cfg(images, out, **kw) -> PreprocessConfig:
    cfg = PreprocessConfig(images=str(images), out=str(out), crop=48, step=24, shard_samples=16, jobs=1,
                           scales=[2], **kw)
    cfg.validate()
    return cfg


def test_preprocess_to_s3_matches_local_and_resumes(s3_env, t91_small, tmp_path, monkeypatch):
    monkeypatch.setenv("SR_PIPELINE_HOME", str(tmp_path / "home"))
    local = tmp_path / "local"
    run_preprocess(_cfg(t91_small, local))
    url = s3_env.url("t91-small")
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", url, *SMALL, "--scales", "2", "-j", "1",
                   check=True)
    assert s3_env.env["AWS_SECRET_ACCESS_KEY"] not in proc.stderr + proc.stdout
    objects = _objects(s3_env, "t91-small")
    shards = {k: v for k, v in objects.items() if k.endswith(".tar")}
    assert shards == shard_bytes(local)  # byte-identical to the local run
    assert not [k for k in objects if k.endswith(".tmp")]  # no temporary key left behind
    m_remote, m_local = json.loads(objects["manifest.json"]), mf.read_manifest(local)
    assert {k: v for k, v in m_remote.items() if k != "created"} == {k: v for k, v in m_local.items() if k != "created"}
    # the reader side: manifest and shard URLs straight from the bucket, and --verify
    assert mf.read_manifest(url)["splits"]["train"]["samples"] == m_local["splits"]["train"]["samples"]
    urls = mf.shard_urls(url, "train")
    assert urls == [f"{url}/{s['name']}" for s in m_local["splits"]["train"]["shards"]]
    ok = run_cli("preprocess", "--verify", "--out", url, check=True)
    assert "match" in ok.stderr
    # resume: a lost shard is rebuilt from the journal (here on a "new machine": no staging)
    victim = sorted(shards)[1]
    s3_env.filesystem().delete_file(f"{s3_env.bucket}/t91-small/{victim}")
    with pytest.raises(UserError, match="missing"):
        mf.shard_urls(url, "train")
    monkeypatch.setenv("SR_PIPELINE_HOME", str(tmp_path / "home2"))
    again = run_cli("preprocess", "--images", str(t91_small), "--out", url, *SMALL, "--scales", "2", "-j", "1",
                    check=True)
    assert "resuming" in again.stderr
    assert {k: v for k, v in _objects(s3_env, "t91-small").items() if k.endswith(".tar")} == shard_bytes(local)
    # a corrupted object is caught by --verify
    fs = s3_env.filesystem()
    with fs.open_output_stream(f"{s3_env.bucket}/t91-small/{victim}") as f:
        f.write(b"x" * len(shards[victim]))
    bad = run_cli("preprocess", "--verify", "--out", url)
    assert bad.returncode == 1 and victim in bad.stderr and "sha256 mismatch" in bad.stderr


def test_object_store_problems_are_one_line_before_any_work(s3_env, t91_small, tmp_path, monkeypatch):
    monkeypatch.setenv("SR_PIPELINE_HOME", str(tmp_path / "home"))
    cases = [
        (f"s3://{s3_env.bucket}-missing/x", {}, "bucket 'sr-test-missing' not found"),
        ("s3://", {}, "no bucket"),
        ("nosuchscheme://bucket/x", {}, "not a storage URI"),
        (s3_env.url("x"), {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}, "unreachable"),
    ]
    for url, env, expected in cases:
        proc = run_cli("preprocess", "--images", str(t91_small), "--out", url, *SMALL, "-j", "1", env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("error: ") and expected in lines[-1], (url, lines)
        assert not any(line.startswith("preprocess") for line in lines)  # no image was read
    assert not (tmp_path / "home" / "preprocess-staging").exists() or not any(
        (tmp_path / "home" / "preprocess-staging").rglob("*.tar"))
    # credentials embedded in a URL never reach the output
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", f"s3://AKIDSECRET:hunter2@{s3_env.bucket}-missing/x",
                   *SMALL, "-j", "1")
    assert proc.returncode == 1 and "hunter2" not in proc.stderr and "AKIDSECRET" not in proc.stderr


def test_rejected_credentials_are_named(s3_server, t91_small, tmp_path):
    """The fixture server checks signatures, as a real store does: an unknown key is refused."""
    env = {**s3_server.env, "AWS_ACCESS_KEY_ID": "AKIDUNKNOWN", "AWS_SECRET_ACCESS_KEY": "not-the-secret",
           "SR_PIPELINE_HOME": str(tmp_path)}
    proc = run_cli("preprocess", "--images", str(t91_small), "--out", s3_server.url("x"), *SMALL, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "access denied" in last and "credentials" in last, proc.stderr
    assert "not-the-secret" not in proc.stderr and s3_server.secret not in proc.stderr


class _FailingStream:
    """An upload stream that dies after `budget` bytes, as a dropped connection would."""

    def __init__(self, inner, budget: int) -> None:
        self.inner, self.budget = inner, budget

    def write(self, data) -> int:
        if len(data) > self.budget:
            raise OSError("simulated connection reset during upload")
        self.budget -= len(data)
        return self.inner.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()  # what pyarrow's own stream does on the way out: completes the upload


class _FlakyFs:
    """pyarrow's S3 filesystem, except that the second shard upload breaks off half-way."""

    def __init__(self, fs) -> None:
        self.fs, self.shard_uploads = fs, 0

    def open_output_stream(self, path, *a, **kw):
        stream = self.fs.open_output_stream(path, *a, **kw)
        if path.endswith(".tar.tmp"):
            self.shard_uploads += 1
            if self.shard_uploads == 2:
                return _FailingStream(stream, 20_000)
        return stream

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_broken_upload_leaves_no_object_under_a_shard_name(s3_env, t91_small, tmp_path, monkeypatch):
    from pipeline.train import storage

    local = tmp_path / "local"
    run_preprocess(_cfg(t91_small, local))
    real_fs = storage._fs
    monkeypatch.setattr(storage, "_fs", lambda uri: (lambda fs, p: (_FlakyFs(fs), p))(*real_fs(uri)))
    url = s3_env.url("flaky")
    with pytest.raises(UserError, match="simulated connection reset"):
        run_preprocess(_cfg(t91_small, url))
    objects = _objects(s3_env, "flaky")
    published = sorted(k for k in objects if k.endswith(".tar"))
    assert len(published) == 1 and objects[published[0]] == shard_bytes(local)[published[0]]  # only whole shards
    assert "manifest.json" not in objects and not [k for k in objects if k.endswith(".tmp")]
    monkeypatch.setattr(storage, "_fs", real_fs)
    run_preprocess(_cfg(t91_small, url))  # the rerun resumes and completes
    assert {k: v for k, v in _objects(s3_env, "flaky").items() if k.endswith(".tar")} == shard_bytes(local)
