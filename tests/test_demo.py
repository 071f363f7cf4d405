"""The built-in run (demo.sh) at a reduced size, and the README's first-screen commands."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def first_screen_commands():
    text = open(README).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_first_screen_has_exactly_two_setup_commands_that_exist():
    cmds = first_screen_commands()
    assert len(cmds) == 2, cmds
    setup, tests = cmds
    assert "pip install -r requirements.txt" in setup and "bash demo.sh" in setup
    assert os.path.isfile(os.path.join(ROOT, "requirements.txt"))
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "demo.sh")]).returncode == 0
    test_command = tests.split("&&")[-1].strip()
    assert test_command.startswith("python -m pytest -q")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_command in ci  # CI runs the README's test command (then the slow tests)
    assert "-m slow" in ci


@pytest.mark.parametrize("module", ["train", "generate", "preprocessing.dataset_tools", "evaluations.evaluator",
                                    "evaluations.reference", "demo.pipeline"])
def test_every_entry_point_the_demo_calls_builds_its_parser_and_help(module, capsys):
    """In-process (spawning each script's --help costs seconds apiece): the parser builds and --help
    exits 0; the end-to-end run below proves the demo's own arguments parse."""
    import importlib
    parser = importlib.import_module(module).build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_builtin_pipeline_runs_end_to_end_in_process(tmp_path, capsys):
    """demo/pipeline.py (what demo.sh runs) at a reduced size, in this process: each stage's output
    exists and the losses fell. The script itself and its rerun behaviour: the slow test below."""
    from demo import pipeline
    out = tmp_path / "demo_out"
    result = pipeline.main(["--out", str(out), "--steps", "10", "--log-every", "5", "--num-samples", "10",
                            "--sample-steps", "2", "--eval-images", "4", "--max-images", "200",
                            "--model", "SiT-XS/2"])
    printed = capsys.readouterr().out
    exp = out / "exps" / "reg-digits"
    assert (exp / "checkpoints" / "0000010.pt").is_file() and result["checkpoint"].endswith("0000010.pt")
    logs = [json.loads(line) for line in open(exp / "metrics.jsonl")]
    assert [r["step"] for r in logs] == [5, 10]
    assert logs[-1]["loss_mean"] < logs[0]["loss_mean"]          # training lowered the image loss
    assert logs[-1]["loss_mean_cls_raw"] < logs[0]["loss_mean_cls_raw"]
    acc = json.load(open(out / "digit_accuracy.json"))
    assert acc["num_samples"] == 10 and 0 <= acc["accuracy"] <= 1 and acc["classifier_train_accuracy"] > 0.95
    metrics = json.load(open(out / "samples_eval.metrics.json"))
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= metrics.keys()
    for name in ("samples_by_class.png", "loss_curve.png", "samples/reg-digits.npz", "exps/reg-digits/samples"):
        assert (out / name).exists(), name
    assert "$ python train.py --model SiT-XS/2" in printed and "checkpoint:" in printed and "digit accuracy:" in printed


@pytest.mark.slow
def test_demo_sh_runs_and_a_rerun_reuses_everything(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(os.environ, OUT=str(out), STEPS="20", LOG_EVERY="5", NUM_SAMPLES="10", SAMPLE_STEPS="4",
               EVAL_IMAGES="8", PYTHON=sys.executable, OMP_NUM_THREADS="2")
    cmd = ["bash", os.path.join(ROOT, "demo.sh"), "--max-images", "300"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "checkpoint:" in run.stdout and (out / "samples" / "reg-digits.npz").is_file()
    before = (out / "samples" / "reg-digits.npz").read_bytes()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr + again.stdout
    # a finished rerun reuses the evaluations too (issue 26: it reran the evaluator, ~45 s)
    assert "$ python evaluations/evaluator.py" not in again.stdout and "(up to date:" in again.stdout
    assert (out / "samples" / "reg-digits.npz").read_bytes() == before


def _readme_flag_table(title):
    """{first flag of a row: (default cell, every flag named in the first cell)}."""
    text = open(README).read()
    block = text.split(f"**{title}**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = re.findall(r"`(--[\w-]+)`", cells[0])
        rows[flags[0]] = (cells[1], set(flags))
    return rows


@pytest.mark.parametrize("script", ["train", "generate"])
def test_readme_flag_tables_list_every_flag_with_its_default(script):
    """Every option of the parser has a row with its default; an alias spelling that only sets another
    flag's value (--allow-tf32, --cpu) is named in that flag's row."""
    import argparse
    module = __import__(script)
    rows = _readme_flag_table(f"{script}.py")
    want, aliases = {}, {}
    for action in module.build_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.default == argparse.SUPPRESS:
            aliases[longs[0]] = action.dest
            continue
        want[longs[0]] = "required" if action.required else str(action.default)
    assert sorted(rows) == sorted(want)
    assert {k: rows[k][0] for k in want} == want
    named = set().union(*(flags for _, flags in rows.values()))
    assert set(aliases) <= named, set(aliases) - named


LADDER = "--routing sprint --norm rmsnorm --rope --qk-norm --value-residual --cfm-coeff 0.05 --time-shift"


@pytest.mark.slow
def test_the_builtin_run_with_the_speedrun_ladder_trains_and_samples(tmp_path):
    """Every rung of SpeedrunDiT's ladder at once on the built-in digits (not asserted to be better)."""
    from demo import pipeline
    out = tmp_path / "demo_out"
    result = pipeline.main(["--out", str(out), "--steps", "10", "--log-every", "5", "--num-samples", "10",
                            "--sample-steps", "4", "--eval-images", "8", "--max-images", "300",
                            "--model", "SiT-XS/2", "--exp-name", "ladder",
                            "--train-args", LADDER + " --route-start 2 --route-end 3"])
    config = torch.load(result["checkpoint"], weights_only=True)["model_config"]
    assert (config["routing"], config["norm"], config["rope"], config["value_residual"]) == ("sprint", "rmsnorm", True, True)
    logs = [json.loads(line) for line in open(out / "exps" / "ladder" / "metrics.jsonl")]
    assert "cfm_loss" in logs[-1] and logs[-1]["loss_mean"] < logs[0]["loss_mean"]
    assert json.load(open(out / "digit_accuracy_ladder.json"))["num_samples"] == 10
