"""Preemption (preemption.py): SIGTERM / SIGUSR1 / SIGINT stop a run at a step boundary with one
checkpoint and exit status 3, and the rerun equals a straight run bit for bit. The handlers only
set a flag; the ranks agree on the step through one all-reduce. Also the launcher check (srun
without a launcher) and the progress lines of a batch job. The multi-process runs are slow."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import preemption
import train
from conftest import ROOT, train_args
from preemption import EXIT_PREEMPTED, Preempted, StopRequest
from runtime import Procs, check_launcher
from tracking import Progress


def one_process():
    return Procs.joined(0, 1, 0, "cpu")


#################################################################################
#                          The handlers and the flag (fast)                     #
#################################################################################

def test_a_signal_only_sets_the_flag_and_a_second_one_changes_nothing():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(one_process())
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1" and stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)                  # during the save: nothing is interrupted
        assert stop.received == "SIGUSR1" and stop.requested()
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_second_ctrl_c_aborts_as_usual():
    stop = StopRequest(one_process())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.close()


def test_a_signalled_run_saves_its_step_writes_the_marker_and_says_so(digits_data, tmp_path, monkeypatch,
                                                                      fresh_accelerate, caplog):
    real = train.train_step

    def step_then_signal(state, *a, **k):
        out = real(state, *a, **k)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)              # arrives mid-run, between two steps' work
        return out
    monkeypatch.setattr(train, "train_step", step_then_signal)
    with pytest.raises(Preempted) as e:
        train.main(train_args(digits_data, tmp_path, "run", 6, checkpointing_steps=5))
    assert e.value.exit_code == EXIT_PREEMPTED == 3
    assert "preempted by SIGTERM at step 2" in str(e.value) and "\n" not in str(e.value)
    assert [s for s, _ in checkpoint.checkpoint_paths(str(tmp_path / "run/checkpoints"))] == [2]
    marker = json.load(open(tmp_path / "run" / preemption.MARKER))
    assert marker["step"] == 2 and marker["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL                 # handlers given back
    assert not (tmp_path / "run" / ".lock").exists()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


#################################################################################
#                        srun without a launcher; batch-job logs                #
#################################################################################

def test_srun_tasks_without_a_launcher_are_refused_with_the_command_to_use(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(ValueError) as e:
        check_launcher()
    assert "srun started 8 tasks" in str(e.value) and "torchrun" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    check_launcher()                                         # under a launcher: fine
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.delenv("RANK")
    check_launcher()                                         # one task (a batch script, srun -n 1): fine


def test_generate_refuses_srun_tasks_without_a_launcher_before_loading_anything(monkeypatch, tmp_path, capsys):
    import generate
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    ckpt = tmp_path / "0000010.pt"
    ckpt.write_bytes(b"not read: the launcher check comes first")
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "samples"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "srun started 4 tasks" in err and "bash eval.sh" in err
    assert not (tmp_path / "samples").exists()


def test_progress_in_a_batch_log_is_a_line_every_interval_not_a_redrawn_bar(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="train")
    stream = io.StringIO()                                   # not a terminal
    progress = Progress(100, 0, enabled=True, every_s=0.2, stream=stream)
    for step in range(1, 4):
        progress.update()
        progress.show(step, {"loss_final": 0.5, "images_per_sec": 10.0})
    time.sleep(0.25)
    progress.show(4, {"loss_final": 0.25, "images_per_sec": 10.0})
    progress.close()
    assert stream.getvalue() == ""                           # no bar, no carriage returns
    lines = [r.message for r in caplog.records if r.message.startswith("step ")]
    assert lines == [lines[0]] and "step 4/100 (4.0%): loss 0.2500, 10.0 img/s" in lines[0]


def test_an_accelerate_dynamo_setting_does_not_compile_the_model(digits_data, tmp_path, monkeypatch, fresh_accelerate):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")        # as `accelerate config` would leave it

    def no_compile(*a, **k):
        raise AssertionError("the whole model was compiled behind the user's back")
    monkeypatch.setattr(torch, "compile", no_compile)
    train.main(train_args(digits_data, tmp_path, "run", 1))
    assert (tmp_path / "run" / "checkpoints" / "0000001.pt").exists()


#################################################################################
#                Real signals to real runs, then the rerun (slow)               #
#################################################################################

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS = 24


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
            os.path.join(ROOT, "tests", "slow_train.py"), "0.2"] + args


def _wait_for_steps(proc, exp, n):
    metrics = exp / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= n):
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.05)


def _final(exp):
    ckpt = checkpoint.load_checkpoint(str(exp / "checkpoints" / f"{STEPS:07d}.pt"))
    return ckpt["model"], ckpt["ema"], ckpt["opt"]["state"]


def _equal(a, b):
    (ma, ea, oa), (mb, eb, ob) = a, b
    return (all(torch.equal(ma[k], mb[k]) for k in ma) and all(torch.equal(ea[k], eb[k]) for k in ea)
            and all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in ("exp_avg", "exp_avg_sq")))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "SIGUSR1 to rank 1 only"])
def test_a_signalled_two_process_run_resumes_to_the_straight_runs_weights(digits_data, tmp_path, how):
    args = lambda name: [a for a in train_args(digits_data, tmp_path, name, STEPS, checkpointing_steps=100)  # noqa: E731
                         if a not in ("--device", "cpu")]
    straight = subprocess.run(_torchrun(args("straight")), cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    exp = tmp_path / "cut"
    proc = subprocess.Popen(_torchrun(args("cut")), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, exp, 3)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)                     # torchrun forwards it to both workers
    else:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(sorted(workers, key=int)[-1]), signal.SIGUSR1)       # one rank only: the all-reduce tells rank 0
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if "preempted by" in line]
    assert len(lines) == 1, err[-3000:]                      # one line, from rank 0
    marker = json.load(open(exp / preemption.MARKER))
    cut = marker["step"]
    assert 3 <= cut < STEPS and f"at step {cut}" in lines[0]
    if how.startswith("SIGUSR1"):          # torchrun exits 1 and lists its workers' statuses (after its own
        assert "exitcode  : 3" in err, err[-3000:]     # SIGTERM it lists none: the marker says it)
    assert [s for s, _ in checkpoint.checkpoint_paths(str(exp / "checkpoints"))] == [cut]
    rerun = subprocess.run(_torchrun(args("cut")), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(step {cut})" in rerun.stderr and not (exp / preemption.MARKER).exists()
    assert _equal(_final(tmp_path / "straight"), _final(exp))            # bit for bit
    with open(exp / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_ctrl_c_to_a_single_process_run_exits_3_with_one_line(digits_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "slow_train.py"), "0.2"] + train_args(
        digits_data, tmp_path, "one", STEPS, checkpointing_steps=100)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(proc, tmp_path / "one", 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "preempted by SIGINT" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert len(checkpoint.checkpoint_paths(str(tmp_path / "one" / "checkpoints"))) == 1


def test_train_sh_outlives_the_signals_and_exits_3_after_a_preemption(tmp_path):
    """A stand-in launcher (first on PATH) is sent SLURM's signals the way a job step gets them: SIGUSR1
    to itself (ignored, as train.sh asks), SIGTERM to train.sh (which waits for it), then exits 1 as
    torchrun does when its workers exit 3, after train.py's marker is written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "accelerate"
    launcher.write_text('#!/bin/bash\nkill -USR1 $$\nkill -TERM $PPID\nsleep 0.3\n'
                        'if [[ -n "$PREEMPT" ]]; then echo "{}" > "$OUTPUT_DIR/$EXP_NAME/preempted.json"; fi\nexit 1\n')
    launcher.chmod(0o755)
    (tmp_path / "x").mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUTPUT_DIR": str(tmp_path), "EXP_NAME": "x",
           "NUM_GPUS": "1", "DATA_DIR": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join(ROOT, "train.sh")], capture_output=True, text=True,
                         env={**env, "PREEMPT": "1"}, timeout=60)
    assert out.returncode == EXIT_PREEMPTED and "preempted" in out.stderr.strip().splitlines()[-1]
    os.remove(tmp_path / "x" / "preempted.json")
    out = subprocess.run(["bash", os.path.join(ROOT, "train.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1                                # a failure stays a failure
