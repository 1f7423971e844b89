"""`sr-pipeline download` against a local HTTP server on 127.0.0.1 (Range, faults, bad archives)."""

from __future__ import annotations

import io
import shutil
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
from pipeline.preprocess import http_fetch
from pipeline.preprocess.extract import safe_extract
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
    monkeypatch.setattr(http_fetch, "ATTEMPTS", 2)
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
    elif kind == "tar-symlink-chain":  # each link's text stays inside; the chain climbs out
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/d1/d2/l2", "../.."), _link("benchmark/l1", "d1/d2/l2/../.."),
        ])
    elif kind == "tar-symlink-chain-deep":  # the same chain, aimed at the folder beside DEST
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/d1/d2/l2", "../.."), _link("benchmark/l1", "d1/d2/l2/../../../outside"),
        ])
    elif kind == "tar-hardlink-to-symlink":  # a hard link would copy what the chain reaches
        (outside / "secret.txt").write_bytes(b"secret")
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/d1/d2/l2", "../.."), _link("benchmark/l1", "d1/d2/l2/../../../outside"),
            _link("benchmark/copy.txt", "benchmark/l1/secret.txt", hard=True),
        ])
    elif kind == "tar-hardlink-to-link":  # directly to a symbolic link member
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/alias", "Set5/HR/a.png"), _link("benchmark/copy.png", "benchmark/alias", hard=True),
        ])
    elif kind == "tar-write-through-link":  # a later member placed under an earlier link
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/d1/d2/l2", "../.."), _link("benchmark/l1", "d1/d2/l2/../../../outside"),
            _link("benchmark/l1/planted", "x"),
        ])
    elif kind == "tar-file-through-link":  # a link to a folder (outside via a chain), then a file in it
        planted = tarfile.TarInfo("benchmark/l1/planted.txt")  # empty regular file, after the links
        _tar(root / "benchmark.tar", ok, [
            _link("benchmark/d1/d2/l2", "../.."), _link("benchmark/l1", "d1/d2/l2/../../../outside"), planted,
        ])
    elif kind == "tar-file-through-inside-link":  # even a link that stays inside is never written through
        planted = tarfile.TarInfo("benchmark/alias/HR/planted.png")
        _tar(root / "benchmark.tar", ok, [_link("benchmark/alias", "Set5"), planted])
    elif kind == "tar-link-name-twice":  # a file, then a link under the same name
        _tar(root / "benchmark.tar", {**ok, "benchmark/twice": b"x"}, [_link("benchmark/twice", "Set5")])
    elif kind == "tar-dangling-symlink":
        _tar(root / "benchmark.tar", ok, [_link("benchmark/later", "not-in-the-archive")])
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
     "tar-symlink-chain", "tar-symlink-chain-deep", "tar-hardlink-to-symlink", "tar-hardlink-to-link",
     "tar-write-through-link", "tar-file-through-link", "tar-file-through-inside-link", "tar-link-name-twice",
     "tar-dangling-symlink", "zip-dotdot", "zip-absolute", "zip-symlink"],
)
def test_malicious_archives_are_refused(kind, file_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "sandbox" / "dest"
    _malicious(kind, file_server.root, outside)
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(UserError, match="refused") as err:
        dl.download("benchmarks", dest, base_url=file_server.base)
    assert "benchmark.tar" in str(err.value)
    assert sorted(p.name for p in outside.iterdir()) == before
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


def test_symlink_chain_is_refused_by_safe_extract(tmp_path):
    """The reviewer's repro, through the public function: no link may resolve outside DEST."""
    archive = tmp_path / "chain.tar"
    _tar(archive, {"top/f.txt": b"x"}, [_link("top/d1/d2/l2", "../.."), _link("top/l1", "d1/d2/l2/../..")])
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match=r"refused, member 'top/l1' is a symbolic link that resolves outside"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []


def _own_data(dest: Path) -> None:
    (dest / "benchmark" / "MyOwnSet").mkdir(parents=True)
    (dest / "benchmark" / "MyOwnSet" / "keep.txt").write_text("mine")
    (dest / "benchmark" / "Set5" / "HR").mkdir(parents=True)
    (dest / "benchmark" / "Set5" / "HR" / "a.png").write_bytes(b"my edited copy")
    (dest / "benchmark" / "Set5" / "HR" / "b.png").write_bytes(b"same")


def test_existing_folder_is_merged_never_deleted(file_server, tmp_path):
    _tar(file_server.root / "benchmark.tar", {
        "benchmark/Set5/HR/a.png": b"archive version", "benchmark/Set5/HR/b.png": b"same",
        "benchmark/Set5/HR/c.png": b"new", "benchmark/Set14/HR/d.png": b"new set",
    })
    dest = tmp_path / "dest"
    _own_data(dest)
    proc = run_cli("download", "benchmarks", "--dest", str(dest), "--url", file_server.base, env=no_proxy_env(), check=True)
    assert (dest / "benchmark" / "MyOwnSet" / "keep.txt").read_text() == "mine"
    assert (dest / "benchmark" / "Set5" / "HR" / "a.png").read_bytes() == b"my edited copy"  # the user's wins
    assert (dest / "benchmark" / "Set5" / "HR" / "b.png").read_bytes() == b"same"
    assert (dest / "benchmark" / "Set5" / "HR" / "c.png").read_bytes() == b"new"
    assert (dest / "benchmark" / "Set14" / "HR" / "d.png").read_bytes() == b"new set"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept 1 existing file(s)" in warnings[0]
    assert str(dest / "benchmark" / "Set5" / "HR" / "a.png") in warnings[0] and "--overwrite" in warnings[0]
    assert (dest / ".downloads" / "benchmark.tar.done").is_file()
    assert sorted(p.name for p in dest.iterdir()) == [".downloads", "benchmark"]  # no temporary folder left
    # --overwrite: the archive's versions replace differing files; the user's other files stay
    again = run_cli("download", "benchmarks", "--dest", str(dest), "--url", file_server.base, "--overwrite",
                    env=no_proxy_env(), check=True)
    assert "already downloaded" not in again.stderr and "replaced 1 existing file(s)" in again.stderr
    assert not [line for line in again.stderr.splitlines() if line.startswith("warning:")]
    assert (dest / "benchmark" / "Set5" / "HR" / "a.png").read_bytes() == b"archive version"
    assert (dest / "benchmark" / "MyOwnSet" / "keep.txt").read_text() == "mine"
    assert (dest / "benchmark" / "Set14" / "HR" / "d.png").read_bytes() == b"new set"
    assert sorted(p.name for p in dest.iterdir()) == [".downloads", "benchmark"]


def test_overwrite_never_replaces_a_folder_or_writes_through_a_link(tmp_path):
    archive = tmp_path / "benchmark.tar"
    _tar(archive, {"benchmark/Set5/HR/a.png": b"x", "benchmark/notes": b"archive file"})
    dest = tmp_path / "dest"
    (dest / "benchmark" / "notes").mkdir(parents=True)  # the user's folder where the archive has a file
    (dest / "benchmark" / "notes" / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes: is a folder, but benchmark.tar has a file there"):
        safe_extract(archive, dest, overwrite=True)
    assert (dest / "benchmark" / "notes" / "mine.txt").read_text() == "mine"
    assert not (dest / "benchmark" / "Set5").exists()  # nothing moved before the refusal
    # a file the user replaced by a link: overwrite swaps the link itself, its target is untouched
    shutil.rmtree(dest / "benchmark" / "notes")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not in dest")
    (dest / "benchmark" / "notes").symlink_to(elsewhere)
    assert safe_extract(archive, dest) == ["benchmark"]  # without overwrite the link is kept
    assert (dest / "benchmark" / "notes").is_symlink()
    safe_extract(archive, dest, overwrite=True)
    assert not (dest / "benchmark" / "notes").is_symlink()
    assert (dest / "benchmark" / "notes").read_bytes() == b"archive file"
    assert elsewhere.read_text() == "not in dest"


def test_clash_of_kinds_refuses_before_moving_anything(tmp_path):
    archive = tmp_path / "benchmark.tar"
    _tar(archive, {"benchmark/Set5/HR/a.png": b"x", "benchmark/Set14/HR/b.png": b"y"})
    dest = tmp_path / "dest"
    (dest / "benchmark").mkdir(parents=True)
    (dest / "benchmark" / "Set5").write_text("a file where the archive has a folder")
    with pytest.raises(UserError, match=r"Set5: exists and is not a folder.*nothing was extracted"):
        safe_extract(archive, dest)
    assert (dest / "benchmark" / "Set5").read_text() == "a file where the archive has a folder"
    assert sorted(p.name for p in (dest / "benchmark").iterdir()) == ["Set5"]  # Set14 not moved in either
    assert sorted(p.name for p in dest.iterdir()) == ["benchmark"]
    # a symbolic link in DEST is never written through
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (dest / "benchmark" / "Set5").unlink()
    (dest / "benchmark" / "Set5").symlink_to(outside)
    with pytest.raises(UserError, match="is a symbolic link; refusing to extract"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_extracting_twice_is_idempotent(tmp_path):
    archive = tmp_path / "benchmark.tar"
    _tar(archive, {"benchmark/Set5/HR/a.png": b"x"}, [_link("benchmark/alias", "Set5")])
    dest = tmp_path / "dest"
    assert safe_extract(archive, dest) == ["benchmark"]
    assert safe_extract(archive, dest) == ["benchmark"]  # identical files and links: nothing to say
    assert (dest / "benchmark" / "alias" / "HR" / "a.png").read_bytes() == b"x"
