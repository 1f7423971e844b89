"""A real S3-API server (moto in server mode) on 127.0.0.1, with authentication enforced.

moto lets the first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests through unsigned; the fixture
spends them on creating an IAM user with an allow-all policy and its access key, so every later
request must be signed with that key: a missing or wrong key is refused as by a real store.
The server runs as a separate process (its own GIL) and is stopped by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port


@dataclass
class S3Server:
    endpoint: str  # host:port
    key_id: str
    secret: str

    def url(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def env(self) -> dict[str, str]:
        """Credentials as a node would have them (never on the command line)."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}

    def upload(self, local: Path, bucket: str, prefix: str) -> str:
        """Create `bucket` and copy the files of `local` under `prefix`; returns the URL."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=self.key_id, secret_key=self.secret, endpoint_override=self.endpoint,
                               scheme="http", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(bucket)
        pafs.copy_files(str(local), f"{bucket}/{prefix}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        return self.url(bucket, prefix)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3", MOTO_ALLOW_NONEXISTENT_REGION="true")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.3)
        import boto3

        iam = boto3.client("iam", endpoint_url=base, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        yield S3Server(f"127.0.0.1:{port}", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
