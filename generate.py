"""Sample FID batches from SiT / REPA / REG checkpoints: distributed, reproducible, resumable.

    torchrun --nproc_per_node 8 generate.py --ckpt exps/run/checkpoints/4000000.pt \\
        --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85

Runs under torchrun or ``python -m torch.distributed.launch`` (the release's eval.sh runs unchanged;
NCCL on GPUs, gloo on CPU) or as a single process. The architecture comes from the checkpoint (ours
store their constructor arguments; the release's are read off the state_dict); flags describing the
architecture are only checked against it. The release's and REPA's command lines are accepted as
they are (their spellings --global-seed, --cls, --local-rank, --legacy, SpeedrunDiT's
--balanced-sampling and --time-shifting).

Outputs, for a run called NAME (``--name``; by default the release's name,
``{model}-{ckpt stem}-size-{resolution}-vae-{vae}-cfg-{cfg_scale}-seed-{seed}-{mode}-{guidance_high}-{cls_cfg_scale}``
for a class-token (REG) checkpoint and REPA's ``...-seed-{seed}-{mode}`` for one without, so that
the releases' evaluation scripts find the file; everything else that decides the images, the seed
scheme included, is in NAME.json, and a rerun with other settings into the same NAME is refused):
    {sample_dir}/NAME/          shards (atomic .npz batches: images, labels, indices), config.json,
                                and with --save-png one {index:06d}.png per image
    {sample_dir}/NAME.npz       arr_0 (N, H, W, 3) uint8 in index order (the ADM evaluator's input),
                                arr_1 (N,) class labels; the same bytes whatever the run's history
    {sample_dir}/NAME.json      everything that determines the result, plus how it was run

Seeding (``--seed-scheme``):
    per-image (default)  image i owns a CPU generator seeded with
                         SeedSequence([seed, i]).generate_state(1, uint64); it draws, in order,
                         the latent noise, a label (uniform over num_classes), the class-token noise,
                         then every noise the sampler asks for (the SDE: image, then class token, at
                         each stochastic step). Image i is therefore the same whatever the world size
                         or batch size (bit for bit on CPU; GPU kernels picked per batch size may move
                         the low bits, so now and then a pixel by one grey level).
    release              the release's: torch.manual_seed(seed * world_size + rank); per batch z, y,
                         class-token noise from the global generator, the sampler's noise from
                         randn_like; image index = batch * world_size * batch_size + k * world_size
                         + rank. Reproduces its samples (with --no-fused-attn, as it sampled), but
                         depends on world size and batch size. A resumed run advances the generator
                         past finished batches by replaying the sampler's draws without the network
                         (samplers.replay_draws), so any sampler in samplers.SAMPLERS resumes exactly.
``--class-balanced`` replaces the label of image i by i % num_classes (50 per class for 50K); the
label is still drawn, so the noises of image i are the same with and without it.

Memory: latents are decoded --decode-batch-size at a time. Out of GPU memory while decoding, the
chunk is retried at half the size (the finished latents are kept); out of memory while sampling
(per-image scheme), the batch is split in two and the smaller size is kept for the rest of the run.
Neither changes the images.

Resume: rerunning the same command keeps the shards already written and samples the rest (per-image:
any world size or batch size; release: the same ones, since they decide the noise). Temporary files
of killed runs are removed at start; a damaged shard is reported, deleted and sampled again. A folder
made with a different configuration is refused.

In-process use (e.g. FID during training): ``sample_batch(model, codec, indices, SampleSettings(...))``
returns the same images as the CLI for the same indices.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import pickle
import re
import socket
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import PRECISIONS, RankZeroParser, add_runtime_args, autocast_dtype, set_tf32
from fileio import (atomic_open, atomic_save_npz, atomic_write_json, file_sha256, is_temp_file, read_json,
                    remove_stale_temp_files)
from loss import PATH_TYPES, resolution_shift
from models.autoencoder import VAE_ALIASES, Autoencoder, decoder_for
from models.sit import SIT_CONFIGS, SiT, SiT_models
from runtime import Procs, one_line
from samplers import GLOBAL_NOISE, PerSampleNoise, RecordingNoise, SAMPLERS, draw_plan, replay_draws, to_device

SHARD_RE = re.compile(r"^(img-\d{7}-\d{7}|rank\d{3}-batch\d{6})\.npz$")
SHARD_KEYS = ("images", "labels", "indices")
AUTO_BATCH = {"cuda": 256, "cpu": 32}
DEFAULT_DECODE_BATCH = 32
DEFAULT_SHIFT_BASE = 4096          # SpeedrunDiT's: SD-VAE latents at 256 px, 4 x 32 x 32
RELEASE_ENCODER_DEPTH = 8          # the release's --encoder-depth default (used by --legacy)
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # NAME.npz's member timestamps: equal runs give equal bytes


#################################################################################
#                         Settings and in-process sampling                      #
#################################################################################

# One rule per numeric setting, shared by SampleSettings and the CLI (which says --num-steps for num_steps).
SETTING_RULES = {
    "num_steps": (lambda v: v >= 1, ">= 1"),
    "cfg_scale": (lambda v: v >= 1.0, ">= 1 (1 = no guidance)"),
    "cls_cfg_scale": (lambda v: v is None or v >= 0.0, ">= 0 (0 = class token unguided)"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "decode_batch_size": (lambda v: v >= 1, ">= 1"),
    "num_classes": (lambda v: v is None or v >= 1, ">= 1"),
}


def setting_problems(values: dict, name=lambda key: key) -> list[str]:
    """What is wrong with the sampler settings in ``values`` (those it holds), one phrase each."""
    out = [f"{name(k)} must be {requirement}, got {values[k]}"
           for k, (ok, requirement) in SETTING_RULES.items() if k in values and not ok(values[k])]
    low, high = values.get("guidance_low"), values.get("guidance_high")
    if low is not None and high is not None and not 0.0 <= low <= high <= 1.0:
        out.append(f"need 0 <= {name('guidance_low')} <= {name('guidance_high')} <= 1, got {low}, {high}")
    return out


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Everything besides the model, the decoder and the image indices that decides the images.

    ``time_shift`` is the shift factor itself (1 = none; generate.py's CLI derives it from the
    checkpoint, see --time-shift). ``num_classes`` None = the model's. ``decode_batch_size`` only
    bounds memory."""
    mode: str = "sde"
    num_steps: int = 50
    heun: bool = False
    cfg_scale: float = 1.5
    cls_cfg_scale: float = 1.5
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path_type: str = "linear"
    time_shift: float = 1.0
    path_drop_guidance: bool = False
    precision: str = "fp32"
    class_balanced: bool = False
    num_classes: int | None = None
    seed: int = 0
    decode_batch_size: int = DEFAULT_DECODE_BATCH

    def __post_init__(self):
        problems = setting_problems(dataclasses.asdict(self))
        for name, value, choices in (("mode", self.mode, sorted(SAMPLERS)), ("precision", self.precision, PRECISIONS),
                                     ("path_type", self.path_type, PATH_TYPES)):
            if value not in choices:
                problems.append(f"{name} {value!r} is not one of {choices}")
        if problems:
            raise ValueError("bad sample settings: " + "; ".join(problems))

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of the sampler (samplers.SAMPLERS[mode])."""
        return dict(num_steps=self.num_steps, heun=self.heun, cfg_scale=self.cfg_scale,
                    guidance_low=self.guidance_low, guidance_high=self.guidance_high, path_type=self.path_type,
                    cls_cfg_scale=self.cls_cfg_scale, time_shift=self.time_shift,
                    path_drop_guidance=self.path_drop_guidance)


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s generator (64 bits, well mixed for neighbouring indices)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class PerImageNoise(PerSampleNoise):
    """The per-image seed scheme: one CPU generator per image, seeded by (seed, index).

    Per image, in order: latent noise, label, class-token noise (REG models), then every noise the
    sampler asks for through ``randn_like`` (copied to the device from pinned memory)."""

    def __init__(self, seed: int, indices):
        super().__init__(torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices)

    def inputs(self, n: int, latent_shape, num_classes: int, cls_dim: int, device):
        if n != len(self.generators):
            raise ValueError(f"inputs for {n} images requested from {len(self.generators)} generators")
        z, y, cls = [], [], []
        for g in self.generators:
            z.append(torch.randn(latent_shape, generator=g))                     # (C, h, w)
            y.append(torch.randint(0, num_classes, (1,), generator=g))
            if cls_dim:
                cls.append(torch.randn(cls_dim, generator=g))                    # (Z,)
        cls = to_device(torch.stack(cls), device) if cls_dim else None
        return to_device(torch.stack(z), device), to_device(torch.cat(y), device), cls


class ReleaseNoise(RecordingNoise):
    """The release's seed scheme: everything from the global generator of the device, per batch z,
    then y, then the class-token noise, then the sampler's randn_like draws (logged in ``log``)."""

    def __init__(self):
        super().__init__(GLOBAL_NOISE)

    def inputs(self, n: int, latent_shape, num_classes: int, cls_dim: int, device):
        z = torch.randn(n, *latent_shape, device=device)                         # (n, C, h, w)
        y = torch.randint(0, num_classes, (n,), device=device)
        cls = torch.randn(n, cls_dim, device=device) if cls_dim else None        # (n, Z)
        return z, y, cls


