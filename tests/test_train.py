"""train.py end to end on the tiny digits dataset (conftest.digits_data): exact resume, several
processes (gloo), ablations, the non-finite guard, release checkpoints, training without a decoder,
and one clear line for bad input. The fault cases of a cluster run are in test_faults.py."""
import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, train_args

import checkpoint  # noqa: E402
import tracking  # noqa: E402
import train  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture
def data_dir(digits_data):
    return digits_data


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def base_args(data_dir, out, name, steps, **extra):
    return train_args(data_dir, out, name, steps, **{"cached_features": "no", **extra})


def read_metrics(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_exact_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    train.main(base_args(data_dir, tmp_path, "straight", 6))
    train.main(base_args(data_dir, tmp_path, "split", 3))
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
    la = [m["loss_final"] for m in read_metrics(tmp_path / "straight")][3:]
    lb = [m["loss_final"] for m in read_metrics(tmp_path / "split")][3:]
    assert la == lb
    # a resumed checkpoint is self-describing and readable with weights_only=True
    raw = torch.load(tmp_path / "split/checkpoints/0000006.pt", weights_only=True)
    assert raw["model_config"]["cls_token_dim"] == 64 and raw["autoencoder"].startswith("pca:")
    assert raw["data"] == {"microbatch": 6, "world": 1, "local_batch": 8, "seed": 0} and len(raw["rng"]) == 1
    model = checkpoint.model_from_checkpoint(raw)
    assert model.cls_token_dim == 64


def test_training_lowers_the_loss_and_uses_cached_features(data_dir, tmp_path):
    train.main(base_args(data_dir, tmp_path, "learn", 40, checkpointing_steps=40, log_every=10, cached_features="yes"))
    logs = read_metrics(tmp_path / "learn")
    first, last = logs[0], logs[-1]
    assert last["loss_mean"] < 0.9 * first["loss_mean"], (first, last)
    assert last["proj_loss_raw"] < first["proj_loss_raw"]   # alignment improves (negative cosine)
    assert last["loss_mean_cls_raw"] < first["loss_mean_cls_raw"]
    # the release's names carry the release's (weighted) values, the raw terms are *_raw; weights 0.5, 0.03
    assert last["proj_loss"] == pytest.approx(0.5 * last["proj_loss_raw"], rel=1e-5)
    assert last["loss_mean_cls"] == pytest.approx(0.03 * last["loss_mean_cls_raw"], rel=1e-5)
    assert last["loss_final"] == pytest.approx(last["loss_mean"] + last["proj_loss"] + last["loss_mean_cls"], rel=1e-5)


@pytest.mark.parametrize("flags, cls_dim, z_dims", [(dict(no_class_token=None), 0, [64]),
                                                     (dict(no_class_token=None, no_projectors=None), 0, []),
                                                     (dict(no_projectors=None), 64, []),
                                                     (dict(cls=0, proj_coeff=0), 64, [64])])   # the release's meaning
def test_ablations_build_repa_and_sit(data_dir, tmp_path, flags, cls_dim, z_dims):
    train.main(base_args(data_dir, tmp_path, "abl", 2, **flags))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "abl/checkpoints/0000002.pt"))
    assert ckpt["model_config"]["cls_token_dim"] == cls_dim
    assert ckpt["model_config"]["z_dims"] == z_dims
    assert all(np.isfinite(m["loss_final"]) for m in read_metrics(tmp_path / "abl"))


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
            out["loss_final"] = out["loss_final"] * float("nan")
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
    assert logs[1]["grad_norm"] is None and logs[1]["loss_final"] is None                     # strict JSON: null
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


@pytest.mark.slow
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
    (("--encoder-depth", "9"), "--encoder-depth must be in 1..4"),
    (("--resolution", "36"), "multiple of 8"),
    (("--resolution", "64"), "does not match the data"),
    (("--total-batch-size", "8"), "give --batch-size (per micro-batch, as released) or --total-batch-size"),
    (("--epochs", "0"), "--epochs must be positive"),
    (("--enc-type", "dinov3-vit-q"), "dinov3-vit-q"),
    (("--data-dir", "/nonexistent/data"), "does not exist"),
    (("--precision", "fp8"), "expected one of fp32, fp16, bf16"),
    (("--resume-from", "/nonexistent.pt"), "no such checkpoint file"),
    (("--nonfinite-patience", "0"), "--nonfinite-patience must be >= 1"),
    (("--keep-every", "5"), "--keep-every must be 0 or a multiple of --checkpointing-steps"),
    (("--device", "cuda:1"), "CUDA" if not torch.cuda.is_available() else "cuda"),
    (("--model", "SiT-T/4"), "random-vit-tiny gives 4 patch tokens at 32 px but the SiT has 1 image tokens"),
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


