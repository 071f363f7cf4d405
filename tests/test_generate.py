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

import checkpoint
import fileio
import generate
import samplers
import sampling
import shard_store
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


def _ours(model, path, codec="identity", **train_args):
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), opt={"state": {}}, steps=3,
                         args=dict(path_type="linear", **train_args), model_name=None, model_config=model.config,
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
    # trained with SpeedrunDiT-style time shifting: C h w = 3 x 8 x 8 = 192 = 4 x 48, so the shift is 2
    _ours(reg3, d / "reg_shifted.pt", time_shift=True, shift_base=48)
    # a named size (SiT-T/2) in REPA's layout, for REPA's own command line
    repa_t2 = randomize_weights_(build_sit(5, **{**TINY, "hidden_size": 256, "depth": 6, "num_heads": 4,
                                                 "in_channels": 4, "cls_token_dim": 0, "encoder_depth": 2}), 105)
    (d / "repa" / "checkpoints").mkdir(parents=True)
    torch.save(dict(model=repa_t2.state_dict(), ema=repa_t2.state_dict(), opt={}, steps=5,
                    args=argparse.Namespace(model="SiT-T/2", encoder_depth=2, num_classes=5, path_type="linear")),
               str(d / "repa" / "checkpoints" / "0000005.pt"))
    return {k: str(v) for k, v in dict(reg=d / "reg_identity.pt", release=d / "reg_release.pt",
                                        repa=d / "repa_release.pt", ours4=d / "reg4_ours.pt",
                                        raw4=d / "raw4_ours.pt", vae=d / "vae", shifted=d / "reg_shifted.pt",
                                        repa_t2=d / "repa" / "checkpoints" / "0000005.pt").items()}


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


def expected_per_image(model, index, seed=0, steps=4, cfg=2.0, cls_cfg=1.5, gh=0.7, balanced=False, shift=1.0,
                       pdg=False):
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
                               cls_latents=cls, cls_cfg_scale=cls_cfg, noise_fn=noise, time_shift=shift,
                               path_drop_guidance=pdg)
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

@pytest.mark.slow
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


@pytest.mark.slow
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
    write_shard, calls = shard_store.write_shard, []
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


def count_network_calls(monkeypatch) -> list:
    """Patch generate's model loading so every forward of the sampling network is counted."""
    calls, build = [], checkpoint.model_from_checkpoint

    def counted(*a, **k):
        model = build(*a, **k)
        model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
        return model
    monkeypatch.setattr(checkpoint, "model_from_checkpoint", counted)
    return calls


def test_sampler_out_of_memory_splits_and_keeps_the_smaller_batch(ckpts, tmp_path, monkeypatch, capsys):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 10, *SDE]
    full, labels, _ = run(tmp_path / "ref", *argv, "--per-proc-batch-size", 10)
    sample_latents, sizes = sampling.sample_latents, []
    def small_memory(model, indices, *a, **k):  # noqa: E306 - a device that holds 2 images at most
        sizes.append(len(indices))
        if len(indices) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return sample_latents(model, indices, *a, **k)
    monkeypatch.setattr(generate, "sample_latents", small_memory)
    images, got_labels, _ = run(tmp_path, *argv, "--per-proc-batch-size", 4)     # batches [0,4) [4,8) [8,10)
    # [0,4) fails once and is split; the later batches start at the smaller size and never fail again
    assert sizes == [4, 2, 2, 2, 2, 2]
    err = capsys.readouterr().err
    assert "out of memory with 4 images per batch; retrying as 2 + 2 and sampling at most 2 at a time" in err
    np.testing.assert_array_equal(images, full)
    np.testing.assert_array_equal(got_labels, labels)
    assert sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("img")) == [
        f"img-{a:07d}-{a + 2:07d}.npz" for a in range(0, 10, 2)]

    # A batch of one that does not fit is an error (nothing left to split), and so is any batch of the
    # release scheme (its noise depends on the batch).
    monkeypatch.setattr(generate, "sample_latents", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("simulated")))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="seed-scheme release"):
        run(tmp_path, *argv, "--per-proc-batch-size", 2, "--seed-scheme", "release", name="rel")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="1 images per batch"):
        run(tmp_path, *argv, "--per-proc-batch-size", 1, name="one")