def model_shape(model) -> tuple[tuple, int, int]:
    """(latent shape (C, h, w), num_classes, class-token width) of a SiT."""
    cfg = model.config
    return (cfg["in_channels"], cfg["input_size"], cfg["input_size"]), cfg["num_classes"], cfg["cls_token_dim"]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def free_memory(device) -> None:
    """Called AFTER an except block: inside it the traceback still holds the failed tensors."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def sample_latents(model, indices, settings: SampleSettings, device=None, noise=None):
    """Images ``indices`` -> (float64 latents (n, C, h, w) on the device, int64 labels (n,) numpy).

    ``noise``: the seed scheme's noise source; default the per-image generators of
    (settings.seed, index). The model must be in eval mode (sample_batch takes care of it)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    device = torch.device(device) if device is not None else _model_device(model)
    latent_shape, model_classes, cls_dim = model_shape(model)
    num_classes = settings.num_classes or model_classes
    if num_classes > model_classes:
        raise ValueError(f"settings.num_classes {num_classes} exceeds the model's {model_classes} classes")
    noise = noise if noise is not None else PerImageNoise(settings.seed, indices)
    z, y, cls = noise.inputs(len(indices), latent_shape, num_classes, cls_dim, device)
    if settings.class_balanced:
        y = to_device(torch.as_tensor(indices % num_classes), device)
    dtype = autocast_dtype(settings.precision)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        latents = SAMPLERS[settings.mode](model, z, y, cls_latents=cls, noise=noise, **settings.sampler_kwargs())
    return latents, y.cpu().numpy().astype(np.int64)


