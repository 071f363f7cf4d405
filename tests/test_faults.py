"""Fault tolerance of training: every failure a cluster run meets gives one clear line, loses
nothing and leaves no debris. Runnable alone: ``python -m pytest tests/test_faults.py`` (add
``-m slow`` for the kill loops and multi-process cases, which CI runs too).

The dataset is the one the issue's reproductions use (conftest.digits_data: 100 digits at 32 px,
fit-pca, encode, a random-vit-tiny feature cache) and a SiT-XS/2 run on the CPU (SiT-T/2 behaves the same, at 20x the cost).
"""
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import tracking
import train
from checkpoint import CheckpointError, checkpoint_paths
from conftest import ROOT, train_args


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def steps_logged(exp):
    with open(os.path.join(exp, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def weights(path):
    return checkpoint.load_checkpoint(str(path))["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#################################################################################
#                         In-process cases (default suite)                      #
#################################################################################

def test_a_run_starts_by_removing_stale_temp_files_of_killed_saves(digits_data, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".tmp-otherhost-4242-abc.pt").write_bytes(b"half a checkpoint")
    (ckpts / "notes.txt").write_text("mine")
    train.main(train_args(digits_data, tmp_path, "run", 1))
    assert sorted(os.listdir(ckpts)) == ["0000001.pt", "0000001.pt.sha256", "notes.txt"]


def test_flipped_bytes_and_a_5000_byte_cut_are_named_and_the_newest_intact_checkpoint_is_used(digits_data, tmp_path,
                                                                                              caplog):
    """Issue 26: 4 KB XOR-ed in the middle of the newest checkpoint loaded silently (mmap skips the zip's
    CRCs) and poisoned the EMA; a checkpoint cut to 5,000 bytes stopped the resume with the usage and
    '[Errno 22] Invalid argument'. Now the first is caught by its integrity record, the second (an older
    run's checkpoint, without a record) by its read, and the run resumes from the newest intact one."""
    train.main(train_args(digits_data, tmp_path, "run", 6, checkpointing_steps=2))     # checkpoints 2, 4, 6
    ckpts = tmp_path / "run" / "checkpoints"
    newest = bytearray((ckpts / "0000006.pt").read_bytes())
    mid = len(newest) // 2
    newest[mid:mid + 4096] = bytes(b ^ 0xA5 for b in newest[mid:mid + 4096])
    (ckpts / "0000006.pt").write_bytes(bytes(newest))
    (ckpts / "0000004.pt").write_bytes((ckpts / "0000004.pt").read_bytes()[:5000])
    os.remove(ckpts / "0000004.pt.sha256")                        # as written before records existed
    caplog.clear()
    train.main(train_args(digits_data, tmp_path, "run", 6, checkpointing_steps=2))
    text = caplog.text
    assert "0000006.pt is not a readable checkpoint (damaged: its sha256 differs from its integrity record" in text
    assert "0000004.pt is not a readable checkpoint ([Errno 22] Invalid argument; only 5000 bytes" in text
    assert text.count("falling back to an older checkpoint") == 2                # a truncated one is named too
    assert "resumed from" in text and "0000002.pt (step 2)" in text
    redone = checkpoint.load_checkpoint(str(ckpts / "0000006.pt"))                 # rewritten, with a record
    assert redone["steps"] == 6 and all(torch.isfinite(v).all() for v in redone["ema"].values())
    (ckpts / "0000006.pt").write_bytes((ckpts / "0000006.pt").read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError) as e:                       # asked for by step: no fallback, one line
        train.main(train_args(digits_data, tmp_path, "run", 8, checkpointing_steps=2, resume_step=6))
    assert "\n" not in str(e.value) and "0000006.pt is not a readable checkpoint (damaged" in str(e.value)


def test_metrics_never_replay_steps_after_a_resume(digits_data, tmp_path):
    train.main(train_args(digits_data, tmp_path, "run", 5))                     # checkpoints 3 and 5
    os.remove(tmp_path / "run" / "checkpoints" / "0000005.pt")                   # as if killed before step 5's save
    train.main(train_args(digits_data, tmp_path, "run", 6))
    assert steps_logged(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_files_are_readable_by_colleagues_under_the_usual_umask(digits_data, tmp_path):
    old = os.umask(0o022)
    try:
        train.main(train_args(digits_data, tmp_path, "run", 1))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in (run / "checkpoints" / "0000001.pt", run / "metrics.jsonl", run / "args.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(digits_data, tmp_path, monkeypatch):
    real = checkpoint.atomic_torch_save
    calls = {"n": 0}

    def fill_up(obj, path):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1234 vs 1200")
        return real(obj, path)
    monkeypatch.setattr(checkpoint, "atomic_torch_save", fill_up)
    with pytest.raises(CheckpointError) as e:
        train.main(train_args(digits_data, tmp_path, "run", 4, checkpointing_steps=1))
    message = str(e.value)
    assert "\n" not in message and "could not write checkpoint" in message and "0000001.pt is intact" in message
    assert [s for s, _ in checkpoint_paths(str(tmp_path / "run" / "checkpoints"))] == [1]
    assert checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000001.pt"))["steps"] == 1


def test_an_unwritable_output_dir_is_one_line(digits_data, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    real_open = open

    def read_only(path, *a, **k):   # root ignores chmod, so the file system's answer is simulated
        mode = a[0] if a else k.get("mode", "r")
        if str(path).startswith(str(locked)) and any(c in mode for c in "wax"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(SystemExit) as e:
        train.main(train_args(digits_data, locked, "run", 1))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write to" in err and "Permission denied" in err and "--output-dir" in err


def test_changed_optimizer_flags_are_applied_on_resume_and_logged(digits_data, tmp_path, caplog):
    train.main(train_args(digits_data, tmp_path, "run", 3))
    train.main(train_args(digits_data, tmp_path, "run", 4, learning_rate=5e-4, adam_beta2=0.99))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "0000004.pt"))
    group = ckpt["opt"]["param_groups"][0]
    assert group["lr"] == 5e-4 and tuple(group["betas"]) == (0.9, 0.99)
    assert ckpt["args"]["learning_rate"] == 5e-4
    assert json.load(open(tmp_path / "run" / "args.json"))["learning_rate"] == 5e-4
    assert "lr 0.001 -> 0.0005" in caplog.text and "betas (0.9, 0.999) -> (0.9, 0.99)" in caplog.text


def test_a_fresh_start_in_a_folder_with_checkpoints_is_refused_unless_archived(digits_data, tmp_path, capsys):
    train.main(train_args(digits_data, tmp_path, "run", 3))
    with pytest.raises(SystemExit):
        train.main(train_args(digits_data, tmp_path, "run", 2, resume_step=0))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds checkpoints up to step 3" in err and "--archive-old-run" in err
    train.main(train_args(digits_data, tmp_path, "run", 2, resume_step=0, archive_old_run=None))
    run = tmp_path / "run"
    archived = [d for d in os.listdir(run) if d.startswith("archived-")]
    assert len(archived) == 1
    assert sorted(os.listdir(run / archived[0] / "checkpoints")) == ["0000003.pt", "0000003.pt.sha256"]
    assert [s for s, _ in checkpoint_paths(str(run / "checkpoints"))] == [2]
    assert steps_logged(run) == [1, 2]                                           # the new run only


def test_toggling_a_setting_that_changes_no_weight_resumes(digits_data, tmp_path, capsys):
    train.main(train_args(digits_data, tmp_path, "run", 3))
    train.main(train_args(digits_data, tmp_path, "run", 4, no_fused_attn=None))
    assert [s for s, _ in checkpoint_paths(str(tmp_path / "run" / "checkpoints"))] == [3, 4]
    with pytest.raises(SystemExit):                                              # this one changes weights
        train.main(train_args(digits_data, tmp_path, "run", 5, qk_norm=None))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different model configuration (qk_norm: False -> True)" in err


#################################################################################
#                       Killed processes and several ranks (slow)               #
#################################################################################

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_kill_9_during_saves_then_a_rerun_equals_an_uninterrupted_run(digits_data, tmp_path):
    steps = 7
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    straight = subprocess.run(cmd + train_args(digits_data, tmp_path, "straight", steps, checkpointing_steps=1),
                              env=ENV, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    old = os.umask(0o022)
    try:
        kills = 0
        for delay in (0.0, 0.05, 0.2):
            proc = subprocess.Popen(cmd + train_args(digits_data, tmp_path, "killed", steps, checkpointing_steps=1),
                                    env=ENV, stderr=subprocess.PIPE, text=True)
            for line in proc.stderr:                    # kill while a checkpoint is being written
                if "writing a checkpoint" in line:
                    time.sleep(delay)
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
            proc.wait(timeout=300)
        assert kills == 3
        final = subprocess.run(cmd + train_args(digits_data, tmp_path, "killed", steps, checkpointing_steps=1),
                               env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        os.umask(old)
    assert final.returncode == 0, final.stderr[-2000:]
    run = tmp_path / "killed"
    assert same_weights(weights(tmp_path / "straight/checkpoints/0000007.pt"), weights(run / "checkpoints/0000007.pt"))
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")]
    assert stat.S_IMODE(os.stat(run / "checkpoints/0000007.pt").st_mode) == 0o644
    logged = steps_logged(run)
    assert logged == sorted(set(logged)) and logged[-1] == steps


@pytest.mark.slow
def test_torchrun_without_a_gpu_or_cpu_flag_is_one_data_parallel_job(digits_data, tmp_path):
    args = [a for a in train_args(digits_data, tmp_path, "ddp", 2, checkpointing_steps=2) if a not in ("--device", "cpu")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "train.py")] + args
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stderr and "(2 replicas in sync)" in out.stderr
    assert steps_logged(tmp_path / "ddp") == [1, 2]                              # each step logged once


DRIVER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import checkpoint, train
mode = sys.argv[2]
rank = int(os.environ["RANK"])
if mode == "slow-save" and rank == 0:
    real = checkpoint.atomic_torch_save
    def slow(obj, path):
        time.sleep(8)                 # a save far longer than the 3-second collective timeout
        return real(obj, path)
    checkpoint.atomic_torch_save = slow
if mode == "unreadable" and rank == 1:
    def unreadable(path, *args, **kwargs):
        raise ValueError(f"{path} is not a readable checkpoint (PytorchStreamReader failed)")
    checkpoint.load_checkpoint = unreadable
if mode == "stale-listing" and rank == 1:
    # a node-local or stale network-filesystem listing: this rank sees only the oldest checkpoint
    real_paths = checkpoint.Checkpointer.paths
    checkpoint.Checkpointer.paths = lambda self: real_paths(self)[:1]
try:
    train.main(sys.argv[3:])
except SystemExit as e:
    sys.exit(e.code)
"""


def _driver(tmp_path, mode, args):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), ROOT, mode] + args
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_save_slower_than_the_collective_timeout_does_not_abort_the_job(digits_data, tmp_path):
    out = _driver(tmp_path, "slow-save", train_args(digits_data, tmp_path, "slow", 4, checkpointing_steps=2,
                                                    dist_timeout=0.05))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s for s, _ in checkpoint_paths(str(tmp_path / "slow/checkpoints"))] == [2, 4]


@pytest.mark.slow
def test_ranks_whose_folders_list_different_checkpoints_resume_from_rank_0s_choice(digits_data, tmp_path):
    train.main(train_args(digits_data, tmp_path, "stale", 4, checkpointing_steps=2))       # checkpoints 2 and 4
    out = _driver(tmp_path, "stale-listing", train_args(digits_data, tmp_path, "stale", 6, checkpointing_steps=2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0000004.pt (step 4)" in out.stderr                      # rank 0's choice; rank 1 saw only step 2
    steps = steps_logged(tmp_path / "stale")
    assert steps == sorted(set(steps)) and steps[-1] == 6           # one job, no replayed steps
    assert [s for s, _ in checkpoint_paths(str(tmp_path / "stale/checkpoints"))] == [2, 4, 6]


@pytest.mark.slow
def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_the_job_with_one_line(digits_data, tmp_path):
    train.main(train_args(digits_data, tmp_path, "two", 2, checkpointing_steps=2))
    out = _driver(tmp_path, "unreadable", train_args(digits_data, tmp_path, "two", 4, checkpointing_steps=2))
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, out.stderr[-3000:]                     # printed once, by rank 0
    assert "process 1 cannot resume from" in lines[0] and "0000002.pt" in lines[0]


@pytest.mark.slow
def test_a_dying_rank_ends_the_job_within_seconds_and_a_rerun_resumes(digits_data, tmp_path):
    args = train_args(digits_data, tmp_path, "die", 400, checkpointing_steps=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "train.py")] + args
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "writing a checkpoint" in line:
            break
    ckpts = tmp_path / "die" / "checkpoints"
    while not checkpoint_paths(str(ckpts)):
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(children[-1]), signal.SIGKILL)
    t0 = time.time()
    proc.wait(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    done = max(s for s, _ in checkpoint_paths(str(ckpts)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "train.py")] + train_args(digits_data, tmp_path, "die", done + 2, checkpointing_steps=2)
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(step {done})" in rerun.stderr and max(s for s, _ in checkpoint_paths(str(ckpts))) == done + 2


#################################################################################
#                 Damaged dataset files: named, repaired by a rerun, skippable  #
#################################################################################

@pytest.fixture(scope="module")
def private_digits(digits_data, tmp_path_factory):
    """A private copy of the tiny dataset made from the same raw digits: these tests damage its files,
    and each repairs what it damaged by rerunning the step that wrote it (which is part of the test)."""
    from preprocessing import dataset_tools
    root = tmp_path_factory.mktemp("private")
    data, run = root / "data", dataset_tools.main
    steps = {
        "convert": ["convert", "--source", str(digits_data.parent / "raw"), "--dest", str(data / "images"),
                    "--resolution", "32x32", "--transform", "center-crop", "--max-images", "40", "--workers", "0"],
        "encode": ["encode", "--source", str(data / "images"), "--dest", str(data / "vae-latents"),
                   "--model-url", f"pca:{data / 'pca.pt'}", "--workers", "0"],
        "cache-features": ["cache-features", "--source", str(data / "images"), "--enc-type", "random-vit-tiny",
                           "--kind", "full", "--workers", "0", "--chunk-size", "16"],
    }
    run(steps["convert"])
    run(["fit-pca", "--source", str(data / "images"), "--dest", str(data / "pca.pt")])
    run(steps["encode"])
    run(steps["cache-features"])
    return data, steps


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("what", [pytest.param("latent", marks=pytest.mark.slow),
                                  pytest.param("image", marks=pytest.mark.slow), "features"])
def test_a_damaged_dataset_file_is_named_with_its_step_and_a_rerun_of_that_step_repairs_it(
        private_digits, tmp_path, what):
    from dataset import DataFileError
    from preprocessing import dataset_tools
    data, steps = private_digits
    victim, step, extra = {
        "latent": (data / "vae-latents/00000/img00000003.npy", "encode", {}),
        "image": (data / "images/00000/img00000003.png", "convert", {"cached_features": "no"}),
        "features": (data / "features-random-vit-tiny-full/chunk-000001.npy", "cache-features", {}),
    }[what]
    good = victim.read_bytes()
    _truncate(victim)
    with pytest.raises(DataFileError) as e:
        train.main(train_args(data, tmp_path, "run", 5, **extra))        # 5 steps of 8 cover every image
    message = str(e.value)
    assert str(victim) in message and f"written by the {step} step" in message and "rerun" in message
    assert "\n" not in message and "(while reading the data of step" in message
    dataset_tools.main(steps[step])                                      # detects and redoes just that file
    assert victim.read_bytes() == good
    train.main(train_args(data, tmp_path, "after", 5, **extra))
    assert [s for s, _ in checkpoint_paths(str(tmp_path / "after" / "checkpoints"))][-1] == 5


def test_skip_bad_samples_replaces_a_damaged_sample_the_same_way_every_time(private_digits, tmp_path, capsys):
    from preprocessing import dataset_tools
    data, steps = private_digits
    _truncate(data / "vae-latents/00000/img00000003.npy")
    try:
        for name in ("a", "b"):
            train.main(train_args(data, tmp_path, name, 5, skip_bad_samples=None, checkpointing_steps=5))
    finally:
        dataset_tools.main(steps["encode"])
    assert capsys.readouterr().err.count("skipping a damaged sample") == 2      # once per run
    assert same_weights(weights(tmp_path / "a/checkpoints/0000005.pt"), weights(tmp_path / "b/checkpoints/0000005.pt"))


@pytest.mark.slow
def test_the_training_script_prints_a_damaged_file_in_one_line(private_digits, tmp_path):
    from preprocessing import dataset_tools
    data, steps = private_digits
    _truncate(data / "vae-latents/00000/img00000003.npy")
    try:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")]
                             + train_args(data, tmp_path, "cli", 5, num_workers=1), env=ENV, capture_output=True,
                             text=True, timeout=300)
    finally:
        dataset_tools.main(steps["encode"])
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "img00000003.npy is damaged" in last and "Traceback" not in out.stderr


def test_trackers_continue_from_the_resumed_step(tmp_path, monkeypatch):
    """TensorBoard purges events past the resumed step; wandb keeps one run id per folder and is rewound to
    the step (offline, where rewinding needs the server, it resumes the same id)."""
    import argparse
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = argparse.Namespace(args=argparse.Namespace(report_to="tensorboard", exp_name="e"), exp_dir=str(tmp_path),
                             state=argparse.Namespace(step=7))
    assert tracking.tracker_resume(run) == {"tensorboard": {"purge_step": 7}}
    run.args.report_to, run.state.step = "wandb", 0
    first = tracking.tracker_resume(run)["wandb"]
    assert first["resume"] == "allow" and first["id"] == (tmp_path / "wandb-run-id.txt").read_text()
    run.state.step = 5
    assert tracking.tracker_resume(run) == {"wandb": {"name": "e", "resume_from": f"{first['id']}?_step=5",
                                                      "dir": str(tmp_path)}}
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.tracker_resume(run)["wandb"]["id"] == first["id"]


def test_wandb_without_login_or_network_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    """Issue 26, row 8: --report-to wandb without a login (or with a key and no server) stops at once with one
    line naming WANDB_MODE=offline and --report-to tensorboard, before the run folder is made."""
    data = tmp_path / "data"
    data.mkdir()
    argv = ["--data-dir", str(data), "--output-dir", str(tmp_path / "exps"), "--exp-name", "w", "--report-to", "wandb"]
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                  # no ~/.netrc login
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # stands in for an unreachable server
    for key, expect in ((None, "not logged in to wandb"), ("k" * 40, "cannot reach the wandb server 127.0.0.1")):
        if key:
            monkeypatch.setenv("WANDB_API_KEY", key)
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and expect in err and len(err.splitlines()) == 1, err
        assert "WANDB_MODE=offline" in err and "--report-to tensorboard" in err
    assert not (tmp_path / "exps").exists() and not os.path.exists("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")                # offline needs neither
    assert tracking.tracker_problem("wandb") is None


def test_a_batch_larger_than_the_dataset_is_one_line_before_the_run_folder(digits_data, tmp_path, capsys):
    """Issue 26, row 9: 100 digits, a global batch of 128 -> one line naming both numbers; nothing written."""
    with pytest.raises(SystemExit) as e:
        train.main(train_args(digits_data, tmp_path, "big", 1, batch_size=128))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "(128 samples) is larger than the dataset" in err and "(100 samples)" in err
    assert not (tmp_path / "big").exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to the last byte (skipped where mounting is not allowed)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(mnt / "filler", "wb", buffering=0) as f:
            with pytest.raises(OSError):
                while True:
                    f.write(bytes(4096))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_disk_already_full_at_start_is_one_line(digits_data, full_disk, capsys):
    """Issue 26, row 9: a run whose output disk is full stops before training with one line, not an OSError
    traceback at the first write."""
    with pytest.raises(SystemExit) as e:
        train.main(train_args(digits_data, full_disk, "run", 1))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "is full (No space left on device" in err and "--output-dir" in err
