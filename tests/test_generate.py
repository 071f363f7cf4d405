"""generate.py end to end on tiny checkpoints (CPU, gloo): seeding, distribution, resume, formats, errors.

The checkpoints are tiny REG/REPA SiTs with randomised weights (zero-initialised read-outs would give
trivial samples), saved in our format (pixel-space "identity" codec) and in the release's (EMA +
argparse Namespace, architecture read off the shapes, decoded by a tiny local AutoencoderKL).
Expected images are rebuilt here from the documented seeding rules with samplers.py directly.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, build_sit, randomize_weights_
from checkpoint import model_from_checkpoint, load_checkpoint, save_checkpoint
from samplers import euler_maruyama_sampler

import generate
from fileio import file_sha256

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
            z_dims=[16], projector_dim=32, encoder_depth=1)
SDE = ["--mode", "sde", "--num-steps", "4", "--cfg-scale", "2.0", "--cls-cfg-scale", "1.5",
       "--guidance-high", "0.7"]


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def _tiny(seed, **overrides):
    return randomize_weights_(build_sit(seed, **{**TINY, **overrides}), seed + 100)


def _ours(model, path, codec="identity"):
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), opt={"state": {}}, steps=3,
                         args=dict(path_type="linear"), model_name=None, model_config=model.config,
                         autoencoder=codec, enc_types=["dinov2-vit-b"]), str(path))


def _release(ema, path, raw=None):
    # The release's layout: no model_config, an argparse Namespace of training flags. num_heads is
    # given because a tiny SiT is not in the size table the shapes are looked up in.
    ns = argparse.Namespace(model="tiny", encoder_depth=1, num_classes=5, num_heads=2, path_type="linear",
                            enc_type="dinov2-vit-b", cls=0.03, proj_coeff=0.5, resolution=16)
    raw = raw or ema
    adam = {k: dict(exp_avg=torch.zeros_like(v)) for k, v in raw.state_dict().items()}
    torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=adam, args=ns, steps=3), str(path))


@pytest.fixture(scope="module", autouse=True)
def one_thread_offline():
    """Tiny models run ~10x faster on one thread than on two that share busy cores; no hub."""
    threads, offline = torch.get_num_threads(), os.environ.get("HF_HUB_OFFLINE")
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"   # a missing SD-VAE fails at once instead of retrying the hub
    yield
    torch.set_num_threads(threads)
    if offline is None:
        os.environ.pop("HF_HUB_OFFLINE")
    else:
        os.environ["HF_HUB_OFFLINE"] = offline


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    reg3 = _tiny(0, in_channels=3)
    _ours(reg3, d / "reg_identity.pt")
    reg4, raw4 = _tiny(1, in_channels=4), _tiny(3, in_channels=4)
    _release(reg4, d / "reg_release.pt", raw=raw4)
    repa4 = _tiny(2, in_channels=4, cls_token_dim=0)
    _release(repa4, d / "repa_release.pt")
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(d / "vae"))
    _ours(reg4, d / "reg4_ours.pt", codec=str(d / "vae"))     # the EMA of reg_release.pt
    _ours(raw4, d / "raw4_ours.pt", codec=str(d / "vae"))     # its raw weights
    return {k: str(v) for k, v in dict(reg=d / "reg_identity.pt", release=d / "reg_release.pt",
                                        repa=d / "repa_release.pt", ours4=d / "reg4_ours.pt",
                                        raw4=d / "raw4_ours.pt", vae=d / "vae").items()}


def run(tmp_path, *argv, name="run"):
    """generate.main in this process; returns (images, labels, sidecar)."""
    out = generate.main(["--sample-dir", str(tmp_path), "--name", name, "--device", "cpu", *map(str, argv)])
    assert out == os.path.join(str(tmp_path), f"{name}.npz")
    return load(tmp_path, name)


def load(tmp_path, name):
    with np.load(os.path.join(str(tmp_path), f"{name}.npz")) as f:
        assert set(f.files) == {"arr_0", "arr_1"}
        images, labels = f["arr_0"], f["arr_1"]
    with open(os.path.join(str(tmp_path), f"{name}.json")) as f:
        return images, labels, json.load(f)


DRIVER = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import generate
dist.init_process_group("gloo")  # once: generate.main() uses a group it finds and leaves it open
for argv in json.loads(sys.argv[2]):
    generate.main(argv)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ddp(ckpts, tmp_path_factory):
    """One `torchrun --nproc_per_node 2` on CPU (gloo) running generate.main for both seed schemes
    (one launch: starting Python + torch twice costs more than all the other tests together)."""
    out = tmp_path_factory.mktemp("ddp")
    common = ["--ckpt", ckpts["reg"], "--sample-dir", str(out), "--device", "cpu", "--num-fid-samples", "7",
              "--per-proc-batch-size", "2", *map(str, SDE)]
    runs = [common + ["--name", "per-image"],
            common + ["--name", "release", "--seed-scheme", "release", "--global-seed", "3"]]
    (out / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(out / "driver.py"), ROOT, json.dumps(runs)]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, runs


def fails(capsys, *argv):
    """Run main, expect argparse's exit 2, return the one error line."""
    with pytest.raises(SystemExit) as e:
        generate.main(["--device", "cpu", *map(str, argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("generate.py: error: ")
    return err


#################################################################################
#                 Independent rebuilds of the two seeding schemes               #
#################################################################################

def to_uint8(x):
    """The release's quantisation, written out: clamp(255 (x + 1) / 2) truncated to uint8, NHWC."""
    return np.clip(255.0 * (x.double().numpy() + 1) / 2, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def expected_per_image(model, index, seed=0, steps=4, cfg=2.0, cls_cfg=1.5, gh=0.7, balanced=False):
    """Image `index` by the documented per-image rule, alone in its batch (identity codec)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]))
    c, s, k = model.config["in_channels"], model.config["input_size"], model.num_classes
    z = torch.randn(c, s, s, generator=g)[None]
    y = torch.randint(0, k, (1,), generator=g)
    cls = torch.randn(model.cls_token_dim, generator=g)[None]
    if balanced:
        y = torch.tensor([index % k])
    noise = lambda like: torch.randn(like.shape[1:], generator=g, dtype=like.dtype)[None]  # noqa: E731
    x = euler_maruyama_sampler(model, z, y, num_steps=steps, cfg_scale=cfg, guidance_high=gh,
                               cls_latents=cls, cls_cfg_scale=cls_cfg, noise_fn=noise)
    return to_uint8(x.float())[0], int(y)


def expected_release(model, num, n, world, seed=0, steps=4, cfg=2.0, cls_cfg=1.5, gh=0.7):
    """The release's scheme: per rank torch.manual_seed(seed * world + rank), per batch z, y, cls from the
    global generator and the sampler's randn_like; image index = b * n * world + k * world + rank."""
    c, s, k = model.config["in_channels"], model.config["input_size"], model.num_classes
    images, labels = {}, {}
    for rank in range(world):
        torch.manual_seed(seed * world + rank)
        for b in range(-(-num // (n * world))):
            z = torch.randn(n, c, s, s)
            y = torch.randint(0, k, (n,))
            cls = torch.randn(n, model.cls_token_dim)
            x = euler_maruyama_sampler(model, z, y, num_steps=steps, cfg_scale=cfg, guidance_high=gh,
                                       cls_latents=cls, cls_cfg_scale=cls_cfg)
            for j, img in enumerate(to_uint8(x.float())):
                images[b * n * world + j * world + rank], labels[b * n * world + j * world + rank] = img, int(y[j])
    return np.stack([images[i] for i in range(num)]), np.array([labels[i] for i in range(num)])


#################################################################################
#                                     Tests                                     #
#################################################################################

def test_per_image_seeding_is_independent_of_world_and_batch_size(ckpts, ddp, tmp_path):
    """torchrun x2 (batch 2) == one process (batch 3) == each image rebuilt alone from its own seed."""
    ddp, ddp_labels, ddp_meta = load(ddp[0], "per-image")
    one, one_labels, one_meta = run(tmp_path, "--ckpt", ckpts["reg"], "--num-fid-samples", 7,
                                    "--per-proc-batch-size", 3, *SDE, name="one")
    assert ddp.shape == (7, 8, 8, 3) and ddp.dtype == np.uint8
    np.testing.assert_array_equal(ddp, one)
    np.testing.assert_array_equal(ddp_labels, one_labels)
    assert ddp_meta["key"] == one_meta["key"]                       # world size is not part of the key
    assert ddp_meta["runs"][0]["world_size"] == 2 and one_meta["runs"][0]["world_size"] == 1

    model = model_from_checkpoint(load_checkpoint(ckpts["reg"])).eval()
    for i in (0, 4, 6):
        img, label = expected_per_image(model, i)
        np.testing.assert_array_equal(one[i], img)
        assert one_labels[i] == label
    assert len({one[i].tobytes() for i in range(7)}) == 7 and one.std() > 20   # non-trivial samples

    key = one_meta["key"]
    assert key["checkpoint_sha256"] == file_sha256(ckpts["reg"])
    assert (key["sampler"], key["num_steps"], key["cfg_scale"], key["cls_cfg_scale"]) == ("sde", 4, 2.0, 1.5)
    assert key["guidance_interval"] == [0.0, 0.7] and key["seed_scheme"] == "per-image"
    assert key["labels"] == "uniform" and key["precision"] == "fp32" and key["weights"] == "ema"


def test_release_scheme_reproduces_the_release_draws(ckpts, ddp, capsys):
    """Release scheme on 2 ranks, 7 images from 2 x 2 x 2 = 8 sampled: matches the rebuilt release loop,
    and a folder made on 2 ranks refuses a 1-rank resume (its noise would differ)."""
    out, runs = ddp
    images, labels, meta = load(out, "release")
    model = model_from_checkpoint(load_checkpoint(ckpts["reg"])).eval()
    want, want_labels = expected_release(model, 7, n=2, world=2, seed=3)
    np.testing.assert_array_equal(images, want)
    np.testing.assert_array_equal(labels, want_labels)
    assert meta["key"]["world_size"] == 2 and meta["key"]["per_proc_batch_size"] == 2
    # Index layout: rank 0 wrote the even images of each batch.
    with np.load(out / "release" / "rank000-batch000001.npz") as shard:
        np.testing.assert_array_equal(shard["indices"], [4, 6])
    with np.load(out / "release" / "rank001-batch000001.npz") as shard:
        np.testing.assert_array_equal(shard["indices"], [5])        # image 7 was sampled and dropped

    os.remove(out / "release.json")
    err = fails(capsys, *runs[1])                                  # same command, one process
    assert "different configuration" in err and "world_size: 2 -> 1" in err


def test_release_scheme_resume_replays_skipped_batches(ckpts, tmp_path):
    """One rank, batches of 2: a missing middle batch is resampled with the generator advanced past
    batch 0 exactly as if it had been sampled."""
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 5, "--per-proc-batch-size", 2, "--seed-scheme", "release", *SDE]
    full, labels, _ = run(tmp_path, *argv)
    model = model_from_checkpoint(load_checkpoint(ckpts["reg"])).eval()
    want, want_labels = expected_release(model, 5, n=2, world=1)
    np.testing.assert_array_equal(full, want)
    np.testing.assert_array_equal(labels, want_labels)

    for f in ("run.npz", "run.json", "run/rank000-batch000001.npz"):
        os.remove(tmp_path / f)
    again, again_labels, _ = run(tmp_path, *argv)
    np.testing.assert_array_equal(again, full)
    np.testing.assert_array_equal(again_labels, labels)


def test_interrupted_run_resumes_and_keeps_written_shards(ckpts, tmp_path, capsys, monkeypatch):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 7, *SDE]
    full, labels, _ = run(tmp_path / "ref", *argv, "--per-proc-batch-size", 3)

    # Interrupt (Ctrl-C) while the second shard is being written.
    write_shard, calls = generate.write_shard, []
    def interrupted(*a, **k):  # noqa: E306
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_shard(*a, **k)
    monkeypatch.setattr(generate, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *argv, "--per-proc-batch-size", 3)
    monkeypatch.undo()
    folder = tmp_path / "run"
    assert sorted(os.listdir(folder)) == ["config.json", "img-0000000-0000003.npz"]
    assert not (tmp_path / "run.npz").exists()
    again, again_labels, meta = run(tmp_path, *argv, "--per-proc-batch-size", 2)   # a new batch size is fine
    np.testing.assert_array_equal(again, full)
    np.testing.assert_array_equal(again_labels, labels)
    assert [r["per_proc_batch_size"] for r in meta["runs"]] == [3, 2]
    assert sorted(os.listdir(folder)) == ["config.json", "img-0000000-0000003.npz", "img-0000003-0000005.npz",
                                          "img-0000005-0000007.npz"]

    # Written shards are reused, not resampled: mark one, lose another and the npz, leave a half-written
    # temp file; the marked images come back as they are, the lost ones as before.
    os.remove(tmp_path / "run.npz")
    os.remove(tmp_path / "run.json")
    os.remove(folder / "img-0000005-0000007.npz")
    (folder / ".tmp-dead.npz").write_bytes(b"partial")
    with np.load(folder / "img-0000000-0000003.npz") as s:
        marked = dict(s)
    marked["images"] = np.zeros_like(marked["images"])
    np.savez(folder / "img-0000000-0000003.npz", **marked)
    again, _, _ = run(tmp_path, *argv, "--per-proc-batch-size", 3)
    assert (again[:3] == 0).all()
    np.testing.assert_array_equal(again[3:], full[3:])

    # Complete: a third run does nothing.
    mtime = os.path.getmtime(tmp_path / "run.npz")
    capsys.readouterr()
    run(tmp_path, *argv)
    assert "already complete" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "run.npz") == mtime


def test_release_checkpoint_equals_ours_and_release_flags(ckpts, tmp_path):
    """Same weights saved in the release's format (architecture inferred, Adam state present) and in ours
    give identical images; the release's eval.sh flags are accepted (underscore spellings, --cls,
    --local-rank), its unusable defaults are not errors when not given."""
    common = ["--num-fid-samples", 3, "--per-proc-batch-size", 3, "--vae-path", ckpts["vae"], *SDE]
    ours, _, _ = run(tmp_path, "--ckpt", ckpts["ours4"], *common, name="ours")
    rel, _, meta = run(tmp_path, "--ckpt", ckpts["release"], *common, "--cls=16", "--projector-embed-dims=16",
                       "--encoder-depth=1", "--path-type=linear", "--guidance_low", 0.0, "--guidance_high", 0.7,
                       "--num-classes", 5, "--no-qk-norm", "--resolution", 16, "--local-rank=0", name="release")
    assert rel.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(rel, ours)
    assert rel.std() > 1 and meta["key"]["autoencoder"] == ckpts["vae"]

    raw, _, _ = run(tmp_path, "--ckpt", ckpts["release"], *common, "--use-model-weights", name="raw")
    np.testing.assert_array_equal(raw, run(tmp_path, "--ckpt", ckpts["raw4"], *common, name="raw-ours")[0])
    assert not np.array_equal(raw, rel)

    repa, _, _ = run(tmp_path, "--ckpt", ckpts["repa"], "--num-fid-samples", 3, "--vae-path", ckpts["vae"],
                     "--num-steps", 4, "--cfg-scale", 2.0, "--cls", 0, name="repa")
    assert repa.shape == (3, 16, 16, 3) and not np.array_equal(repa, rel)


def test_ode_euler_converges_to_heun(ckpts, tmp_path):
    """Deterministic ODE: Euler with 200 steps and Heun with 20 land on the same images (to a grey level
    or two), while Euler with the same 20 steps is an order of magnitude further off (first order)."""
    base = ["--ckpt", ckpts["reg"], "--num-fid-samples", 3, "--per-proc-batch-size", 3, "--mode", "ode",
            "--cfg-scale", 1.5, "--cls-cfg-scale", 1.0]
    euler, _, _ = run(tmp_path, *base, "--num-steps", 200, name="euler")
    heun, _, _ = run(tmp_path, *base, "--num-steps", 20, "--heun", name="heun")
    euler20, _, _ = run(tmp_path, *base, "--num-steps", 20, name="euler20")
    err = np.abs(euler.astype(int) - heun.astype(int))
    err20 = np.abs(euler20.astype(int) - heun.astype(int))
    assert err.mean() < 0.5 and err.max() <= 4, (err.mean(), err.max())
    assert err20.mean() > 5 * max(err.mean(), 0.1), (err20.mean(), err.mean())


def test_class_balanced_labels_pngs_and_bf16(ckpts, tmp_path):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 10, "--per-proc-batch-size", 4, *SDE]
    images, labels, meta = run(tmp_path, *argv, "--class-balanced", "--save-png", name="bal")
    np.testing.assert_array_equal(labels, np.arange(10) % 5)
    assert meta["label_counts"] == {"min": 2, "max": 2}
    model = model_from_checkpoint(load_checkpoint(ckpts["reg"])).eval()
    img, _ = expected_per_image(model, 7, balanced=True)
    np.testing.assert_array_equal(images[7], img)
    from PIL import Image
    for i in (0, 9):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bal" / f"{i:06d}.png")), images[i])

    bf16, _, meta16 = run(tmp_path, *argv, "--class-balanced", "--precision", "bf16", name="bf16")
    diff = np.abs(bf16.astype(int) - images.astype(int))
    assert meta16["key"]["precision"] == "bf16"
    assert 0 < diff.mean() < 2    # autocast changes the numbers a little, not the images


def test_out_of_memory_batches_are_split_into_the_same_images(ckpts, tmp_path, monkeypatch, capsys):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 5, *SDE]
    full, labels, _ = run(tmp_path / "ref", *argv, "--per-proc-batch-size", 5)
    sample_images, sizes = generate.sample_images, []
    def small_memory(model, codec, z, *a, **k):  # noqa: E306 - a device that holds 2 images at most
        sizes.append(len(z))
        if len(z) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return sample_images(model, codec, z, *a, **k)
    monkeypatch.setattr(generate, "sample_images", small_memory)
    images, got_labels, _ = run(tmp_path, *argv, "--per-proc-batch-size", "auto")   # 32 on the CPU: one batch of 5
    assert sizes == [5, 2, 3, 1, 2]                       # 5 -> 2 + 3, 3 -> 1 + 2
    assert "out of memory with 5 images per batch; retrying as 2 + 3" in capsys.readouterr().err
    np.testing.assert_array_equal(images, full)
    np.testing.assert_array_equal(got_labels, labels)
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "img-0000000-0000002.npz",
                                                  "img-0000002-0000003.npz", "img-0000003-0000005.npz"]


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{missing}"], "checkpoint not found"),
    (["--per-proc-batch-size", "many"], "expected a positive integer or 'auto', got 'many'"),
    (["--per-proc-batch-size", "auto", "--seed-scheme", "release"], "needs a fixed --per-proc-batch-size"),
    (["--num-fid-samples", 0], "--num-fid-samples must be >= 1"),
    (["--model", "SiT-B/2"], "--model SiT-B/2 but the checkpoint holds a custom SiT"),
    (["--cls", 768], "--cls 768 but the checkpoint's class token has width 16"),
    (["--projector-embed-dims", "768,1024"], "--projector-embed-dims 768,1024 but the checkpoint's projectors"),
    (["--encoder-depth", 8], "--encoder-depth 8 but the checkpoint was trained with 1"),
    (["--resolution", 256], "--resolution 256 but the checkpoint makes 8px images"),
    (["--num-classes", 1000], "--num-classes 1000 but the checkpoint has 5 classes"),
    (["--qk-norm"], "--qk-norm but the checkpoint was trained without QK-norm"),
    (["--path-type", "cosine"], "--path-type cosine but the checkpoint was trained on the linear path"),
    (["--vae", "ema"], "trained on 'identity' latents"),
    (["--heun"], "--heun applies to --mode ode only"),
    (["--cfg-scale", 0.5], "--cfg-scale must be >= 1"),
    (["--guidance-low", 0.9, "--guidance-high", 0.5], "need 0 <= --guidance-low <= --guidance-high <= 1"),
])
def test_bad_input_is_a_clear_error(ckpts, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nope.pt") if isinstance(a, str) else a for a in argv]
    if "--ckpt" not in argv:
        argv = ["--ckpt", ckpts["reg"], *argv]
    err = fails(capsys, "--sample-dir", tmp_path, "--num-steps", 2, *argv)
    assert message in err, err
    assert not glob.glob(str(tmp_path / "*.npz"))


def test_bad_checkpoints_and_foreign_sample_dirs(ckpts, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in fails(capsys, "--ckpt", junk)
    assert "--cls 16 but the checkpoint's class token has width 0" in fails(capsys, "--ckpt", ckpts["repa"], "--cls", 16)
    assert "--model SiT-XL/2" in fails(capsys, "--ckpt", ckpts["release"], "--model", "SiT-XL/2", "--vae-path", ckpts["vae"])
    err = fails(capsys, "--ckpt", ckpts["release"])                  # SD-VAE weights are not here
    assert "cannot load the decoder 'ema'" in err and "--vae-path" in err
    err = fails(capsys, "--ckpt", ckpts["reg"], "--vae-path", ckpts["vae"])
    assert "has 4 latent channels but the model denoises 3" in err
    assert "config.json" in fails(capsys, "--ckpt", ckpts["release"], "--vae-path", tmp_path)   # not a VAE folder

    base = ["--ckpt", ckpts["reg"], "--sample-dir", tmp_path, "--name", "x", "--num-fid-samples", 2, *SDE]
    generate.main(["--device", "cpu", *map(str, base)])
    err = fails(capsys, *base, "--num-steps", 5)                       # same folder, other settings
    assert "different configuration" in err and "num_steps: 4 -> 5" in err
    os.remove(tmp_path / "x.json")
    err = fails(capsys, *base, "--global-seed", 1)
    assert "sample dir" in err and "global_seed: 0 -> 1" in err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "000000.png").write_bytes(b"")
    assert "no config.json" in fails(capsys, "--ckpt", ckpts["reg"], "--sample-dir", tmp_path, "--name", "y")