#################################################################################
#                Release checkpoints and the decoder (issue: release seams)      #
#################################################################################

def _release_layout(ckpt, **release_args):
    """Our checkpoint rewritten as the REG release saves it: {model, ema, opt, args (Namespace), steps}."""
    args = argparse.Namespace(model="SiT-XS/2", enc_type="random-vit-tiny", encoder_depth=2, **release_args)
    return {"model": ckpt["model"], "ema": ckpt["ema"], "opt": ckpt["opt"], "args": args, "steps": ckpt["steps"]}


def test_a_release_checkpoint_trains_further(data_dir, tmp_path, caplog):
    train.main(base_args(data_dir, tmp_path, "ours", 2, checkpointing_steps=2))
    ours = checkpoint.load_checkpoint(str(tmp_path / "ours/checkpoints/0000002.pt"))
    release = tmp_path / "release" / "checkpoints" / "0000002.pt"
    release.parent.mkdir(parents=True)
    torch.save(_release_layout(ours), release)
    train.main(base_args(data_dir, tmp_path, "continued", 3, resume_from=release, model="SiT-B/2"))
    new = checkpoint.load_checkpoint(str(tmp_path / "continued/checkpoints/0000003.pt"))
    assert new["steps"] == 3 and new["model_config"] == ours["model_config"]      # architecture from the file
    assert {float(st["step"]) for st in new["opt"]["state"].values()} == {3.0}   # Adam's count continued
    assert any(not torch.equal(new["model"][k], ours["model"][k]) for k in ours["model"])
    assert "has none (a release checkpoint): RNG states reseeded" in caplog.text
    assert "resumed from" in caplog.text and "(step 2)" in caplog.text


