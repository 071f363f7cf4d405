"""Processes, ranks and devices: ``Procs`` starts the process group of the scripts that do not run
under Accelerate (generate.py, preprocessing/dataset_tools.py, evaluations) and gives training,
whose group Accelerate starts, the same collectives (``Procs.joined``); plus the few runtime
helpers every script shares (one-line errors, downloads done once per node, clearing
Accelerate's process-wide state).

Under a launcher (torchrun, ``python -m torch.distributed.launch``, accelerate launch, SLURM
with those variables set) a process group is created: NCCL when the device is a GPU, gloo on
the CPU. Alone, a process is rank 0 of 1 and nothing is initialised.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

# How long ranks wait for each other at a collective before the job is aborted. Checkpoints are
# written on a background thread (checkpoint.Checkpointer) and no collective waits for the
# write, so what remains is a rank waiting for the slowest one's batch, a first compile, or an
# evaluation's uneven share: minutes, not hours. 30 minutes covers those with room to spare and
# keeps a hung rank from idling every GPU of the job for two hours (PyTorch's default is 10).
DEFAULT_TIMEOUT_MIN = 30


def one_line(e: BaseException) -> str:
    """An exception as one line: its message with whitespace folded, or its type name."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def last_line(e: BaseException) -> str:
    """The useful line of an error raised in a DataLoader worker (its message arrives wrapped in the
    worker's traceback): the last non-empty line, without the exception's type name."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].split(f"{type(e).__name__}: ", 1)[-1] if lines else type(e).__name__


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) when alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_launcher(script: str = "train.sh") -> None:
    """Refuse N processes that no launcher tied together: ``srun`` with several tasks starts N
    copies of the script and sets SLURM_PROCID / SLURM_STEP_NUM_TASKS but not RANK / WORLD_SIZE,
    so each copy would be a separate one-process run writing the same folder. ``script`` is what
    the message tells to run under srun (train.sh, eval.sh). Raises ValueError with one line saying
    what to run instead."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        raise ValueError(
            f"srun started {tasks} tasks but no launcher set RANK / WORLD_SIZE: they would be {tasks} separate runs "
            f"writing one folder; run one task per node that starts the launcher (srun --ntasks-per-node=1 bash "
            f"{script} ..., or srun --ntasks-per-node=1 torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 ...), "
            "or export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR MASTER_PORT")


def resolve_device(flag: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this process. None / "cuda": cuda:LOCAL_RANK if a GPU exists (else the CPU
    for None); "cuda:N" is refused under a launcher with several processes, where it would put
    every rank on one GPU. Raises ValueError with a one-line message."""
    try:
        device = torch.device(flag) if flag else None
    except RuntimeError:
        raise ValueError(f"--device {flag!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {flag} but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", local_rank % count)
    if world_size > 1 and device.index != local_rank % count:
        raise ValueError(f"--device {flag} under a launcher with {world_size} processes would put every rank on "
                         f"one GPU; use --device cuda (each rank takes cuda:LOCAL_RANK)")
    return device


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files (ulimit -n) to its hard limit, which needs no
    privilege: loader workers inherit it. Returns (soft, hard) after, or None where there are no
    such limits (Windows) or the call is refused."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # an unlimited hard limit is left alone: some systems refuse it as a soft limit for files
        if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None


class Procs:
    """Rank, world size and device of this process, and the collectives the scripts need."""

    def __init__(self, device: str | None = None, timeout_min: float = DEFAULT_TIMEOUT_MIN):
        self.rank, self.world_size, self.local_rank = launcher_env()
        self.device = resolve_device(device, self.local_rank, self.world_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.distributed = self.world_size > 1
        self._host_group = None
        # A caller that already set up torch.distributed (tests calling main() twice) keeps it.
        self.owns_group = self.distributed and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_min))
        if self.distributed:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def joined(cls, rank: int, world_size: int, local_rank: int, device) -> "Procs":
        """The Procs of a job whose process group was started by another library (Accelerate,
        for training): the same collectives, and the group is left to its owner."""
        self = cls.__new__(cls)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.distributed, self.owns_group = torch.device(device), world_size > 1, False
        self._host_group = None
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (nothing is copied to
        the ranks that would only throw it away)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank: one all-reduce (max) of one
        integer on the host, over a gloo group (created at the first call, which every rank
        makes at the same point), so a NCCL job does not wait for its GPU stream."""
        if not self.distributed:
            return bool(flag)
        if self._host_group is None:
            self._host_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                                else dist.new_group(backend="gloo"))
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._host_group)
        return bool(t.item())

    @contextlib.contextmanager
    def main_first(self):
        """Run the block on each node's local rank 0 first, then on the other ranks (downloads)."""
        with local_main_first(self.local_rank, self.barrier):
            yield

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


@contextlib.contextmanager
def local_main_first(local_rank: int, barrier):
    """The block runs on local rank 0, then (after a barrier) on the others: torch.hub and the
    Hugging Face cache move and delete folders while they download, so ranks that fill an empty
    cache at the same time break each other's files. ``barrier`` is the job's barrier."""
    if local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if local_rank == 0:
            barrier()


def forget_process_state() -> None:
    """Clear Accelerate's process-wide state (it outlives the Accelerator); the process group, if
    any, stays for the process's other work."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
