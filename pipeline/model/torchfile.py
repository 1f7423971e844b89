"""Loading a torch file safely, and saying in one line why one could not be loaded.

Every checkpoint load goes through :func:`load_weights_only`: ``torch.load(weights_only=True)``
refuses a pickle that would run code. What is kept apart here is the diagnosis of a failure,
which needs the file's bytes and torch's error texts, not the checkpoint format: a security
refusal (pickled objects that are not plain weights) is told apart from a file that is simply
not a PyTorch checkpoint (empty, text, another binary format, a truncated zip), and torch's
paragraphs of advice (some of it, ``weights_only=False``, the opposite of what to do with an
unknown file) become one line that names the cause.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.console import UserError

ONE_LINE_LIMIT = 300
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = b"\x80"  # a pickle of protocol >= 2: torch.save's legacy format (or a raw pickle)


def _clip(text: str, limit: int = ONE_LINE_LIMIT) -> str:
    """``text`` on one line, at most ``limit`` characters, never cut mid-word.

    Prefers ending at the last complete sentence that fits (torch's messages put the cause
    first and the advice after); otherwise cuts at a word boundary and marks it with ``…``.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
    if ends and ends[-1] >= limit // 4:
        return head[: ends[-1]]
    cut = head.rfind(" ", 0, limit)
    return (head[:cut] if cut > 0 else head[: limit - 1]).rstrip(" ,;:") + "…"


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return _clip(lines[0]) if lines else type(exc).__name__


def _refusal_reason(exc: BaseException) -> str | None:
    """The weights_only unpickler's own reason when it refused the file, else None.

    torch re-raises the unpickler's error ``from None`` inside paragraphs whose advice is to
    allow-list globals or pass ``weights_only=False`` (the opposite of what to do with an
    unknown file); the original error is still the exception's ``__context__``. Its first
    sentence (e.g. ``Unsupported global: GLOBAL print was not an allowed global by default.``)
    is what the user needs.
    """
    if not isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" not in str(exc):
        return None
    inner = exc.__context__
    text = " ".join(str(inner).split()) if isinstance(inner, pickle.UnpicklingError) else ""
    match = re.match(r"(.+?[.!?])(?=\s|$)", text)
    return _clip(match.group(1) if match else text, 200) or "rejected by the weights_only loader"


def _is_pickle_stream(path: Path) -> bool:
    """Whether the file opens with one complete pickle (opcodes parse up to STOP).

    Pickle protocols 0 and 1 are printable or arbitrary bytes with no magic number, so a text
    file cannot be told apart from an old-protocol pickle by its first bytes; parsing the
    opcodes (without executing any) can. Text that is not a pickle fails within a few bytes.
    """
    try:
        with open(path, "rb") as fh:
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(fh))
    except Exception:  # any parse failure (unknown opcode, truncated argument) means "no"
        return False


def _file_kind(path: Path) -> str:
    """What the bytes say: ``empty``, ``zip``, ``pickle``, ``text`` or ``binary``."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_PROTO) or _is_pickle_stream(path):
        return "pickle"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut by the 512-byte window is still text
        if exc.start < len(head) - 3:
            return "binary"
    return "binary" if b"\x00" in head else "text"


def _load_error(path: Path, exc: BaseException) -> UserError:
    """One line that tells a security refusal apart from a file that is simply not a checkpoint."""
    try:
        kind = _file_kind(path)
    except OSError as err:
        return UserError(f"{path}: cannot read the checkpoint: {err.strerror or err}")
    if kind == "empty":
        return UserError(f"{path}: not a readable PyTorch checkpoint: the file is empty")
    if kind in ("text", "binary"):
        looks = "a text file, e.g. JSON or YAML" if kind == "text" else "another binary format"
        return UserError(
            f"{path}: not a readable PyTorch checkpoint: it is not a PyTorch file at all "
            f"(neither a zip archive nor a binary pickle as torch.save writes; it looks like {looks})"
        )
    if kind == "zip" and not zipfile.is_zipfile(path):
        # torch reports this as a miniz error or a bare "[Errno 22]" depending on the length
        return UserError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): its zip archive "
            "has no end record, so the file was cut short (an interrupted copy or download?)"
        )
    reason = _refusal_reason(exc)
    if reason is not None:
        if reason.startswith("Unsupported operand"):
            what = ("uses pickle instructions that torch.save never writes for plain weights "
                    "(corrupt, or possibly code)")
        else:
            what = "contains pickled objects that are not plain weights (possibly code)"
        return UserError(
            f"{path}: refused to load: the file {what}; only tensors and plain data are "
            f"accepted ({reason})"
        )
    return UserError(
        f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_one_line(exc)}"
    )


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is one ``UserError`` line."""
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise UserError(f"{path}: not a checkpoint file (it is a directory or special file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable"
        raise _load_error(path, exc) from None
