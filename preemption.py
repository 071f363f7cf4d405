"""Preemption: a run that is told to stop (a SLURM time limit or preemption, SLURM's ``--signal``,
Ctrl-C) finishes its step, writes one checkpoint and exits with ``EXIT_PREEMPTED`` (3), so the
rerun of the same command resumes bit for bit from that step instead of losing up to a
checkpoint interval.

    SIGTERM   SLURM's time limit and preemption (then SIGKILL after KillWait, 30 s by default);
              torchrun forwards it to its workers (and kills them 30 s later)
    SIGUSR1   SLURM's early warning: sbatch --signal=USR1@180 sends it 3 minutes before the limit
    SIGINT    Ctrl-C; a second Ctrl-C aborts at once (the checkpoint write is atomic, so the
              previous checkpoint is intact whatever happens)

The handler only sets a flag: a signal never interrupts a step or a checkpoint write, and a second
SIGTERM/SIGUSR1 during the save changes nothing. At every step boundary all ranks combine their
flags (``Procs.any``: one all-reduce of one integer on the host, no GPU sync), so they stop at the
same step even when the signal reached only some of them, and every rank takes part in the save's
collectives: no rank saves alone, none waits in a collective the others left. The launchers
(torchrun, accelerate launch) exit 1 when a worker exits 3; ``{exp}/preempted.json`` (written on
preemption, removed when the next segment starts) tells a job script that the stop was a
preemption: train.sh exits 3 then.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from fileio import atomic_write_json

logger = logging.getLogger("train")

EXIT_PREEMPTED = 3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MARKER = "preempted.json"


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint; the message is one line."""
    exit_code = EXIT_PREEMPTED


class StopRequest:
    """Signal handlers that set a flag; ``requested()`` is the step-boundary check (a collective:
    every rank calls it at the same steps). ``close()`` puts the previous handlers back."""

    def __init__(self, procs, signals=SIGNALS):
        self.procs, self.received = procs, None
        self._previous = {}
        for sig in signals:
            with contextlib.suppress(ValueError):        # not the main thread: no handlers, no flag
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            if signum == signal.SIGINT:                      # the next Ctrl-C aborts as usual
                signal.signal(signal.SIGINT, signal.default_int_handler)
            else:
                signal.signal(signum, self._handle)

    def requested(self) -> bool:
        """True on every rank when any rank has received a signal (one tiny all-reduce)."""
        return self.procs.any(self.received is not None)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)
        self._previous = {}


def ignore_signals_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of the job step and Ctrl-C the
    whole process group; a loader worker killed by them would end the run with a 'worker killed'
    error before it could save. The workers ignore SIGUSR1 (SLURM's --signal, the advised warning) and
    Ctrl-C; not SIGTERM, which is how the loader (and Python at exit) stops its workers: a worker deaf
    to it would keep the finished run from exiting."""
    for sig in SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)


def marker_path(exp_dir: str) -> str:
    return os.path.join(exp_dir, MARKER)


def clear_marker(exp_dir: str) -> None:
    """A new segment of the run starts: the previous one's preemption is resolved."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker_path(exp_dir))


def stop(run, why: str, saved: str | None) -> None:
    """After the checkpoint of this step is written (``saved``: its path, on rank 0): the marker,
    one line, and ``Preempted`` on every rank."""
    step = run.state.step
    line = (f"preempted by {why} at step {step}: checkpoint {saved} written; rerun the same command to resume "
            f"(exit status {EXIT_PREEMPTED})")
    if run.accelerator.is_main_process:
        atomic_write_json(marker_path(run.exp_dir), dict(step=step, signal=why, checkpoint=saved, time=time.time()))
        logger.info(line)
    raise Preempted(line)
