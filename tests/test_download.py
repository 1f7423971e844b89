"""`sr-pipeline download` against a local HTTP server on 127.0.0.1 (Range, faults, bad archives)."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import fixtures_preprocess
import pytest
from fixtures_preprocess import no_proxy_env
from helpers import run_cli

from pipeline.console import UserError
from pipeline.preprocess import download as dl
from pipeline.preprocess.manifest import read_manifest

file_server = fixtures_preprocess.file_server


def _tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return path.read_bytes()


def _zip(path: Path, files: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path.read_bytes()


@pytest.fixture
def benchmark_files(set5_dir: Path) -> dict[str, bytes]:
    return {f"benchmark/Set5/HR/{p.name}": p.read_bytes() for p in sorted(set5_dir.glob("*.png"))[:3]}


def test_download_benchmarks_with_the_cli(file_server, benchmark_files, tmp_path):
    _tar(file_server.root / "benchmark.tar", benchmark_files)
    dest = tmp_path / "data"
    proc = run_cli("download", "benchmarks", "--dest", str(dest), "--url", file_server.base, env=no_proxy_env(), check=True)
    for name, data in benchmark_files.items():
        assert (dest / name).read_bytes() == data
    assert (dest / ".downloads" / "benchmark.tar.done").is_file()
    assert not (dest / ".downloads" / "benchmark.tar").exists()  # archive removed by default
    assert "extracted benchmark" in proc.stderr
    again = run_cli("download", "benchmarks", "--dest", str(dest), "--url", file_server.base, env=no_proxy_env(), check=True)
    assert "already downloaded" in again.stderr
    assert [r["method"] for r in file_server.requests] == ["GET"]  # nothing fetched the second time


def test_download_div2k_then_preprocess(file_server, t91_dir, set5_dir, tmp_path):
    train = {f"DIV2K_train_HR/{n}": (t91_dir / n).read_bytes() for n in ("t1.png", "t2.png")}
    valid = {"DIV2K_valid_HR/bird.png": (set5_dir / "bird.png").read_bytes()}
    _zip(file_server.root / "DIV2K_train_HR.zip", train)
    _zip(file_server.root / "DIV2K_valid_HR.zip", valid)
    dest = tmp_path / "div2k"
    env = {**no_proxy_env(), "SR_PIPELINE_DOWNLOAD_URL": file_server.base}
    run_cli("download", "div2k", "--dest", str(dest), "--keep-archive", env=env, check=True)
    assert (dest / "DIV2K_train_HR" / "t1.png").read_bytes() == train["DIV2K_train_HR/t1.png"]
    assert (dest / ".downloads" / "DIV2K_valid_HR.zip").is_file()  # --keep-archive
    out = tmp_path / "shards"
    run_cli("preprocess", "--data-dir", str(dest), "--out", str(out), "--crop", "48", "--step", "48", "--scales", "2", check=True)
    m = read_manifest(out)
    assert m["dataset"] == "DIV2K" and m["splits"]["train"]["images"] == 2 and m["splits"]["valid"]["images"] == 1


def test_resume_from_a_partial_file(file_server, benchmark_files, tmp_path):
    data = _tar(file_server.root / "benchmark.tar", benchmark_files)
    dest = tmp_path / "data"
    (dest / ".downloads").mkdir(parents=True)
    half = len(data) // 2
    (dest / ".downloads" / "benchmark.tar.part").write_bytes(data[:half])
    dl.download("benchmarks", dest, base_url=file_server.base, keep_archive=True)
    assert file_server.requests[0]["range"] == f"bytes={half}-"
    assert (dest / ".downloads" / "benchmark.tar").read_bytes() == data


def test_dropped_connections_are_resumed_with_range(file_server, benchmark_files, tmp_path):
    data = _tar(file_server.root / "benchmark.tar", benchmark_files)
    file_server.cut_after["benchmark.tar"] = [5000, 20000]  # the first two responses break off
    dest = tmp_path / "data"
    dl.download("benchmarks", dest, base_url=file_server.base, keep_archive=True)
    assert [r["range"] for r in file_server.requests] == [None, "bytes=5000-", "bytes=25000-"]
    assert (dest / ".downloads" / "benchmark.tar").read_bytes() == data


def test_size_check_keeps_partial_and_reports(file_server, benchmark_files, tmp_path, monkeypatch):
    data = _tar(file_server.root / "benchmark.tar", benchmark_files)
    monkeypatch.setattr(dl, "ATTEMPTS", 2)
    file_server.cut_after["benchmark.tar"] = [1000, 1000]
    dest = tmp_path / "data"
    with pytest.raises(UserError, match=r"download incomplete .* 2000 of \d+ bytes.*rerun to resume"):
        dl.download("benchmarks", dest, base_url=file_server.base)
    assert (dest / ".downloads" / "benchmark.tar.part").stat().st_size == 2000
    assert not (dest / "benchmark").exists()
    dl.download("benchmarks", dest, base_url=file_server.base, keep_archive=True)  # server healthy again
    assert file_server.requests[-1]["range"] == "bytes=2000-"
    assert (dest / ".downloads" / "benchmark.tar").read_bytes() == data


def test_server_without_range_support_restarts(file_server, benchmark_files, tmp_path):
    data = _tar(file_server.root / "benchmark.tar", benchmark_files)
    file_server.ignore_range.add("benchmark.tar")
    dest = tmp_path / "data"
    (dest / ".downloads").mkdir(parents=True)
    (dest / ".downloads" / "benchmark.tar.part").write_bytes(b"stale bytes of another file")
    dl.download("benchmarks", dest, base_url=file_server.base, keep_archive=True)
    assert (dest / ".downloads" / "benchmark.tar").read_bytes() == data


def test_http_error_and_bad_url(file_server, tmp_path):
    proc = run_cli("download", "benchmarks", "--dest", str(tmp_path / "d"), "--url", file_server.base, env=no_proxy_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "HTTP 404" in proc.stderr
    with pytest.raises(UserError, match="unknown dataset"):
        dl.sources("imagenet")
    with pytest.raises(UserError, match="only http"):
        dl.download("benchmarks", tmp_path / "d", base_url="file:///etc/")
    assert dl.sources("div2k")[0] == ("DIV2K_train_HR.zip", "https://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip")
    assert dl.sources("benchmarks")[0][1] == "https://cv.snu.ac.kr/research/EDSR/benchmark.tar"


def _link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info


def _malicious(kind: str, root: Path, outside: Path) -> None:
    ok = {"benchmark/Set5/HR/a.png": b"fine"}
    if kind == "tar-dotdot":
        _tar(root / "benchmark.tar", {**ok, "benchmark/../../outside/evil.txt": b"x"})
    elif kind == "tar-absolute":
        _tar(root / "benchmark.tar", {**ok, str(outside / "evil.txt"): b"x"})
    elif kind == "tar-symlink-out":
        _tar(root / "benchmark.tar", ok, [_link("benchmark/link", "../../outside")])
    elif kind == "tar-symlink-abs":
        _tar(root / "benchmark.tar", ok, [_link("benchmark/link", str(outside))])
    elif kind == "tar-hardlink-out":
        _tar(root / "benchmark.tar", ok, [_link("benchmark/hard", "../outside/evil.txt", hard=True)])
    elif kind == "tar-device":
        dev = tarfile.TarInfo("benchmark/dev")
        dev.type = tarfile.CHRTYPE
        _tar(root / "benchmark.tar", ok, [dev])
    elif kind == "zip-dotdot":
        _zip(root / "benchmark.tar", {**ok, "../outside/evil.txt": b"x"})
    elif kind == "zip-absolute":
        _zip(root / "benchmark.tar", {**ok, str(outside / "evil.txt"): b"x"})
    elif kind == "zip-symlink":
        with zipfile.ZipFile(root / "benchmark.tar", "w") as zf:
            zf.writestr("benchmark/ok.png", b"fine")
            info = zipfile.ZipInfo("benchmark/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, str(outside))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["tar-dotdot", "tar-absolute", "tar-symlink-out", "tar-symlink-abs", "tar-hardlink-out", "tar-device",
     "zip-dotdot", "zip-absolute", "zip-symlink"],
)
def test_malicious_archives_are_refused(kind, file_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "sandbox" / "dest"
    _malicious(kind, file_server.root, outside)
    with pytest.raises(UserError, match="refused") as err:
        dl.download("benchmarks", dest, base_url=file_server.base)
    assert "benchmark.tar" in str(err.value)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in dest.iterdir()) == [".downloads"]  # nothing extracted at all
    assert not (dest / ".downloads" / "benchmark.tar.done").exists()
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["dest"]


def test_malicious_archive_via_cli_is_one_line(file_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _malicious("tar-dotdot", file_server.root, outside)
    proc = run_cli("download", "benchmarks", "--dest", str(tmp_path / "dest"), "--url", file_server.base, env=no_proxy_env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused" in last and "evil.txt" in last


def test_links_inside_the_archive_are_kept(file_server, tmp_path):
    _tar(file_server.root / "benchmark.tar", {"benchmark/Set5/HR/a.png": b"fine"},
         [_link("benchmark/alias", "Set5"), _link("benchmark/copy.png", "benchmark/Set5/HR/a.png", hard=True)])
    dest = tmp_path / "dest"
    dl.download("benchmarks", dest, base_url=file_server.base)
    assert (dest / "benchmark" / "alias").is_symlink()
    assert (dest / "benchmark" / "alias" / "HR" / "a.png").read_bytes() == b"fine"
    assert (dest / "benchmark" / "copy.png").read_bytes() == b"fine"
