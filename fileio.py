"""Files that are never half-written, and the few file helpers every script shares.

Every output of the project (checkpoints, sample shards and batches, manifests, metrics, caches)
goes through ``atomic_open``: the bytes land in a temporary file in the destination folder,
are flushed to disk, get the permissions the user's umask gives any new file (mkstemp's
private 0600 would hide checkpoints from colleagues on a shared cluster), and are renamed over
the destination. A reader therefore sees the old file or the new one, never a part.

Temporary files are named ``.tmp-<host>-<pid>-<random>~<tag><ext>`` (tag: a short hash of the
destination's name), so a run can find the ones that earlier, killed processes left behind
(``remove_stale_temp_files``), in a shared folder only those of its own destinations, without
touching anything that is not ours.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import tempfile

TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"^\.tmp-(?P<host>[^/]*)-(?P<pid>\d+)-[^/]*$")


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _own_prefix() -> str:
    return f"{TMP_PREFIX}{_host()}-{os.getpid()}-"


def _temp_suffix(path) -> str:
    """'~<8 hex of the destination's name><its extension>': which file a temp file was meant to become."""
    name = os.path.basename(os.fspath(path))
    return f"~{hashlib.sha256(name.encode()).hexdigest()[:8]}{os.path.splitext(name)[1]}"


def default_file_mode() -> int:
    """0o666 & ~umask: what open() gives a new file (0o644 under the usual umask 022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it, then put it back
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, fsync: bool = True):
    """``with atomic_open(path) as f: f.write(...)``: binary handle on a temp file that replaces
    ``path`` when the block ends without an exception (and is removed if it raises)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_own_prefix(), suffix=_temp_suffix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)


def atomic_write_json(path, obj, indent: int | None = 2) -> None:
    """Strict JSON (NaN and infinities are refused, not written as bare tokens)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, allow_nan=False) + "\n").encode("utf-8"))


class HashingWriter:
    """A binary file handle that hashes (sha256) and counts what passes through it, so a file's
    digest costs no second read. torch.save writes its zip strictly in order (no seek), which
    tests/test_checkpoint.py checks against file_sha256. A write's OSError (ENOSPC, EDQUOT) is
    kept: torch's zip writer replaces it with 'unexpected pos ...'; atomic_torch_save raises it instead."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path) -> tuple[str, int]:
    """torch.save through atomic_open; returns (sha256 hex, bytes) of what was written."""
    import torch

    with atomic_open(path) as f:
        out = HashingWriter(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    return out.sha256.hexdigest(), out.bytes


def atomic_save_npz(path, **arrays) -> None:
    import numpy as np

    with atomic_open(path) as f:
        np.savez(f, **arrays)


def npy_bytes(array) -> bytes:
    """One array as the bytes of a .npy file."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def file_sha256(path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def is_temp_file(name: str) -> bool:
    return _TMP_RE.match(os.path.basename(name)) is not None


def remove_stale_temp_files(folder, recursive: bool = False, targets=None) -> list[str]:
    """Delete temp files that processes other than this one left in ``folder`` (a kill -9 during a
    write leaves them). Call it once at the start of a job, before any rank writes there; only
    files matching our own temp pattern are touched, and with ``targets`` (destination paths in a
    folder other jobs write too) only the temp files meant to become one of them. Returns the
    removed paths."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    own = _own_prefix()
    ends = None if targets is None else tuple(_temp_suffix(t) for t in targets)
    removed = []
    walker = os.walk(folder) if recursive else [(folder, None, os.listdir(folder))]
    for root, _, names in walker:
        for name in names:
            path = os.path.join(root, name)
            if (is_temp_file(name) and not name.startswith(own) and (ends is None or name.endswith(ends))
                    and os.path.isfile(path)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed
