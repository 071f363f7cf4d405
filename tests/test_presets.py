"""presets.py: each paper run expands to the documented flags, which train.py's parser accepts."""
import subprocess

import pytest

import presets
import train
from conftest import ROOT


PAPER = [n for n in presets.PRESETS if n.startswith("reg-")]


def test_the_speedrun_preset_turns_on_every_rung_of_the_ladder():
    args = train.build_parser().parse_args(["--data-dir", "d", "--exp-name", "e"] + presets.flags("speedrun-b1", "train"))
    assert (args.model, args.encoder_depth, args.routing, args.norm, args.rope, args.qk_norm, args.value_residual,
            args.cfm_coeff, args.time_shift, args.precision) == (
        "SiT-B/1", 2, "sprint", "rmsnorm", True, True, True, 0.05, True, "bf16")
    import generate
    gen = generate.build_parser().parse_args(["--ckpt", "x.pt"] + presets.flags("speedrun-b1", "eval"))
    assert gen.class_balanced and gen.cfg_scale == 1.0 and gen.num_steps == 250


@pytest.mark.parametrize("name", PAPER)
def test_each_preset_parses_into_the_paper_recipe(name):
    args = train.build_parser().parse_args(["--data-dir", "d", "--exp-name", "e"] + presets.flags(name, "train"))
    depth = {"SiT-B/2": 4, "SiT-L/2": 8, "SiT-XL/2": 8}[args.model]
    assert (args.encoder_depth, args.enc_type, args.proj_coeff, args.cls) == (depth, "dinov2-vit-b", 0.5, 0.03)
    assert (args.batch_size, args.learning_rate, args.precision, args.tf32) == (256, 1e-4, "fp16", True)
    assert args.max_train_steps == (4_000_000 if name.endswith("4m") else 400_000)
    eval_flags = presets.flags(name, "eval")
    assert eval_flags[eval_flags.index("--mode") + 1] == "sde" and eval_flags[eval_flags.index("--num-steps") + 1] == "250"


def test_later_flags_win_over_a_preset():
    args = train.build_parser().parse_args(["--data-dir", "d", "--exp-name", "e"] + presets.flags("reg-b2-400k", "train")
                                           + ["--batch-size", "128"])
    assert args.batch_size == 128 and args.model == "SiT-B/2"


def test_unknown_preset_is_one_line():
    with pytest.raises(KeyError, match="unknown preset 'x'"):
        presets.flags("x", "train")
    out = subprocess.run(["bash", "train.sh", "no-such-preset"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": __import__("os").environ["PATH"], "PYTHON": __import__("sys").executable})
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "presets.py: error: unknown preset 'no-such-preset'; choose one of " + ", ".join(presets.PRESETS)]


@pytest.mark.parametrize("name", PAPER)
def test_each_preset_evaluation_parses_for_generate(name):
    import generate
    args = generate.build_parser().parse_args(["--ckpt", "x.pt"] + presets.flags(name, "eval"))
    guided = name.endswith("4m")
    assert (args.mode, args.num_steps, args.num_fid_samples, args.per_proc_batch_size) == ("sde", 250, 50000, 64)
    assert args.cfg_scale == (2.3 if guided else 1.0) and args.guidance_high == 0.85
    if guided:
        assert args.cls_cfg_scale == 2.3


def test_eval_sh_takes_a_preset_and_says_what_is_missing(tmp_path):
    import os
    import sys
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable}
    out = subprocess.run(["bash", "eval.sh", "no-such-preset"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "unknown preset 'no-such-preset'" in out.stderr
    out = subprocess.run(["bash", os.path.join(ROOT, "eval.sh"), "reg-b2-400k"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "REF_BATCH": ""})
    assert out.returncode == 1 and "checkpoint not found: exps/reg-b2-400k/checkpoints/(none yet)" in out.stderr


def test_presets_keep_the_newest_few_and_milestones_and_the_readme_states_their_disk():
    import disk_space
    for name in presets.PRESETS:
        args = train.build_parser().parse_args(["--data-dir", "d", "--exp-name", "e"] + presets.flags(name, "train"))
        assert args.keep_last == 3 and args.keep_every > 0
        assert args.keep_every % presets.TRAIN_SH_CHECKPOINTING_STEPS == 0      # milestones are saved steps
    one, peak = presets.disk("reg-xl2-4m")
    assert 10.5e9 < one < 11.5e9                       # the issue's ~11 GB: 16 bytes x ~680M parameters
    assert peak == 8 + 2 + 1           # milestones 0.5M..4M, the newest 3 (4M is both), one being written
    assert one == disk_space.model_checkpoint_bytes("SiT-XL/2")             # the model's defaults are REG's XL
    assert presets.disk_table() in open(f"{ROOT}/README.md").read()
