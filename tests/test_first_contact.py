"""A new user's first minutes (issue 26, row 10): the messages they meet first are one useful line."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_train_sh_without_data_says_so_in_one_line_before_starting_processes(tmp_path):
    env = dict(os.environ, DATA_DIR=str(tmp_path / "nowhere"), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.pop("NUM_GPUS", None)
    out = subprocess.run(["bash", os.path.join(ROOT, "train.sh"), "reg-b2-400k"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and out.stdout == ""
    assert len(lines) <= 2, lines                                  # the no-GPU note, then the useful line
    assert "DATA_DIR" in lines[-1] and "does not exist" in lines[-1] and "dataset_tools.py" in lines[-1]


def test_train_sh_defaults_to_a_tracker_that_works_offline():
    text = open(os.path.join(ROOT, "train.sh")).read()
    assert re.search(r"^REPORT_TO=\$\{REPORT_TO:-tensorboard\}", text, re.M)


@pytest.mark.parametrize("module", ["train", "generate"])
def test_a_bad_flag_is_one_line_without_the_usage_block(module, capsys):
    import importlib
    main = importlib.import_module(module).main
    required = {"train": ["--exp-name", "x", "--data-dir", "x"], "generate": ["--ckpt", "x"]}[module]
    with pytest.raises(SystemExit) as e:
        main(required + ["--no-such-flag"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "unrecognized arguments: --no-such-flag" in err and f"{module}.py --help" in err


@pytest.mark.parametrize("module", ["train", "generate"])
def test_every_flag_shows_its_default_once_in_help(module):
    import argparse
    import importlib
    parser = importlib.import_module(module).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = " ".join(formatter._format_action(action).split())
        stated = text.count("(default:") + len(re.findall(r"\bdefault\b(?!:? ?%)", text.replace("(default:", "")))
        assert stated >= 1 and text.count("(default:") <= 1, (action.option_strings, text)


def test_sample_grids_have_a_gap_between_cells():
    from online_eval import GRID_GAP, GRID_GAP_GREY, image_grid
    images = np.full((4, 5, 7, 3), 255, np.uint8)                      # white cells
    grid = image_grid(images, cols=2)
    assert grid.shape == (2 * (5 + GRID_GAP) + GRID_GAP, 2 * (7 + GRID_GAP) + GRID_GAP, 3)
    between_rows = grid[GRID_GAP + 5:2 * GRID_GAP + 5]                  # the band after the first row of cells
    assert (between_rows == GRID_GAP_GREY).all() and (grid[GRID_GAP:GRID_GAP + 5, GRID_GAP:GRID_GAP + 7] == 255).all()


def test_demo_sh_and_the_readme_state_the_same_run_time():
    header = open(os.path.join(ROOT, "demo.sh")).read().splitlines()[1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    minutes = re.search(r"about (\w+) minutes", header).group(1)
    assert minutes == "four" and "about 4 minutes on 2 CPU cores" in readme


def test_where_to_get_the_reference_batch_is_in_the_readme():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz" in readme
