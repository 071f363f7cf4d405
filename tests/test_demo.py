"""The built-in run (demo.sh) at a reduced size, and the README's first-screen commands."""
import json
import os
import re
import subprocess
import sys

import pytest

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
    assert "python -m pytest -q" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m pytest -q" in ci  # CI runs the README's test command


def test_every_script_the_demo_calls_exists_and_parses_its_flags():
    demo = open(os.path.join(ROOT, "demo.sh")).read()
    scripts = sorted(set(re.findall(r"\$PY ([\w/]+\.py)", demo)))
    assert {"train.py", "generate.py", "preprocessing/dataset_tools.py", "evaluations/evaluator.py"} <= set(scripts)
    for script in scripts:
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (script, out.stderr[-500:])


@pytest.mark.slow
def test_demo_runs_end_to_end_at_reduced_size(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(os.environ, OUT=str(out), STEPS="20", LOG_EVERY="5", NUM_SAMPLES="10", SAMPLE_STEPS="4",
               EVAL_IMAGES="8", PYTHON=sys.executable, OMP_NUM_THREADS="2")
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    exp = out / "exps" / "reg-digits"
    assert (exp / "checkpoints" / "0000020.pt").is_file()
    logs = [json.loads(line) for line in open(exp / "metrics.jsonl")]
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert logs[-1]["loss_mean"] < logs[0]["loss_mean"]          # training lowered the image loss
    assert logs[-1]["loss_mean_cls"] < logs[0]["loss_mean_cls"]
    acc = json.load(open(out / "digit_accuracy.json"))
    assert acc["num_samples"] == 10 and 0 <= acc["accuracy"] <= 1 and acc["classifier_train_accuracy"] > 0.95
    metrics = json.load(open(out / "samples_eval.metrics.json"))
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= metrics.keys()
    for name in ("samples_by_class.png", "loss_curve.png", "samples/reg-digits.npz"):
        assert (out / name).is_file(), name
    assert "checkpoint:" in run.stdout and "digit accuracy" in run.stdout
    # rerunning reuses what is done: no retraining, same samples
    before = (out / "samples" / "reg-digits.npz").read_bytes()
    again = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr + again.stdout
    assert (out / "samples" / "reg-digits.npz").read_bytes() == before


def _readme_flag_table(title):
    text = open(README).read()
    block = text.split(f"**{title}**", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.findall(r"`(--[\w-]+)`", cells[0])[0]] = cells[1]
    return rows


@pytest.mark.parametrize("script", ["train", "generate"])
def test_readme_flag_tables_list_every_flag_with_its_default(script):
    import argparse
    module = __import__(script)
    rows = _readme_flag_table(f"{script}.py")
    want = {}
    for action in module.build_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        want[longs[0]] = "required" if action.required else str(action.default)
    assert sorted(rows) == sorted(want)
    assert {k: rows[k] for k in want} == want
