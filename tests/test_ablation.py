"""The SiT / REPA / REG ablation on the digits (issue 19) at tiny sizes: the self-supervised encoder
(its class token separates held-out digits far better than a random one), the digits metric (FD zero
for identical sets, growing with a controlled shift; the accuracy), FD logged during training with
the sampled labels, and the ablation script (three runs, table and plot, a rerun resumes)."""
import json

import numpy as np
import pytest
import torch

import train
from conftest import train_args

# The trained class token must beat a random-weight encoder of the same architecture (timm's DINOv2
# init) by at least this much k-NN accuracy on held-out digits, after a few steps at 32 px.
ENCODER_MARGIN = 0.30


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def metric():
    from evaluations.digits import DigitsMetric
    return DigitsMetric()


@pytest.fixture(scope="module")
def real32():
    from evaluations.digits import load_digits_data, render_digits
    images8, labels = load_digits_data()
    return render_digits(images8, 32), labels


# ----------------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------------

def test_render_digits_is_what_make_digits_writes(digits_data):
    from PIL import Image

    from evaluations.digits import load_digits_data, render_digits
    raw = digits_data.parent / "raw"                      # conftest's make_digits output at 32 px
    images8, labels = load_digits_data()
    for i in (0, 1, 500, 1796):
        png = np.asarray(Image.open(raw / str(labels[i]) / f"{i:04d}.png"))
        assert np.array_equal(render_digits(images8[i:i + 1], 32)[0], png)


def test_fd_is_zero_for_identical_sets_and_grows_with_a_controlled_shift(metric, real32):
    from evaluations.digits import DigitsMetric
    images, labels = real32
    m = DigitsMetric(reference_images=images)
    assert abs(m.evaluate(images)["fd"]) < 1e-6
    rng = np.random.default_rng(0)
    noisy = [np.clip(images + rng.normal(0, s, images.shape), 0, 255).astype(np.uint8) for s in (10, 30, 60)]
    fds = [m.evaluate(x)["fd"] for x in noisy]
    assert 0.1 < fds[0] < fds[1] < fds[2], fds                  # pixel noise of growing strength
    shifted = [m.evaluate(np.roll(images, k, axis=2))["fd"] for k in (1, 2, 4)]
    assert 0.1 < shifted[0] < shifted[1] < shifted[2], shifted  # translation by 1, 2, 4 px
    # the default reference (all real digits at the samples' size) agrees with an explicit one
    assert abs(metric.evaluate(images)["fd"]) < 1e-6


def test_accuracy_needs_labels_and_processes_split_gives_the_same_numbers(metric, real32):
    images, labels = real32
    out = metric.evaluate(images, labels)
    assert out["accuracy"] > 0.95 and metric.classifier_train_accuracy > 0.95
    assert "accuracy" not in metric.evaluate(images[:50])
    wrong = metric.evaluate(images[:200], (labels[:200] + 1) % 10)
    assert wrong["accuracy"] < 0.1
    acts = metric.activations(images[:300], labels[:300])
    parts = [metric.activations(images[:100], labels[:100]), metric.activations(images[100:100], labels[100:100]),
             metric.activations(images[100:300], labels[100:300])]                # an empty rank included
    assert metric.metrics_from_activations(parts) == pytest.approx(metric.metrics_from_activations([acts]))


def test_train_py_logs_fd_and_accuracy_with_the_sampled_labels(digits_data, tmp_path):
    train.main(train_args(digits_data, tmp_path, "digits", 2, fid_every=2, checkpointing_steps=2, fid_metric="digits",
                          fid_num_samples=10, fid_num_steps=2, fid_batch_size=5, fid_cfg_scale=1,
                          fid_class_balanced=None))
    rows = [json.loads(line) for line in open(tmp_path / "digits" / "metrics.jsonl")]
    last = rows[-1]
    assert last["step"] == 2 and last["fd_10"] > 0 and 0 <= last["accuracy_10"] <= 1


# ----------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------