@torch.no_grad()
def decode_latents(codec, latents, batch_size: int = DEFAULT_DECODE_BATCH, log=None) -> tuple[np.ndarray, int]:
    """Latents (n, C, h, w) -> uint8 images (n, H, W, 3), decoded ``batch_size`` at a time.

    A chunk that runs out of GPU memory is retried at half the size: the latents are kept, nothing
    is sampled again. Returns (images, the chunk size that worked: keep it for later batches)."""
    out, start, size = [], 0, max(1, int(batch_size))
    while start < len(latents):
        chunk = latents[start:start + size]
        failed = False
        try:
            pixels = codec.decode(chunk.float())                                 # (k, 3, H, W) ~[-1, 1]
            out.append(Autoencoder.to_uint8(pixels).cpu().numpy())
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            failed = True
        if failed:
            pixels = None
            free_memory(latents.device)
            size = max(1, size // 2)
            if log is not None:
                log(f"out of memory decoding {len(chunk)} images; decoding {size} at a time from now on")
            continue
        start += len(chunk)
    return np.concatenate(out), size


def sample_batch(model, codec, indices, settings: SampleSettings, device=None, noise=None):
    """In-process sampling: images ``indices`` -> (uint8 images (n, H, W, 3), int64 labels (n,)).

    The same images as ``generate.py`` with the same settings and the per-image seed scheme (its
    default), whatever the batch; the global RNG is not touched. The model is put in eval mode for
    the call and restored after; TF32 follows the caller's torch.backends settings (the CLI's
    --tf32, on by default, sets them). ``device`` defaults to the model's; ``noise`` is the seed
    scheme's noise source (default PerImageNoise(settings.seed, indices)). Call it on each rank
    with that rank's indices and gather the results."""
    training = model.training
    model.eval()
    try:
        latents, labels = sample_latents(model, indices, settings, device, noise)
        images, _ = decode_latents(codec, latents, settings.decode_batch_size)
    finally:
        model.train(training)
    return images, labels


def skip_release_batch(model, n: int, settings: SampleSettings, device, noise: ReleaseNoise) -> None:
    """Advance the release scheme's global generator past one batch without sampling it: its inputs,
    then the sampler's own draws, replayed without the network."""
    latent_shape, model_classes, cls_dim = model_shape(model)
    z, y, cls = noise.inputs(n, latent_shape, settings.num_classes or model_classes, cls_dim, device)
    replay_draws(SAMPLERS[settings.mode], z, y, noise, cls_latents=cls, **settings.sampler_kwargs())


def check_replayable(model, n: int, settings: SampleSettings, device, drawn: list) -> None:
    """The draws of a sampled batch must be those the replay makes, or a resume would skip wrongly."""
    latent_shape, _, cls_dim = model_shape(model)
    z = torch.zeros(n, *latent_shape, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    cls = torch.zeros(n, cls_dim, device=device) if cls_dim else None
    plan = draw_plan(SAMPLERS[settings.mode], z, y, cls_latents=cls, **settings.sampler_kwargs())
    if plan != drawn:
        raise RuntimeError(f"sampler {settings.mode!r} drew {len(drawn)} noises but its replay without the network "
                           f"draws {len(plan)} (its draws depend on the network's outputs?); --seed-scheme release "
                           "could not resume it: use --seed-scheme per-image")


#################################################################################
#                                      CLI                                      #
#################################################################################

def _batch_size(s: str):
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {s!r}") from None


def build_parser() -> RankZeroParser:
    p = RankZeroParser(prog="generate.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b = argparse.BooleanOptionalAction

    g = p.add_argument_group("checkpoint (the architecture comes from it; these flags are checked against it)")
    g.add_argument("--ckpt", required=True, help="our checkpoint or the REG/REPA release's")
    g.add_argument("--use-model-weights", action="store_true", help="sample with the raw weights instead of the EMA")
    g.add_argument("--legacy", action=b, default=False,
                   help="old release checkpoints: rename decoder_blocks.i to blocks.{i + encoder depth} "
                        "(--encoder-depth, else the checkpoint's, else 8) before loading")
    g.add_argument("--model", choices=list(SiT_models), default=None,
                   help="checked against the checkpoint (the release's default SiT-XL/2 is not assumed)")
    g.add_argument("--resolution", type=int, default=None,
                   help="image size; default: the checkpoint's latent size x the codec's downsampling")
    g.add_argument("--num-classes", type=int, default=None, help="checked against the checkpoint")
    g.add_argument("--encoder-depth", type=int, default=None, help="checked against the checkpoint")
    g.add_argument("--projector-embed-dims", default=None,
                   help="comma-separated encoder widths, checked against the checkpoint "
                        "(the release's default '768,1024' is ignored unless given)")
    g.add_argument("--cls-token-dim", "--cls", dest="cls_token_dim", type=int, default=None,
                   help="width of the class token, checked against the checkpoint (0 = no class token: "
                        "REPA/SiT); --cls is the release's spelling")
    g.add_argument("--qk-norm", action=b, default=None, help="checked against the checkpoint")
    g.add_argument("--fused-attn", action=b, default=True,
                   help="torch SDPA attention (the release sampled without it; same maths)")

    g = p.add_argument_group("latent codec")
    g.add_argument("--vae", choices=list(VAE_ALIASES), default=None,
                   help="SD-VAE decoder (stabilityai/sd-vae-ft-*; offline: REG_VAE_PATH points at a local copy); "
                        "default ema, or the checkpoint's own codec when it was not trained on SD-VAE latents")
    g.add_argument("--vae-path", default=None, help="local copy of the decoder (a diffusers AutoencoderKL folder)")

    g = p.add_argument_group("sampler")
    g.add_argument("--mode", choices=list(SAMPLERS), default=None,
                   help="sde: the release's Euler-Maruyama; ode: Euler/Heun. Default: sde for class-token (REG) "
                        "checkpoints, ode (REPA's default) for checkpoints without a class token")
    g.add_argument("--heun", action=b, default=False, help="Heun's correction (--mode ode only)")
    g.add_argument("--num-steps", type=int, default=50)
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance (1 = none)")
    g.add_argument("--cls-cfg-scale", type=float, default=None,
                   help="guidance of the class token (0 = it follows the conditional drift); default 1.5 as "
                        "released (class-token checkpoints only)")
    g.add_argument("--guidance-low", "--guidance_low", dest="guidance_low", type=float, default=0.0)
    g.add_argument("--guidance-high", "--guidance_high", dest="guidance_high", type=float, default=1.0)
    g.add_argument("--path-type", choices=list(PATH_TYPES), default=None,
                   help="default: the checkpoint's training path (linear if not recorded)")
    g.add_argument("--time-shift", "--time-shifting", dest="time_shift", action=b, default=None,
                   help="shift the time grid by sqrt(C h w / --shift-base) (SpeedrunDiT's); default: as the "
                        "checkpoint was trained (its args time_shift), off if not recorded")
    g.add_argument("--shift-base", type=int, default=None,
                   help=f"latent size (C h w) without shift; default the checkpoint's, else {DEFAULT_SHIFT_BASE}")

    g.add_argument("--path-drop-guidance", "--path-drop", dest="path_drop_guidance", action=b, default=False,
                   help="path-drop guidance (SPRINT; --routing sprint checkpoints only): the unconditional branch "
                        "runs without the sparse path (--path-drop: SpeedrunDiT's spelling, whose default is on)")

    g = p.add_argument_group("seeding and output")
    g.add_argument("--seed-scheme", choices=["per-image", "release"], default="per-image")
    g.add_argument("--class-balanced", "--balanced-sampling", dest="class_balanced", action=b, default=False,
                   help="label of image i = i %% num_classes (--balanced-sampling: SpeedrunDiT's spelling)")
    g.add_argument("--sample-dir", default="samples")
    g.add_argument("--name", default=None,
                   help="run name (folder and .npz); default: the release's name built from the settings")
    g.add_argument("--per-proc-batch-size", type=_batch_size, default=32,
                   help="images per process and batch, or 'auto' (256 on a GPU, 32 on the CPU). With the "
                        "per-image seed scheme a batch that runs out of GPU memory is split in two and the "
                        "smaller size kept (the images do not depend on the batching)")
    g.add_argument("--decode-batch-size", type=int, default=DEFAULT_DECODE_BATCH,
                   help="latents decoded at a time (halved for the rest of the run if the decoder runs out "
                        "of GPU memory; finished latents are never sampled again)")
    g.add_argument("--num-fid-samples", type=int, default=50_000)
    g.add_argument("--save-png", action="store_true", help="also write one PNG per image")

    g = p.add_argument_group("runtime")
    add_runtime_args(g, precision_default="fp32", tf32_default=True,
                     seed_help="seed of the samples (--global-seed: the release's spelling); see --seed-scheme")
    g.add_argument("--compile", action=b, default=False,
                   help="torch.compile the SiT blocks (faster on GPUs after a warm-up; numbers change slightly)")
    # torch.distributed.launch (the release's eval.sh) passes this; we read LOCAL_RANK instead.
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def validate_args(parser: RankZeroParser, args) -> None:
    """Checks that need no checkpoint: every rank runs them, rank 0 prints."""
    if args.num_fid_samples < 1:
        parser.error(f"--num-fid-samples must be >= 1, got {args.num_fid_samples}")
    if args.per_proc_batch_size == "auto":
        if args.seed_scheme == "release":
            parser.error("--seed-scheme release draws its noise per batch, so it needs a fixed --per-proc-batch-size")
    elif args.per_proc_batch_size < 1:
        parser.error(f"--per-proc-batch-size must be >= 1, got {args.per_proc_batch_size}")
    problems = setting_problems(vars(args), name=lambda key: "--" + key.replace("_", "-"))
    if problems:
        parser.error("; ".join(problems))
    if args.heun and args.mode == "sde":
        parser.error("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")
    if args.shift_base is not None and args.shift_base < 1:
        parser.error(f"--shift-base must be >= 1, got {args.shift_base}")
    if args.cls_token_dim is not None and args.cls_token_dim < 0:
        parser.error(f"--cls-token-dim must be >= 0, got {args.cls_token_dim}")
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
#                        Checkpoint -> model and codec                          #
#################################################################################

def legacy_state_dict(state_dict: dict, encoder_depth: int) -> dict:
    """The release's --legacy remap: decoder_blocks.{i}.* -> blocks.{i + encoder_depth}.*, other keys as they are."""
    out = {}
    for key, value in state_dict.items():
        prefix = "module." if key.startswith("module.") else ""
        parts = key[len(prefix):].split(".")
        if parts[0] == "decoder_blocks" and len(parts) > 1 and parts[1].isdigit():
            key = prefix + ".".join(["blocks", str(int(parts[1]) + encoder_depth), *parts[2:]])
        out[key] = value
    return out


def load_model(parser: RankZeroParser, args):
    """Build the sampling model from the checkpoint (read on the CPU; optimizer state dropped).

    Returns (model in eval mode on the CPU, facts about the checkpoint)."""
    try:
        ckpt = load_checkpoint(args.ckpt)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        parser.error(f"cannot read checkpoint {args.ckpt}: {one_line(e)[:300]}")
    weights = "model" if args.use_model_weights else "ema"
    train_args = ckpt.get("args") or {}
    state_dict = ckpt.get(weights)
    if isinstance(state_dict, dict):
        old_layout = any(k.removeprefix("module.").startswith("decoder_blocks.") for k in state_dict)
        if args.legacy:
            depth = args.encoder_depth or train_args.get("encoder_depth") or RELEASE_ENCODER_DEPTH
            ckpt[weights] = legacy_state_dict(state_dict, int(depth))
        elif old_layout:
            parser.error(f"{args.ckpt} holds an old release layout (decoder_blocks.*); add --legacy to rename them "
                         "to blocks.{i + encoder depth}, as the release's --legacy does")
    try:
        model = model_from_checkpoint(ckpt, weights=weights, fused_attn=args.fused_attn)
    except (KeyError, ValueError, RuntimeError) as e:
        parser.error(f"cannot build the model of {args.ckpt}: {one_line(e)[:500]}")
    cfg = model.config
    shape = (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"])
    time_shift = train_args.get("time_shift", train_args.get("time_shifting"))  # ours / SpeedrunDiT's
    facts = dict(
        weights=weights,
        steps=ckpt.get("steps"),
        # the shapes decide; a stored name only names what the table does not know
        name=next((n for n, c in SIT_CONFIGS.items() if c == shape), None)
        or ckpt.get("model_name") or train_args.get("model"),
        autoencoder=ckpt.get("autoencoder"), codec=ckpt.get("codec"),
        path_type=train_args.get("path_type"),
        encoder_depth=(ckpt.get("model_config") or {}).get("encoder_depth", train_args.get("encoder_depth")),
        time_shift=None if time_shift is None else bool(time_shift),
        shift_base=train_args.get("shift_base"),
    )
    del ckpt  # the other weights and the Adam state are not needed any more
    return model.eval().requires_grad_(False), facts


def codec_spec(parser: RankZeroParser, args, facts: dict) -> str:
    """Which decoder: models.autoencoder.decoder_for on the checkpoint's recorded codec (SD-VAE latents,
    from the hub or a local copy, decode with the EMA decoder as released; --vae / --vae-path choose;
    other codecs decode with themselves). Release checkpoints record none: SD-VAE latents, or whatever
    --vae-path gives (then only its channels are checked against the model, in check_codec)."""
    recorded = facts["codec"] or facts["autoencoder"]
    if recorded is None and args.vae_path is not None:
        return os.path.abspath(args.vae_path)
    try:
        return decoder_for(facts["codec"] or facts["autoencoder"], args.vae, args.vae_path)
    except (ValueError, FileNotFoundError) as e:
        parser.error(one_line(e))


def resolve_sampler_args(parser: RankZeroParser, args, model) -> None:
    """Defaults that depend on the checkpoint: --mode and --cls-cfg-scale."""
    has_cls = bool(model.config["cls_token_dim"])
    if args.mode is None:
        args.mode = "sde" if has_cls else "ode"   # REG's 'ode' default exits (defect); REPA's samples
    if args.heun and args.mode != "ode":
        parser.error("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")
    if not has_cls:
        if args.cls_cfg_scale:
            parser.error("--cls-cfg-scale needs a REG checkpoint (this one has no class token)")
        args.cls_cfg_scale = 0.0
    elif args.cls_cfg_scale is None:
        args.cls_cfg_scale = 1.5                   # the release's default


def check_flags(parser: RankZeroParser, args, model, facts: dict) -> None:
    """Flags that describe the architecture must agree with the checkpoint (before loading a decoder)."""
    cfg = model.config
    problems = []
    if args.model is not None and args.model != facts["name"]:
        held = facts["name"] or f"a custom SiT (depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']})"
        problems.append(f"--model {args.model} but the checkpoint holds {held}")
    if args.num_classes is not None and args.num_classes != cfg["num_classes"]:
        problems.append(f"--num-classes {args.num_classes} but the checkpoint has {cfg['num_classes']} classes")
    if args.cls_token_dim is not None and args.cls_token_dim != cfg["cls_token_dim"]:
        problems.append(f"--cls-token-dim (--cls) {args.cls_token_dim} but the checkpoint's class token has width "
                        f"{cfg['cls_token_dim']} (0 = no class token: a REPA/SiT checkpoint)")
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
    if args.path_drop_guidance and cfg.get("routing") != "sprint":
        problems.append(f"--path-drop-guidance needs a checkpoint trained with --routing sprint "
                        f"(this one has routing {cfg.get('routing', 'none')!r})")
    if args.cfg_scale > 1.0 and cfg["class_dropout_prob"] <= 0:
        problems.append("--cfg-scale > 1 needs a model trained with class dropout (it has no null class)")
    if problems:
        parser.error("checkpoint/flag mismatch: " + "; ".join(problems))


def check_codec(parser: RankZeroParser, args, model, codec) -> int:
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


def time_shift_factor(args, facts: dict, latent_shape) -> float:
    """1 (none) unless time shifting is on (--time-shift, else the checkpoint's training args);
    then loss.resolution_shift(latent_shape, --shift-base or the checkpoint's or 4096)."""
    on = args.time_shift if args.time_shift is not None else bool(facts["time_shift"])
    if not on:
        return 1.0
    base = args.shift_base or facts["shift_base"] or DEFAULT_SHIFT_BASE
    return float(resolution_shift(latent_shape, int(base)))


def settings_from_args(args, model, shift: float) -> SampleSettings:
    return SampleSettings(
        mode=args.mode, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
        cls_cfg_scale=args.cls_cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
        path_type=args.path_type, time_shift=shift, path_drop_guidance=args.path_drop_guidance,
        precision=args.precision, class_balanced=args.class_balanced,
        num_classes=model.config["num_classes"], seed=args.seed, decode_batch_size=args.decode_batch_size,
    )


#################################################################################
#                     Run configuration (the sidecar JSON)                      #
#################################################################################

def run_key(args, model, facts: dict, spec: str, resolution: int, world_size: int, shift: float) -> dict:
    """Everything that decides the pixels of image i. Two runs with equal keys give equal images.
    The key names are those of existing sidecars (e.g. global_seed), so their folders still resume."""
    key = dict(
        checkpoint_sha256=facts["sha256"], weights=facts["weights"], model_config=model.config,
        autoencoder=spec, resolution=resolution,
        sampler=args.mode, heun=args.heun, num_steps=args.num_steps, path_type=args.path_type,
        cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
        guidance_interval=[args.guidance_low, args.guidance_high],
        global_seed=args.seed, seed_scheme=args.seed_scheme,
        labels="class-balanced: i % num_classes" if args.class_balanced else "uniform",
        precision=args.precision, tf32=args.tf32,
    )
    if shift != 1.0:  # absent when off, as in sidecars written before time shifting existed
        key["time_shift"] = shift
    if args.path_drop_guidance:  # likewise
        key["path_drop_guidance"] = True
    if args.seed_scheme == "release":  # the release's noise depends on the layout of the work
        key.update(world_size=world_size, per_proc_batch_size=args.per_proc_batch_size)
    return json.loads(json.dumps(key))  # tuples -> lists, as read back from disk


def run_info(args, facts: dict, procs: Procs) -> dict:
    """How this invocation ran (does not decide the result in the per-image scheme)."""
    return dict(
        started=datetime.datetime.now().isoformat(timespec="seconds"), host=socket.gethostname(),
        world_size=procs.world_size, per_proc_batch_size=args.per_proc_batch_size,
        decode_batch_size=args.decode_batch_size, device=procs.device.type, torch=torch.__version__,
        checkpoint=os.path.abspath(args.ckpt), checkpoint_steps=facts["steps"], model_name=facts["name"],
        vae_path_env=os.environ.get("REG_VAE_PATH"), command=sys.argv,
    )


def vae_label(args, spec: str) -> str:
    """The decoder as the release's name spells it: ema / mse, else the codec's own name."""
    if args.vae is not None:
        return args.vae
    for short, hf_id in VAE_ALIASES.items():
        if spec in (short, hf_id):
            return short
    return os.path.basename(spec.rstrip(os.sep).removeprefix("pca:")) or spec


def default_name(args, facts: dict, spec: str, resolution: int, has_cls: bool) -> str:
    """The release's folder name (REG's for class-token checkpoints, REPA's without), floats as Python's str()."""
    model = (args.model or facts["name"] or "custom").replace("/", "-")
    ckpt = os.path.basename(args.ckpt).replace(".pt", "")
    name = (f"{model}-{ckpt}-size-{resolution}-vae-{vae_label(args, spec)}-cfg-{args.cfg_scale}"
            f"-seed-{args.seed}-{args.mode}")
    if has_cls:
        name += f"-{args.guidance_high}-{args.cls_cfg_scale}"
    return name


_SIT_DEFAULTS = {k: p.default for k, p in inspect.signature(SiT.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty}


def comparable_key(key: dict) -> dict:
    """A run key for comparison: model_config entries at SiT's own defaults are dropped, so that an
    option added to the model later (recorded at its default) does not orphan existing folders."""
    key = dict(key or {})
    cfg = key.get("model_config")
    if isinstance(cfg, dict):
        defaults = json.loads(json.dumps(_SIT_DEFAULTS, default=list))
        key["model_config"] = {k: v for k, v in cfg.items() if not (k in defaults and defaults[k] == v)}
    return key


def _key_diff(old: dict, new: dict) -> str:
    old, new = comparable_key(old), comparable_key(new)
    fields = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields if old.get(k) != new.get(k))


def prepare_run(folder: str, final_json: str, npz_path: str, key: dict, info: dict, num_images: int):
    """Rank 0: check the folder and the final sidecar against this run. Returns (error, complete)."""
    if os.path.isfile(final_json):
        stored = read_json(final_json)
        if comparable_key(stored.get("key")) != comparable_key(key):
            return (f"{npz_path} was made with a different configuration ({_key_diff(stored.get('key', {}), key)}); "
                    "choose another --name or --sample-dir, or delete it"), False
        if stored.get("num_images") == num_images and os.path.isfile(npz_path):
            return None, True
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        stored = read_json(config_path)
        if comparable_key(stored.get("key")) != comparable_key(key):
            return (f"sample dir {folder} holds images from a different configuration "
                    f"({_key_diff(stored.get('key', {}), key)}); choose another --name or --sample-dir, or delete it"), False
        runs = stored.get("runs", []) + [info]
        key = stored["key"]  # keep the stored spelling
    elif os.path.isdir(folder) and any(not is_temp_file(f) for f in os.listdir(folder)):
        return (f"sample dir {folder} holds files but no config.json (not made by this generate.py); "
                "choose another --name or --sample-dir, or delete it"), False
    else:
        runs = [info]
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(config_path, dict(key=key, runs=runs))
    return None, False


def writable_error(sample_dir: str, folder: str) -> str | None:
    """One line if the sample dir (or the run's folder in it) cannot be written, else None."""
    try:
        os.makedirs(sample_dir, exist_ok=True)
    except OSError as e:
        return (f"cannot create --sample-dir {sample_dir} ({e.strerror or one_line(e)}); create it yourself "
                "or choose a writable --sample-dir")
    for d in (sample_dir, folder):
        if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
            return (f"cannot write to {d} (read-only); make it writable (chmod u+w {d}) "
                    "or choose another --sample-dir")
    return None


#################################################################################
#                           Work plan, shards, assembly                         #
#################################################################################

class ShardError(ValueError):
    """A shard that cannot be trusted (truncated, damaged, incomplete, wrong shapes)."""


def list_shards(folder: str) -> list[str]:
    """The shard files of a run folder (never the temp files of atomic writes), sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if SHARD_RE.match(f) and not is_temp_file(f))


def _npy_header(f) -> tuple[tuple, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ShardError(f"unknown .npy version {version}")
    if fortran:
        raise ShardError("images stored in Fortran order")
    return tuple(shape), np.dtype(dtype)


def read_shard_indices(path: str, resolution: int | None = None) -> np.ndarray:
    """The image indices of a shard, after checking it: the three arrays present, indices and labels
    readable, images uint8 (n, R, R, 3) with all their bytes there. Raises ShardError."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            missing = [k for k in SHARD_KEYS if f"{k}.npy" not in names]
            if missing:
                raise ShardError(f"no {', '.join(missing)} array")
            with zf.open("indices.npy") as f:
                indices = np.lib.format.read_array(f, allow_pickle=False)
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
            info = zf.getinfo("images.npy")
            with zf.open(info) as f:
                shape, dtype = _npy_header(f)
                header_bytes = f.tell()
    except ShardError:
        raise
    except PermissionError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError) as e:
        raise ShardError(one_line(e)) from None
    n = len(indices) if indices.ndim == 1 else -1
    if n < 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ShardError(f"indices are {indices.dtype} {indices.shape}, expected a non-empty integer vector")
    if labels.shape != (n,):
        raise ShardError(f"labels have shape {labels.shape}, expected ({n},)")
    want = (n, resolution, resolution, 3) if resolution else (n, *shape[1:3], 3)
    if dtype != np.uint8 or shape != want:
        raise ShardError(f"images are {dtype} {shape}, expected uint8 {want}")
    if info.file_size != header_bytes + math.prod(shape):
        raise ShardError(f"images hold {info.file_size - header_bytes} bytes, expected {math.prod(shape)}")
    if indices.min() < 0 or len(np.unique(indices)) != n:
        raise ShardError("indices are negative or repeated")
    return indices.astype(np.int64)


def valid_shards(folder: str, resolution: int | None, log=print) -> dict[str, np.ndarray]:
    """Rank 0: {shard name: indices} of the good shards; a damaged one is named in one line, deleted
    (so that its images are sampled again) and left out."""
    good = {}
    for name in list_shards(folder):
        path = os.path.join(folder, name)
        try:
            good[name] = read_shard_indices(path, resolution)
        except ShardError as e:
            log(f"warning: shard {path} is damaged ({e}); deleting it, its images will be sampled again")
            os.remove(path)
    return good


def per_image_plan(shards: dict[str, np.ndarray], num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches [start, stop) covering the images no shard holds; each batch is contiguous, so every
    shard covers a range, whatever batch sizes earlier runs used."""
    done = np.zeros(num_images, dtype=bool)
    for idx in shards.values():
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


def _zip_member(zf: zipfile.ZipFile, name: str):
    """A stored member with a fixed timestamp, so the archive's bytes depend on its contents only."""
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    return zf.open(info, "w", force_zip64=True)


def assemble_npz(folder: str, num_images: int, npz_path: str) -> np.ndarray:
    """Stream the shards into ``npz_path`` (arr_0 images in index order, arr_1 labels), atomically,
    holding one block of shards in memory at a time. Returns the labels.

    A block is a run of shards (sorted by first index) whose indices form one range: a single shard in
    the per-image scheme, the world_size shards of one batch in the release's interleaved scheme."""
    entries = []                                                   # (first, last + 1, size, name)
    count = np.zeros(num_images, dtype=np.int64)
    for name in list_shards(folder):
        with np.load(os.path.join(folder, name)) as shard:
            idx = shard["indices"]
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
        with _zip_member(zf, "arr_0.npy") as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (num_images, *image_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for block in blocks():
                member.write(np.ascontiguousarray(block).data)
        with _zip_member(zf, "arr_1.npy") as member:
            np.lib.format.write_array(member, labels)
    return labels


#################################################################################
#                                      Run                                      #
#################################################################################

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
    tf32 = set_tf32(args.tf32)
    rng_devices = [procs.device.index] if procs.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            return _run(parser, args, procs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        procs.close()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plan_on_main(args, procs, model, facts, spec, resolution, shift, folder, final_json, npz_path) -> dict:
    """Rank 0, before any rank writes: check the sample dir, clear temp files of killed runs, check the
    configuration, drop damaged shards, and plan the work."""
    error = writable_error(args.sample_dir, folder)
    if error:
        return dict(error=error, complete=False)
    try:
        stale = remove_stale_temp_files(folder) + remove_stale_temp_files(args.sample_dir,
                                                                           targets=(npz_path, final_json))
        for path in stale:
            _stderr(f"removed {path} (a temporary file of an earlier, killed run)")
        facts["sha256"] = file_sha256(args.ckpt)
        key = run_key(args, model, facts, spec, resolution, procs.world_size, shift)
        error, complete = prepare_run(folder, final_json, npz_path, key, run_info(args, facts, procs),
                                      args.num_fid_samples)
        state = dict(error=error, complete=complete)
        if not error and not complete:
            shards = valid_shards(folder, resolution, log=_stderr)
            state["todo"] = (per_image_plan(shards, args.num_fid_samples, args.per_proc_batch_size)
                             if args.seed_scheme == "per-image" else set(shards))  # release: shards written
    except OSError as e:
        return dict(error=f"cannot prepare {folder}: {one_line(e)}; check the permissions and free space of "
                          "--sample-dir", complete=False)
    return state


def _run(parser: RankZeroParser, args, procs: Procs) -> str | None:
    device = procs.device
    if args.per_proc_batch_size == "auto":
        args.per_proc_batch_size = AUTO_BATCH.get(device.type, 32)
    model, facts = load_model(parser, args)
    resolve_sampler_args(parser, args, model)
    check_flags(parser, args, model, facts)
    spec = codec_spec(parser, args, facts)
    try:
        with procs.main_first():       # a download (Hugging Face) once per node, then the others read it
            codec = Autoencoder.from_spec(spec, device=device)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"cannot load the decoder {spec!r}: {one_line(e)} "
                     "(--vae-path points at a local copy of a diffusers AutoencoderKL; REG_VAE_PATH at a "
                     "local copy of the SD-VAE)")
    resolution = check_codec(parser, args, model, codec)
    args.path_type = args.path_type or facts["path_type"] or "linear"
    latent_shape, num_classes, cls_dim = model_shape(model)
    shift = time_shift_factor(args, facts, latent_shape)
    settings = settings_from_args(args, model, shift)
    model.to(device)
    if args.compile:
        model.compile_blocks()
    world, rank, N = procs.world_size, procs.rank, args.num_fid_samples

    name = args.name or default_name(args, facts, spec, resolution, bool(cls_dim))
    folder = os.path.join(args.sample_dir, name)
    npz_path = os.path.join(args.sample_dir, f"{name}.npz")
    final_json = os.path.join(args.sample_dir, f"{name}.json")

    # Rank 0 checks the sample dir and makes the plan; everyone gets the same plan.
    state = None
    if procs.is_main:
        state = _plan_on_main(args, procs, model, facts, spec, resolution, shift, folder, final_json, npz_path)
    state = procs.broadcast(state)
    if state["error"]:
        parser.error(state["error"])
    if state["complete"]:
        if procs.is_main:
            print(f"{npz_path} is already complete ({N} images); nothing to do")
        return npz_path if procs.is_main else None

    batches, remaining = rank_batches(args, state["todo"], rank, world)
    release = args.seed_scheme == "release"
    release_noise = ReleaseNoise() if release else None
    if release:
        torch.manual_seed(args.seed * world + rank)
    if procs.is_main:
        shift_note = f", time shift {shift:g}" if shift != 1.0 else ""
        print(f"sampling {remaining} of {N} images into {folder} on {world} process(es), "
              f"{args.mode} {args.num_steps} steps, cfg {args.cfg_scale:g}{shift_note}, seed scheme {args.seed_scheme}")

    sample_shards(model, codec, settings, args, procs, batches, remaining, folder, release_noise)
    procs.barrier()
    return assemble(folder, final_json, npz_path, N, num_classes, resolution) if procs.is_main else None


def sample_shards(model, codec, settings, args, procs, batches, remaining, folder, release_noise) -> None:
    """This rank's batches -> shards. A batch that runs out of memory in the sampler is split and the
    smaller size kept for the rest of the run (per-image seeding: the images are the same); the
    decoder works in chunks and halves them on an out-of-memory error, never resampling."""
    device, rank, world, N, n = procs.device, procs.rank, procs.world_size, args.num_fid_samples, args.per_proc_batch_size
    release = release_noise is not None
    pbar = tqdm(total=remaining, unit="img", desc="sampling", disable=not procs.is_main, dynamic_ncols=True)
    queue = list(enumerate(batches))[::-1]                 # popped from the end, in order
    cap, decode_size, checked = n, args.decode_batch_size, False
    while queue:
        b, idx = queue.pop()
        if idx is None:  # release scheme, batch already written: only advance the generator
            skip_release_batch(model, n, settings, device, release_noise)
            continue
        if not release and len(idx) > cap:  # smaller batches since an out-of-memory error
            queue += [(b, idx[i:i + cap]) for i in range(0, len(idx), cap)][::-1]
            continue
        if release:
            release_noise.log = []
        failed = False
        try:
            latents, labels = sample_latents(model, idx, settings, device, release_noise)
        except torch.cuda.OutOfMemoryError:
            failed = True
        if failed:  # out of the except block: its traceback no longer holds the batch's tensors
            free_memory(device)
            if release or len(idx) == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"out of memory sampling {len(idx)} images per batch"
                    + (" with --seed-scheme release, whose noise depends on the batch size: start a new run with a "
                       "smaller --per-proc-batch-size, or use --seed-scheme per-image" if release else ""))
            half = len(idx) // 2
            cap = half
            queue += [(b, idx[half:]), (b, idx[:half])]
            _stderr(f"rank {rank}: out of memory with {len(idx)} images per batch; retrying as {half} + "
                    f"{len(idx) - half} and sampling at most {cap} at a time from now on")
            continue
        if release and not checked:
            check_replayable(model, len(idx), settings, device, release_noise.log)
            checked = True
        images, decode_size = decode_latents(codec, latents, decode_size, log=lambda m: _stderr(f"rank {rank}: {m}"))
        del latents
        keep = idx < N  # the release samples whole batches and drops the extra images
        shard = f"rank{rank:03d}-batch{b:06d}.npz" if release else f"img-{idx[0]:07d}-{idx[-1] + 1:07d}.npz"
        if args.save_png:
            save_pngs(folder, images[keep], idx[keep])
        write_shard(folder, shard, images[keep], labels[keep], idx[keep])      # the shard marks them done
        pbar.update(min(int(keep.sum()) * world, pbar.total - pbar.n))
    pbar.close()


def assemble(folder, final_json, npz_path, N, num_classes, resolution) -> str:
    """Rank 0, once every shard is written: the .npz in index order and its sidecar JSON."""
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
