"""The run folder's lock (run_lock.py): a second run on a folder is refused in one line and touches
nothing there; a lock left by a killed run, a dead node or an earlier segment of a requeued SLURM
job does not block; the holder's heartbeat keeps its lock fresh. The two-real-runs case is slow."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import run_lock
import train
from conftest import ROOT, train_args
from run_lock import FolderInUse, RunLock


def write_lock(folder, **holder):
    os.makedirs(folder, exist_ok=True)
    info = {**dict(host=socket.gethostname(), pid=os.getpid(), run_id="other", segment=0, started=time.time()), **holder}
    with open(os.path.join(folder, ".lock"), "w") as f:
        json.dump(info, f)
    return os.path.join(folder, ".lock")


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


#################################################################################
#                              The lock on its own                              #
#################################################################################

def test_a_live_holder_on_this_host_refuses_and_a_dead_one_is_taken_over(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper)
    with pytest.raises(FolderInUse) as e:
        RunLock(str(tmp_path), "mine").acquire()
    message = str(e.value)
    assert "\n" not in message and f"pid {sleeper}" in message and "delete" in message and ".lock" in message
    write_lock(tmp_path, pid=dead_pid())
    lock = RunLock(str(tmp_path), "mine")
    lock.acquire()
    assert "is gone" in lock.took_over and lock.held()
    lock.release()
    assert not os.path.exists(tmp_path / ".lock") and os.listdir(tmp_path) == []


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    path = write_lock(tmp_path, host="node-that-is-not-this-one", pid=1)
    with pytest.raises(FolderInUse, match="last heartbeat"):
        RunLock(str(tmp_path), "mine", stale_after_s=600).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))                                          # no heartbeat for an hour
    lock = RunLock(str(tmp_path), "mine", stale_after_s=600)
    lock.acquire()
    assert "60 minutes old" in lock.took_over
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_earlier_segments_lock_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_lock.run_id() == "slurm-777"
    write_lock(tmp_path, host="node-of-the-first-segment", pid=1, run_id="slurm-777", segment=1)
    with pytest.raises(FolderInUse):                     # the same segment (another step of this job): refused
        RunLock(str(tmp_path), "slurm-777").acquire()
    write_lock(tmp_path, host="node-of-the-first-segment", pid=1, run_id="slurm-777", segment=0)
    lock = RunLock(str(tmp_path), "slurm-777")
    lock.acquire()
    assert "earlier segment" in lock.took_over
    lock.release()


def test_the_heartbeat_refreshes_the_lock_and_release_leaves_a_lock_it_lost(tmp_path):
    lock = RunLock(str(tmp_path), "mine", heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert lock.heartbeat_age() < 5
    write_lock(tmp_path, pid=12345, run_id="someone-else")              # broken by hand and retaken by another run
    lock.release()
    assert json.load(open(lock.path))["run_id"] == "someone-else"       # not ours: left alone


#################################################################################
#                          A second run on a busy folder                        #
#################################################################################

def test_a_second_run_is_refused_in_one_line_and_nothing_of_the_first_is_touched(digits_data, tmp_path, sleeper,
                                                                                   capsys, fresh_accelerate):
    exp = tmp_path / "run"
    ckpts = exp / "checkpoints"
    ckpts.mkdir(parents=True)
    first = {ckpts / "0000003.pt": b"the first run's checkpoint",
             ckpts / f".tmp-{socket.gethostname().replace('-', '_')}-{sleeper}-x~abcd.pt": b"its save in flight",
             exp / "metrics.jsonl": b'{"step": 1}\n'}
    for path, data in first.items():
        path.write_bytes(data)
    lock = write_lock(exp, pid=sleeper)
    before = open(lock).read()
    with pytest.raises(SystemExit) as e:
        train.main(train_args(digits_data, tmp_path, "run", 4))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is in use by another run" in err and f"pid {sleeper}" in err and "delete" in err
    assert {p: p.read_bytes() for p in first} == first                          # nothing lost or overwritten
    assert sorted(os.listdir(exp)) == [".lock", "checkpoints", "metrics.jsonl"] and open(lock).read() == before


def test_a_stale_lock_of_a_killed_run_does_not_block_and_the_run_releases_its_own(digits_data, tmp_path, caplog,
                                                                                  fresh_accelerate):
    write_lock(tmp_path / "run", pid=dead_pid())
    train.main(train_args(digits_data, tmp_path, "run", 1))
    assert "took over the stale lock" in caplog.text and "is gone" in caplog.text
    assert not (tmp_path / "run" / ".lock").exists()
    assert (tmp_path / "run" / "checkpoints" / "0000001.pt").exists()


@pytest.mark.slow
def test_two_runs_started_on_one_folder_the_second_is_refused_the_first_completes(digits_data, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()                             # the first run waits after each step while this file exists
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    steps = 10
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "slow_train.py"), "0"]
                             + train_args(digits_data, tmp_path, "run", steps, checkpointing_steps=5),
                             cwd=ROOT, env={**env, "HOLD_FILE": str(hold)}, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.1)
        second = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")]
                                + train_args(digits_data, tmp_path, "run", steps, checkpointing_steps=5),
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert first.poll() is None              # refused while the first was still training
    finally:
        hold.unlink()
        if first.poll() is None and sys.exc_info()[0] is not None:
            first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert "is in use by another run" in last and f"pid {first.pid}" in last
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    with open(metrics) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, steps + 1))   # every step once
    ckpts = sorted(f for f in os.listdir(tmp_path / "run" / "checkpoints") if f.endswith(".pt"))
    assert ckpts == [f"{s:07d}.pt" for s in (5, 10)]
    assert not (tmp_path / "run" / ".lock").exists()