def test_encoder_trains_and_its_class_token_separates_held_out_digits(tmp_path, capsys):
    from demo import train_encoder
    from models.encoders import build_encoder
    out = str(tmp_path / "enc.pth")
    argv = ["--out", out, "--resolution", "32", "--max-images", "300", "--steps", "8", "--batch-size", "32",
            "--threads", "1", "--log-every", "4"]
    report = train_encoder.main(argv)
    probe = report["probe"]
    assert report["held_out_images"] == 50 and report["train_images"] == 250
    assert probe["trained"] >= probe["random"] + ENCODER_MARGIN, probe
    losses = [loss for _, loss in report["losses"]]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
    # the official DINOv2 layout, read back through the loader every consumer uses
    sd = torch.load(out, weights_only=True)
    assert "mask_token" in sd and "blocks.3.attn.qkv.weight" in sd
    enc = build_encoder("dinov2-vit-tiny", 32, local_path=out)
    assert enc.weights.kind == "file" and enc.num_patch_tokens == 4
    # rerun: reused, not retrained
    capsys.readouterr()
    again = train_encoder.main(argv)
    assert again["sha256"] == report["sha256"] and "already trained" in capsys.readouterr().out


@pytest.mark.slow
def test_encoder_training_beats_its_own_random_start_at_64px(tmp_path):
    """At the experiment's resolution, 80 steps on 500 digits: the training itself adds class
    separation (at 8 steps and 32 px above, a LayerScale-1 random start can still be as good)."""
    from demo import train_encoder
    report = train_encoder.main(["--out", str(tmp_path / "enc.pth"), "--resolution", "64", "--max-images", "600",
                                 "--steps", "80", "--batch-size", "64", "--threads", "1"])
    probe = report["probe"]
    assert probe["trained"] >= probe["random_layer_scale_init"] + 0.10, probe
    assert probe["trained"] >= probe["random"] + ENCODER_MARGIN, probe


# ----------------------------------------------------------------------------------------------------
# The ablation script
# ----------------------------------------------------------------------------------------------------

def fake_runs(root, steps=(100, 200), seeds=(0, 1), k=250):
    """metrics.jsonl files as train.py writes them; FD: REG < REPA < SiT except REG/REPA at seed 1, step 100."""
    from demo import ablation
    runs = {}
    base = {"SiT": 50.0, "REPA": 40.0, "REG": 30.0}
    for seed in seeds:
        for method in ablation.METHODS:
            name = ablation.run_name(method, seed)
            exp = root / name
            exp.mkdir(parents=True)
            with open(exp / "metrics.jsonl", "w") as f:
                for s in steps:
                    fd = base[method] / (s / 100) + seed
                    if seed == 1 and s == 100 and method == "REG":
                        fd = 45.0
                    f.write(json.dumps({"step": s, "loss": 1.0, f"fd_{k}": fd, f"accuracy_{k}": 0.5,
                                        "eval_seconds": 1.0}) + "\n")
            runs[name] = {"method": method, "seed": seed, "exp": str(exp)}
    return runs


