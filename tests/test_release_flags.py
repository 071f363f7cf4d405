"""The release's flag names keep the release's meanings for non-default values (issue 27); the
project's own meanings have their own flags. The expected behaviour is written here from the REG
release's train.py / models/sit.py (not read from a checkout at run time):

    --batch-size B, --gradient-accumulation-steps G   B // world per process and micro-batch; an optimizer
                                                       step sees B x G images
    --cls 0, --proj-coeff 0                            the model is built as with the defaults (class token,
                                                       projectors); only the loss weight is 0
    --cfg-prob P                                       not passed to the model: labels dropped at 0.1
    --legacy                                           labels dropped at P in train.py, before the latents' noise,
                                                       then again (0.1) by the model: 1 - (1 - P) * 0.9 null
    --epochs E                                         the loop stops after E passes over its loader
                                                       (drop_last), ceil(micro-batches / G) steps each
    logged loss_final, loss_mean, proj_loss, loss_mean_cls  total, image v-loss, 0.5 x alignment, 0.03 x class-token
"""
import json
import os

import pytest
import torch

from conftest import train_args

import train  # noqa: E402
import training_run  # noqa: E402
from data_order import optimizer_steps_per_epoch  # noqa: E402
from runtime import forget_process_state  # noqa: E402


def build(data_dir, tmp_path, **flags):
    """A run built as train.py builds it (no step taken): its model holds the initial weights."""
    parser = train.build_parser()
    args = parser.parse_args(argv(data_dir, tmp_path, "b", 1, cached_features="no", **flags))
    train.check_args(args, parser)
    try:
        return training_run.build(args, parser)
    finally:
        forget_process_state()


def argv(data_dir, tmp_path, name, steps, **flags):
    """conftest.train_args, where batch_size=None leaves --batch-size out."""
    drop = flags.get("batch_size", 0) is None
    args = train_args(data_dir, tmp_path, name, steps, **{k: v for k, v in flags.items() if k != "batch_size"})
    if drop:
        i = args.index("--batch-size")
        del args[i:i + 2]
    return args


def weights(run):
    return {k: v.clone() for k, v in run.model.state_dict().items()}


#################################################################################
#                    Model build: --cls 0, --proj-coeff 0, --cfg-prob            #
#################################################################################

def test_release_flags_leave_the_initial_weights_as_the_defaults_build_them(digits_data, tmp_path, capsys):
    default = weights(build(digits_data, tmp_path))
    assert default["y_embedder.embedding_table.weight"].shape[0] == 11            # 10 classes + the null class
    for flags in (dict(cls=0), dict(proj_coeff=0), dict(cfg_prob=0), dict(cfg_prob=0.3)):
        run = build(digits_data, tmp_path, **flags)
        got = weights(run)
        assert got.keys() == default.keys(), flags
        assert all(torch.equal(got[k], default[k]) for k in got), flags          # bitwise the same draws
        assert run.model.y_embedder.dropout_prob == 0.1, flags                  # --cfg-prob never reaches it
    # the weight-0 terms are still computed, as released: the encoder runs for both targets
    run = build(digits_data, tmp_path, cls=0, proj_coeff=0)
    assert run.model.cls_token_dim == 64 and run.model.z_dims == [64] and run.online_encoders
    assert run.objective.weights == {"proj_loss": 0.0, "loss_mean_cls": 0.0}
    # --cfg-prob other than 0.1 (here 0 and 0.3) warns, one line each, naming the flag that honours the rate
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 2 and "--cfg-prob 0.3 is ignored" in lines[1] and all("--label-dropout" in ln for ln in lines)


def test_the_projects_own_meanings_have_their_own_flags(digits_data, tmp_path):
    repa = build(digits_data, tmp_path, no_class_token=None).model
    assert repa.cls_token_dim == 0 and repa.z_dims == [64]
    sit = build(digits_data, tmp_path, no_class_token=None, no_projectors=None)
    assert (sit.model.cls_token_dim, sit.model.z_dims, sit.online_encoders) == (0, [], False)
    no_align = build(digits_data, tmp_path, no_projectors=None)
    assert no_align.model.z_dims == [] and no_align.objective.weights["proj_loss"] == 0.0
    assert build(digits_data, tmp_path, label_dropout=0.3).model.y_embedder.dropout_prob == 0.3
    plain = build(digits_data, tmp_path, label_dropout=0).model
    assert plain.y_embedder.embedding_table.weight.shape[0] == 10                 # no null class


#################################################################################
#                    --legacy: the release's double label dropout                #
#################################################################################

