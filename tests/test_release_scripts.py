"""The releases' own scripts against this code base, end to end, in several processes (slow: each test
starts Python + torch in 2-3 processes).

* REG's eval.sh, as a user would run it: only paths and sizes edited (a tiny SiT-T/2 checkpoint in the
  release's layout, 2 SDE steps, 4 images, 2 CPU processes through ``python -m torch.distributed.launch``);
  offline, the decoder is found through REG_VAE_PATH (a random tiny AutoencoderKL here), Inception
  through REG_INCEPTION_WEIGHTS (random weights), and REG_FID_METHOD=lowrank keeps the CPU FID short.
* The in-process Evaluator fed activations computed in 2 processes (gloo) gives a single process's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, build_sit, randomize_weights_

pytestmark = pytest.mark.slow

RELEASE_EVAL_SH = r"""
random_number=$((RANDOM % 100 + 1200))
NUM_GPUS=2
STEP="0000004"
SAVE_PATH="{save_path}"
VAE_PATH="your_vae_path/"
NUM_STEP=2
MODEL_SIZE='T'
CFG_SCALE=2.3
CLS_CFG_SCALE=2.3
GH=0.85

export NCCL_P2P_DISABLE=1

python -m torch.distributed.launch --master_port=$random_number --nproc_per_node=$NUM_GPUS generate.py \
  --model SiT-T/2 \
  --num-fid-samples 4 \
  --ckpt ${{SAVE_PATH}}/checkpoints/${{STEP}}.pt \
  --path-type=linear \
  --encoder-depth=2 \
  --projector-embed-dims=768 \
  --per-proc-batch-size=2 \
  --mode=sde \
  --num-steps=${{NUM_STEP}} \
  --cfg-scale=${{CFG_SCALE}} \
  --cls-cfg-scale=${{CLS_CFG_SCALE}} \
  --guidance-high=${{GH}} \
  --sample-dir ${{SAVE_PATH}}/checkpoints \
  --cls=768


python ./evaluations/evaluator.py \
    --ref_batch {ref_batch} \
    --sample_batch ${{SAVE_PATH}}/checkpoints/SiT-${{MODEL_SIZE}}-2-${{STEP}}-size-64-vae-ema-cfg-${{CFG_SCALE}}-seed-0-sde-${{GH}}-${{CLS_CFG_SCALE}}.npz \
    --save_path ${{SAVE_PATH}}/checkpoints \
    --cfg_cond 1 \
    --step ${{STEP}} \
    --num_steps ${{NUM_STEP}} \
    --cfg ${{CFG_SCALE}} \
    --cls_cfg ${{CLS_CFG_SCALE}} \
    --gh ${{GH}}
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    env.update(extra)
    return env


def _release_checkpoint(path) -> torch.nn.Module:
    """SiT-T/2 + REG (768-wide class token and projector output, as eval.sh's flags say) on 8 x 8 SD-VAE-shaped
    latents, saved as the release saves: {model, ema, opt, args (argparse.Namespace), steps}."""
    model = randomize_weights_(build_sit(0, input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=6,
                                         num_heads=4, num_classes=1000, z_dims=[768], projector_dim=32,
                                         encoder_depth=2, cls_token_dim=768), 1)
    state = model.state_dict()
    args = argparse.Namespace(model="SiT-T/2", encoder_depth=2, num_classes=1000, path_type="linear",
                              enc_type="dinov2-vit-b", proj_coeff=0.5, cls=0.03, resolution=64, fused_attn=True,
                              qk_norm=False, mixed_precision="fp16")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model=state, ema=state, opt=dict(state={}, param_groups=[]), args=args, steps=4), path)
    return model