def test_decoder_out_of_memory_never_resamples(ckpts, tmp_path, monkeypatch, capsys):
    """A decode that runs out of memory is retried in smaller chunks from the same latents: no extra
    network call, the same images, and the smaller chunk is kept for the later batches."""
    argv = ["--ckpt", ckpts["ours4"], "--num-fid-samples", 8, "--per-proc-batch-size", 4, "--decode-batch-size", 4, *SDE]
    calls = count_network_calls(monkeypatch)
    full, labels, _ = run(tmp_path / "ref", *argv)
    normal_calls = list(calls)
    assert normal_calls == [4, 8, 8, 8] * 2        # 4 SDE steps per batch (t = 1 .68 .36 .04), doubled <= 0.7

    from models.autoencoder import Autoencoder
    decode, sizes = Autoencoder.decode, []
    def flaky(self, z):  # noqa: E306 - out of memory on the first chunk of 4 only
        sizes.append(len(z))
        if len(z) == 4 and sizes.count(4) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(self, z)
    monkeypatch.setattr(Autoencoder, "decode", flaky)
    calls.clear()
    images, got_labels, _ = run(tmp_path, *argv)
    assert calls == normal_calls                   # not one sampler step more
    assert sizes == [4, 2, 2, 2, 2]                # halved once, then kept for the second batch
    assert "out of memory decoding 4 images; decoding 2 at a time from now on" in capsys.readouterr().err
    np.testing.assert_array_equal(images, full)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{missing}"], "checkpoint not found"),
    (["--per-proc-batch-size", "many"], "expected a positive integer or 'auto', got 'many'"),
    (["--per-proc-batch-size", "auto", "--seed-scheme", "release"], "needs a fixed --per-proc-batch-size"),
    (["--num-fid-samples", 0], "--num-fid-samples must be >= 1"),
    (["--model", "SiT-B/2"], "--model SiT-B/2 but the checkpoint holds a custom SiT"),
    (["--cls", 768], "--cls-token-dim (--cls) 768 but the checkpoint's class token has width 16"),
    (["--cls-token-dim", 8], "--cls-token-dim (--cls) 8 but the checkpoint's class token has width 16"),
    (["--projector-embed-dims", "768,1024"], "--projector-embed-dims 768,1024 but the checkpoint's projectors"),
    (["--encoder-depth", 8], "--encoder-depth 8 but the checkpoint was trained with 1"),
    (["--resolution", 256], "--resolution 256 but the checkpoint makes 8px images"),
    (["--num-classes", 1000], "--num-classes 1000 but the checkpoint has 5 classes"),
    (["--qk-norm"], "--qk-norm but the checkpoint was trained without QK-norm"),
    (["--path-type", "cosine"], "--path-type cosine but the checkpoint was trained on the linear path"),
    (["--vae", "ema"], "made by 'identity', which decodes with itself"),
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
    import integrity                                                  # issue 26: flipped bytes, with a record
    damaged = tmp_path / "0000002.pt"
    data = bytearray(open(ckpts["reg"], "rb").read())
    integrity.write_record(str(damaged), __import__("hashlib").sha256(data).hexdigest())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    err = fails(capsys, "--ckpt", damaged)
    assert "0000002.pt is not a readable checkpoint (damaged: its sha256 differs from its integrity record" in err
    assert "--cls-token-dim (--cls) 16 but the checkpoint's class token has width 0" in fails(
        capsys, "--ckpt", ckpts["repa"], "--cls", 16)
    assert "--model SiT-XL/2" in fails(capsys, "--ckpt", ckpts["release"], "--model", "SiT-XL/2", "--vae-path", ckpts["vae"])
    err = fails(capsys, "--ckpt", ckpts["release"])                  # SD-VAE weights are not here
    assert "cannot load the decoder 'ema'" in err and "--vae-path" in err
    err = fails(capsys, "--ckpt", ckpts["reg"], "--vae-path", ckpts["vae"])
    assert "made by 'identity', which decodes with itself; drop --vae-path" in err
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


