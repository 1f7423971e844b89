"""Checkpoint uploads that survive a storage outage: retried with backoff, reported, bounded.

Ray Train's own upload gives up after three quick attempts, and in its background (ASYNC) mode
a failed upload fails the worker group at once: a storage path that is down for a minute would
end training (or restart it, with ``--max-failures``). ``ray.train.report`` takes an upload
function instead (``checkpoint_upload_fn``); :class:`RetryingUpload` copies the checkpoint
where Ray would (``<experiment path>/<checkpoint dir name>`` on the run's storage filesystem)
and, when that fails, says so in one line, waits (2 s, doubling up to 60 s) and tries again,
for up to ``upload_retry_s``. Only then does it raise, and Ray's failure handling applies: the
last registered checkpoint stays the one a restart resumes from.

Each attempt is bounded: on object storage the files go through a copy of the run's S3
filesystem whose requests fail after ``upload_timeout_s`` without progress, are retried by
the AWS SDK three times only, and are made on the calling thread (pyarrow's default for a ``s3://`` URL retries a connection that
hangs for about 100 s per call, measured against a stopped server). The checkpoint handed back
to Ray names Ray's own filesystem, as Ray requires. Not every hang is bounded by that: a
request already sending its body when the store stops answering (an ``UploadPart`` frozen
mid-way, measured with pyarrow 25 against a stopped server) waited far past a 1 s request
timeout (over 25 s, once about 40 s) before failing. The step loop is unaffected (the upload
runs in Ray's background thread and later checkpoints are skipped meanwhile), but the time
limit is checked between attempts, so the job may give up that much later than
``upload_retry_s``.

A half-written destination is never taken for a checkpoint: Ray registers one (in the
controller's snapshot, what a restart reads) only after the function has returned, and each
attempt first deletes what an earlier one left, so a registered directory holds the files of
one complete attempt.
"""

from __future__ import annotations

import threading
import time
from typing import Any

BACKOFF_FIRST_S = 2.0
BACKOFF_MAX_S = 60.0


def one_line(exc: BaseException, limit: int = 240) -> str:
    """The reason, on one line; pyarrow's S3 errors start with a long "When ... key ... in
    bucket ...:" that repeats the destination, so the AWS error itself comes first."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    aws = text.find("AWS Error")
    return (text[aws:] if aws > 0 else text)[:limit]


class UploadGaveUp(RuntimeError):
    """The upload kept failing for ``upload_retry_s``; the worker group fails on it."""


class RetryingUpload:
    """One checkpoint's ``checkpoint_upload_fn`` (rank 0; see the module docstring).

    Made on the training thread (Ray's train context is read there); called by Ray on its
    upload thread (ASYNC) or on the training thread (SYNC). The loop reads :attr:`done` and
    :attr:`failures` to decide, and say, why a later checkpoint is skipped.
    """

    def __init__(self, step: int, retry_s: float, timeout_s: float, say, storage: Any = None) -> None:
        if storage is None:
            import ray.train

            storage = ray.train.get_context().get_storage()  # DeveloperAPI: filesystem + paths
        self.fs = storage.storage_filesystem
        self.base = storage.experiment_fs_path
        self.timeout_s = timeout_s
        self.step, self.retry_s, self.say = step, retry_s, say
        self.failures = 0
        self.done = threading.Event()  # set once the files are all in place

    def where(self, dest: str) -> str:
        """The destination for messages: the filesystem's scheme and path, never credentials
        (those live in the filesystem object or the environment, not in the path)."""
        kind = getattr(self.fs, "type_name", "")
        return dest if kind in ("", "local") else f"{kind}://{dest}"

    def __call__(self, checkpoint, checkpoint_dir_name: str):
        from ray.train import Checkpoint

        dest = f"{self.base.rstrip('/')}/{checkpoint_dir_name}"
        deadline = time.monotonic() + self.retry_s
        delay = BACKOFF_FIRST_S
        while True:
            try:
                self._copy(checkpoint, dest)
                break
            except Exception as exc:  # noqa: BLE001 - any storage failure is retried until the deadline
                self.failures += 1
                reason, left = one_line(exc), deadline - time.monotonic()
                if left <= 0:
                    # Ray retries an upload whose error names a transient AWS failure ("AWS Error
                    # NETWORK_CONNECTION"...) three more times: ours already waited its bound.
                    reason = reason.replace("AWS Error", "AWS error")
                    self.say(f"error: checkpoint upload of step {self.step} to {self.where(dest)} failed "
                             f"{self.failures} times in {self.retry_s:g}s (upload_retry_s); giving up: {reason}")
                    raise UploadGaveUp(f"checkpoint upload of step {self.step} to {self.where(dest)} failed "
                                       f"for {self.retry_s:g}s (upload_retry_s): {reason}") from None
                wait = min(delay, left)
                self.say(f"warning: checkpoint upload of step {self.step} to {self.where(dest)} failed "
                         f"({reason}); retry {self.failures} in {wait:.0f}s, training goes on")
                time.sleep(wait)
                delay = min(2 * delay, BACKOFF_MAX_S)
        if self.failures:
            self.say(f"checkpoint of step {self.step} uploaded to {self.where(dest)} after "
                     f"{self.failures} failed attempt(s)")
        self.done.set()
        return Checkpoint(path=dest, filesystem=self.fs)

    def _copy(self, checkpoint, dest: str) -> None:
        """One attempt from a clean destination (what a failed attempt left is deleted first)."""
        import pyarrow.fs as pafs

        fs = impatient(self.fs, self.timeout_s)  # here, on the upload thread: making it may wait on the store
        if fs.get_file_info(dest).type != pafs.FileType.NotFound:
            fs.delete_dir(dest)
        fs.create_dir(dest, recursive=True)
        # One file at a time, on this thread: Ray's own upload turns pyarrow's threads off for
        # S3 uploads (a pyarrow issue with threaded uploads, apache/arrow#32372), and so do we.
        pafs.copy_files(checkpoint.path, dest, source_filesystem=checkpoint.filesystem, destination_filesystem=fs,
                        use_threads=False)


_IMPATIENT: dict[tuple[int, float], Any] = {}  # (id of Ray's filesystem, timeout) -> our copy of it
_IMPATIENT_LOCK = threading.Lock()


def impatient(fs, timeout_s: float):
    """`fs` with bounded requests when it is S3 (see the module docstring); others as they are.

    Made once per run and filesystem, and never on the training thread: constructing an S3
    filesystem talks to the store (measured: it waited on a frozen store until the test gave up),
    so the step loop must not do it."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    key = (id(fs), timeout_s)
    with _IMPATIENT_LOCK:
        made = _IMPATIENT.get(key)
        if made is None or made[0] is not fs:
            rebuild, (options,) = fs.__reduce__()  # the options it was made with (credentials: same source)
            options.update(connect_timeout=timeout_s, request_timeout=timeout_s, background_writes=False,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
            made = _IMPATIENT[key] = (fs, rebuild(options))
        return made[1]
