"""Integrity records: a file's sha256, written next to it once the file is complete, checked before
the file is trusted.

``{name}.sha256`` holds one line in ``sha256sum``'s format (``<64 hex>  <name>``), so
``cd checkpoints && sha256sum -c 0040000.pt.sha256`` checks a file by hand too. The record is
written atomically AFTER the file it describes (its digest is computed while the file is written:
no second read), and an older record of the same name is removed BEFORE the new file replaces the
old one, so a record never describes a file other than its own: a file without a record is one
written before records existed (or by the release), or one whose writer died between the two renames.

Why a hash and not only torch's own checks: checkpoints are loaded with ``mmap=True`` (8 ranks do not
each hold an XL checkpoint in memory), and memory-mapped loading reads tensors without checking the
zip's CRC-32s, so flipped bytes inside a tensor load silently (issue 26). Checking means reading the
file once: about 10 s for an 11 GB SiT-XL/2 checkpoint at ~1 GB/s, once per resume.
"""
from __future__ import annotations

import contextlib
import os
import re

from fileio import atomic_write_bytes, file_sha256

SUFFIX = ".sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class IntegrityError(ValueError):
    """A file does not match its integrity record (or its record is unreadable); the message says
    which, naming the record (the caller names the file)."""


def record_path(path: str) -> str:
    return os.fspath(path) + SUFFIX


def write_record(path: str, sha256: str) -> None:
    atomic_write_bytes(record_path(path), f"{sha256}  {os.path.basename(path)}\n".encode())


def remove_record(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(record_path(path))


def read_record(path: str) -> str | None:
    """The sha256 recorded for ``path``; None when it has no record. IntegrityError if unreadable."""
    try:
        with open(record_path(path), "rb") as f:
            text = f.read(4096).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    m = _LINE.match(text)
    if not m or m.group(2) != os.path.basename(path):
        raise IntegrityError(f"its integrity record {os.path.basename(record_path(path))} is unreadable")
    return m.group(1)


def verify(path: str) -> bool:
    """True when ``path`` matches its record, False when it has none; IntegrityError when it differs."""
    expected = read_record(path)
    if expected is None:
        return False
    if file_sha256(path) != expected:
        raise IntegrityError(f"its sha256 differs from its integrity record {os.path.basename(record_path(path))}")
    return True