#################################################################################
#              The releases' command lines, names and defaults                  #
#################################################################################

def test_parser_spellings_and_defaults():
    """Our names and the releases' aliases land on the same settings; defaults as the release's
    generate.py where it is not defective (see the module docstring of generate.py)."""
    p = generate.build_parser()
    d = p.parse_args(["--ckpt", "x.pt"])
    assert (d.cfg_scale, d.num_steps, d.guidance_low, d.guidance_high, d.per_proc_batch_size) == (1.5, 50, 0.0, 1.0, 32)
    assert (d.num_fid_samples, d.seed, d.tf32, d.heun, d.legacy, d.sample_dir) == (50_000, 0, True, False, False, "samples")
    assert d.precision == "fp32" and d.decode_batch_size == sampling.DEFAULT_DECODE_BATCH
    # resolved from the checkpoint: mode (sde with a class token, else ode), cls-cfg-scale (1.5 with a class token)
    assert d.mode is None and d.cls_cfg_scale is None and d.cls_token_dim is None and d.time_shift is None
    a = p.parse_args(["--ckpt", "x.pt", "--cls=768", "--global-seed", "3", "--mixed-precision", "no",
                      "--balanced-sampling", "--time-shifting", "--shift-base", "1024", "--allow-tf32",
                      "--local-rank=1", "--guidance_high", "0.85", "--legacy"])
    assert (a.cls_token_dim, a.seed, a.precision, a.class_balanced, a.time_shift, a.shift_base) == (768, 3, "fp32", True, True, 1024)
    assert (a.tf32, a.local_rank, a.guidance_high, a.legacy) == (True, 1, 0.85, True)
    b = p.parse_args(["--ckpt", "x.pt", "--cls-token-dim", "16", "--seed", "4", "--precision", "fp16",
                      "--no-class-balanced", "--no-time-shift", "--no-tf32"])
    assert (b.cls_token_dim, b.seed, b.precision, b.class_balanced, b.time_shift, b.tf32) == (16, 4, "fp16", False, False, False)
    with pytest.raises(SystemExit):
        p.parse_args(["--ckpt", "x.pt", "--precision", "fp8"])


def test_default_name_is_the_releases_and_other_settings_are_refused(ckpts, tmp_path, capsys):
    """No --name: the release's folder/npz name, floats as str(); the defaults of the release apply
    (sde for a class-token checkpoint, cls-cfg 1.5); settings outside the name are in the sidecar, and a
    rerun with other ones into the same name is refused, naming them."""
    base = ["--ckpt", ckpts["reg"], "--sample-dir", tmp_path, "--num-fid-samples", 2, "--num-steps", 2]
    out = generate.main(["--device", "cpu", *map(str, base)])
    name = "custom-reg_identity-size-8-vae-identity-cfg-1.5-seed-0-sde-1.0-1.5"
    assert out == os.path.join(str(tmp_path), name + ".npz")
    key = load(tmp_path, name)[2]["key"]
    assert (key["sampler"], key["cls_cfg_scale"], key["cfg_scale"], key["global_seed"]) == ("sde", 1.5, 1.5, 0)
    assert "time_shift" not in key                                     # off: as in sidecars made before it existed
    out = generate.main(["--device", "cpu", *map(str, base), "--cfg-scale", "2.3", "--cls-cfg-scale", "2.3",
                         "--guidance-high", "0.85", "--global-seed", "1"])
    assert os.path.basename(out) == "custom-reg_identity-size-8-vae-identity-cfg-2.3-seed-1-sde-0.85-2.3.npz"
    err = fails(capsys, *base, "--num-steps", 3)                        # not in the name: same file, refused
    assert "different configuration" in err and "num_steps: 2 -> 3" in err
    err = fails(capsys, *base, "--seed-scheme", "release", "--per-proc-batch-size", 2)
    assert "seed_scheme: 'per-image' -> 'release'" in err


