"""Sample FID batches from SiT / REPA / REG checkpoints: distributed, reproducible, resumable.

    torchrun --nproc_per_node 8 generate.py --ckpt exps/run/checkpoints/4000000.pt \\
        --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85

Runs under torchrun (NCCL on GPUs, gloo on CPU) or as a single process. The architecture comes
from the checkpoint (ours store their constructor arguments; the release's are read off the
state_dict); flags describing the architecture are only checked against it.

Outputs, for a run called NAME (``--name``, or built from the settings):
    {sample_dir}/NAME/          shards (atomic .npz batches: images, labels, indices), config.json,
                                and with --save-png one {index:06d}.png per image
    {sample_dir}/NAME.npz       arr_0 (N, H, W, 3) uint8 in index order (the ADM evaluator's input),
                                arr_1 (N,) class labels
    {sample_dir}/NAME.json      everything that determines the result, plus how it was run

Seeding (``--seed-scheme``):
    per-image (default)  image i owns a CPU generator seeded with
                         SeedSequence([global_seed, i]).generate_state(1, uint64); it draws, in order,
                         the latent noise, a label (uniform over num_classes), the class-token noise,
                         then the SDE's noise at every stochastic step (image, then class token).
                         Image i is therefore the same whatever the world size or batch size
                         (bit for bit on CPU; GPU kernels picked per batch size may move the low
                         bits, so now and then a pixel by one grey level).
    release              the release's: torch.manual_seed(global_seed * world_size + rank); per batch
                         z, y, class-token noise from the global generator, the SDE noise from
                         randn_like; image index = batch * world_size * batch_size + k * world_size
                         + rank. Reproduces its samples (with --no-fused-attn, as it sampled), but
                         depends on world size and batch size.
``--class-balanced`` replaces the label of image i by i % num_classes (50 per class for 50K); the
label is still drawn, so the noises of image i are the same with and without it.

Resume: rerunning the same command keeps the shards already written and samples the rest (per-image:
any world size or batch size; release: the same ones, since they decide the noise). A folder made with
a different configuration is refused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pickle
import re
import socket
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint
from fileio import atomic_open, atomic_save_npz, atomic_write_json, file_sha256, read_json
from models.autoencoder import Autoencoder
from models.sit import SIT_CONFIGS, SiT_models
from runtime import Procs, one_line
from samplers import SAMPLERS

# Latent codecs that are not the SD-VAE: --vae (an SD-VAE decoder) cannot stand in for them.
NOT_SD_VAE = ("identity", "random-tiny")
SHARD_RE = re.compile(r"^(img-\d{7}-\d{7}|rank\d{3}-batch\d{6})\.npz$")


#################################################################################
#                                      CLI                                      #
#################################################################################

class CLIParser(argparse.ArgumentParser):
    """argparse whose errors are printed by rank 0 only; every rank exits with status 2."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


AUTO_BATCH = {"cuda": 256, "cpu": 32}


