"""A real S3-API server on 127.0.0.1 for the object-storage tests (`moto` in server mode),
with authentication enforced as by a real store.

One server per test session, in its own process (its own session id, stopped by
:func:`helpers.stop_session`), so that Ray nodes, workers and CLI subprocesses reach it like
any remote store. moto lets the first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests through
unsigned: the fixture spends exactly those on creating an IAM user with an allow-all policy and
its access key, so every later request must be signed with that key and a missing or wrong key
is refused.

pyarrow's S3 filesystem (what ``s3://`` goes through in this project) takes the endpoint from
``AWS_ENDPOINT_URL_S3`` (an AWS SDK setting), so no option of ours is needed: set the variables
in :attr:`S3Server.env` in the process (or subprocess, or Ray node) that opens the URL. A URL can
also carry the endpoint itself (``url(..., endpoint_in_url=True)``), as a user without that
variable would write it.

Usage::

    def test_x(s3_env):                       # the variables set in this test's environment
        url = s3_env.url("my/prefix")          # s3://sr-test/my/prefix
        url = s3_env.upload(local_dir, "p")    # copy a local folder there

The default bucket exists and is shared by the session: give each test its own prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port, stop_session, wait_for_port

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    host: str  # 127.0.0.1:PORT
    key_id: str
    secret: str
    bucket: str = "sr-test"
    env: dict[str, str] = field(default_factory=dict)  # what a client (node) needs to reach it
    pgid: int = 0  # the server's process group: a test may freeze it (SIGSTOP) and must resume it (SIGCONT)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}"

    def url(self, prefix: str = "", *, bucket: str | None = None, endpoint_in_url: bool = False) -> str:
        """``s3://bucket/prefix`` (a fresh unique prefix when none is given); with
        `endpoint_in_url`, the server named in the URL's query instead of by the environment."""
        url = f"s3://{bucket or self.bucket}/{prefix or uuid.uuid4().hex[:12]}".rstrip("/")
        return f"{url}?endpoint_override={self.host}&scheme=http&region={REGION}" if endpoint_in_url else url

    def filesystem(self, *, allow_bucket_creation: bool = False):
        """A pyarrow S3 filesystem on this server (for tests that inspect objects directly)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.key_id, secret_key=self.secret, endpoint_override=self.endpoint,
                                 scheme="http", region=REGION, allow_bucket_creation=allow_bucket_creation)

    def upload(self, local: Path, prefix: str, *, bucket: str | None = None, endpoint_in_url: bool = False) -> str:
        """Copy the files of `local` under `prefix` (creating `bucket` if needed); returns the URL."""
        import pyarrow.fs as pafs

        bucket = bucket or self.bucket
        fs = self.filesystem(allow_bucket_creation=True)
        fs.create_dir(bucket)
        pafs.copy_files(str(local), f"{bucket}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        return self.url(prefix, bucket=bucket, endpoint_in_url=endpoint_in_url)


def _create_user(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed everything, and its key: the unsigned requests moto lets through."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """`python -m moto.server` on a free loopback port, authentication on, one bucket created."""
    pytest.importorskip("moto", reason="moto[server] is a dev dependency (pip install -e .[dev])")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", MOTO_ALLOW_NONEXISTENT_REGION="true")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        try:
            wait_for_port(port, 60, proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from e
        host = f"127.0.0.1:{port}"
        key_id, secret = _create_user(f"http://{host}")
        client_env = {
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": f"http://{host}",  # read by pyarrow's S3 filesystem (AWS SDK)
            "AWS_EC2_METADATA_DISABLED": "true",  # never probe an instance-metadata endpoint
        }
        server = S3Server(host, key_id, secret, env=client_env, pgid=proc.pid)  # own session: pgid = pid
        server.filesystem(allow_bucket_creation=True).create_dir(server.bucket)
        yield server
    finally:
        stop_session(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`s3_server` with its variables set in this test's environment (and its subprocesses)."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server
