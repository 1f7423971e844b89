"""The S3 fixture itself: a real S3-API server reached through pyarrow's ``s3://`` URLs, which
refuses requests not signed with its key (as a real store does)."""

from __future__ import annotations

import pytest


def test_s3_server_round_trip_through_uri(s3_env) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(s3_env.url("fixture-check"))  # endpoint from the env vars
    with fs.open_output_stream(f"{path}/a.bin") as f:
        f.write(b"shard bytes")
    with s3_env.filesystem().open_input_stream(f"{path}/a.bin") as f:
        assert f.read() == b"shard bytes"
    assert fs.get_file_info(f"{s3_env.bucket}-missing").type == pafs.FileType.NotFound
    for key_id, secret in [(s3_env.key_id, "wrong-secret"), ("AKIDUNKNOWN", s3_env.secret)]:
        stranger = pafs.S3FileSystem(access_key=key_id, secret_key=secret, endpoint_override=s3_env.endpoint,
                                     scheme="http", region="us-east-1")
        with pytest.raises(OSError, match="(?i)denied|forbidden|signature|invalid"):
            stranger.open_input_stream(f"{path}/a.bin").read()
    anonymous = pafs.S3FileSystem(anonymous=True, endpoint_override=s3_env.endpoint, scheme="http", region="us-east-1")
    with pytest.raises(OSError):
        anonymous.open_input_stream(f"{path}/a.bin").read()
