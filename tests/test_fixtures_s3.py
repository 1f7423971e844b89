"""The S3 fixture itself: a real S3-API server reached through pyarrow's ``s3://`` URLs."""

from __future__ import annotations


def test_s3_server_round_trip_through_uri(s3_env) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(s3_env.url("fixture-check"))  # endpoint from the env vars
    with fs.open_output_stream(f"{path}/a.bin") as f:
        f.write(b"shard bytes")
    with s3_env.filesystem().open_input_stream(f"{path}/a.bin") as f:
        assert f.read() == b"shard bytes"
    assert fs.get_file_info(f"{s3_env.bucket}-missing").type == pafs.FileType.NotFound