def _batch_size(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {s!r}") from None


def build_parser() -> CLIParser:
    p = CLIParser(prog="generate.py", description=__doc__.split("\n")[0],
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b = argparse.BooleanOptionalAction

    g = p.add_argument_group("checkpoint (the architecture comes from it; these flags are checked against it)")
    g.add_argument("--ckpt", required=True, help="our checkpoint or the REG/REPA release's")
    g.add_argument("--use-model-weights", action="store_true", help="sample with the raw weights instead of the EMA")
    g.add_argument("--model", choices=list(SiT_models), default=None, help="checked against the checkpoint")
    g.add_argument("--resolution", type=int, default=None,
                   help="image size; default: the checkpoint's latent size x the codec's downsampling")
    g.add_argument("--num-classes", type=int, default=None, help="checked against the checkpoint")
    g.add_argument("--encoder-depth", type=int, default=None, help="checked against the checkpoint")
    g.add_argument("--projector-embed-dims", default=None,
                   help="comma-separated encoder widths, checked against the checkpoint "
                        "(the release's default '768,1024' is ignored unless given)")
    g.add_argument("--cls", type=int, default=None,
                   help="class-token width, checked against the checkpoint (0 = no class token: REPA/SiT)")
    g.add_argument("--qk-norm", action=b, default=None, help="checked against the checkpoint")
    g.add_argument("--fused-attn", action=b, default=True,
                   help="torch SDPA attention (the release sampled without it; same maths)")

    g = p.add_argument_group("latent codec")
    g.add_argument("--vae", choices=["ema", "mse"], default=None,
                   help="SD-VAE decoder (stabilityai/sd-vae-ft-*); default ema, or the checkpoint's own codec "
                        "when it was not trained on SD-VAE latents")
    g.add_argument("--vae-path", default=None, help="local copy of the decoder (a diffusers AutoencoderKL folder)")

    g = p.add_argument_group("sampler")
    g.add_argument("--mode", choices=list(SAMPLERS), default="sde", help="sde: the release's Euler-Maruyama; ode: Euler/Heun")
    g.add_argument("--heun", action=b, default=False, help="Heun's correction (--mode ode only)")
    g.add_argument("--num-steps", type=int, default=50)
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance (1 = none)")
    g.add_argument("--cls-cfg-scale", type=float, default=0.0,
                   help="guidance of the class token (0 = it follows the conditional drift)")
    g.add_argument("--guidance-low", "--guidance_low", dest="guidance_low", type=float, default=0.0)
    g.add_argument("--guidance-high", "--guidance_high", dest="guidance_high", type=float, default=1.0)
    g.add_argument("--path-type", choices=["linear", "cosine"], default=None,
                   help="default: the checkpoint's training path (linear if not recorded)")

    g = p.add_argument_group("seeding and output")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--seed-scheme", choices=["per-image", "release"], default="per-image")
    g.add_argument("--class-balanced", action="store_true", help="label of image i = i %% num_classes")
    g.add_argument("--sample-dir", default="samples")
    g.add_argument("--name", default=None, help="run name (folder and .npz); default: built from the settings")
    g.add_argument("--per-proc-batch-size", type=_batch_size, default=32,
                   help="images per process and batch, or 'auto' (256 on a GPU, 32 on the CPU). With the "
                        "per-image seed scheme a batch that runs out of GPU memory is split in two and "
                        "retried (the images do not depend on the batching)")
    g.add_argument("--num-fid-samples", type=int, default=50_000)
    g.add_argument("--save-png", action="store_true", help="also write one PNG per image")

    g = p.add_argument_group("runtime")
    g.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 = autocast for the network; the sampler state stays float64, the VAE float32")
    g.add_argument("--tf32", action=b, default=True, help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--compile", action=b, default=False,
                   help="torch.compile the SiT blocks (faster on GPUs after a warm-up; numbers change slightly)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    # torch.distributed.launch (the release's eval.sh) passes this; we read LOCAL_RANK instead.
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def validate_args(parser: CLIParser, args) -> None:
    """Checks that need no checkpoint: every rank runs them, rank 0 prints."""
    if args.num_fid_samples < 1:
        parser.error(f"--num-fid-samples must be >= 1, got {args.num_fid_samples}")
    if args.per_proc_batch_size == "auto":
        if args.seed_scheme == "release":
            parser.error("--seed-scheme release draws its noise per batch, so it needs a fixed --per-proc-batch-size")
    elif args.per_proc_batch_size < 1:
        parser.error(f"--per-proc-batch-size must be >= 1, got {args.per_proc_batch_size}")
    if args.num_steps < 1:
        parser.error(f"--num-steps must be >= 1, got {args.num_steps}")
    if args.cfg_scale < 1.0:
        parser.error(f"--cfg-scale must be >= 1 (1 = no guidance), got {args.cfg_scale}")
    if args.cls_cfg_scale < 0.0:
        parser.error(f"--cls-cfg-scale must be >= 0 (0 = class token unguided), got {args.cls_cfg_scale}")
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        parser.error(f"need 0 <= --guidance-low <= --guidance-high <= 1, got {args.guidance_low}, {args.guidance_high}")
    if args.heun and args.mode != "ode":
        parser.error("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")
    if args.global_seed < 0:
        parser.error(f"--global-seed must be >= 0, got {args.global_seed}")
    if args.resolution is not None and args.resolution < 1:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    if args.vae is not None and args.vae_path is not None:
        parser.error("give either --vae (a Hugging Face SD-VAE) or --vae-path (a local copy), not both")
    if args.name is not None and (not args.name or os.sep in args.name or args.name.startswith(".")):
        parser.error(f"--name must be a plain file name, got {args.name!r}")
    if args.projector_embed_dims is not None:
        try:
            args.projector_embed_dims = [int(z) for z in args.projector_embed_dims.split(",") if z.strip()]
        except ValueError:
            parser.error(f"--projector-embed-dims must be comma-separated integers, got {args.projector_embed_dims!r}")
    if not os.path.isfile(args.ckpt):
        parser.error(f"checkpoint not found: {args.ckpt} (--ckpt)")


#################################################################################
#                              Processes and device                             #
#################################################################################

#################################################################################
#                        Checkpoint -> model and codec                          #
#################################################################################

def load_model(parser: CLIParser, args):
    """Build the sampling model from the checkpoint (read on the CPU; optimizer state dropped).

    Returns (model in eval mode on the CPU, facts about the checkpoint)."""
    try:
        ckpt = load_checkpoint(args.ckpt)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        parser.error(f"cannot read checkpoint {args.ckpt}: {one_line(e)[:300]}")
    weights = "model" if args.use_model_weights else "ema"
    train_args = ckpt.get("args") or {}
    try:
        model = model_from_checkpoint(ckpt, weights=weights, fused_attn=args.fused_attn)
    except (KeyError, ValueError, RuntimeError) as e:
        parser.error(f"cannot build the model of {args.ckpt}: {one_line(e)}")
    cfg = model.config
    shape = (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"])
    facts = dict(
        weights=weights,
        steps=ckpt.get("steps"),
        # the shapes decide; a stored name only names what the table does not know
        name=next((n for n, c in SIT_CONFIGS.items() if c == shape), None)
        or ckpt.get("model_name") or train_args.get("model"),
        autoencoder=ckpt.get("autoencoder"),
        path_type=train_args.get("path_type"),
        encoder_depth=(ckpt.get("model_config") or {}).get("encoder_depth", train_args.get("encoder_depth")),
    )
    del ckpt  # the other weights and the Adam state are not needed any more
    return model.eval().requires_grad_(False), facts


def codec_spec(parser: CLIParser, args, ckpt_codec: str | None) -> str:
    """Which decoder: --vae-path, else --vae, else the checkpoint's own codec if it is not an SD-VAE,
    else the release's default (the EMA-fine-tuned SD-VAE; both SD-VAEs share the encoder)."""
    if args.vae_path is not None:
        return os.path.abspath(args.vae_path)
    if ckpt_codec in NOT_SD_VAE:
        if args.vae is not None:
            parser.error(f"--vae {args.vae}: this checkpoint was trained on {ckpt_codec!r} latents, not SD-VAE ones; "
                         "drop --vae (its own codec is used)")
        return ckpt_codec
    if args.vae is not None:
        return args.vae
    if ckpt_codec in (None, "ema", "mse", "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"):
        return "ema"
    return ckpt_codec  # another codec (Hugging Face id or local folder) recorded at training time


def check_flags(parser: CLIParser, args, model, facts: dict) -> None:
    """Flags that describe the architecture must agree with the checkpoint (before loading a decoder)."""
    cfg = model.config
    problems = []
    if args.model is not None and args.model != facts["name"]:
        held = facts["name"] or f"a custom SiT (depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']})"
        problems.append(f"--model {args.model} but the checkpoint holds {held}")
    if args.num_classes is not None and args.num_classes != cfg["num_classes"]:
        problems.append(f"--num-classes {args.num_classes} but the checkpoint has {cfg['num_classes']} classes")
    if args.cls is not None and args.cls != cfg["cls_token_dim"]:
        problems.append(f"--cls {args.cls} but the checkpoint's class token has width {cfg['cls_token_dim']} "
                        "(0 = no class token: a REPA/SiT checkpoint)")
    if args.projector_embed_dims is not None and list(args.projector_embed_dims) != list(cfg["z_dims"]):
        dims = ",".join(map(str, cfg["z_dims"])) or "none"
        problems.append(f"--projector-embed-dims {','.join(map(str, args.projector_embed_dims))} "
                        f"but the checkpoint's projectors have widths {dims}")
    if (args.encoder_depth is not None and facts["encoder_depth"] is not None and cfg["z_dims"]
            and args.encoder_depth != facts["encoder_depth"]):
        problems.append(f"--encoder-depth {args.encoder_depth} but the checkpoint was trained with {facts['encoder_depth']}")
    if args.qk_norm is not None and args.qk_norm != cfg["qk_norm"]:
        problems.append(f"--{'' if args.qk_norm else 'no-'}qk-norm but the checkpoint was trained "
                        f"{'with' if cfg['qk_norm'] else 'without'} QK-norm")
    if args.path_type is not None and facts["path_type"] and args.path_type != facts["path_type"]:
        problems.append(f"--path-type {args.path_type} but the checkpoint was trained on the {facts['path_type']} path")
    if not cfg["cls_token_dim"] and args.cls_cfg_scale > 0:
        problems.append("--cls-cfg-scale needs a REG checkpoint (this one has no class token)")
    if args.cfg_scale > 1.0 and cfg["class_dropout_prob"] <= 0:
        problems.append("--cfg-scale > 1 needs a model trained with class dropout (it has no null class)")
    if problems:
        parser.error("checkpoint/flag mismatch: " + "; ".join(problems))


def check_codec(parser: CLIParser, args, model, codec) -> int:
    """The decoder must fit the model's latents. Returns the image resolution."""
    cfg = model.config
    problems = []
    if codec.latent_channels != cfg["in_channels"]:
        problems.append(f"the decoder {codec.spec!r} has {codec.latent_channels} latent channels but the model "
                        f"denoises {cfg['in_channels']} (choose the codec it was trained with: --vae/--vae-path)")
    resolution = cfg["input_size"] * codec.downsample
    if args.resolution is not None and args.resolution != resolution:
        problems.append(f"--resolution {args.resolution} but the checkpoint makes {resolution}px images "
                        f"({cfg['input_size']} latents x {codec.downsample})")
    if problems:
        parser.error("checkpoint/decoder mismatch: " + "; ".join(problems))
    return resolution


#################################################################################
#                     Run configuration (the sidecar JSON)                      #
#################################################################################

def run_key(args, model, facts: dict, spec: str, resolution: int, world_size: int) -> dict:
    """Everything that decides the pixels of image i. Two runs with equal keys give equal images."""
    key = dict(
        checkpoint_sha256=facts["sha256"], weights=facts["weights"], model_config=model.config,
        autoencoder=spec, resolution=resolution,
        sampler=args.mode, heun=args.heun, num_steps=args.num_steps, path_type=args.path_type,
        cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
        guidance_interval=[args.guidance_low, args.guidance_high],
        global_seed=args.global_seed, seed_scheme=args.seed_scheme,
        labels="class-balanced: i % num_classes" if args.class_balanced else "uniform",
        precision=args.precision, tf32=args.tf32,
    )
    if args.seed_scheme == "release":  # the release's noise depends on the layout of the work
        key.update(world_size=world_size, per_proc_batch_size=args.per_proc_batch_size)
    return json.loads(json.dumps(key))  # tuples -> lists, as read back from disk


def run_info(args, facts: dict, procs: Procs) -> dict:
    """How this invocation ran (does not decide the result in the per-image scheme)."""
    return dict(
        started=datetime.datetime.now().isoformat(timespec="seconds"), host=socket.gethostname(),
        world_size=procs.world_size, per_proc_batch_size=args.per_proc_batch_size,
        device=procs.device.type, torch=torch.__version__, checkpoint=os.path.abspath(args.ckpt),
        checkpoint_steps=facts["steps"], model_name=facts["name"], command=sys.argv,
    )


def default_name(args, facts: dict, spec: str, resolution: int) -> str:
    model = (facts["name"] or "custom").replace("/", "-")
    ckpt = os.path.splitext(os.path.basename(args.ckpt))[0]
    name = (f"{model}-{ckpt}-size-{resolution}-vae-{os.path.basename(spec.rstrip(os.sep))}-{args.mode}"
            f"{'-heun' if args.heun else ''}-steps-{args.num_steps}-cfg-{args.cfg_scale:g}"
            f"-clscfg-{args.cls_cfg_scale:g}-gl-{args.guidance_low:g}-gh-{args.guidance_high:g}"
            f"-seed-{args.global_seed}-{args.seed_scheme}")
    name += "-balanced" if args.class_balanced else ""
    name += "-bf16" if args.precision == "bf16" else ""
    name += "-rawweights" if args.use_model_weights else ""
    return name


def _key_diff(old: dict, new: dict) -> str:
    fields = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields if old.get(k) != new.get(k))


def prepare_run(folder: str, final_json: str, npz_path: str, key: dict, info: dict, num_images: int):
    """Rank 0: check the folder and the final sidecar against this run. Returns (error, complete)."""
    if os.path.isfile(final_json):
        stored = read_json(final_json)
        if stored.get("key") != key:
            return (f"{npz_path} was made with a different configuration ({_key_diff(stored.get('key', {}), key)}); "
                    "choose another --name or --sample-dir, or delete it"), False
        if stored.get("num_images") == num_images and os.path.isfile(npz_path):
            return None, True
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        stored = read_json(config_path)
        if stored.get("key") != key:
            return (f"sample dir {folder} holds images from a different configuration "
                    f"({_key_diff(stored.get('key', {}), key)}); choose another --name or --sample-dir, or delete it"), False
        runs = stored.get("runs", []) + [info]
    elif os.path.isdir(folder) and any(not f.startswith(".tmp-") for f in os.listdir(folder)):
        return (f"sample dir {folder} holds files but no config.json (not made by this generate.py); "
                "choose another --name or --sample-dir, or delete it"), False
    else:
        runs = [info]
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(config_path, dict(key=key, runs=runs))
    return None, False


#################################################################################
#                                    Seeding                                    #
#################################################################################

def image_seed(global_seed: int, index: int) -> int:
    """Seed of image ``index``'s generator (64 bits, well mixed for neighbouring indices)."""
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, np.uint64)[0])


class PerImageNoise:
    """One CPU generator per image of a batch, so an image's draws never depend on its batch.

    Per image, in order: latent noise, label, class-token noise (REG models), then every noise the
    SDE asks for through ``noise_like`` (image noise, then class-token noise, at each stochastic step)."""

    def __init__(self, global_seed: int, indices):
        self.gens = [torch.Generator().manual_seed(image_seed(global_seed, int(i))) for i in indices]

    def inputs(self, latent_shape, num_classes: int, cls_dim: int):
        z, y, cls = [], [], []
        for g in self.gens:
            z.append(torch.randn(latent_shape, generator=g))                     # (C, h, w)
            y.append(torch.randint(0, num_classes, (1,), generator=g))
            if cls_dim:
                cls.append(torch.randn(cls_dim, generator=g))                    # (Z,)
        return torch.stack(z), torch.cat(y), torch.stack(cls) if cls_dim else None

    def noise_like(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.gens):
            raise ValueError(f"noise for {like.shape[0]} samples requested from {len(self.gens)} generators")
        noise = [torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in self.gens]
        return torch.stack(noise).to(like.device)                                # like's shape


def release_inputs(n: int, latent_shape, num_classes: int, cls_dim: int, device):
    """The release's per-batch draws from the global generator: z, then y, then the class-token noise."""
    z = torch.randn(n, *latent_shape, device=device)                             # (n, C, h, w)
    y = torch.randint(0, num_classes, (n,), device=device)
    cls = torch.randn(n, cls_dim, device=device) if cls_dim else None            # (n, Z)
    return z, y, cls


def release_skip(n: int, latent_shape, num_classes: int, cls_dim: int, args, device) -> None:
    """Advance the global generator past one batch without sampling it (a batch done before a resume):
    the batch's inputs, then the noise the SDE draws (randn_like of the float64 state) per stochastic step."""
    release_inputs(n, latent_shape, num_classes, cls_dim, device)
    if args.mode == "sde":
        for _ in range(args.num_steps - 1):
            torch.randn(n, *latent_shape, dtype=torch.float64, device=device)
            if cls_dim:
                torch.randn(n, cls_dim, dtype=torch.float64, device=device)


#################################################################################
#                           Work plan, shards, assembly                         #
#################################################################################

def list_shards(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if SHARD_RE.match(f))


def shard_indices(path: str) -> np.ndarray:
    with np.load(path) as shard:
        return shard["indices"]


def per_image_plan(folder: str, num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches [start, stop) covering the images no shard holds; each batch is contiguous, so every
    shard covers a range, whatever batch sizes earlier runs used."""
    done = np.zeros(num_images, dtype=bool)
    for name in list_shards(folder):
        idx = shard_indices(os.path.join(folder, name))
        done[idx[idx < num_images]] = True
    batches, i = [], 0
    while i < num_images:
        if done[i]:
            i += 1
            continue
        stop = i
        while stop < num_images and not done[stop] and stop - i < batch_size:
            stop += 1
        batches.append((i, stop))
        i = stop
    return batches


def release_indices(batch: int, n: int, world_size: int, rank: int) -> np.ndarray:
    """The release's image indices of a rank's batch (interleaved across ranks)."""
    return batch * n * world_size + np.arange(n) * world_size + rank


def rank_batches(args, todo, rank: int, world: int):
    """This rank's batches in order, as index arrays (None: a release batch to skip), and the number
    of images all ranks still have to sample. ``todo`` is rank 0's plan: per-image, the [start, stop)
    batches left, dealt round-robin; release, the names of the shards already written."""
    n, N = args.per_proc_batch_size, args.num_fid_samples
    if args.seed_scheme == "per-image":
        return [np.arange(start, stop) for start, stop in todo[rank::world]], sum(b - a for a, b in todo)
    batches, remaining = [], 0
    for b in range(math.ceil(N / (n * world))):
        for r in range(world):
            idx = release_indices(b, n, world, r)
            left = f"rank{r:03d}-batch{b:06d}.npz" not in todo and (idx < N).any()
            remaining += int((idx < N).sum()) if left else 0
            if r == rank:
                batches.append(idx if left else None)
    return batches, remaining


def write_shard(folder: str, name: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    atomic_save_npz(os.path.join(folder, name), images=images, labels=labels.astype(np.int64),
                    indices=indices.astype(np.int64))


def save_pngs(folder: str, images: np.ndarray, indices: np.ndarray) -> None:
    for img, i in zip(images, indices):
        with atomic_open(os.path.join(folder, f"{int(i):06d}.png")) as f:
            Image.fromarray(img).save(f, format="PNG")


def assemble_npz(folder: str, num_images: int, npz_path: str) -> np.ndarray:
    """Stream the shards into ``npz_path`` (arr_0 images in index order, arr_1 labels), atomically,
    holding one block of shards in memory at a time. Returns the labels.

    A block is a run of shards (sorted by first index) whose indices form one range: a single shard in
    the per-image scheme, the world_size shards of one batch in the release's interleaved scheme."""
    entries = []                                                   # (first, last + 1, size, name)
    count = np.zeros(num_images, dtype=np.int64)
    for name in list_shards(folder):
        idx = shard_indices(os.path.join(folder, name))
        idx = idx[idx < num_images]   # a run that asked for more images earlier leaves extra ones
        if idx.size:
            np.add.at(count, idx, 1)
            entries.append((int(idx.min()), int(idx.max()) + 1, int(idx.size), name))
    if (count != 1).any():
        raise RuntimeError(f"shards in {folder} cover {int((count > 0).sum())} of {num_images} images "
                           f"({int((count > 1).sum())} more than once); rerun generate.py to finish them")
    entries.sort()
    with np.load(os.path.join(folder, entries[0][3])) as first:
        image_shape = first["images"].shape[1:]                    # (H, W, 3)
    labels = np.empty(num_images, dtype=np.int64)

    def blocks():
        group, start, stop, covered = [], 0, 0, 0
        for _, hi, size, name in entries:
            group.append(name)
            stop, covered = max(stop, hi), covered + size
            if stop - start != covered:
                continue  # the range [start, stop) still has holes that later shards fill
            block = np.empty((covered, *image_shape), dtype=np.uint8)   # (n, H, W, 3)
            for member in group:
                with np.load(os.path.join(folder, member)) as shard:
                    idx = shard["indices"]
                    keep = idx < num_images
                    block[idx[keep] - start] = shard["images"][keep]
                    labels[idx[keep]] = shard["labels"][keep]
            yield block
            group, start, covered = [], stop, 0

    with atomic_open(npz_path) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (num_images, *image_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for block in blocks():
                member.write(np.ascontiguousarray(block).data)
        with zf.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, labels)
    return labels


#################################################################################
#                                    Sampling                                   #
#################################################################################

@torch.no_grad()
def sample_images(model, codec, z, y, cls, args, noise_fn) -> np.ndarray:
    """Latent noise (n, C, h, w) -> uint8 images (n, H, W, 3) through the sampler and the decoder."""
    with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        latents = SAMPLERS[args.mode](
            model, z, y, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
            guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=args.path_type,
            cls_latents=cls, cls_cfg_scale=args.cls_cfg_scale, noise_fn=noise_fn,
        )                                                                        # float64 (n, C, h, w)
    pixels = codec.decode(latents.float())                                       # (n, 3, H, W) ~[-1, 1]
    return Autoencoder.to_uint8(pixels).cpu().numpy()


def main(argv=None) -> str | None:
    """Run the CLI; returns the path of the .npz on rank 0 (None on the other ranks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    try:
        procs = Procs(args.device)
    except ValueError as e:
        parser.error(str(e))
    # Global state is restored on the way out, so main() can be called from other code (and tests).
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    rng_devices = [procs.device.index] if procs.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            return _run(parser, args, procs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        procs.close()


def _run(parser: CLIParser, args, procs: Procs) -> str | None:
    device = procs.device
    if args.per_proc_batch_size == "auto":
        args.per_proc_batch_size = AUTO_BATCH.get(device.type, 32)
    model, facts = load_model(parser, args)
    check_flags(parser, args, model, facts)
    spec = codec_spec(parser, args, facts["autoencoder"])
    try:
        codec = Autoencoder.from_spec(spec, device=device)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"cannot load the decoder {spec!r}: {one_line(e)} "
                     "(--vae-path points at a local copy of a diffusers AutoencoderKL)")
    resolution = check_codec(parser, args, model, codec)
    args.path_type = args.path_type or facts["path_type"] or "linear"
    model.to(device)
    if args.compile:
        model.compile_blocks()
    cfg = model.config
    latent_shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    num_classes, cls_dim = cfg["num_classes"], cfg["cls_token_dim"]
    n, world, rank, N = args.per_proc_batch_size, procs.world_size, procs.rank, args.num_fid_samples

    name = args.name or default_name(args, facts, spec, resolution)
    folder = os.path.join(args.sample_dir, name)
    npz_path = os.path.join(args.sample_dir, f"{name}.npz")
    final_json = os.path.join(args.sample_dir, f"{name}.json")

    # Rank 0 checks the sample dir and makes the plan; everyone gets the same plan.
    state = None
    if procs.is_main:
        os.makedirs(args.sample_dir, exist_ok=True)
        facts["sha256"] = file_sha256(args.ckpt)
        key = run_key(args, model, facts, spec, resolution, world)
        info = run_info(args, facts, procs)
        error, complete = prepare_run(folder, final_json, npz_path, key, info, N)
        state = dict(error=error, complete=complete)
        if not error and not complete:
            state["todo"] = (per_image_plan(folder, N, n) if args.seed_scheme == "per-image"
                             else set(list_shards(folder)))  # release: the shards already written
    state = procs.broadcast(state)
    if state["error"]:
        parser.error(state["error"])
    if state["complete"]:
        if procs.is_main:
            print(f"{npz_path} is already complete ({N} images); nothing to do")
        return npz_path if procs.is_main else None

    batches, remaining = rank_batches(args, state["todo"], rank, world)
    if args.seed_scheme == "release":
        torch.manual_seed(args.global_seed * world + rank)
    if procs.is_main:
        print(f"sampling {remaining} of {N} images into {folder} on {world} process(es), "
              f"{args.mode} {args.num_steps} steps, cfg {args.cfg_scale:g}, seed scheme {args.seed_scheme}")

    # ---- Sample ----
    pbar = tqdm(total=remaining, unit="img", desc="sampling", disable=not procs.is_main, dynamic_ncols=True)
    queue = list(enumerate(batches))[::-1]                 # popped from the end, in order
    while queue:
        b, idx = queue.pop()
        if idx is None:  # release scheme, batch already written: only advance the generator
            release_skip(n, latent_shape, num_classes, cls_dim, args, device)
            continue
        if args.seed_scheme == "per-image":
            noise = PerImageNoise(args.global_seed, idx)
            z, y, cls = noise.inputs(latent_shape, num_classes, cls_dim)
            noise_fn, shard = noise.noise_like, f"img-{idx[0]:07d}-{idx[-1] + 1:07d}.npz"
        else:
            z, y, cls = release_inputs(n, latent_shape, num_classes, cls_dim, device)
            noise_fn, shard = None, f"rank{rank:03d}-batch{b:06d}.npz"
        if args.class_balanced:
            y = torch.as_tensor(idx % num_classes)
        z, y = z.to(device), y.to(device)
        cls = None if cls is None else cls.to(device)
        try:
            images = sample_images(model, codec, z, y, cls, args, noise_fn)
        except torch.cuda.OutOfMemoryError:
            if args.seed_scheme != "per-image" or len(idx) == 1:
                raise
            # Per-image noise: the halves give the same images, they just fit in memory.
            del z, y, cls
            if device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            queue += [(b, idx[half:]), (b, idx[:half])]
            print(f"rank {rank}: out of memory with {len(idx)} images per batch; retrying as {half} + "
                  f"{len(idx) - half}", file=sys.stderr)
            continue
        keep = idx < N  # the release samples whole batches and drops the extra images
        labels = y.cpu().numpy()
        if args.save_png:
            save_pngs(folder, images[keep], idx[keep])
        write_shard(folder, shard, images[keep], labels[keep], idx[keep])      # the shard marks them done
        pbar.update(min(int(keep.sum()) * world, pbar.total - pbar.n))
    pbar.close()

    # ---- Assemble on rank 0 ----
    procs.barrier()
    if not procs.is_main:
        return None
    t0 = time.time()
    labels = assemble_npz(folder, N, npz_path)
    stored = read_json(os.path.join(folder, "config.json"))
    counts = np.bincount(labels, minlength=num_classes)
    sidecar = dict(key=stored["key"], num_images=N, npz=os.path.basename(npz_path),
                   arrays={"arr_0": [N, *([resolution] * 2), 3], "arr_1": [N]},
                   label_counts={"min": int(counts.min()), "max": int(counts.max())},
                   runs=stored["runs"])
    atomic_write_json(final_json, sidecar)
    print(f"saved {npz_path} [{N} x {resolution} x {resolution} x 3] in {time.time() - t0:.1f}s; "
          f"settings in {final_json}")
    return npz_path


if __name__ == "__main__":
    main()