def test_release_eval_sh_runs_unchanged(tmp_path):
    from evaluations import inception
    from models.autoencoder import Autoencoder

    save = tmp_path / "exps" / "reg-tiny"
    model = _release_checkpoint(str(save / "checkpoints" / "0000004.pt"))
    vae_dir = tmp_path / "sd-vae-ft-ema"                       # what an offline user points REG_VAE_PATH at
    Autoencoder.from_spec("random-tiny").vae.save_pretrained(str(vae_dir))
    weights = inception.save_random_weights(tmp_path / "inception.pth", seed=0)
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    script = tmp_path / "eval.sh"
    script.write_text(RELEASE_EVAL_SH.format(save_path=save, ref_batch=ref))

    env = _env(REG_VAE_PATH=str(vae_dir), REG_INCEPTION_WEIGHTS=str(weights), REG_FID_METHOD="lowrank")
    r = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]

    name = "SiT-T-2-0000004-size-64-vae-ema-cfg-2.3-seed-0-sde-0.85-2.3"
    with np.load(save / "checkpoints" / f"{name}.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8 and len({i.tobytes() for i in images}) == 4
    meta = json.loads((save / "checkpoints" / f"{name}.json").read_text())
    assert meta["runs"][0]["world_size"] == 2 and meta["key"]["sampler"] == "sde"
    assert (meta["key"]["num_steps"], meta["key"]["cfg_scale"], meta["key"]["cls_cfg_scale"]) == (2, 2.3, 2.3)
    assert meta["key"]["guidance_interval"] == [0.0, 0.85] and meta["key"]["autoencoder"] == "ema"

    # The release's results file: save_path + num_steps + step + cfg + gh + cls_cfg + "cfg_cond_true.txt".
    txt = save / "checkpoints242.30.852.3cfg_cond_true.txt"
    lines = txt.read_text().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    metrics = json.loads((save / "checkpoints" / f"{name}.metrics.json").read_text())
    values = [float(line.split(": ")[1]) for line in lines]
    assert values == [metrics[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")]
    assert metrics["fid_method"] == "lowrank" and metrics["num_samples"] == 4

    # The launched, 2-process run made the images the in-process API makes.
    import sampling
    torch.set_num_threads(1)
    settings = sampling.SampleSettings(mode="sde", num_steps=2, cfg_scale=2.3, cls_cfg_scale=2.3, guidance_high=0.85)
    got, got_labels = sampling.sample_batch(model.eval(), Autoencoder.from_spec(str(vae_dir)), [3, 0], settings)
    np.testing.assert_array_equal(got, images[[3, 0]])
    np.testing.assert_array_equal(got_labels, labels[[3, 0]])


EVAL_DRIVER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from evaluations.evaluator import Evaluator
from runtime import Procs
ref, sample, weights, out = sys.argv[2:6]
procs = Procs("cpu")
with np.load(sample) as f:
    images = f["arr_0"]
mine = np.array_split(np.arange(len(images)), procs.world_size)[procs.rank]
ev = Evaluator(ref, weights, device="cpu", batch_size=2, fid_method="lowrank")
gathered = procs.gather(ev.activations(images[mine]))
if procs.is_main:
    with open(out, "w") as f:
        json.dump(ev.metrics_from_activations(gathered), f)
procs.close()
"""


def test_evaluator_activations_from_two_processes_equal_one(tmp_path):
    from evaluations import evaluator, inception

    rng = np.random.default_rng(1)
    weights = inception.save_random_weights(tmp_path / "inception.pth", seed=1)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8))
    grad = np.linspace(0, 255, 24)[None, None, :, None]
    np.savez(tmp_path / "sample.npz", arr_0=np.clip(rng.normal(grad, 40, (4, 24, 24, 3)), 0, 255).astype(np.uint8))
    (tmp_path / "driver.py").write_text(EVAL_DRIVER)
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "driver.py"),
           ROOT, str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), str(weights), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    two = json.loads(out.read_text())
    one = evaluator.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", inception_weights=weights, batch_size=2,
                             device="cpu", fid_method="lowrank")
    assert two == one


def test_our_eval_sh_samples_with_its_variables(tmp_path):
    """This repository's eval.sh (torchrun, our flag names), sample-only (REF_BATCH empty), one process."""
    from checkpoint import save_checkpoint

    model = randomize_weights_(build_sit(2, input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                                         num_heads=2, num_classes=5, z_dims=[16], projector_dim=32,
                                         encoder_depth=1, cls_token_dim=16), 3)
    ckpt = tmp_path / "exp" / "checkpoints" / "0000010.pt"
    save_checkpoint(dict(model=model.state_dict(), ema=model.state_dict(), opt={}, steps=10, args={"path_type": "linear"},
                         model_config=model.config, autoencoder="identity"), str(ckpt))
    env = _env(CKPT=str(ckpt), REF_BATCH="", NUM_GPUS="1", PER_PROC_BATCH="2", NUM_STEPS="2", NUM_SAMPLES="3",
               SEED="5", PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "eval.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    name = "0000010-sde-2-cfg-2.3-cls-2.3-gi-0.0-0.85-seed-5"
    assert f"samples in {tmp_path / 'exp' / 'samples' / name}.npz" in r.stdout
    meta = json.loads((tmp_path / "exp" / "samples" / f"{name}.json").read_text())
    assert meta["key"]["global_seed"] == 5 and meta["num_images"] == 3
