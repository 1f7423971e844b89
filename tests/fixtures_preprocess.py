"""Fixtures and helpers for the preprocess-stage tests (images, a Range-capable HTTP server)."""

from __future__ import annotations

import http.server
import io
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Small settings used by most tests: T91 images are ~120-210 px.
SMALL = ["--crop", "48", "--step", "24", "--shard-samples", "16"]


def copy_images(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)
    return dst


@pytest.fixture
def t91_small(t91_dir: Path, tmp_path: Path) -> Path:
    """Five real T91 photos in their own folder (copied: tests add bad files next to them)."""
    return copy_images(t91_dir, tmp_path / "photos", ["t1.png", "t10.png", "t12.png", "t2.png", "t3.png"])


def read_tar_members(path: Path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def decode_member(name: str, data: bytes) -> np.ndarray:
    """Pixels of an image member of either encoding (``.npy`` raw or ``.png``)."""
    if name.endswith(".npy"):
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous
        return arr
    return decode(data)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


# ---------------------------------------------------------------------------------------------
# A small HTTP server on 127.0.0.1 with Range support and fault injection
# ---------------------------------------------------------------------------------------------


@dataclass
class FileServer:
    root: Path
    base: str
    requests: list[dict] = field(default_factory=list)
    # path -> number of bytes after which the next responses are cut (popped per request)
    cut_after: dict[str, list[int]] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)


def _handler(server: FileServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _serve(self, body: bool) -> None:
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            server.requests.append({"method": self.command, "path": name, "range": rng})
            path = server.root / name
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
            if m and name not in server.ignore_range:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                chunk = data[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{start + len(chunk) - 1}/{len(data)}")
            else:
                chunk = data
                self.send_response(200)
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            cuts = server.cut_after.get(name)
            if cuts:
                limit = cuts.pop(0)
                self.wfile.write(chunk[:limit])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(False)

    return Handler


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    fs = FileServer(root=root, base="")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fs))
    httpd.daemon_threads = True
    fs.base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fs
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def no_proxy_env() -> dict[str, str]:
    """Environment for a CLI subprocess that must talk to 127.0.0.1 directly."""
    return {"NO_PROXY": "*", "no_proxy": "*", "HTTP_PROXY": "", "http_proxy": "", "HTTPS_PROXY": "", "https_proxy": ""}