def test_repa_command_line_and_checkpoint(ckpts, tmp_path, monkeypatch, capsys):
    """REPA's README command (sizes shrunk) on a REPA checkpoint of a named size, decoder found through
    REG_VAE_PATH as offline users do: REPA's output name; without --mode REPA's default (ode) is used."""
    monkeypatch.setenv("REG_VAE_PATH", ckpts["vae"])
    argv = ["--model", "SiT-T/2", "--num-fid-samples", "3", "--ckpt", ckpts["repa_t2"], "--path-type=linear",
            "--encoder-depth=2", "--projector-embed-dims=16", "--per-proc-batch-size=3", "--mode=sde",
            "--num-steps=4", "--cfg-scale=1.8", "--guidance-high=0.7", "--sample-dir", str(tmp_path)]
    out = generate.main(argv + ["--device", "cpu"])
    assert os.path.basename(out) == "SiT-T-2-0000005-size-16-vae-ema-cfg-1.8-seed-0-sde.npz"
    images, _, meta = load(tmp_path, "SiT-T-2-0000005-size-16-vae-ema-cfg-1.8-seed-0-sde")
    assert images.shape == (3, 16, 16, 3) and images.std() > 1
    assert meta["key"]["cls_cfg_scale"] == 0.0 and meta["key"]["autoencoder"] == "ema"
    assert meta["runs"][0]["vae_path_env"] == ckpts["vae"]

    ode_argv = [a for a in argv if a != "--mode=sde"] + ["--device", "cpu"]
    out = generate.main(ode_argv)
    assert os.path.basename(out) == "SiT-T-2-0000005-size-16-vae-ema-cfg-1.8-seed-0-ode.npz"
    assert load(tmp_path, "SiT-T-2-0000005-size-16-vae-ema-cfg-1.8-seed-0-ode")[2]["key"]["sampler"] == "ode"
    capsys.readouterr()
    generate.main(ode_argv + ["--mode", "ode"])                       # the same run: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert "--cls-cfg-scale needs a REG checkpoint" in fails(capsys, *argv, "--cls-cfg-scale", "1.5")


def test_legacy_flag_remaps_old_checkpoints(ckpts, tmp_path, capsys):
    """The release's --legacy: decoder_blocks.i -> blocks.{i + encoder depth}; the remapped checkpoint
    samples exactly as the current layout does; without --legacy it is a clear error."""
    sd = {"blocks.0.x": 1, "decoder_blocks.0.attn.qkv.weight": 2, "decoder_blocks.11.mlp.fc1.bias": 3,
          "module.decoder_blocks.2.norm1.weight": 4, "decoder_blocks_extra": 5}
    assert checkpoint.legacy_state_dict(sd, 8) == {"blocks.0.x": 1, "blocks.8.attn.qkv.weight": 2,
                                                 "blocks.19.mlp.fc1.bias": 3, "module.blocks.10.norm1.weight": 4,
                                                 "decoder_blocks_extra": 5}
    ckpt = torch.load(ckpts["release"], weights_only=False)
    for weights in ("ema", "model"):   # encoder depth 1 (the checkpoint's args): block 1 was decoder block 0
        ckpt[weights] = {(k.replace("blocks.1.", "decoder_blocks.0.", 1) if k.startswith("blocks.1.") else k): v
                         for k, v in ckpt[weights].items()}
    assert any(k.startswith("decoder_blocks.0.") for k in ckpt["ema"])
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    common = ["--num-fid-samples", 2, "--per-proc-batch-size", 2, "--vae-path", ckpts["vae"], *SDE]
    want, _, _ = run(tmp_path, "--ckpt", ckpts["release"], *common, name="new")
    got, _, _ = run(tmp_path, "--ckpt", old, *common, "--legacy", name="old")
    np.testing.assert_array_equal(got, want)
    err = fails(capsys, "--ckpt", old, "--sample-dir", tmp_path, *common)
    assert "old release layout (decoder_blocks.*); add --legacy" in err
    # a wrong encoder depth leaves a hole in the blocks: a clear error, not a silent misload
    err = fails(capsys, "--ckpt", old, "--sample-dir", tmp_path, *common, "--legacy", "--encoder-depth", 2)
    assert "cannot build the model" in err and "blocks.1." in err


