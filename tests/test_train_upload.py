"""The checkpoint upload function without a Ray job: a real local storage path that refuses
writes (a file where the run directory should be), then comes back. The outage under a whole
job, on an S3 server, is tests/test_train_storage_outage.py."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, TrainConfig
from pipeline.train.upload import RetryingUpload, UploadGaveUp


def _source(tmp_path):
    from ray.train import Checkpoint

    src = tmp_path / "local"
    src.mkdir()
    (src / "model.pt").write_bytes(b"m" * 1000)
    (src / "train_state.pt").write_bytes(b"s" * 10)
    return Checkpoint.from_directory(str(src))


def _storage(base):
    import pyarrow.fs as pafs

    return SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), experiment_fs_path=str(base))


def test_upload_is_retried_from_a_clean_destination_until_the_storage_works(tmp_path):
    base = tmp_path / "run"
    base.write_text("a file where the run directory should be")  # every write under it fails
    lines: list[str] = []
    upload = RetryingUpload(7, retry_s=60, timeout_s=1, say=lines.append, storage=_storage(base))

    def storage_comes_back() -> None:  # ...with what a failed attempt left in the destination
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        base.unlink()
        (base / "checkpoint_x").mkdir(parents=True)
        (base / "checkpoint_x" / "model.pt.partial").write_bytes(b"half")

    repair = threading.Thread(target=storage_comes_back)
    repair.start()
    checkpoint = upload(_source(tmp_path), "checkpoint_x")
    repair.join()

    assert checkpoint.path == str(base / "checkpoint_x")
    assert checkpoint.filesystem is upload.fs  # Ray's filesystem, as Ray requires
    assert sorted(os.listdir(checkpoint.path)) == ["model.pt", "train_state.pt"]  # the leftover is gone
    assert (base / "checkpoint_x" / "model.pt").read_bytes() == b"m" * 1000
    assert upload.done.is_set() and upload.failures == 1
    assert lines[0].startswith(f"warning: checkpoint upload of step 7 to {base}/checkpoint_x failed (")
    assert lines[0].endswith("retry 1 in 2s, training goes on")
    assert lines[-1] == f"checkpoint of step 7 uploaded to {base}/checkpoint_x after 1 failed attempt(s)"


def test_upload_gives_up_when_its_time_is_spent(tmp_path):
    base = tmp_path / "run"
    base.write_text("a file where the run directory should be")
    lines: list[str] = []
    upload = RetryingUpload(3, retry_s=0, timeout_s=1, say=lines.append, storage=_storage(base))
    with pytest.raises(UploadGaveUp, match="checkpoint upload of step 3 to .* failed for 0s"):
        upload(_source(tmp_path), "checkpoint_y")
    assert not upload.done.is_set()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint upload of step 3") and "giving up" in lines[0]


@pytest.mark.parametrize("field, value", [("upload_retry_s", -1.0), ("upload_timeout_s", 0.0)])
def test_upload_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value}).validate()
