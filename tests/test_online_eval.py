"""FID during training (online_eval.py) on the built-in digits with random-weight Inception: it runs at
the requested steps and logs the named metrics, leaves the training trajectory untouched, gives the
same values after a resume, and the same on 2 processes as on 1."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import train
from conftest import ROOT, train_args


@pytest.fixture(autouse=True)
def fresh_accelerate_state(fresh_accelerate, monkeypatch):
    monkeypatch.setenv("REG_FID_METHOD", "lowrank")     # exact small-batch FID, fast on a CPU


@pytest.fixture(scope="module")
def fid_inputs(digits_data, tmp_path_factory):
    from evaluations import reference
    from evaluations.inception import save_random_weights
    root = tmp_path_factory.mktemp("fid")
    ref = root / "ref.npz"
    reference.main([str(digits_data / "images"), str(ref), "--num-images", "8", "--no-stats"])
    weights = save_random_weights(root / "inception-RANDOM.pth")
    return ["--fid-ref", str(ref), "--fid-inception-weights", str(weights), "--fid-num-samples", "5",
            "--fid-num-steps", "1", "--fid-batch-size", "5"]


def fid_args(data, out, name, steps, fid_inputs, **extra):
    # a short EMA, so that the evaluated model moves visibly between evaluations
    extra = {"ema_decay": 0.5, **extra}
    return train_args(data, out, name, steps, fid_every=2, checkpointing_steps=2, log_every=10, **extra) + fid_inputs


def records(exp):
    with open(os.path.join(exp, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_fid_during_training_is_logged_named_by_k_and_leaves_training_untouched(digits_data, tmp_path, fid_inputs):
    train.main(fid_args(digits_data, tmp_path, "fid", 4, fid_inputs))
    logs = records(tmp_path / "fid")
    assert sorted(logs) == [2, 4]
    for step in (2, 4):
        assert {"fid_5", "sfid_5", "inception_score_5", "precision_5", "recall_5"} <= logs[step].keys()
        assert logs[step]["fid_5"] > 0 and logs[step]["eval_seconds"] > 0
    assert logs[2]["fid_5"] != logs[4]["fid_5"]                      # the model changed, the images too
    train.main(train_args(digits_data, tmp_path, "plain", 4, checkpointing_steps=2, log_every=10, ema_decay=0.5))
    a = checkpoint.load_checkpoint(str(tmp_path / "fid/checkpoints/0000004.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "plain/checkpoints/0000004.pt"))
    for key in ("model", "ema"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key   # same trajectory without it


@pytest.mark.slow
def test_a_resumed_run_evaluates_to_the_same_numbers(digits_data, tmp_path, fid_inputs):
    train.main(fid_args(digits_data, tmp_path, "straight", 4, fid_inputs))
    train.main(fid_args(digits_data, tmp_path, "resumed", 2, fid_inputs))
    train.main(fid_args(digits_data, tmp_path, "resumed", 4, fid_inputs))      # resumes at step 2
    a, b = records(tmp_path / "straight")[4], records(tmp_path / "resumed")[4]
    assert {k: v for k, v in a.items() if k.endswith("_5")} == {k: v for k, v in b.items() if k.endswith("_5")}


def test_fid_needs_a_reference_batch(digits_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(digits_data, tmp_path, "noref", 2, fid_every=1))
    assert "--fid-every needs --fid-ref" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(digits_data, tmp_path, fid_inputs):
    """With learning rate 0 the EMA at step 2 is the same in both runs (the data order is not), so the
    evaluation sees the same model: split over 2 processes it must give the same numbers."""
    train.main(fid_args(digits_data, tmp_path, "one", 2, fid_inputs, learning_rate=0.0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", REG_FID_METHOD="lowrank")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train.py")] + fid_args(digits_data, tmp_path, "two", 2, fid_inputs, learning_rate=0.0)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = records(tmp_path / "one")[2], records(tmp_path / "two")[2]
    scores = [k for k in one if k.endswith("_5")]
    assert len(scores) == 5 and all(one[k] == pytest.approx(two[k], rel=1e-6) for k in scores), (one, two)


def test_path_drop_guidance_during_training_scores_what_generate_samples_with_it(digits_data, tmp_path, capsys):
    """--fid-path-drop-guidance: the online digits FD of a SPRINT run is that of generate.py
    --path-drop-guidance on the same checkpoint and settings (same images: per-image seeds), differs
    from plain guidance's, and leaves training untouched; without --routing sprint it is one line."""
    import generate
    import numpy as np
    from evaluations.digits import DigitsMetric
    sampler = dict(fid_metric="digits", fid_num_samples=10, fid_num_steps=3, fid_batch_size=5, fid_mode="sde",
                   fid_cfg_scale=3, fid_cls_cfg_scale=3, fid_guidance_low=0, fid_guidance_high=1, fid_seed=0,
                   fid_class_balanced=None)
    sprint = dict(routing="sprint", route_start=2, route_end=3, path_drop=0.5, ema_decay=0.5)
    for name, pdg in (("pdg", {"fid_path_drop_guidance": None}), ("cfg", {})):
        train.main(train_args(digits_data, tmp_path, name, 2, fid_every=2, checkpointing_steps=2, **sampler,
                              **sprint, **pdg))
    online = {name: records(tmp_path / name)[2]["fd_10"] for name in ("pdg", "cfg")}
    assert online["pdg"] != online["cfg"]
    a, b = (checkpoint.load_checkpoint(str(tmp_path / f"{n}/checkpoints/0000002.pt")) for n in ("pdg", "cfg"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])           # same training either way
    generate.main(["--ckpt", str(tmp_path / "pdg/checkpoints/0000002.pt"), "--sample-dir", str(tmp_path / "s"),
                   "--name", "pdg", "--device", "cpu", "--num-fid-samples", "10", "--per-proc-batch-size", "5",
                   "--mode", "sde", "--num-steps", "3", "--cfg-scale", "3", "--cls-cfg-scale", "3",
                   "--guidance-low", "0", "--guidance-high", "1", "--global-seed", "0", "--class-balanced",
                   "--path-drop-guidance"])
    with np.load(tmp_path / "s" / "pdg.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert DigitsMetric().evaluate(images, labels)["fd"] == online["pdg"]
    with pytest.raises(SystemExit):
        train.main(train_args(digits_data, tmp_path, "dense", 2, fid_every=2, **sampler, fid_path_drop_guidance=None))
    assert "--fid-path-drop-guidance needs --routing sprint" in capsys.readouterr().err.strip().splitlines()[-1]