#################################################################################
#               Noise interface: resume follows the sampler itself              #
#################################################################################

def toy_sampler(model, latents, y, num_steps=3, cls_latents=None, noise=None, noise_fn=None, **_):
    """A stochastic sampler with its own draw pattern (unlike the SDE: a draw at every step, an extra
    one-channel draw on odd steps, the class-token noise in float32): a resume that hard-coded the
    SDE's draws would replay the wrong number of them."""
    import samplers
    noise = samplers.as_noise_source(noise, noise_fn)
    x = latents.to(torch.float64)
    c = None if cls_latents is None else cls_latents.to(torch.float64)
    for i in range(num_steps):
        t = torch.full((len(x),), 1 - i / num_steps, dtype=latents.dtype, device=x.device)
        v, _, vc = model(x.to(latents.dtype), t, y, cls_token=None if c is None else c.to(latents.dtype), return_zs=False)
        x = x - v.double() / num_steps + 0.3 * noise.randn_like(x)
        if i % 2:
            x = x + 0.2 * noise.randn_like(x[:, :1])
        if c is not None:
            c = c - vc.double() / num_steps + 0.3 * noise.randn_like(c.float()).double()
    return x


def value_dependent_sampler(model, latents, y, cls_latents=None, noise=None, **_):
    """Draws only when the network says so: its draws cannot be replayed without the network."""
    t = torch.ones(len(latents), dtype=latents.dtype)
    v, _, _ = model(latents, t, y, cls_token=cls_latents, return_zs=False)
    x = latents.double() - v.double()
    if v.abs().sum() > 0:
        x = x + noise.randn_like(x)
    return x


def test_new_stochastic_sampler_resumes_exactly_under_the_release_scheme(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "toy", toy_sampler)
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 5, "--per-proc-batch-size", 2, "--seed-scheme", "release",
            "--mode", "toy", "--num-steps", 3, "--cfg-scale", 1.0]
    full, labels, meta = run(tmp_path, *argv)
    assert meta["key"]["sampler"] == "toy" and len({img.tobytes() for img in full}) == 5

    def lose_middle_batch():
        for f in ("run.npz", "run.json", "run/rank000-batch000001.npz"):
            os.remove(tmp_path / f)
    lose_middle_batch()
    again, again_labels, _ = run(tmp_path, *argv)
    np.testing.assert_array_equal(again, full)
    np.testing.assert_array_equal(again_labels, labels)

    # The test can fail: without the sampler's own replay the resumed batch gets other noise.
    lose_middle_batch()
    monkeypatch.setattr(sampling, "replay_draws", lambda *a, **k: [])
    broken, _, _ = run(tmp_path, *argv)
    np.testing.assert_array_equal(broken[:2], full[:2])
    assert not np.array_equal(broken[2:4], full[2:4])


def test_sampler_whose_draws_depend_on_the_network_is_refused_by_the_release_scheme(ckpts, tmp_path, monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "greedy", value_dependent_sampler)
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 2, "--per-proc-batch-size", 2, "--mode", "greedy",
            "--cfg-scale", 1.0]
    with pytest.raises(RuntimeError, match="use --seed-scheme per-image"):
        run(tmp_path, *argv, "--seed-scheme", "release", name="rel")
    images, _, _ = run(tmp_path, *argv, name="per-image")              # per-image needs no replay
    assert images.shape == (2, 8, 8, 3)


