"""Train SiT + REG (or REPA, or plain SiT) on preprocessed latents, under Accelerate.

    accelerate launch train.py --model SiT-B/2 --enc-type dinov2-vit-b --encoder-depth 4 --data-dir DATA

Rerunning the same command resumes from the newest checkpoint of the experiment (model, EMA,
optimizer, grad scaler, step, RNG states and data position are all restored), so N steps in one go
equal N/2 + resume + N/2 (bitwise on the CPU in float32). See README.md for recipes and flags.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time

import torch

from fileio import atomic_open
from checkpoint import checkpoint_paths, load_checkpoint, prune_checkpoints, save_checkpoint
from loss import PATH_TYPES, PREDICTIONS, WEIGHTINGS, SILoss
from models.sit import SIT_CONFIGS, SiT_models

logger = logging.getLogger("train")


#################################################################################
#                                   Arguments                                   #
#################################################################################

ADAM_IMPLS = ("auto", "fused", "foreach")


def make_optimizer(params, impl: str = "auto", **adam_kwargs) -> torch.optim.AdamW:
    """AdamW over params already on their device. 'fused' = one kernel for all parameters;
    'foreach' = a few batched kernels (bitwise equal to the per-tensor loop); 'auto' = fused
    where supported, else foreach."""
    params = list(params)
    if impl in ("auto", "fused"):
        try:
            return torch.optim.AdamW(params, fused=True, **adam_kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            if impl == "fused":
                device = params[0].device.type if params else "?"
                raise ValueError(f"--adam-impl fused is not available on {device} with torch {torch.__version__} "
                                 f"({str(e).splitlines()[0]}); use --adam-impl foreach") from e
    elif impl != "foreach":
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose one of {ADAM_IMPLS}")
    return torch.optim.AdamW(params, foreach=True, **adam_kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train SiT with REG / REPA.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("logging and saving")
    g.add_argument("--output-dir", type=str, default="exps", help="root of all runs")
    g.add_argument("--exp-name", type=str, required=True, help="run folder: {output-dir}/{exp-name}; rerunning resumes it")
    g.add_argument("--logging-dir", type=str, default="logs", help="tracker folder inside the run folder")
    g.add_argument("--report-to", type=str, default="tensorboard", choices=["wandb", "tensorboard", "none"],
                   help="tracker; wandb works offline with WANDB_MODE=offline")
    g.add_argument("--sampling-steps", type=int, default=10000, help="EMA sample grid every N steps (0: never)")
    g.add_argument("--checkpointing-steps", type=int, default=10000)
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
    g.add_argument("--resume-step", type=int, default=None,
                   help="resume from this step's checkpoint (default: the newest one, if any; 0: start fresh)")
    g.add_argument("--log-every", type=int, default=100, help="log (and sync with the host) every N steps")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, choices=list(SiT_models), default="SiT-XL/2", help="SiT size/patch")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    g.add_argument("--encoder-depth", type=int, default=8, help="block (1-based) whose output the projectors align; 4 for SiT-B, 8 for L/XL")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True, help="torch SDPA attention (off: explicit softmax)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="LayerNorm on queries and keys")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the REPA projector MLPs")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, required=True, help="preprocessed dataset (see Data preparation)")
    g.add_argument("--resolution", type=int, default=256, help="image resolution; must match the data")
    g.add_argument("--batch-size", type=int, default=256, help="global batch (all processes, all accumulation steps)")
    g.add_argument("--num-workers", type=int, default=4, help="data-loader worker processes per training process")
    g.add_argument("--cached-features", choices=["auto", "yes", "no"], default="auto",
                   help="use the dataset's cached encoder outputs instead of running the encoder")

    g = p.add_argument_group("precision and speed")
    g.add_argument("--allow-tf32", action=argparse.BooleanOptionalAction, default=False, help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--mixed-precision", type=str, default="fp16", choices=["no", "fp16", "bf16"], help="autocast dtype (fp16 uses a grad scaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT blocks and the online encoder (numbers change slightly)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1400, help="accepted for the release's command lines; training stops at --max-train-steps")
    g.add_argument("--max-train-steps", type=int, default=400000, help="optimizer steps to train for (total, across resumes)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=float, default=1e-08, help="AdamW epsilon")
    g.add_argument("--adam-impl", choices=ADAM_IMPLS, default="auto",
                   help="AdamW kernels: auto = fused where the device has them (CUDA; CPU with torch >= 2.4), "
                        "else foreach; same update rule (fused may differ in the last bit). A resumed run "
                        "keeps its checkpoint's choice")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    g.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                   help="on a non-finite loss: stop the run (checked without a per-step host sync), "
                        "or skip that update (one host sync per step)")

    g = p.add_argument_group("seed")
    g.add_argument("--seed", type=int, default=0, help="seed; process k uses seed + k for t, noise and label dropout")

    g = p.add_argument_group("loss")
    g.add_argument("--path-type", type=str, default="linear", choices=list(PATH_TYPES), help="interpolant")
    g.add_argument("--prediction", type=str, default="v", choices=list(PREDICTIONS), help="network target")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="class-label dropout for classifier-free guidance")
    g.add_argument("--enc-type", type=str, default="dinov2-vit-b", help="comma-separated encoder names")
    g.add_argument("--proj-coeff", type=float, default=0.5, help="REPA alignment weight (0: no projectors)")
    g.add_argument("--weighting", default="uniform", type=str, choices=list(WEIGHTINGS), help="time sampling: U(0,1) or log-normal")
    g.add_argument("--cls", "--cls-coeff", dest="cls", type=float, default=0.03,
                   help="REG class-token loss weight (0: no class token, i.e. plain REPA)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for the release's command lines; no effect in training")

    g = p.add_argument_group("sample grids")
    g.add_argument("--sample-num-steps", type=int, default=50, help="ODE steps of the EMA sample grids")
    g.add_argument("--sample-cfg-scale", type=float, default=4.0, help="guidance of the EMA sample grids")
    g.add_argument("--num-sample-images", type=int, default=16, help="images per EMA sample grid")
    g.add_argument("--vae", type=str, default=None,
                   help="autoencoder spec for decoding sample grids (default: the one the dataset was encoded with)")
    return p


def check_args(args, parser):
    """Cheap checks before anything heavy starts; each failure is one clear line."""
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.batch_size < 1 or args.gradient_accumulation_steps < 1:
        parser.error("--batch-size and --gradient-accumulation-steps must be positive")
    if args.max_train_steps < 1:
        parser.error("--max-train-steps must be positive")
    if args.proj_coeff < 0 or args.cls < 0:
        parser.error("--proj-coeff and --cls must be >= 0")
    if not 0 <= args.cfg_prob < 1:
        parser.error(f"--cfg-prob must be in [0, 1), got {args.cfg_prob}")
    depth = SIT_CONFIGS[args.model][0]
    if (args.proj_coeff > 0) and not 1 <= args.encoder_depth <= depth:
        parser.error(f"--encoder-depth must be in 1..{depth} for {args.model}, got {args.encoder_depth}")
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist; prepare it with preprocessing/dataset_tools.py (see README)")


#################################################################################
#                              Data order and state                             #
#################################################################################

class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, sharded, resumable sample order.

    Epoch e is randperm(N) seeded with seed + e, cut to whole global micro-batches; micro-batch k
    of the epoch gives rank r the slice [k*W*B + r*B, k*W*B + (r+1)*B). The stream depends only on
    (seed, world size, batch), so it can restart at any micro-batch without reading data."""

    def __init__(self, n, local_batch, rank, world, seed, start_microbatch=0):
        self.n, self.b, self.rank, self.world, self.seed = n, local_batch, rank, world, seed
        self.per_epoch = n // (local_batch * world)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global micro-batch ({local_batch * world})")
        self.start = start_microbatch

    def __iter__(self):
        epoch, k = divmod(self.start, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for j in range(k, self.per_epoch):
                lo = j * self.b * self.world + self.rank * self.b
                yield from perm[lo:lo + self.b].tolist()
            epoch, k = epoch + 1, 0

    def __len__(self):  # infinite stream; DataLoader only needs this for progress estimates
        return 2 ** 62


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#################################################################################
#                                   Training                                    #
#################################################################################

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)

    # Heavy imports after the argument checks, so a bad flag fails in a blink.
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    from dataset import REGDataset
    from models.autoencoder import Autoencoder
    from models.encoders import load_encoders, parse_enc_types
    from models.sit import create_model

    needs_encoder = args.proj_coeff > 0 or args.cls > 0
    try:
        enc_types = parse_enc_types(args.enc_type) if needs_encoder else []
        dataset = REGDataset(args.data_dir, use_features={"auto": "auto", "yes": True, "no": False}[args.cached_features],
                             enc_types=enc_types)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if dataset.resolution != args.resolution:
        parser.error(f"--resolution {args.resolution} does not match the data in {args.data_dir} ({dataset.resolution})")
    num_classes = args.num_classes or dataset.num_classes

    exp_dir = os.path.join(args.output_dir, args.exp_name)
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=exp_dir, logging_dir=os.path.join(exp_dir, args.logging_dir)),
        # Every parameter gets a gradient at every step (labels dropped via the null-class row, the
        # projectors and class-token layers exist only when their losses are on): no unused-parameter
        # search, and a static graph lets DDP reuse its bucket order after the first step. DDP's static
        # graph does not support no_sync (gradient accumulation): it trips an internal assert.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                       static_graph=args.gradient_accumulation_steps == 1)],
        cpu=args.cpu,
    )
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    local_batch, rem = divmod(args.batch_size, world * args.gradient_accumulation_steps)
    if rem or local_batch == 0:
        parser.error(f"--batch-size {args.batch_size} is not divisible by processes x accumulation steps "
                     f"({world} x {args.gradient_accumulation_steps})")
    if accelerator.is_main_process:
        os.makedirs(ckpt_dir, exist_ok=True)
        logging.basicConfig(format="[%(asctime)s] %(message)s", level=logging.INFO,
                            handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(exp_dir, "log.txt"))])
    if args.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # the same initial weights on every process

    # ---- encoders, latent codec, model ----------------------------------------------------
    use_features = needs_encoder and dataset.feature_kind != "none"
    if use_features and args.proj_coeff > 0 and dataset.feature_kind != "full":
        parser.error("the dataset's feature cache holds class tokens only, but --proj-coeff > 0 needs the patch tokens; "
                     "use --cached-features no or cache full features")
    encoders = [] if (not needs_encoder or use_features) else load_encoders(enc_types, args.resolution, device)
    z_dims = [dataset.encoder_widths[e] for e in enc_types] if use_features else [e.embed_dim for e in encoders]
    codec = Autoencoder.from_spec(args.vae or dataset.autoencoder_spec, device=device)
    latent_channels, latent_size = dataset.latent_shape[0] // 2, dataset.latent_shape[-1]

    model = create_model(
        args.model, input_size=latent_size, in_channels=latent_channels, num_classes=num_classes,
        class_dropout_prob=args.cfg_prob, z_dims=z_dims if args.proj_coeff > 0 else [],
        projector_dim=args.projector_dim, encoder_depth=args.encoder_depth,
        cls_token_dim=z_dims[0] if args.cls > 0 else 0, qk_norm=args.qk_norm, fused_attn=args.fused_attn,
    )
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # an exact copy
    model.to(device)
    ema.to(device)
    try:
        optimizer = make_optimizer(model.parameters(), args.adam_impl, lr=args.learning_rate,
                                   betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                   eps=args.adam_epsilon)
    except ValueError as e:
        parser.error(str(e))

    # ---- resume ---------------------------------------------------------------------------
    step = 0
    saved = dict(checkpoint_paths(ckpt_dir))
    resume_from = None
    if args.resume_step is None and saved:
        resume_from = saved[max(saved)]
    elif args.resume_step:
        if args.resume_step not in saved:
            parser.error(f"no checkpoint for step {args.resume_step} in {ckpt_dir} (have: {sorted(saved) or 'none'})")
        resume_from = saved[args.resume_step]
    ckpt = None
    if resume_from:
        ckpt = load_checkpoint(resume_from)
        if ckpt.get("model_config") != model.config:
            parser.error(f"{resume_from} was trained with a different model configuration; use another --exp-name")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["opt"])
        step = int(ckpt["steps"])
        if accelerator.is_main_process:
            logger.info(f"resumed from {resume_from} (step {step})")

    if args.compile:
        # Before DDP wraps the model; in place, so state-dict keys (and checkpoints) are unchanged.
        model.compile_blocks()
        for enc in encoders:
            enc.compile()
    model_ddp, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(args.seed + rank)  # the release's per-process seed for t, noise and label dropout
    if ckpt is not None:
        if ckpt.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        states = ckpt.get("rng") or []
        if len(states) == world:
            set_rng_state(states[rank], device)
        else:
            torch.manual_seed(args.seed + rank + step)
            if accelerator.is_main_process:
                logger.warning(f"checkpoint was written by {len(states)} processes, now {world}: RNG reseeded")

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=local_batch,
        sampler=ResumableSampler(len(dataset), local_batch, rank, world, args.seed,
                                 start_microbatch=step * args.gradient_accumulation_steps),
        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # keeps iter() off the global RNG (exact resume)
    )
    loss_fn = SILoss(prediction=args.prediction, path_type=args.path_type, weighting=args.weighting)

    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"{args.model}: {n_params / 1e6:.2f}M parameters; class token: {model.cls_token_dim or 'off'}; "
                    f"projectors: {model.z_dims or 'off'}; encoders: {enc_types or 'none'} "
                    f"({'cached features' if use_features else 'online'}); {world} process(es), {local_batch} per micro-batch")
        accelerator.init_trackers("REG", config={k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))})
        with open(os.path.join(exp_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    # Fixed noise and labels for the EMA sample grids (the same at every grid and after resume).
    g = torch.Generator().manual_seed(args.seed)
    grid_n = args.num_sample_images
    grid_inputs = dict(
        latents=torch.randn(grid_n, latent_channels, latent_size, latent_size, generator=g),
        y=torch.randint(0, num_classes, (grid_n,), generator=g),
        cls_latents=torch.randn(grid_n, model.cls_token_dim, generator=g) if model.cls_token_dim else None,
    )

    def save(step):
        states = gather_objects(accelerator, rng_state(device))
        # DDP keeps replicas identical; verify it (cheaply) before writing rank 0's copy.
        sums = gather_objects(accelerator, float(sum(p.detach().double().sum() for p in model.parameters())))
        if len(set(sums)) != 1:
            raise RuntimeError(f"model replicas diverged across processes at step {step}: checksums {sums}")
        if accelerator.is_main_process:
            obj = dict(
                model=model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(), steps=step,
                args=vars(args), model_name=args.model, model_config=model.config,
                autoencoder=codec.spec, enc_types=enc_types,
                scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None, rng=states,
            )
            path = os.path.join(ckpt_dir, f"{step:07d}.pt")
            save_checkpoint(obj, path)
            prune_checkpoints(ckpt_dir, args.keep_last)
            logger.info(f"saved checkpoint {path}" + (f" ({world} replicas in sync)" if world > 1 else ""))
        accelerator.wait_for_everyone()

    # ---- loop -----------------------------------------------------------------------------
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    sums = torch.zeros(7, device=device)  # loss, denoise, proj, cls, proj_w, cls_w, grad_norm
    bad_flag = torch.zeros((), device=device, dtype=torch.bool)
    progress = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    t_log, steps_logged, skipped = time.time(), 0, 0
    if step >= args.max_train_steps and accelerator.is_main_process:
        logger.info(f"already at step {step} >= --max-train-steps {args.max_train_steps}; nothing to do")
    data_iter = iter(loader)
    model_ddp.train()
    while step < args.max_train_steps:
        batch = next(data_iter)
        with accelerator.accumulate(model_ddp):
            labels = batch["label"].to(device, non_blocking=True)
            moments = batch["moments"].to(device, non_blocking=True)
            with torch.no_grad():
                x = codec.sample(moments)                                  # (N, C, h, w) scaled latents
                zs, cls_token = encoder_targets(batch, encoders, use_features, model, accelerator, device)
            with accelerator.autocast():
                terms = loss_fn(model_ddp, x, dict(y=labels), zs=zs, cls_token=cls_token)
                loss_mean = terms.denoising_loss.mean()
                proj_mean = terms.proj_loss.mean()
                cls_mean = terms.denoising_loss_cls.mean()
                loss = loss_mean + args.proj_coeff * proj_mean + args.cls * cls_mean
            bad_flag |= ~torch.isfinite(loss.detach())
            accelerator.backward(loss)
            grad_norm, skip = None, False
            if accelerator.sync_gradients:
                if args.nonfinite == "skip":  # decided jointly, so every process skips the same update
                    skip = accelerator.reduce(bad_flag.float(), reduction="sum").item() > 0
                    bad_flag.zero_()
                if skip:
                    skipped += 1
                    if accelerator.is_main_process:
                        logger.warning(f"non-finite loss at step {step + 1}: update skipped ({skipped} so far)")
                else:
                    grad_norm = accelerator.clip_grad_norm_(model_ddp.parameters(), args.max_grad_norm)
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        sums[:6] += torch.stack([loss.detach(), loss_mean.detach(), proj_mean.detach(), cls_mean.detach(),
                                 args.proj_coeff * proj_mean.detach(), args.cls * cls_mean.detach()]).float() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue

        # one optimizer step done
        step += 1
        if skip:
            sums.nan_to_num_(0.0, 0.0, 0.0)  # keep the window's log finite
        else:
            update_ema(ema_params, model_params, args.ema_decay)
            sums[6] += grad_norm.detach().float() if torch.is_tensor(grad_norm) else float(grad_norm)
        steps_logged += 1
        progress.update(1)

        is_ckpt_step = step % args.checkpointing_steps == 0 or step == args.max_train_steps
        if step % args.log_every == 0 or is_ckpt_step:
            stats = accelerator.reduce(sums, reduction="mean").tolist()  # the only host syncs
            if accelerator.reduce(bad_flag.float(), reduction="sum").item() > 0:
                raise FloatingPointError(f"non-finite loss between steps {step - steps_logged + 1} and {step}; "
                                         f"the last good checkpoint is in {ckpt_dir} (try --mixed-precision bf16 or a lower lr)")
            elapsed = time.time() - t_log
            logs = dict(zip(["loss", "loss_mean", "proj_loss", "loss_mean_cls", "proj_loss_weighted",
                             "loss_mean_cls_weighted", "grad_norm"], [s / steps_logged for s in stats]))
            logs["steps_per_sec"] = steps_logged / elapsed
            logs["images_per_sec"] = steps_logged * args.batch_size / elapsed
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{logs['images_per_sec']:.1f}")
            if accelerator.is_main_process:
                with open(os.path.join(exp_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            sums.zero_()
            t_log, steps_logged = time.time(), 0

        if is_ckpt_step:
            save(step)
        if args.sampling_steps > 0 and (step % args.sampling_steps == 0 or step == args.max_train_steps):
            if accelerator.is_main_process:
                sample_grid(ema, codec, grid_inputs, args, step, exp_dir, accelerator, device)
            accelerator.wait_for_everyone()

    progress.close()
    accelerator.end_training()
    if accelerator.is_main_process:
        logger.info(f"done: {step} steps; checkpoints in {ckpt_dir}")


def encoder_targets(batch, encoders, use_features, model, accelerator, device):
    """(alignment targets per encoder, clean class token) from the cache or the online encoders.
    REG aligns class + patch tokens; plain REPA/SiT models align the patch tokens only."""
    if use_features:
        cls_list = [c.to(device, non_blocking=True).float() for c in _as_list(batch["enc_cls"])]
        tok_list = [t.to(device, non_blocking=True).float() for t in _as_list(batch.get("enc_tokens", []))]
    elif encoders:
        images = batch["image"].to(device, non_blocking=True)
        cls_list, tok_list = [], []
        with accelerator.autocast():
            for enc in encoders:
                cls, tokens = enc(images)
                cls_list.append(cls)
                tok_list.append(tokens)
    else:
        return None, None
    zs = None
    if model.z_dims:
        zs = tok_list if model.cls_token_dim else [t[:, 1:] for t in tok_list]
    cls_token = cls_list[0].float() if model.cls_token_dim else None
    return zs, cls_token


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """ema = decay * ema + (1 - decay) * param over all parameters in two fused calls (the
    release's per-parameter mul_/add_, same arithmetic)."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, [p.detach() for p in model_params], alpha=1 - decay)


def gather_objects(accelerator, obj):
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


@torch.no_grad()
def sample_grid(ema, codec, grid_inputs, args, step, exp_dir, accelerator, device):
    """Decode EMA samples from fixed noise and labels; save a PNG grid and log it."""
    import numpy as np
    from PIL import Image

    from samplers import euler_sampler

    inputs = {k: (v.to(device) if v is not None else None) for k, v in grid_inputs.items()}
    cfg = args.sample_cfg_scale if args.cfg_prob > 0 else 1.0
    x = euler_sampler(ema, inputs["latents"], inputs["y"], num_steps=args.sample_num_steps, cfg_scale=cfg,
                      path_type=args.path_type, cls_latents=inputs["cls_latents"], cls_cfg_scale=cfg)
    images = codec.to_uint8(codec.decode(x.float())).cpu().numpy()          # (N, H, W, 3)
    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    folder = os.path.join(exp_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{step:07d}.png")
    with atomic_open(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("ema_samples", grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"ema_samples": wandb.Image(grid)}, step=step)
    logger.info(f"saved EMA samples {path}")


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
