"""`sr-pipeline download div2k|benchmarks`: fetch the official archives, resume, extract safely.

* Official sources by default: the DIV2K HR zips from the DIV2K site, and the ``benchmark.tar``
  (Set5, Set14, B100, Urban100, Manga109) named in the EDSR-PyTorch README. ``--url BASE`` or
  ``$SR_PIPELINE_DOWNLOAD_URL`` replaces the base URL (a mirror, or a local server in tests);
  archive file names stay the same.
* Downloads go to ``DEST/.downloads/<name>.part`` and resume (:mod:`.http_fetch`: Range
  requests, retries, the announced size as the only check).
* Archives are extracted under DEST without ever writing outside it or deleting a folder
  there (:mod:`.extract`); files the user changed are kept unless ``--overwrite`` is given.
  A ``DEST/.downloads/<name>.done`` marker records completion so a rerun skips finished
  archives (``--overwrite`` fetches and extracts them again).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from pipeline import console
from pipeline.console import UserError
from pipeline.imageio import atomic_write_bytes
from pipeline.preprocess.extract import extract, kept_message
from pipeline.preprocess.http_fetch import fetch

URL_ENV = "SR_PIPELINE_DOWNLOAD_URL"
OFFICIAL: dict[str, tuple[str, tuple[str, ...]]] = {
    "div2k": ("https://data.vision.ee.ethz.ch/cvl/DIV2K/", ("DIV2K_train_HR.zip", "DIV2K_valid_HR.zip")),
    "benchmarks": ("https://cv.snu.ac.kr/research/EDSR/", ("benchmark.tar",)),
}


def sources(what: str, base_url: str | None = None) -> list[tuple[str, str]]:
    """[(archive name, URL)] for a dataset, honouring --url / $SR_PIPELINE_DOWNLOAD_URL."""
    if what not in OFFICIAL:
        raise UserError(f"unknown dataset {what!r} (choose from {', '.join(OFFICIAL)})")
    official, names = OFFICIAL[what]
    base = base_url or os.environ.get(URL_ENV) or official
    if not base.endswith("/"):
        base += "/"
    return [(name, base + name) for name in names]


def download(
    what: str, dest: Path, base_url: str | None = None, keep_archive: bool = False, overwrite: bool = False
) -> list[Path]:
    """Fetch and extract every archive of `what` into `dest`; returns the extracted folders.

    `overwrite` extracts again even when a marker says an archive is done, and replaces
    existing files that differ from the archive's (folders are still only merged into)."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        cache = dest / ".downloads"
        cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{dest}: cannot create destination folder ({exc.strerror})") from None
    created: list[Path] = []
    for name, url in sources(what, base_url):
        marker = cache / f"{name}.done"
        if marker.is_file() and not overwrite:
            with contextlib.suppress(ValueError, OSError):
                done = json.loads(marker.read_text())
                console.info(f"{name}: already downloaded and extracted ({', '.join(done.get('extracted', []))})")
                created += [dest / n for n in done.get("extracted", [])]
                continue
        archive = cache / name
        if not archive.is_file():
            part = fetch(url, cache / f"{name}.part", name)
            os.replace(part, archive)
        size = archive.stat().st_size
        top, kept, replaced = extract(archive, dest, overwrite)
        atomic_write_bytes(marker, json.dumps({"url": url, "bytes": size, "extracted": top}).encode())
        if kept:
            console.warn(kept_message(archive, kept, "rerun with --overwrite"))
        if replaced:
            console.info(f"{name}: replaced {len(replaced)} existing file(s) with the archive's versions")
        if not keep_archive:
            archive.unlink()
        console.info(f"{name}: {size / 1e6:.1f} MB, extracted {', '.join(top)} into {dest}")
        created += [dest / n for n in top]
    return created
