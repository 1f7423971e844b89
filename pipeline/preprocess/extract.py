"""Safe extraction of a zip or tar archive into a destination folder that may hold user files.

Extraction never writes outside the destination: every member is checked before anything is
written (absolute paths, ``..``, links pointing outside, device files, hard links to anything
but an earlier regular file -> the whole archive is refused), files are unpacked into a
temporary folder inside the destination, every symbolic link is then resolved on disk (a chain
of links that climbs out is refused too), and only then is the tree moved into place. No
folder already there is ever deleted or replaced: the archive's tree is merged into it, so the
user's own files beside the archive's stay. An existing file that differs from the archive's
is kept (with a warning) unless ``overwrite`` is given, which replaces such files (never
folders). A corrupt archive fails with one line.

Separate from :mod:`.http_fetch` (getting the archive) and :mod:`.download` (the command):
this is the security-relevant part, and it takes any local archive.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import console
from pipeline.console import UserError

CHUNK = 1 << 20  # copy buffer for one member


def _unsafe(archive: Path, name: str, why: str) -> UserError:
    return UserError(f"{archive}: refused, member {name!r} {why}; nothing was extracted")


def _inside(root: Path, target: str) -> bool:
    resolved = os.path.normpath(os.path.join(root, target))
    return resolved == str(root) or resolved.startswith(str(root) + os.sep)


def _check_name(archive: Path, root: Path, name: str) -> str:
    """The member's normalised relative path, or UserError if it could escape `root`."""
    if not name or "\x00" in name:
        raise _unsafe(archive, name, "has an empty or invalid name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _unsafe(archive, name, "has an absolute path")
    parts = re.split(r"[/\\]+", name)
    if ".." in parts:
        raise _unsafe(archive, name, "climbs out of the destination ('..')")
    rel = "/".join(p for p in parts if p not in ("", "."))
    if not _inside(root, rel):
        raise _unsafe(archive, name, "points outside the destination")
    return rel


def _plan_tar(archive: Path, root: Path, tf: tarfile.TarFile) -> list[tuple[tarfile.TarInfo, str]]:
    """Check every member before anything is written. Link targets are only text here; where a
    symbolic link really leads is checked on disk after extraction (see :func:`_check_symlinks`)."""
    plan = []
    files: set[str] = set()  # regular files seen so far: the only valid hard-link targets
    for m in tf.getmembers():
        rel = _check_name(archive, root, m.name)
        if m.issym():
            target = m.linkname
            if not target or os.path.isabs(target) or target.startswith("\\"):
                raise _unsafe(archive, m.name, f"is a link to an absolute path ({target!r})")
            if not _inside(root, os.path.join(root, os.path.dirname(rel), target)):
                raise _unsafe(archive, m.name, f"is a link pointing outside the destination ({target!r})")
        elif m.islnk():
            # A hard link names an earlier member. Only a regular file may be its source: a hard
            # link "to" a symbolic link would copy whatever that link reaches, possibly outside.
            if not m.linkname or os.path.isabs(m.linkname):
                raise _unsafe(archive, m.name, f"is a link to an absolute path ({m.linkname!r})")
            source = _check_name(archive, root, m.linkname)
            if source not in files:
                raise _unsafe(archive, m.name, f"is a hard link to {m.linkname!r}, which is not a regular file before it")
        elif not (m.isfile() or m.isdir()):
            raise _unsafe(archive, m.name, "is a device, FIFO or other special file")
        if m.isfile():
            files.add(rel)
        if rel:
            plan.append((m, rel))
    _no_members_under_links(archive, plan)
    return plan


def _no_members_under_links(archive: Path, plan: list[tuple[tarfile.TarInfo, str]]) -> None:
    """Refuse members placed under a symbolic link member, and names given twice to a link.

    Members are written before any link exists, so such a member would not go through the link
    here; but the archive means it to (that is how an extractor following links is tricked
    into writing outside), and creating the link over the folder it made would fail later with
    a vague error. Refusing names the problem and leaves DEST untouched.
    """
    links = {rel for m, rel in plan if m.issym()}
    if not links:
        return
    seen: set[str] = set()
    for m, rel in plan:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in links:
                raise _unsafe(archive, m.name, f"would be written through the symbolic link member {prefix!r}")
        if rel in links and rel in seen:
            raise _unsafe(archive, m.name, "names a symbolic link that another member also uses")
        seen.add(rel)


def _plan_zip(archive: Path, root: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    plan = []
    for m in zf.infolist():
        rel = _check_name(archive, root, m.filename)
        kind = stat.S_IFMT(m.external_attr >> 16)  # 0 when the zip carries no Unix file type
        if kind == stat.S_IFLNK:
            raise _unsafe(archive, m.filename, "is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _unsafe(archive, m.filename, "is a special file")
        if rel:
            plan.append((m, rel))
    return plan


def _no_links_on_path(archive: Path, root: Path, rel: str) -> None:
    """Refuse to write through a symlink that an earlier member created (defence in depth)."""
    cur = root
    for part in rel.split("/")[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise _unsafe(archive, rel, f"would be written through the symbolic link {cur.relative_to(root)}")


def _check_symlinks(archive: Path, work: Path, links: list[str]) -> None:
    """Every extracted symbolic link must resolve, on disk, to something that exists inside
    `work`. Checking the target text is not enough: ``a -> d/l/../..`` looks inside, but if
    ``d/l`` is itself a link to ``..`` the kernel climbs out (links are followed before ``..``
    is applied). realpath follows the chain the same way; dangling links are refused too,
    since whatever later appears under their target name would decide where they lead."""
    for rel in links:
        try:
            real = os.path.realpath(work / rel, strict=True)
        except OSError:
            raise _unsafe(archive, rel, "is a symbolic link that leads nowhere (dangling or a loop)") from None
        if not _inside(work, real):
            raise _unsafe(archive, rel, "is a symbolic link that resolves outside the destination")


def _extract_tar(archive: Path, work: Path, tf: tarfile.TarFile) -> None:
    tplan = _plan_tar(archive, work, tf)
    _check_space(archive, work.parent, sum(m.size for m, _ in tplan if m.isfile()))
    hard, soft = [], []
    with console.progress_bar(f"extract {archive.name}", total=len(tplan), unit="file") as bar:
        for m, rel in tplan:
            target = work / rel
            _no_links_on_path(archive, work, rel)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            else:
                (soft if m.issym() else hard).append((m, rel))  # after all files, so targets exist
            bar.advance()
    # Hard links first, while no symbolic link exists yet: each becomes a copy of a regular file
    # extracted above. Then the symbolic links, never created through another one.
    for m, rel in hard:
        source = work / _check_name(archive, work, m.linkname)
        _no_links_on_path(archive, work, rel)
        if not stat.S_ISREG(os.lstat(source).st_mode):
            raise _unsafe(archive, m.name, "is a hard link to something that is not a regular file")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, work / rel, follow_symlinks=False)
    for m, rel in soft:
        _no_links_on_path(archive, work, rel)
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(m.linkname, work / rel)
    _check_symlinks(archive, work, [rel for _, rel in soft])


def _extract_zip(archive: Path, work: Path, zf: zipfile.ZipFile) -> None:
    zplan = _plan_zip(archive, work, zf)
    _check_space(archive, work.parent, sum(m.file_size for m, _ in zplan))
    with console.progress_bar(f"extract {archive.name}", total=len(zplan), unit="file") as bar:
        for m, rel in zplan:
            target = work / rel
            _no_links_on_path(archive, work, rel)
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            bar.advance()


def _same_file(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    return filecmp.cmp(a, b, shallow=False)


@dataclass
class _MergePlan:
    moves: list[tuple[Path, Path]]  # (extracted path, final path: new, or a file to replace)
    kept: list[Path]  # existing files that differ from the archive's: left as they are
    replaced: list[Path]  # existing files that differ, replaced (only with overwrite)


def _plan_merge(archive: Path, work: Path, dest: Path, overwrite: bool = False) -> _MergePlan:
    """How to bring the extracted tree into `dest` without deleting any folder.

    Whole subtrees that are new are moved with one rename; folders that exist already are
    merged into, so whatever else the user keeps in them stays. An existing file equal to the
    archive's is left alone; a differing one is kept (the user's data wins) and reported, or
    with `overwrite` replaced by a rename (a symbolic link is replaced itself, never written
    through). Nothing is extracted through a symbolic link in `dest`, and a clash of kinds (a
    file where the archive has a folder, or the reverse) refuses the whole archive before
    anything moves.
    """
    plan = _MergePlan([], [], [])

    def walk(src: Path, dst: Path) -> None:
        for entry in sorted(src.iterdir()):
            final = dst / entry.name
            if not os.path.lexists(final):
                plan.moves.append((entry, final))
            elif entry.is_dir() and not entry.is_symlink():
                if final.is_symlink():
                    raise UserError(
                        f"{final}: is a symbolic link; refusing to extract {archive.name} through it "
                        "(move it away or choose another --dest); nothing was extracted"
                    )
                if not final.is_dir():
                    raise UserError(
                        f"{final}: exists and is not a folder, but {archive.name} has a folder there "
                        "(move it away and rerun); nothing was extracted"
                    )
                walk(entry, final)
            elif final.is_dir() and not final.is_symlink():
                raise UserError(
                    f"{final}: is a folder, but {archive.name} has a file there "
                    "(move it away and rerun); nothing was extracted"
                )
            elif _same_file(entry, final):
                continue
            elif overwrite:
                plan.replaced.append(final)
                plan.moves.append((entry, final))
            else:
                plan.kept.append(final)

    walk(work, dest)
    return plan


def safe_extract(archive: Path, dest: Path, overwrite: bool = False) -> list[str]:
    """Extract a zip or tar archive under `dest`; returns its top-level names.

    Existing folders in `dest` are never deleted or replaced: the archive's tree is merged into
    them (see :func:`_plan_merge`). Existing files that differ from the archive's are kept with
    a warning, or replaced when `overwrite` is set.
    """
    top, kept, _ = extract(archive, dest, overwrite)
    if kept:
        console.warn(kept_message(archive, kept, "extract again with overwrite=True"))
    return top


def kept_message(archive: Path, kept: list[Path], how: str) -> str:
    more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
    return (
        f"kept {len(kept)} existing file(s) that differ from the ones in {archive.name}: {kept[0]}{more} "
        f"(to replace them with the archive's versions, {how})"
    )


def extract(archive: Path, dest: Path, overwrite: bool = False) -> tuple[list[str], list[Path], list[Path]]:
    """(top-level names, existing files kept because they differ, existing files replaced):
    :func:`safe_extract`'s work."""
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(dest, f".extract-{archive.name}.tmp").resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _extract_zip(archive, work, zf)
        else:
            try:
                tf = tarfile.open(archive)  # noqa: SIM115 - closed below
            except tarfile.TarError:
                raise UserError(f"{archive}: not a zip or tar archive (corrupt download?)") from None
            with tf:
                _extract_tar(archive, work, tf)
        top = sorted(p.name for p in work.iterdir())
        for name in top:
            if name == ".downloads" or name.startswith(".extract-"):
                raise _unsafe(archive, name, "would overwrite sr-pipeline's own download state")
        plan = _plan_merge(archive, work, work.parent, overwrite)
        for src, final in plan.moves:
            os.replace(src, final)
        return top, plan.kept, plan.replaced
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{archive}: corrupt archive ({exc})") from None
    except OSError as exc:
        raise UserError(f"{dest}: extraction failed ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_space(archive: Path, dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise UserError(f"{archive}: needs {needed / 1e9:.2f} GB to extract but {dest} has {free / 1e9:.2f} GB free")