def test_init_from_a_repa_checkpoint_starts_reg_with_fresh_class_token_layers(data_dir, tmp_path):
    from models.sit import create_model
    torch.manual_seed(5)
    repa = create_model("SiT-XS/2", input_size=4, num_classes=10, z_dims=[64], projector_dim=64,
                        encoder_depth=2, cls_token_dim=0)
    release = tmp_path / "repa.pt"
    torch.save({"model": repa.state_dict(), "ema": repa.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-XS/2"), "steps": 400000}, release)
    fresh = create_model("SiT-XS/2", input_size=4, num_classes=10, z_dims=[64], projector_dim=64,
                         encoder_depth=2, cls_token_dim=64)
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    tracking.logger.addHandler(handler)
    try:
        checkpoint.init_weights_from(fresh, checkpoint.load_checkpoint(str(release)), str(release))
    finally:
        tracking.logger.removeHandler(handler)
    ref = create_model("SiT-XS/2", input_size=4, num_classes=10, z_dims=[64], projector_dim=64, encoder_depth=2,
                       cls_token_dim=64)
    for name, value in fresh.state_dict().items():
        if name in repa.state_dict() and name != "pos_embed":
            assert torch.equal(value, repa.state_dict()[name]), name
    reg_only = {k for k in fresh.state_dict() if k not in repa.state_dict()}
    assert reg_only == {"cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias",
                        "final_layer.linear_cls.weight", "final_layer.linear_cls.bias"}
    assert all(n in records[0] for n in reg_only) and "fresh:" in records[0]
    # the run itself: a REG run started from REPA weights trains
    train.main(base_args(data_dir, tmp_path, "reg-from-repa", 1, init_from=release))
    assert torch.isfinite(torch.stack([v.float().sum() for v in checkpoint.load_checkpoint(
        str(tmp_path / "reg-from-repa/checkpoints/0000001.pt"))["model"].values()])).all()
    del ref


def test_training_needs_no_decoder_and_draws_grids_when_there_is_one(data_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REG_VAE_PATH", raising=False)
    train.main(base_args(data_dir, tmp_path, "nodec", 2, sampling_steps=1, sample_num_steps=2,
                         num_sample_images=4, vae="stabilityai/sd-vae-ft-ema"))
    warnings = [r.getMessage() for r in caplog.records if "no EMA sample grids" in r.getMessage()]
    assert len(warnings) == 1 and "--vae" in warnings[0] and "REG_VAE_PATH" in warnings[0]
    assert [s for s, _ in checkpoint.checkpoint_paths(str(tmp_path / "nodec/checkpoints"))] == [2]
    assert not os.path.exists(tmp_path / "nodec" / "samples")
    # with the dataset's own (PCA) codec the grids are drawn
    train.main(base_args(data_dir, tmp_path, "grids", 2, sampling_steps=1, sample_num_steps=2, num_sample_images=4))
    assert sorted(os.listdir(tmp_path / "grids" / "samples")) == ["0000001.png", "0000002.png"]


def test_compile_needs_torch_2_5_and_says_so(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(SystemExit):
        train.main(base_args(data_dir, tmp_path, "old", 1, compile=None))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--compile needs torch >= 2.5" in err and "2.4.1" in err


def test_a_class_token_cache_serves_the_class_token_while_the_encoder_gives_the_patch_tokens(
        data_dir, tmp_path, caplog):
    """A cache of class tokens only, with alignment on: the class token comes from the cache and the
    encoder runs online for the patch tokens (instead of stopping)."""
    import shutil

    from preprocessing import dataset_tools
    data = tmp_path / "data"
    for part in ("images", "vae-latents", "pca-f8c4.pt"):
        (shutil.copytree if (data_dir / part).is_dir() else shutil.copy)(data_dir / part, data / part)
    dataset_tools.main(["cache-features", "--source", str(data / "images"), "--enc-type", "random-vit-tiny",
                        "--kind", "cls", "--workers", "0"])
    train.main(base_args(data, tmp_path, "clscache", 2, cached_features="auto"))
    assert "cached class tokens, patch tokens online" in caplog.text
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "clscache/checkpoints/0000002.pt"))
    assert ckpt["model_config"]["z_dims"] == [64] and ckpt["model_config"]["cls_token_dim"] == 64
    assert ckpt["codec"]["family"] == "pca"


#################################################################################
#                     Beyond the release: options in training                   #
#################################################################################

def test_route_draws_are_the_same_on_every_process_and_split_by_rows():
    from models.sit import create_model
    torch.manual_seed(0)
    model = create_model("SiT-XS/2", input_size=8, num_classes=10, z_dims=[16], projector_dim=16, encoder_depth=1,
                         cls_token_dim=16, routing="sprint", route_start=1, route_end=3, path_drop=0.5)
    opt = torch.optim.AdamW(model.parameters())
    one = train_step.TrainState(model, opt, seed=3, step=7)                          # 1 process, global batch 8
    ranks = [train_step.TrainState(model, opt, seed=3, step=7, rank=r, world=2) for r in (0, 1)]
    whole = one.route(0, 8)
    parts = [s.route(0, 4) for s in ranks]                                      # 2 processes, 4 each
    assert torch.equal(torch.cat([p.keep for p in parts]), whole.keep)
    assert parts[0].drop_path == parts[1].drop_path == whole.drop_path
    assert not torch.equal(one.route(1, 8).keep, whole.keep)                    # another micro-batch, another draw


@pytest.mark.parametrize("flags", [
    dict(norm="rmsnorm", rope=None, value_residual=None, routing="sprint", route_start=2, route_end=3,
         cfm_coeff=0.05, time_shift=None, qk_norm=None),
    dict(routing="tread", route_start=2, route_end=3, pos_embed="none", rope=None),
], ids=["speedrun-ladder", "tread"])
def test_options_train_and_resume_bit_for_bit(data_dir, tmp_path, flags):
    train.main(base_args(data_dir, tmp_path, "straight", 4, checkpointing_steps=2, **flags))
    train.main(base_args(data_dir, tmp_path, "split", 2, checkpointing_steps=2, **flags))
    train.main(base_args(data_dir, tmp_path, "split", 4, checkpointing_steps=2, **flags))
    a = checkpoint.load_checkpoint(str(tmp_path / "straight/checkpoints/0000004.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "split/checkpoints/0000004.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    config = a["model_config"]
    assert config["routing"] == flags["routing"] and (config["route_start"], config["route_end"]) == (2, 3)
    model = checkpoint.model_from_checkpoint(a)                                 # rebuilds the same model
    assert model.routing == flags["routing"] and model.config == config
    if "cfm_coeff" in flags:
        assert "cfm_loss" in read_metrics(tmp_path / "straight")[0]


def test_grad_checkpointing_trains_the_same_weights(data_dir, tmp_path):
    train.main(base_args(data_dir, tmp_path, "plain", 3))
    train.main(base_args(data_dir, tmp_path, "ckpt", 3, grad_checkpointing=None))
    a = checkpoint.load_checkpoint(str(tmp_path / "plain/checkpoints/0000003.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "ckpt/checkpoints/0000003.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [m["loss_final"] for m in read_metrics(tmp_path / "plain")] == [m["loss_final"] for m in read_metrics(tmp_path / "ckpt")]
    assert "grad_checkpointing" not in b["model_config"]                        # not part of the architecture