def test_legacy_drops_labels_twice_in_the_releases_draw_order():
    """Prepare(legacy_drop=p) then the objective: the labels the embedder sees are the release's,
    drawn in its order: train.py's drop, the latents' noise, t, eps, eps_cls, the model's drop."""
    from loss import REGObjective
    from train_step import Prepare
    from conftest import build_sit
    model = build_sit().train()                                                   # 10 classes, dropout 0.1
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    n, p = 64, 0.5
    g = torch.Generator().manual_seed(0)
    batch = {"moments": torch.randn(n, 8, 8, 8, generator=g), "label": torch.randint(0, 10, (n,), generator=g),
             "enc_cls": torch.randn(n, 16, generator=g), "enc_tokens": torch.randn(n, 17, 16, generator=g)}
    prepare = Prepare(model, torch.device("cpu"), 0.5, 0.0, use_features=True, legacy_drop=p)
    torch.manual_seed(7)
    REGObjective()(model, **prepare(batch))
    # what the release's loop draws, in its order
    torch.manual_seed(7)
    first = torch.rand(n) < p                                                     # train.py, --legacy
    torch.randn(n, 4, 8, 8)                                                       # sample_posterior
    torch.rand(n, 1, 1, 1), torch.randn(n, 4, 8, 8), torch.randn(n, 16)          # t, eps, eps_cls
    second = torch.rand(n) < 0.1                                                  # LabelEmbedder.token_drop
    want = torch.where(second, 10, torch.where(first, 10, batch["label"]))
    assert torch.equal(seen[0], want)
    # the rate: 1 - (1 - p) * 0.9 nulls, i.e. ~19% at the release's 0.1
    prepare = Prepare(model, torch.device("cpu"), 0.5, 0.0, use_features=True, legacy_drop=0.1)
    big = {k: v.repeat(500, *([1] * (v.ndim - 1))) for k, v in batch.items()}   # 32000 samples
    torch.manual_seed(1)
    labels = model.y_embedder.token_drop(prepare(big)["y"])
    null = (labels == 10).float().mean().item()
    assert abs(null - 0.19) < 0.01, null
    # without --legacy: the model's drop alone
    torch.manual_seed(1)
    labels = model.y_embedder.token_drop(Prepare(model, torch.device("cpu"), 0.5, 0.0, use_features=True)(big)["y"])
    assert abs((labels == 10).float().mean().item() - 0.1) < 0.01


def test_legacy_without_a_null_class_is_one_clear_line(digits_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(train_args(digits_data, tmp_path, "leg", 1, legacy=None, label_dropout=0))
    assert "--legacy drops labels to the null class, which needs --label-dropout > 0" in capsys.readouterr().err


#################################################################################
#          --batch-size with accumulation, --epochs, and the logged names       #
#################################################################################

def test_stop_step_is_the_releases_epoch_count():
    # n images, batch per process, processes, accumulation -> the release's optimizer steps per epoch
    assert optimizer_steps_per_epoch(100, 8, 1, 1) == 12                          # len(loader), drop_last
    assert optimizer_steps_per_epoch(100, 8, 1, 5) == 3                           # 5 + 5 + a closing 2
    assert optimizer_steps_per_epoch(100, 4, 2, 1) == 12                          # floor(floor(100 / 4) / 2)
    assert optimizer_steps_per_epoch(1_281_167, 32, 8, 1) == 5004                 # ImageNet at 256: 1400 epochs > 4M steps
    # measured on the release's train.py (20 images, --batch-size 4): --epochs 1 stopped at step 5;
    # --gradient-accumulation-steps 2 --epochs 2 stopped at step 6 (2 + 2 + 1 micro-batches per epoch)
    assert optimizer_steps_per_epoch(20, 4, 1, 1) == 5 and 2 * optimizer_steps_per_epoch(20, 4, 1, 2) == 6


def test_batch_size_is_per_micro_batch_and_epochs_stop_the_run(digits_data, tmp_path, monkeypatch):
    """--batch-size 32 --gradient-accumulation-steps 2 --epochs 2 on 100 images: each optimizer step sees
    2 micro-batches of 32 (64 images), an epoch is ceil(3 / 2) = 2 steps, the run stops at step 4 (not
    at --max-train-steps 50); the release's names carry its values."""
    sizes = []
    real = train.train_step

    def recording(state, batches, *a, **k):
        sizes.append([int(b["label"].shape[0]) for b in batches])
        return real(state, batches, *a, **k)
    monkeypatch.setattr(train, "train_step", recording)
    train.main(train_args(digits_data, tmp_path, "acc", 50, cached_features="yes", batch_size=32,
                          gradient_accumulation_steps=2, epochs=2, checkpointing_steps=50))
    assert sizes == [[32, 32]] * 4
    rows = [json.loads(line) for line in open(tmp_path / "acc" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert os.path.isfile(tmp_path / "acc" / "checkpoints" / "0000004.pt")
    assert rows[0]["images_per_sec"] == pytest.approx(64 * rows[0]["steps_per_sec"])
    last = rows[-1]
    assert last["proj_loss"] == pytest.approx(0.5 * last["proj_loss_raw"], rel=1e-5)
    assert last["loss_mean_cls"] == pytest.approx(0.03 * last["loss_mean_cls_raw"], rel=1e-5)
    assert last["loss_final"] == pytest.approx(last["loss_mean"] + last["proj_loss"] + last["loss_mean_cls"], rel=1e-5)
    assert "loss" not in last and not any(k.endswith("_weighted") for k in last)


def test_total_batch_size_is_per_optimizer_step(digits_data, tmp_path, capsys):
    run = build(digits_data, tmp_path, batch_size=None, total_batch_size=16, gradient_accumulation_steps=2)
    assert (run.local_batch, run.step_images) == (8, 16)
    run = build(digits_data, tmp_path, gradient_accumulation_steps=2)              # --batch-size 8: the release's
    assert (run.local_batch, run.step_images) == (8, 16)
    with pytest.raises(SystemExit):
        train.main(argv(digits_data, tmp_path, "bad", 1, batch_size=None, total_batch_size=12,
                        gradient_accumulation_steps=5))
    assert "--total-batch-size 12 is not divisible by processes x accumulation steps (1 x 5)" in capsys.readouterr().err