#################################################################################
#                Damaged shards, temp files, read-only folders                  #
#################################################################################

def test_damaged_shards_are_resampled_into_the_same_npz_bytes(ckpts, tmp_path, capsys):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 10, "--per-proc-batch-size", 3, *SDE]
    run(tmp_path / "clean", *argv)
    clean = (tmp_path / "clean" / "run.npz").read_bytes()
    run(tmp_path, *argv)
    assert (tmp_path / "run.npz").read_bytes() == clean               # same bytes from another run
    folder = tmp_path / "run"
    os.remove(tmp_path / "run.npz")
    os.remove(tmp_path / "run.json")
    truncated = folder / "img-0000003-0000006.npz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    with np.load(folder / "img-0000006-0000009.npz") as s:
        shard = dict(s)
    np.savez(folder / "img-0000006-0000009.npz", images=shard["images"], indices=shard["indices"])   # no labels
    np.savez(folder / "img-0000009-0000010.npz", images=np.zeros((1, 4, 4, 3), np.uint8), labels=np.zeros(1, np.int64),
             indices=np.array([9]))                                                                     # wrong shape
    stale = folder / ".tmp-otherhost-4242-abcd.npz"                  # left by a killed run elsewhere
    stale.write_bytes(b"half a shard")
    # beside run.npz, in a sample dir other runs share: a killed assembly of run.npz, and another run's write
    half_npz = tmp_path / f".tmp-otherhost-4243-efgh{fileio._temp_suffix(tmp_path / 'run.npz')}"
    other = tmp_path / f".tmp-otherhost-4244-ijkl{fileio._temp_suffix(tmp_path / 'other-run.npz')}"
    half_npz.write_bytes(b"half an npz")
    other.write_bytes(b"another run, still writing")
    capsys.readouterr()
    run(tmp_path, *argv)
    out, err = capsys.readouterr()
    assert "sampling 7 of 10 images" in out                          # only the damaged shards' images
    warnings = [line for line in err.splitlines() if line.startswith("warning: shard")]
    assert len(warnings) == 3 and all("deleting it" in w for w in warnings)
    assert any("img-0000003-0000006.npz" in w for w in warnings)
    assert any("img-0000006-0000009.npz" in w and "labels" in w for w in warnings)
    assert any("img-0000009-0000010.npz" in w and "(1, 8, 8, 3)" in w for w in warnings)
    assert f"removed {stale}" in err and not stale.exists()
    assert f"removed {half_npz}" in err and not half_npz.exists()
    assert other.exists()                                            # not this run's: left alone
    assert (tmp_path / "run.npz").read_bytes() == clean


def test_unwritable_sample_dir_is_one_line(ckpts, tmp_path, capsys, monkeypatch):
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 2, "--num-steps", 2]
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = fails(capsys, *argv, "--sample-dir", blocker / "samples")
    assert f"cannot create --sample-dir {blocker / 'samples'}" in err

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):    # root ignores the mode: simulate what the check sees
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(ro) else real(p, m, **k))
        err = fails(capsys, *argv, "--sample-dir", ro)
    finally:
        ro.chmod(0o755)
    assert f"cannot write to {ro} (read-only)" in err and "--sample-dir" in err
    assert os.listdir(ro) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes to read-only folders")
