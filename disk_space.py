"""Disk use of a run's checkpoints: how big one is, how many a run keeps, and whether the next fits.

A training checkpoint holds the model, its EMA and AdamW's two moments, all fp32: about
16 bytes per trainable parameter (SiT-XL/2 + REG: ~11 GB). ``--keep-last K`` keeps the newest K,
``--keep-every N`` also keeps every checkpoint whose step is a multiple of N (milestones). A new
checkpoint is written completely before older ones are pruned, so the folder briefly holds one more.

Free space is read with ``shutil.disk_usage`` (statvfs): it does not see per-user quotas, so a save
can still fail on a quota (EDQUOT) or a disk filled by others meanwhile; that failure is one line
too and leaves the previous checkpoint intact (checkpoint.Checkpointer).
"""
from __future__ import annotations

import shutil

import torch

SLACK = 1.02            # a checkpoint's size varies by a few KB (pickled args, RNG states); ask for 2% more


def human(n: float) -> str:
    """Bytes in decimal units, as df -H and file managers print them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def state_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state: what torch.save writes, less a small header."""
    if torch.is_tensor(value):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def training_checkpoint_bytes(model: torch.nn.Module) -> int:
    """A training checkpoint's size before it is written (the optimizer state may not exist yet):
    model and EMA state_dicts, plus AdamW's exp_avg and exp_avg_sq of each trainable parameter (fp32)."""
    weights = state_bytes(model.state_dict())
    moments = sum(2 * p.nelement() * 4 for p in model.parameters() if p.requires_grad)
    return 2 * weights + moments


def model_checkpoint_bytes(name: str, **config) -> int:
    """training_checkpoint_bytes of a named SiT size, built on the meta device (no memory, no time)."""
    from models.sit import create_model

    with torch.device("meta"):
        model = create_model(name, **config)
    return training_checkpoint_bytes(model)


def save_steps(max_steps: int, every: int, start: int = 0) -> list[int]:
    """The steps a run saves at after ``start``: multiples of ``every``, and the last step."""
    steps = list(range((start // every + 1) * every, max_steps + 1, every))
    if max_steps > start and (not steps or steps[-1] != max_steps):
        steps.append(max_steps)
    return steps


def kept_steps(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    """Which of ``steps`` stay after pruning: all (keep_last <= 0), else the newest keep_last and the milestones."""
    if keep_last <= 0:
        return list(steps)
    newest = set(steps[-keep_last:])
    return [s for s in steps if s in newest or (keep_every > 0 and s % keep_every == 0)]


def peak_count(max_steps: int, every: int, keep_last: int, keep_every: int) -> int:
    """The most checkpoints a run's folder holds at once (a new one is complete before pruning)."""
    held, peak = [], 0
    for step in save_steps(max_steps, every):
        held.append(step)
        peak = max(peak, len(held))
        held = kept_steps(held, keep_last, keep_every)
    return peak


def free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def room_problem(folder: str, need: int) -> str | None:
    """None when ``folder`` has ``need`` bytes (plus SLACK) free, else what is missing, in words."""
    free = free_bytes(folder)
    if free >= need * SLACK:
        return None
    return f"needs ~{human(need * SLACK)} but {folder} has {human(free)} free"
