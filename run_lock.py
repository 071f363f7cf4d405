"""The run folder's lock: one run at a time in ``{output-dir}/{exp-name}``.

Two runs started on one folder would overwrite each other's checkpoints, log every step twice,
and the newer one's start-up cleanup would delete the older one's in-flight temporary files.
So rank 0 takes ``{exp}/.lock`` before anything is written there (before the stale-temp-file
cleanup), and a second run is refused in one line naming the holder.

    {exp}/.lock   JSON: host, pid, run id, start time; its mtime is the holder's heartbeat

fcntl/flock locks are unreliable on NFS and Lustre (silently local, or not supported), and a
lock held by a dead node would never be released; so the lock is a file created with O_EXCL
(atomic on NFSv3+ and on the parallel file systems clusters use) whose mtime rank 0 refreshes
every ``HEARTBEAT_S`` from a background thread. A lock is stale, and is taken over with a
warning, when
  - its holder ran on this host and its pid is gone (a killed run), or
  - its heartbeat is older than ``STALE_AFTER_S`` (a dead node, seen from another host), or
  - it was written by an earlier segment of this SLURM job (the same job id, a lower
    SLURM_RESTART_COUNT: a requeued job never runs two segments at once).
Every rank of a job shares rank 0's lock (the run id names the job: SLURM_JOB_ID, torchrun's
rendezvous id, else a random id). A lock that is wrongly thought alive (a reused pid, a clock
gone wrong) is removed by hand: the refusal says how.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class FolderInUse(RuntimeError):
    """Another live run holds the folder; the message is one line."""


def run_id() -> str:
    """An id for every process of this job (the launcher's when it has one)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    return uuid.uuid4().hex[:12]


def segment() -> int:
    """Which segment of a requeued SLURM job this is (0 for the first, and outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, another user's
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                    # half-written by a holder killed while creating it


class RunLock:
    """``acquire()`` takes the folder or raises FolderInUse; ``release()`` gives it back (only if
    the lock is still ours). Only rank 0 of a job holds it."""

    def __init__(self, folder: str, run: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.folder, self.path, self.run = folder, os.path.join(folder, LOCK_NAME), run
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None          # why a stale lock was replaced (for the log)

    # ---------------------------------------------------------------- taking it
    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            holder = _read(self.path)
            if holder is None:
                continue                                # released meanwhile: try again
            why = self.stale_reason(holder)
            if why is None:
                raise FolderInUse(self.describe(holder))
            if self._break(holder):
                self.took_over = why
        raise FolderInUse(f"{self.folder} is being locked and unlocked by another run at the same time; "
                          "check that no other run uses this --exp-name")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dict(host=self.host, pid=self.pid, run_id=self.run, segment=segment(), started=time.time()), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder``'s lock is stale, or None when its run may be alive."""
        age = self.heartbeat_age()
        if (holder.get("run_id") == self.run and self.run.startswith("slurm-")
                and isinstance(holder.get("segment"), int) and holder["segment"] < segment()):
            return f"an earlier segment of this SLURM job ({self.run}, restart {holder['segment']}) left it"
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        if age is not None and age > self.stale_after_s:
            return f"its heartbeat is {age / 60:.0f} minutes old"
        return None

    def _break(self, holder: dict) -> bool:
        """Move the stale lock aside; if a live run took the folder meanwhile (its lock, not the
        stale one, was moved), put that lock back. True when the stale lock is gone."""
        aside = f"{self.path}.stale-{self.host}-{self.pid}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if _read(aside) != holder:
            with contextlib.suppress(OSError):
                os.rename(aside, self.path)
            return False
        with contextlib.suppress(OSError):
            os.remove(aside)
        return True

    def heartbeat_age(self) -> float | None:
        try:
            return time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None

    def describe(self, holder: dict) -> str:
        age = self.heartbeat_age()
        started = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        beat = f"last heartbeat {age:.0f} s ago" if age is not None else "no heartbeat"
        return (f"{self.folder} is in use by another run (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"run {holder.get('run_id', '?')}, started {when}, {beat}); use another --exp-name, or, if that run "
                f"is truly dead, delete {self.path}")

    # ---------------------------------------------------------------- holding it
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def held(self) -> bool:
        holder = _read(self.path)
        return bool(holder) and holder.get("pid") == self.pid and holder.get("host") == self.host \
            and holder.get("run_id") == self.run

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self.held():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)


# The locks this process holds, released by ``release_held`` when train.main returns or fails (a
# run that fails while it is being built never gets to its own clean-up).
_HELD: list[RunLock] = []


def hold(folder: str, run: str) -> RunLock:
    for earlier in [h for h in _HELD if os.path.abspath(h.folder) == os.path.abspath(folder)]:
        _HELD.remove(earlier)        # an earlier run in this process built here (training_run.build called
        earlier.release()            # directly, without train.main's clean-up): runs in one process are sequential
    lock = RunLock(folder, run)
    lock.acquire()
    _HELD.append(lock)
    return lock


def release_held() -> None:
    while _HELD:
        _HELD.pop().release()
