"""train.py end to end on a tiny dataset made here: exact resume, multi-process (gloo), ablations,
non-finite guard, atomic checkpoints and clear errors for bad input."""
import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import train  # noqa: E402
from preprocessing import dataset_tools  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 RGB images of 32x32 in 4 classes (class = a bright quadrant), encoded with the
    lossless identity-f8 codec (latents 192 x 4 x 4), plus a full random-encoder feature cache."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    for i in range(40):
        c = i % 4
        img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        r, q = divmod(c, 2)
        img[r * 16:(r + 1) * 16, q * 16:(q + 1) * 16] += 150
        os.makedirs(root / "raw" / f"c{c}", exist_ok=True)
        Image.fromarray(img).save(root / "raw" / f"c{c}" / f"{i:03d}.png")
    data = root / "data"
    dataset_tools.main(["convert", "--source", str(root / "raw"), "--dest", str(data / "images"),
                        "--resolution", "32x32", "--transform", "center-crop"])
    dataset_tools.main(["encode", "--source", str(data / "images"), "--dest", str(data / "vae-latents"),
                        "--model-url", "identity-f8"])
    return data


def _reset_accelerate():
    """Accelerate keeps process-wide singletons; reset them between in-process runs."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    _reset_accelerate()
    yield
    _reset_accelerate()


def base_args(data_dir, out, name, steps, **extra):
    args = ["--data-dir", str(data_dir), "--output-dir", str(out), "--exp-name", name, "--resolution", "32",
            "--model", "SiT-T/2", "--enc-type", "random-vit-tiny", "--encoder-depth", "2", "--projector-dim", "64",
            "--batch-size", "8", "--max-train-steps", str(steps), "--mixed-precision", "no", "--report-to", "none",
            "--num-workers", "0", "--cpu", "--learning-rate", "1e-3", "--log-every", "1",
            "--checkpointing-steps", "3", "--sampling-steps", "0", "--cached-features", "no"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is None else [str(v)])
    return args


def read_metrics(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_exact_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    train.main(base_args(data_dir, tmp_path, "straight", 6))
    _reset_accelerate()
    train.main(base_args(data_dir, tmp_path, "split", 3))
    _reset_accelerate()
    train.main(base_args(data_dir, tmp_path, "split", 6))  # the same command again, longer: resumes at 3
    a = checkpoint.load_checkpoint(str(tmp_path / "straight/checkpoints/0000006.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "split/checkpoints/0000006.pt"))
    assert a["steps"] == b["steps"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the logged losses of steps 4..6 are the same numbers too
    la = [m["loss"] for m in read_metrics(tmp_path / "straight")][3:]
    lb = [m["loss"] for m in read_metrics(tmp_path / "split")][3:]
    assert la == lb
    # a resumed checkpoint is self-describing and readable with weights_only=True
    raw = torch.load(tmp_path / "split/checkpoints/0000006.pt", weights_only=True)
    assert raw["model_config"]["cls_token_dim"] == 64 and raw["autoencoder"] == "identity-f8"
    model = checkpoint.model_from_checkpoint(raw)
    assert model.cls_token_dim == 64


def test_training_lowers_the_loss_and_uses_cached_features(data_dir, tmp_path):
    dataset_tools.main(["cache-features", "--source", str(data_dir / "images"), "--enc-type", "random-vit-tiny",
                        "--kind", "full"])
    args = base_args(data_dir, tmp_path, "learn", 40, checkpointing_steps=40, log_every=10)
    args[args.index("--cached-features") + 1] = "yes"
    train.main(args)
    logs = read_metrics(tmp_path / "learn")
    first, last = logs[0], logs[-1]
    assert last["loss_mean"] < 0.9 * first["loss_mean"], (first, last)
    assert last["proj_loss"] < first["proj_loss"]           # alignment improves (negative cosine)
    assert last["loss_mean_cls"] < first["loss_mean_cls"]
    # raw and weighted terms are both logged, the weights being 0.5 and 0.03
    assert last["proj_loss_weighted"] == pytest.approx(0.5 * last["proj_loss"], rel=1e-5)
    assert last["loss_mean_cls_weighted"] == pytest.approx(0.03 * last["loss_mean_cls"], rel=1e-5)


@pytest.mark.parametrize("flags, cls_dim, z_dims", [(dict(cls=0), 0, [64]), (dict(cls=0, proj_coeff=0), 0, []),
                                                     (dict(proj_coeff=0), 64, [])])
def test_ablations_build_repa_and_sit(data_dir, tmp_path, flags, cls_dim, z_dims):
    train.main(base_args(data_dir, tmp_path, "abl", 2, **flags))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "abl/checkpoints/0000002.pt"))
    assert ckpt["model_config"]["cls_token_dim"] == cls_dim
    assert ckpt["model_config"]["z_dims"] == z_dims
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tmp_path / "abl"))


def test_gradient_accumulation_counts_optimizer_steps(data_dir, tmp_path):
    train.main(base_args(data_dir, tmp_path, "acc", 3, gradient_accumulation_steps=2))
    ckpts = checkpoint.checkpoint_paths(str(tmp_path / "acc/checkpoints"))
    assert [s for s, _ in ckpts] == [3]
    assert [m["step"] for m in read_metrics(tmp_path / "acc")] == [1, 2, 3]


def _poison_steps(monkeypatch, steps):
    """Make the objective's loss NaN at the given optimizer steps (1-based; no accumulation)."""
    import loss as loss_module
    real = loss_module.REGObjective.__call__
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if steps == "all" or calls["n"] in steps:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(loss_module.REGObjective, "__call__", poisoned)
    return calls


