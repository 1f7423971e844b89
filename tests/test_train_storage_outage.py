"""The storage path failing mid-run: checkpoint uploads are retried and reported, training goes on.

A real job (local Ray, 2 CPU workers, tiny preset) keeps its run on a real S3-API server
(tests/fixtures_s3.py). Once Ray Train has registered a first checkpoint there, the server is
frozen (SIGSTOP: connections are accepted and never answered, the worst kind of outage), and
resumed (SIGCONT) after the workers have said that uploads fail and that later checkpoints
were skipped at advancing steps. The job must end normally, with the retried checkpoint
registered, no half-written or skipped checkpoint registered, and the last checkpoint complete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from fixtures_train import start_cli, tiny_args, train_shards, wait_for_line  # noqa: F401 - fixture
from helpers import stop_session

pytestmark = pytest.mark.slow

RUN = "outage"


def s3_snapshot(s3, prefix: str) -> dict:
    """Ray Train's checkpoint manager snapshot of the run ({} until there is one)."""
    import pyarrow.fs as pafs

    fs, path = s3.filesystem(), f"{s3.bucket}/{prefix}/{RUN}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def registered_steps(snapshot: dict) -> dict[int, str]:
    return {r["metrics"]["step"]: r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}


def after(log, mark: int) -> str:
    return log.read_text(errors="replace")[mark:]


def test_storage_outage_mid_run_is_retried_and_training_goes_on(train_shards, s3_env, tmp_path):  # noqa: F811
    import pyarrow.fs as pafs
    import torch

    prefix = f"outage-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "train.log"
    # A checkpoint every 20 steps (a second or two; the store is frozen between two uploads, which
    # keeps the test short: an upload frozen mid-request can hang far longer than its request
    # timeout, see pipeline/train/upload.py); every registered one kept, so that the retried one
    # is still listed at the end; an upload request that gets nothing for 1 s fails.
    args = tiny_args(train_shards, s3_env.url(prefix), epochs=1, iters=240, extra=(
        "--run-name", RUN, "--checkpoint-every", "20", "--keep-checkpoints", "1000",
        "--set", "upload_timeout_s=1", "--set", "upload_retry_s=300"))
    proc = start_cli(args, log)
    frozen = False
    try:
        deadline = time.monotonic() + 120
        while not registered_steps(s3_snapshot(s3_env, prefix)):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint registered: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        mark = len(log.read_text(errors="replace"))
        os.killpg(s3_env.pgid, signal.SIGSTOP)
        frozen = True
        try:
            # Two failed attempts of one upload, and two checkpoints skipped at different steps
            # meanwhile: training went on while the storage did not answer. The first failure can
            # take long: a request caught mid-way by the freeze outlasts upload_timeout_s (seen
            # past 75 s in a fresh-clone CI run), so the wait allows for it; it ends as soon as
            # both have been seen.
            deadline = time.monotonic() + 240
            while True:
                text = after(log, mark)
                failures = re.findall(r"warning: checkpoint upload of step (\d+) to s3://\S+ failed .*; retry (\d+) in", text)
                skipped = re.findall(r"warning: checkpoint at step (\d+) skipped: the upload of step (\d+) is still "
                                     r"(?:in progress|retrying)", text)
                if len(failures) >= 2 and len({s for s, _ in skipped}) >= 2 or proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, f"no failed uploads / skipped checkpoints: {text[-3000:]}"
                time.sleep(0.2)
        finally:
            os.killpg(s3_env.pgid, signal.SIGCONT)
            frozen = False
        rc = proc.wait(180)
    finally:
        if frozen:
            os.killpg(s3_env.pgid, signal.SIGCONT)
        if proc.poll() is None:
            stop_session(proc)
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert len(failures) >= 2 and len({s for s, _ in skipped}) >= 2, text[mark:][-3000:]
    retried = int(failures[0][0])
    assert {int(m) for _, m in skipped} == {retried}, skipped  # the skips waited on the retried upload
    assert all(int(s) > retried for s, _ in skipped)
    assert s3_env.secret not in text and s3_env.key_id not in text  # no credentials in the lines
    assert re.search(rf"checkpoint of step {retried} uploaded to s3://\S+ after \d+ failed attempt", text), text[-3000:]

    registered = registered_steps(s3_snapshot(s3_env, prefix))
    assert retried in registered, registered
    assert not {int(s) for s, _ in skipped} & set(registered), "a skipped checkpoint was registered"
    assert max(registered) == 240, registered  # the final checkpoint
    # Nothing under the run looks like a checkpoint that Ray did not register (no half-written
    # leftovers), and the last one loads, complete, with weights_only.
    fs, run = s3_env.filesystem(), f"{s3_env.bucket}/{prefix}/{RUN}"
    dirs = {i.base_name for i in fs.get_file_info(pafs.FileSelector(run)) if i.type == pafs.FileType.Directory
            and i.base_name.startswith("checkpoint_")}
    assert dirs == set(registered.values()), (dirs, registered)
    for step in (retried, 240):  # the retried upload and the last one: complete, loadable
        local = tmp_path / f"step{step}"
        local.mkdir()
        pafs.copy_files(f"{run}/{registered[step]}", str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        state = torch.load(local / "train_state.pt", map_location="cpu", weights_only=True)
        model = torch.load(local / "model.pt", map_location="cpu", weights_only=True)
        assert state["progress"]["step"] == step and model["step"] == step
        assert model["state_dict"] and state["optimizer"]["state"]
