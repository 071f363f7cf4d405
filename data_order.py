"""The order in which training reads the data, and its place in it: what resume restores of the data.

Epoch e is randperm(N) seeded with seed + e, cut into whole global micro-batches; each process takes
its slice of every micro-batch. The order is a function of (seed, processes, batch per process)
only, so the position (micro-batches consumed = step x accumulation) is all a resume needs, and the
loader restarts there without reading the data it skips.
"""
from __future__ import annotations

import logging

import torch

from dataset import DATA_ERRORS
from preemption import ignore_signals_in_worker
from runtime import last_line

logger = logging.getLogger("train")


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, sharded, resumable sample order.

    Epoch e is randperm(N) seeded with seed + e, cut to whole global micro-batches; micro-batch k
    of the epoch gives rank r the slice [k*W*B + r*B, k*W*B + (r+1)*B). The stream depends only on
    (seed, world size, batch), so it can restart at any micro-batch without reading data."""

    def __init__(self, n, local_batch, rank, world, seed, start_microbatch=0):
        self.n, self.b, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.per_epoch = microbatches_per_epoch(n, local_batch, world)
        self.start = start_microbatch

    def __iter__(self):
        epoch, k = divmod(self.start, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for j in range(k, self.per_epoch):
                lo = j * self.b * self.world + self.rank * self.b
                yield from perm[lo:lo + self.b].tolist()
            epoch, k = epoch + 1, 0

    def __len__(self):  # infinite stream; DataLoader only needs this for progress estimates
        return 2 ** 62


def microbatches_per_epoch(n: int, local_batch: int, world: int) -> int:
    """Whole global micro-batches in one pass over n images: the release's loader length per process
    (drop_last, then split over the processes: floor(floor(n / local_batch) / world), the same number)."""
    per_epoch = n // (local_batch * world)
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} images is smaller than one global micro-batch ({local_batch * world})")
    return per_epoch


def optimizer_steps_per_epoch(n: int, local_batch: int, world: int, accumulation: int) -> int:
    """The release's optimizer steps per epoch: Accelerate closes an accumulation at the end of its
    loader, so a last, shorter one counts as a step: ceil(micro-batches / accumulation)."""
    return -(-microbatches_per_epoch(n, local_batch, world) // accumulation)


class DataPosition:
    """The loader's place in the stream: micro-batches consumed = step x accumulation (``state``
    is the TrainState). The stream is a function of (seed, processes, batch per process), so the
    position is all resume needs."""

    def __init__(self, state, accumulation: int, world: int, local_batch: int, seed: int):
        self.state, self.accumulation, self.layout = state, accumulation, dict(world=world, local_batch=local_batch, seed=seed)

    @property
    def microbatch(self) -> int:
        return self.state.step * self.accumulation

    def state_dict(self) -> dict:
        return {"microbatch": self.microbatch, **self.layout}

    def load_state_dict(self, saved: dict | None) -> None:
        """The step (restored with the rest) fixes the position; a changed layout gives another order."""
        if saved and {k: saved.get(k) for k in self.layout} != self.layout:
            logger.warning(f"the checkpoint's data layout {saved} differs from this run's {self.layout}: "
                           "the data order after resume is a different (equally random) one")


def make_loader(dataset, local_batch: int, rank: int, world: int, seed: int, start_microbatch: int,
                num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """This process's stream of micro-batches, starting at ``start_microbatch``."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch,
        sampler=ResumableSampler(len(dataset), local_batch, rank, world, seed, start_microbatch=start_microbatch),
        num_workers=num_workers, pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps iter() off the global RNG (exact resume)
        worker_init_fn=ignore_signals_in_worker,       # a SLURM signal stops the run, not its workers
    )


def next_batches(data, n: int, step: int) -> list:
    """The micro-batches of the next step; a damaged file stops the run naming it and the step."""
    try:
        return [next(data) for _ in range(n)]
    except DATA_ERRORS as e:     # raised in a loader worker, its message wrapped in the worker's traceback
        raise type(e)(f"{last_line(e)} (while reading the data of step {step + 1})") from None