def test_table_plot_and_gaps_from_the_runs(tmp_path):
    from demo import ablation
    args = ablation.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "0,1", "--steps", "200"])
    result = ablation.collect(args, fake_runs(tmp_path / "exps"))
    result["real_floor"] = (2.5, 0.3)
    assert result["steps"] == [100, 200]
    fd = result["summary"]["fd"]
    assert fd["SiT"][200]["per_seed"] == [25.0, 26.0] and fd["SiT"][200]["mean"] == 25.5
    assert result["ordering"][100]["REG<REPA<SiT_seeds"] == 1 and result["ordering"][200]["REG<REPA<SiT_seeds"] == 2
    # each of the paper's orderings counted on its own: at step 100 seed 1 has REPA < REG < SiT
    assert [result["ordering"][100][k + "_seeds"] for k in ablation.ORDERINGS] == [1, 1, 2, 2]
    assert result["ordering"][200]["REPA-REG"][0] == pytest.approx(5.0)
    result["encoders"] = {0: {"probe": {"trained": 0.936, "random": 0.08}},
                          1: {"probe": {"trained": 0.95, "random": 0.081}}}
    text = ablation.write_table(result, str(tmp_path / "table.md"))
    assert "| 200 | 25.5 ± 0.7 (25.0, 26.0) |" in text
    assert "| 100 | 1/2 | 1/2 | 2/2 | 2/2 |" in text and "| 200 | 2/2 | 2/2 | 2/2 | 2/2 |" in text
    assert "seed 0 93.6%, seed 1 95.0%" in text
    assert "Measured on" not in text                      # no invocation recorded its platform
    one = {"platform": "torch 2.14.1+cu130, AVX512", "cpu": "Xeon"}
    result["invocations"] = [dict(one), dict(one), {"wall_seconds": 1.0}]
    text = ablation.write_table(result, str(tmp_path / "table.md"))
    assert "Measured on torch 2.14.1+cu130, AVX512 (Xeon); the per-seed values are bit for bit" in text
    result["invocations"].append({"platform": "torch 2.14.1+cu130, AVX2", "cpu": "EPYC"})
    text = ablation.write_table(result, str(tmp_path / "table.md"))
    assert "several platforms (torch 2.14.1+cu130, AVX2 (EPYC); torch 2.14.1+cu130, AVX512 (Xeon))" in text
    assert ablation.platform_name() == f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
    ablation.plot(result, str(tmp_path / "ablation.png"))
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_each_seed_trains_its_own_encoder_and_its_runs_use_it(tmp_path):
    """The encoder is a random variable of the experiment: seed s trains encoder s (train_encoder
    --seed s), caches its features in a folder of its own, and only seed s's REPA / REG runs read
    them (train.py picks the cache whose weights are REG_DINOV2_WEIGHTS); SiT uses no encoder."""
    from demo import ablation
    stages, info = ablation.plan(ablation.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "3,5"]))
    by_name = {s.name: s for s in stages}
    assert [s.name for s in stages][:5] == ["data", "encoder-s3", "encoder-s5", "features-s3", "features-s5"]
    assert len(set(info["weights"].values())) == 2
    for seed in (3, 5):
        (_, argv), = by_name[f"encoder-s{seed}"].calls
        assert argv[argv.index("--seed") + 1] == str(seed) and argv[argv.index("--out") + 1] == info["weights"][seed]
        (_, argv), = by_name[f"features-s{seed}"].calls
        assert argv[argv.index("--enc-weights") + 1] == info["weights"][seed]
        assert argv[argv.index("--dest") + 1].endswith(f"features-dinov2-vit-tiny-full-s{seed}")
        assert by_name[f"features-s{seed}"].deps == ("data", f"encoder-s{seed}")
        for method in ("REPA", "REG"):
            stage = by_name[ablation.run_name(method, seed)]
            assert stage.env == {"REG_DINOV2_WEIGHTS": info["weights"][seed]} and stage.deps == (f"features-s{seed}",)
            assert stage.calls[0][1][stage.calls[0][1].index("--seed") + 1] == str(seed)
        assert by_name[ablation.run_name("SiT", seed)].env == {}


@pytest.mark.slow
def test_ablation_script_runs_three_runs_writes_table_and_plot_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    from demo import ablation
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--jobs", "0", "--seeds", "0", "--eval-every", "2", "--fid-num-samples", "20",
            "--fid-num-steps", "2", "--encoder-steps", "3", "--encoder-batch-size", "16", "--resolution", "32",
            "--max-images", "200", "--model", "SiT-XS/2", "--projector-dim", "64"]
    first = ablation.main(argv + ["--steps", "2"])
    assert sorted(first["runs"]) == ["reg-s0", "repa-s0", "sit-s0"] and first["steps"] == [2]
    printed = capsys.readouterr().out
    assert "--no-class-token --no-projectors" in printed and "--enc-weights" in printed
    # interrupted at step 2 of 4: the rerun skips the data, encoder and features and resumes every run
    result = ablation.main(argv + ["--steps", "4"])
    printed = capsys.readouterr().out
    assert "features-s0: done already, skipped" in printed and "encoder-s0: done already, skipped" in printed
    assert result["steps"] == [2, 4]
    for name, r in result["runs"].items():
        assert "(step 2)" in (out / "exps" / name / "log.txt").read_text()     # train.py: "resumed from ... (step 2)"
        assert r["fd"][2] == first["runs"][name]["fd"][2]
        assert np.isfinite(r["fd"][4]) and 0 <= r["accuracy"][4] <= 1
    for name in ("table.md", "table.json", "ablation.png", "encoder/dinov2_vittiny14_digits-s0.pth",
                 "data/features-dinov2-vit-tiny-full-s0/manifest.json"):
        assert (out / name).exists(), name
    assert "| 4 |" in (out / "table.md").read_text()
    args_json = json.load(open(out / "exps" / "reg-s0" / "args.json"))
    assert args_json["enc_type"] == "dinov2-vit-tiny" and args_json["cls"] == 0.03
    # finished: a third call trains nothing
    calls = []
    monkeypatch.setattr(train, "main", lambda argv: calls.append(argv))
    again = ablation.main(argv + ["--steps", "4"])
    assert calls == [] and "reg-s0: done already, skipped" in capsys.readouterr().out
    assert again["summary"] == result["summary"] and len(again["invocations"]) == 3