def test_read_only_sample_dir_for_real(ckpts, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = fails(capsys, "--ckpt", ckpts["reg"], "--num-fid-samples", 2, "--sample-dir", ro)
    finally:
        ro.chmod(0o755)
    assert f"cannot write to {ro} (read-only)" in err


def test_explicit_device_under_a_launcher(ckpts, tmp_path, capsys, monkeypatch):
    """--device cuda:N under a multi-process launcher is refused by runtime.resolve_device, through the CLI."""
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    argv = ["--ckpt", ckpts["reg"], "--sample-dir", tmp_path, "--device", "cuda:1"]
    if not torch.cuda.is_available():
        assert "CUDA is not available" in fails(capsys, *argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = fails(capsys, *argv)
    assert "--device cuda:1 under a launcher with 2 processes would put every rank on one GPU" in err
    from runtime import resolve_device
    assert resolve_device("cuda:1", 1, 2) == torch.device("cuda", 1)        # its own GPU is fine
    assert resolve_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", 0, 1) == torch.device("cuda", 0)        # one process: any GPU


#################################################################################
#                    Time shift, in-process API, pinned noise                   #
#################################################################################

def test_time_shift_from_the_checkpoint_and_its_flags(ckpts, tmp_path):
    argv = ["--num-fid-samples", 3, "--per-proc-batch-size", 3, *SDE]
    shifted, _, meta = run(tmp_path, "--ckpt", ckpts["shifted"], *argv, name="shifted")
    assert meta["key"]["time_shift"] == 2.0                           # sqrt(3 * 8 * 8 / 48)
    model = model_from_checkpoint(load_checkpoint(ckpts["shifted"])).eval()
    for i in (0, 2):
        np.testing.assert_array_equal(shifted[i], expected_per_image(model, i, shift=2.0)[0])
    off, _, meta_off = run(tmp_path, "--ckpt", ckpts["shifted"], *argv, "--no-time-shift", name="off")
    plain, _, _ = run(tmp_path, "--ckpt", ckpts["reg"], *argv, name="plain")   # same weights, no shift recorded
    np.testing.assert_array_equal(off, plain)
    assert "time_shift" not in meta_off["key"] and not np.array_equal(off, shifted)
    base4, _, meta4 = run(tmp_path, "--ckpt", ckpts["reg"], *argv, "--time-shift", "--shift-base", 12, name="b12")
    assert meta4["key"]["time_shift"] == 4.0


def test_sample_batch_gives_the_cli_images(ckpts, tmp_path):
    """The in-process API: any indices, any order, the CLI's images and labels; the model's mode and the
    global RNG are left as they were."""
    images, labels, _ = run(tmp_path, "--ckpt", ckpts["ours4"], "--num-fid-samples", 5, "--per-proc-batch-size", 5,
                            "--class-balanced", *SDE)
    from models.autoencoder import Autoencoder
    model = model_from_checkpoint(load_checkpoint(ckpts["ours4"])).train()
    codec = Autoencoder.from_spec(ckpts["vae"])
    settings = sampling.SampleSettings(mode="sde", num_steps=4, cfg_scale=2.0, cls_cfg_scale=1.5, guidance_high=0.7,
                                       class_balanced=True, seed=0, decode_batch_size=1)
    torch.manual_seed(123)
    got, got_labels = sampling.sample_batch(model, codec, [4, 1], settings)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))                           # global RNG untouched
    assert model.training                                              # mode restored
    assert got.dtype == np.uint8 and got.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got, images[[4, 1]])
    np.testing.assert_array_equal(got_labels, labels[[4, 1]])
    with pytest.raises(ValueError, match="mode 'nope'"):
        sampling.SampleSettings(mode="nope")
    with pytest.raises(ValueError, match="precision"):
        sampling.SampleSettings(precision="fp8")
    with pytest.raises(ValueError, match="exceeds the model's 5 classes"):
        sampling.sample_batch(model, codec, [0], dataclasses_replace(settings, num_classes=7))


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


def test_per_image_noise_moves_through_pinned_memory(monkeypatch):
    """On CUDA the CPU-drawn noise is pinned and copied without blocking (checked with a stand-in tensor
    path on CPU-only machines); the values are those of the per-image generators."""
    import samplers
    seen = []
    real_to_device = samplers.to_device

    def spy(t, device):
        seen.append(torch.device(device).type)
        return real_to_device(t, device)
    monkeypatch.setattr(samplers, "to_device", spy)
    noise = sampling.PerImageNoise(0, [3, 7])
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    a = noise.randn_like(x)
    g = torch.Generator().manual_seed(sampling.image_seed(0, 7))      # image 7's own generator
    assert torch.equal(a[1], torch.randn(3, 4, 4, generator=g, dtype=torch.float64))
    b = sampling.PerImageNoise(0, [7]).randn_like(x[:1])               # alone in its batch: the same
    assert torch.equal(a[1:], b) and seen == ["cpu", "cpu"]
    if torch.cuda.is_available():
        c = sampling.PerImageNoise(0, [3, 7]).randn_like(x.cuda())
        assert c.is_cuda and torch.equal(c.cpu(), a)
    else:
        calls = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
        monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(k.get("non_blocking")) or self)
        real_to_device(torch.zeros(1), "cuda")
        assert calls == ["pin", True]


