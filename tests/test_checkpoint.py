"""checkpoint.Checkpointer and fileio: background atomic saves, what a failed save says and keeps,
the choice of checkpoint on resume, stale temp files, permissions."""
import errno
import os
import stat

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError, Checkpointer, checkpoint_paths
from fileio import atomic_write_bytes, remove_stale_temp_files


class Box:
    """A thing that saves and loads itself."""

    def __init__(self, value):
        self.w = torch.full((4,), float(value))

    def state_dict(self):
        return {"w": self.w}


def test_save_snapshots_now_and_writes_in_the_background(tmp_path):
    ck = Checkpointer(str(tmp_path), log=lambda m: None)
    box = Box(1)
    path = ck.save(5, {"model": box, "steps": 5, "ema": None})
    box.w.add_(100)                               # training goes on changing the live tensors
    ck.wait()
    saved = checkpoint.load_checkpoint(path)
    assert torch.equal(saved["model"]["w"], torch.ones(4)) and saved["steps"] == 5 and saved["ema"] is None
    assert os.path.basename(path) == "0000005.pt"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        ck = Checkpointer(str(tmp_path), background=False, log=lambda m: None)
        path = ck.save(1, {"model": Box(0), "steps": 1})
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    finally:
        os.umask(old)
    for p in (path, tmp_path / "x.json"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(str(tmp_path), log=lambda m: None)
    first = ck.save(1, {"model": Box(1), "steps": 1})
    ck.wait()

    def full_disk(obj, path):
        open(os.path.join(tmp_path, ".tmp-host-1-partial.pt"), "wb").write(b"half")  # what a crash leaves
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "atomic_torch_save", full_disk)
    ck.save(2, {"model": Box(2), "steps": 2})
    with pytest.raises(CheckpointError) as e:
        ck.wait()
    message = str(e.value)
    assert "\n" not in message and "No space left" in message and first in message and "intact" in message
    assert [s for s, _ in checkpoint_paths(str(tmp_path))] == [1]
    assert torch.equal(checkpoint.load_checkpoint(first)["model"]["w"], torch.ones(4))


def test_choose_falls_back_from_a_truncated_newest_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path), background=False, log=lambda m: None)
    ck.save(1, {"model": Box(1), "steps": 1})
    newest = ck.save(2, {"model": Box(2), "steps": 2})
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 2])
    warnings = []
    path, ckpt = ck.choose(None, log=warnings.append)
    assert ckpt["steps"] == 1 and path.endswith("0000001.pt")
    assert len(warnings) == 1 and "0000002.pt" in warnings[0] and "\n" not in warnings[0]
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ck.choose(2)                                   # asked for explicitly: no silent fallback
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*\[1, 2\]"):
        ck.choose(7)


def test_step_numbers_beyond_seven_digits_are_still_checkpoints(tmp_path):
    for name in ("0000010.pt", "12000000.pt", ".tmp-h-1-x.pt", "notes.pt", "10.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [s for s, _ in checkpoint_paths(str(tmp_path))] == [10, 12000000]


def test_stale_temp_files_of_other_processes_are_removed_and_nothing_else(tmp_path):
    keep = ["0000001.pt", "metrics.jsonl", ".hidden", "tmp-note.txt"]
    stale = [".tmp-otherhost-123-abc.pt", f".tmp-{os.uname().nodename.replace('-', '_')}-1-x.npz"]
    for name in keep + stale:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
