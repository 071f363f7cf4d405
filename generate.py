"""Sample FID batches from SiT / REPA / REG checkpoints: distributed, reproducible, resumable.

    torchrun --nproc_per_node 8 generate.py --ckpt exps/run/checkpoints/4000000.pt \\
        --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85

Runs under torchrun or ``python -m torch.distributed.launch`` (the release's eval.sh runs unchanged;
NCCL on GPUs, gloo on CPU) or as a single process. The architecture comes from the checkpoint (ours
store their constructor arguments; the release's are read off the state_dict); flags describing the
architecture are only checked against it. The release's and REPA's command lines are accepted as
they are (their spellings --global-seed, --cls, --local-rank, --legacy, SpeedrunDiT's
--balanced-sampling and --time-shifting).

A run called NAME (``--name``; by default the release's name, so that the releases' evaluation
scripts find the file) writes {sample_dir}/NAME/ (shards), NAME.npz and NAME.json: shard_store.py.
Everything that decides the images is in NAME.json (run_identity.py); a rerun with other settings
into the same NAME is refused, the same command resumes. The checkpoint, the decoder and the settings
checked against the flags: sampling_run.py. Seed schemes, sampling a batch: sampling.py.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

import sampling_run
from cli import DefaultsHelpFormatter, RankZeroParser, add_runtime_args, set_tf32
from fileio import file_sha256, remove_stale_temp_files
from loss import PATH_TYPES, SHIFT_BASE
from models.autoencoder import VAE_ALIASES
from models.sit import SiT_models
from run_identity import default_name, prepare_run, run_info, run_key, writable_error
from runtime import Procs, check_launcher, one_line
from samplers import SAMPLERS
from sampling import (DEFAULT_DECODE_BATCH, ReleaseNoise, check_replayable, decode_latents,
                      free_memory, model_shape, sample_latents, setting_problems, skip_release_batch)
from shard_store import assemble, per_image_plan, rank_batches, save_pngs, valid_shards, write_shard

AUTO_BATCH = {"cuda": 256, "cpu": 32}


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
                       formatter_class=DefaultsHelpFormatter)
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
                   help=f"latent size (C h w) without shift; default the checkpoint's, else {SHIFT_BASE}")
    g.add_argument("--path-drop-guidance", "--path-drop", dest="path_drop_guidance", action=b, default=False,
                   help="path-drop guidance (SPRINT; --routing sprint checkpoints only): the unconditional branch "
                        "runs without the sparse path (--path-drop: SpeedrunDiT's spelling; its sampler has it on)")

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
    try:
        check_launcher("eval.sh")
    except ValueError as e:
        parser.error(str(e))


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
    built = sampling_run.build(parser, args, procs)
    model, facts, spec, codec, resolution, shift, settings = (
        built.model, built.facts, built.spec, built.codec, built.resolution, built.shift, built.settings)
    latent_shape, num_classes, cls_dim = model_shape(model)
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

    batches, remaining = rank_batches(state["todo"], rank, world, args.seed_scheme, args.per_proc_batch_size, N)
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


if __name__ == "__main__":
    main()