def test_existing_sidecars_still_resume(ckpts, tmp_path, capsys, monkeypatch):
    """A folder whose config.json predates a model option recorded at its default (or spells the seed
    global_seed, as all sidecars do) resumes; a real difference is still refused."""
    argv = ["--ckpt", ckpts["reg"], "--num-fid-samples", 3, "--per-proc-batch-size", 2, *SDE]
    full, _, _ = run(tmp_path / "ref", *argv)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):     # interrupted before any shard
        m.setattr(generate, "write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        run(tmp_path, *argv)
    config = tmp_path / "run" / "config.json"
    stored = json.loads(config.read_text())
    assert stored["key"]["global_seed"] == 0
    del stored["key"]["model_config"]["qk_norm"]              # written before the option existed (default off)
    config.write_text(json.dumps(stored))
    images, _, meta = run(tmp_path, *argv)
    np.testing.assert_array_equal(images, full)
    assert "qk_norm" not in meta["key"]["model_config"]       # the stored spelling is kept
    os.remove(tmp_path / "run.json")
    stored["key"]["model_config"]["num_classes"] = 7           # not a default: a different model
    config.write_text(json.dumps(stored))
    assert "num_classes" in fails(capsys, "--sample-dir", tmp_path, "--name", "run", *argv)


def test_speedrundit_checkpoint_samples_with_path_drop_guidance(ckpts, tmp_path, capsys):
    """A checkpoint in SpeedrunDiT's layout (its key names, RoPE tables, Namespace args with
    time_shifting) samples as the model it came from, with and without path-drop guidance."""
    from models.speedrundit import to_speedrundit_state_dict
    model = randomize_weights_(build_sit(7, **{**TINY, "depth": 6, "encoder_depth": 2, "in_channels": 3,
                                               "qk_norm": True, "norm": "rmsnorm", "rope": True,
                                               "value_residual": True, "routing": "sprint"}), 107).eval()
    sd = to_speedrundit_state_dict(model)
    path = tmp_path / "0400000.pt"
    torch.save(dict(model=sd, ema=sd, opt={}, steps=4, autoencoder="identity",    # decoder: the test's identity
                    args=argparse.Namespace(num_classes=5, time_shifting=True, shift_base=48, path_type="linear")),
               str(path))
    argv = ["--ckpt", path, "--num-fid-samples", 3, "--per-proc-batch-size", 3, *SDE]
    pdg, _, meta = run(tmp_path, *argv, "--path-drop-guidance", name="pdg")
    dense, _, meta_dense = run(tmp_path, *argv, name="dense")
    assert meta["key"]["path_drop_guidance"] is True and "path_drop_guidance" not in meta_dense["key"]
    assert meta["key"]["time_shift"] == 2.0                           # from SpeedrunDiT's args
    for i in range(3):
        np.testing.assert_array_equal(pdg[i], expected_per_image(model, i, shift=2.0, pdg=True)[0])
        np.testing.assert_array_equal(dense[i], expected_per_image(model, i, shift=2.0)[0])
    assert not np.array_equal(pdg, dense)
    err = fails(capsys, "--ckpt", ckpts["reg"], "--sample-dir", tmp_path, "--path-drop-guidance", *SDE)
    assert "--path-drop-guidance needs a checkpoint trained with --routing sprint" in err