def test_nonfinite_stop_policy_stops_the_run(data_dir, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, "all")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.main(base_args(data_dir, tmp_path, "nan", 3, nonfinite="stop"))
    assert checkpoint.checkpoint_paths(str(tmp_path / "nan/checkpoints")) == []  # nothing poisoned was saved


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_isolated_nonfinite_step_is_skipped_and_the_run_goes_on(data_dir, tmp_path, monkeypatch, precision):
    """Default policy: the poisoned step 2 leaves weights and optimizer state exactly as step 1 left them
    (checkpoints every step), is counted in the log, and training continues to the end."""
    _poison_steps(monkeypatch, {2})
    train.main(base_args(data_dir, tmp_path, "skip", 4, checkpointing_steps=1, mixed_precision=precision))
    ckpts = dict(checkpoint.checkpoint_paths(str(tmp_path / "skip/checkpoints")))
    assert sorted(ckpts) == [1, 2, 3, 4]
    one, two, four = (checkpoint.load_checkpoint(ckpts[k]) for k in (1, 2, 4))
    for name in one["model"]:
        assert torch.equal(one["model"][name], two["model"][name]), name            # untouched by step 2
    for pid, st in one["opt"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], two["opt"]["state"][pid][key]), (pid, key)
    assert any(not torch.equal(two["model"][k], four["model"][k]) for k in two["model"])  # steps 3-4 trained
    assert all(torch.isfinite(v).all() for v in four["model"].values())
    assert {float(st["step"]) for st in four["opt"]["state"].values()} == {3.0}          # 3 real updates
    logs = read_metrics(tmp_path / "skip")
    assert [m["skipped_steps"] for m in logs] == [0, 1, 0, 0]
    assert logs[1]["grad_norm"] is None and logs[1]["loss"] is None                     # strict JSON: null
    assert all(m["grad_norm"] is not None for i, m in enumerate(logs) if i != 1)


def test_persistent_nonfinite_steps_stop_after_the_patience(data_dir, tmp_path, monkeypatch):
    _poison_steps(monkeypatch, "all")
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        train.main(base_args(data_dir, tmp_path, "dead", 10, checkpointing_steps=1, nonfinite_patience=3))
    for _, path in checkpoint.checkpoint_paths(str(tmp_path / "dead/checkpoints")):
        ckpt = checkpoint.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("accumulation", [1, 2])   # DDP static graph; no_sync without it
def test_two_processes_on_cpu_stay_in_sync(data_dir, tmp_path, accumulation):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "train.py")] + base_args(data_dir, tmp_path, "ddp", 2, checkpointing_steps=2,
                                                    gradient_accumulation_steps=accumulation)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stderr + out.stdout
    assert "(2 replicas in sync)" in out.stderr + out.stdout
    assert [s for s, _ in checkpoint.checkpoint_paths(str(tmp_path / "ddp/checkpoints"))] == [2]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "0000010.pt")
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}, "steps": 10}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}, "steps": 20}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["0000010.pt"]  # no temporary file left behind
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))


@pytest.mark.parametrize("change, message", [
    (("--model", "SiT-Q/2"), "invalid choice"),
    (("--encoder-depth", "9"), "--encoder-depth must be in 1..6"),
    (("--resolution", "36"), "multiple of 8"),
    (("--resolution", "64"), "does not match the data"),
    (("--gradient-accumulation-steps", "3"), "not divisible by processes x accumulation"),
    (("--enc-type", "dinov3-vit-q"), "dinov3-vit-q"),
    (("--data-dir", "/nonexistent/data"), "does not exist"),
])
def test_bad_input_is_one_clear_line(data_dir, tmp_path, capsys, change, message):
    args = base_args(data_dir, tmp_path, "bad", 2)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and "Traceback" not in err


def test_data_dir_without_the_expected_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = base_args(tmp_path / "empty", tmp_path, "bad", 2)
    with pytest.raises(SystemExit):
        train.main(args)
    assert "error:" in capsys.readouterr().err


def test_make_optimizer_kernels_keep_the_adamw_update():
    from optim import make_optimizer
    torch.manual_seed(0)
    proto = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    finals = {}
    for impl in ("loop", "foreach", "fused", "auto"):
        net = copy.deepcopy(proto)
        opt = (torch.optim.AdamW(net.parameters(), foreach=False, **kw) if impl == "loop"
               else make_optimizer(net.parameters(), impl, **kw))
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            net(torch.randn(4, 16, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        finals[impl] = torch.cat([p.detach().flatten() for p in net.parameters()])
        if impl in ("fused", "auto"):
            assert opt.param_groups[0]["fused"]
    assert torch.equal(finals["foreach"], finals["loop"])                       # bitwise
    torch.testing.assert_close(finals["fused"], finals["loop"], rtol=0, atol=1e-6)
    assert not torch.equal(finals["loop"], torch.cat([p.detach().flatten() for p in proto.parameters()]))
    with pytest.raises(ValueError, match="unknown AdamW implementation"):
        make_optimizer(proto.parameters(), "sgd", **kw)
