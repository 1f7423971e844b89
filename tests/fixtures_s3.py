"""A real S3-API server on 127.0.0.1 for the object-storage tests (`moto` in server mode).

One server per test session, in its own process (its own session id, stopped by
:func:`helpers.stop_session`), so that Ray workers and CLI subprocesses reach it like any
remote store. pyarrow's S3 filesystem (what ``s3://`` goes through in this project) takes the
endpoint from ``AWS_ENDPOINT_URL_S3`` (an AWS SDK setting), so no option of ours is needed:
set the variables in :attr:`S3Server.env` in the process (or subprocess, or Ray runtime env)
that opens the URL.

Usage::

    def test_x(s3_server, monkeypatch):
        for k, v in s3_server.env.items():
            monkeypatch.setenv(k, v)
        url = s3_server.url("my/prefix")  # s3://<bucket>/my/prefix

The bucket exists and is shared by the session: give each test its own prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from helpers import free_port, stop_session, wait_for_port


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str] = field(default_factory=dict)  # what a client needs to reach it

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix``; a fresh unique prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}".rstrip("/")

    def filesystem(self):
        """A pyarrow S3 filesystem on this server (for tests that inspect objects directly)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint, scheme="http", region=self.env["AWS_DEFAULT_REGION"],
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """`python -m moto.server` on a free loopback port, with one bucket created."""
    pytest.importorskip("moto", reason="moto[server] is a dev dependency (pip install -e .[dev])")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
    )
    try:
        wait_for_port(port, 60, proc)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "sr-pipeline-test",  # moto accepts any credentials
            "AWS_SECRET_ACCESS_KEY": "sr-pipeline-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,  # read by pyarrow's S3 filesystem (AWS SDK)
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance-metadata endpoint
        }
        server = S3Server(endpoint=endpoint, bucket="sr-test", env=env)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"], endpoint_override=endpoint,
            scheme="http", region=env["AWS_DEFAULT_REGION"], allow_bucket_creation=True,
        ).create_dir(server.bucket)
        yield server
    finally:
        stop_session(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`s3_server` with its variables set in this test's environment (and its subprocesses)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
