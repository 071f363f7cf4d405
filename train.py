"""Train SiT + REG (or REPA, or plain SiT) on preprocessed latents.

    accelerate launch train.py --model SiT-B/2 --enc-type dinov2-vit-b --encoder-depth 4 --data-dir DATA
    torchrun --nproc_per_node 8 train.py ...            # the same; python train.py ... for one process

The training step is a function, ``train_step(state, micro_batches, objective, prepare)``: the
objective (loss.REGObjective) owns the loss terms and their weights, ``TrainState`` holds what
one step changes (model, EMA, optimizer, grad scaler, step). ``main`` parses, builds, resumes and
loops. Rerunning the same command resumes from the newest checkpoint of the experiment (model,
EMA, optimizer, grad scaler, step, RNG states and data position are all restored), so N steps in
one go equal N/2 + resume + N/2 (bitwise on the CPU in float32). See README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

import cli
import online_eval
from checkpoint import CheckpointError, Checkpointer, checkpoint_paths, infer_model_config
from fileio import atomic_open, atomic_write_bytes
from loss import PATH_TYPES, PREDICTIONS, WEIGHTINGS, REGObjective, resolution_shift
from models.autoencoder import sample_latents
from models.sit import SIT_CONFIGS, SiT_models, complete_config
from optim import ADAM_IMPLS, GuardedAdamW, make_optimizer, update_ema
from runtime import DEFAULT_TIMEOUT_MIN, launcher_env, one_line, resolve_device

logger = logging.getLogger("train")


#################################################################################
#                                   Arguments                                   #
#################################################################################

def build_parser() -> argparse.ArgumentParser:
    p = cli.RankZeroParser(prog="train.py", description="Train SiT with REG / REPA.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in (_logging_args, _model_args, _options_args, _data_args, _runtime_args, _optimisation_args,
                _loss_args, _grid_args, online_eval.add_args):
        add(p)
    return p


def _logging_args(p) -> None:
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
                   help="resume from this step's checkpoint (default: the newest one, if any; 0: start fresh, "
                        "which needs --archive-old-run when the folder holds checkpoints)")
    g.add_argument("--archive-old-run", action="store_true",
                   help="with --resume-step 0: move the folder's checkpoints, metrics and samples into "
                        "{exp}/archived-<date>/ before starting fresh")
    g.add_argument("--resume-from", type=str, default=None,
                   help="continue from this checkpoint file (ours or the REG release's): weights, EMA, optimizer "
                        "and step; the architecture is read from it")
    g.add_argument("--init-from", type=str, default=None,
                   help="start a new run from these weights (ours, REG's or REPA's release): model and EMA only; "
                        "layers the checkpoint lacks (e.g. REG's class-token layers after REPA) start fresh")
    g.add_argument("--log-every", type=int, default=100, help="log (and sync with the host) every N steps")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MIN,
                   help="minutes ranks wait for each other at a collective before the job aborts")


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, choices=list(SiT_models), default="SiT-XL/2", help="SiT size/patch")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    g.add_argument("--encoder-depth", type=int, default=8, help="block (1-based) whose output the projectors align; 4 for SiT-B, 8 for L/XL")
    g.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True, help="torch SDPA attention (off: explicit softmax)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False, help="LayerNorm on queries and keys")
    g.add_argument("--projector-dim", type=int, default=2048, help="hidden width of the REPA projector MLPs")
    g.add_argument("--ops-head", type=int, default=16, help="accepted for the release's command lines; no effect")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each SiT block's activations in the backward pass (less memory, ~1/3 more "
                        "compute; same gradients; not part of the architecture)")


def _options_args(p) -> None:
    g = p.add_argument_group("beyond the release (off by default; see README, 'Beyond the release')")
    g.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm",
                   help="RMSNorm in blocks, final layer, class-token embedding and QK-norm (SpeedrunDiT)")
    g.add_argument("--rope", action=argparse.BooleanOptionalAction, default=False,
                   help="2-D axial rotary embeddings on queries and keys (the class token is not rotated)")
    g.add_argument("--pos-embed", choices=["sincos", "none"], default="sincos",
                   help="the fixed sin-cos table added to the tokens (none: RoPE alone)")
    g.add_argument("--value-residual", action=argparse.BooleanOptionalAction, default=False,
                   help="mix each block's attention values with the first block's (learned weight, 0.5 at start)")
    g.add_argument("--routing", choices=["none", "sprint", "tread"], default="none",
                   help="token routing in training (sampling stays dense): SPRINT or TREAD")
    g.add_argument("--route-start", type=int, default=None, help="first routed block (default 2)")
    g.add_argument("--route-end", type=int, default=None, help="end of the routed blocks (default depth - 2)")
    g.add_argument("--route-drop", type=float, default=None,
                   help="fraction of image tokens dropped in the routed blocks (default: SPRINT 0.75, TREAD 0.5)")
    g.add_argument("--path-drop", type=float, default=None,
                   help="SPRINT: fraction of steps whose whole sparse path is replaced by its mask token (default 0.05)")


def _data_args(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=str, required=True, help="preprocessed dataset (see Data preparation)")
    g.add_argument("--resolution", type=int, default=256, help="image resolution; must match the data")
    g.add_argument("--batch-size", type=int, default=256, help="global batch (all processes, all accumulation steps)")
    g.add_argument("--num-workers", type=int, default=4, help="data-loader worker processes per training process")
    g.add_argument("--cached-features", choices=["auto", "yes", "no"], default="auto",
                   help="use the dataset's cached encoder outputs instead of running the encoder")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="replace a damaged sample by the next readable one (warned once; the same on every "
                        "process and rerun, so resume stays exact) instead of stopping with its file named")


def _runtime_args(p) -> None:
    g = p.add_argument_group("precision, speed and device")
    cli.add_runtime_args(g, precision_default="fp16", tf32_default=False, train=True,
                         seed_help="seed; process k uses seed + k for t, noise and label dropout")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT blocks and the online encoder (numbers change slightly)")


def _optimisation_args(p) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1400, help="accepted for the release's command lines; training stops at --max-train-steps")
    g.add_argument("--max-train-steps", type=int, default=1_000_000, help="optimizer steps to train for (total, across resumes)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-epsilon", type=float, default=1e-08, help="AdamW epsilon")
    g.add_argument("--adam-impl", choices=ADAM_IMPLS, default="foreach",
                   help="AdamW kernels: foreach = bitwise the release's update; fused = one kernel (CUDA; CPU with "
                        "torch >= 2.4), same rule up to the last bits; auto = fused where available")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    g.add_argument("--nonfinite", choices=["skip", "stop"], default="skip",
                   help="a step with a non-finite loss or gradient: skip its update (weights and optimizer state "
                        "untouched, no host sync) or stop the run at the next log step")
    g.add_argument("--nonfinite-patience", type=int, default=200,
                   help="with --nonfinite skip: stop after this many consecutive skipped steps")


def _loss_args(p) -> None:
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
    g.add_argument("--cfm-coeff", type=float, default=0.0,
                   help="contrastive flow matching weight (SpeedrunDiT: 0.05; 0: off, the release)")
    g.add_argument("--cfm-weighting", choices=["uniform", "linear"], default="uniform",
                   help="CFM term per sample: uniform, or linear = weighted by its time t (SpeedrunDiT's option)")
    g.add_argument("--time-shift", action=argparse.BooleanOptionalAction, default=False,
                   help="shift t by sqrt(latent elements / --shift-base) (SD3/SpeedrunDiT); sampling follows")
    g.add_argument("--shift-base", type=int, default=4096,
                   help="latent elements with no shift (4096 = SD-VAE latents at 256 px)")


def _grid_args(p) -> None:
    g = p.add_argument_group("sample grids")
    g.add_argument("--sample-num-steps", type=int, default=50, help="ODE steps of the EMA sample grids")
    g.add_argument("--sample-cfg-scale", type=float, default=4.0, help="guidance of the EMA sample grids")
    g.add_argument("--num-sample-images", type=int, default=16, help="images per EMA sample grid")
    g.add_argument("--vae", type=str, default=None,
                   help="decoder of the sample grids: ema or mse (SD-VAE), or a local autoencoder folder; default: "
                        "the EMA SD-VAE for SD-VAE latents (as released), else the codec the data was encoded with")

def check_args(args, parser):
    """Cheap checks before anything heavy starts; each failure is one clear line."""
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.batch_size < 1 or args.gradient_accumulation_steps < 1:
        parser.error("--batch-size and --gradient-accumulation-steps must be positive")
    if args.max_train_steps < 1 or args.checkpointing_steps < 1 or args.log_every < 1:
        parser.error("--max-train-steps, --checkpointing-steps and --log-every must be positive")
    if args.proj_coeff < 0 or args.cls < 0 or args.cfm_coeff < 0:
        parser.error("--proj-coeff, --cls and --cfm-coeff must be >= 0")
    if args.shift_base < 1:
        parser.error(f"--shift-base must be positive, got {args.shift_base}")
    if not 0 <= args.cfg_prob < 1:
        parser.error(f"--cfg-prob must be in [0, 1), got {args.cfg_prob}")
    if args.nonfinite_patience < 1:
        parser.error(f"--nonfinite-patience must be >= 1, got {args.nonfinite_patience}")
    if args.dist_timeout <= 0:
        parser.error(f"--dist-timeout must be positive (minutes), got {args.dist_timeout}")
    depth = SIT_CONFIGS[args.model][0]
    if (args.proj_coeff > 0) and not 1 <= args.encoder_depth <= depth:
        parser.error(f"--encoder-depth must be in 1..{depth} for {args.model}, got {args.encoder_depth}")
    if args.compile and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        parser.error(f"--compile needs torch >= 2.5 (one compiled graph for all SiT blocks), found {torch.__version__}")
    if args.resume_from and args.init_from:
        parser.error("give --resume-from (continue a run) or --init-from (new run from its weights), not both")
    for flag, path in (("--resume-from", args.resume_from), ("--init-from", args.init_from)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such checkpoint file")
    online_eval.check_args(args, parser)
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} does not exist; prepare it with preprocessing/dataset_tools.py (see README)")
    _, world, local_rank = launcher_env()
    try:
        resolve_device(args.device, local_rank, world)
    except ValueError as e:
        parser.error(str(e))


#################################################################################
#                         The training step and its state                        #
#################################################################################

@dataclass
class TrainState:
    """What one optimizer step changes. ``forward`` is what the objective calls (the DDP wrapper
    under several processes, else the model); ``ema`` lives on the process that saves (None on
    the others, which never read it)."""
    model: torch.nn.Module
    optimizer: GuardedAdamW | torch.optim.Optimizer
    ema: torch.nn.Module | None = None
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    step: int = 0
    forward: torch.nn.Module | None = None
    precision: str = "fp32"
    ema_decay: float = 0.9999
    max_grad_norm: float = 1.0
    seed: int = 0               # token routing: the draw of step s comes from (seed, s), the same on every
    rank: int = 0               # process; each process takes its rows of the global batch
    world: int = 1

    def __post_init__(self):
        self.forward = self.forward or self.model
        self._params = list(self.model.parameters())
        self._ema_params = list(self.ema.parameters()) if self.ema is not None else None

    def autocast(self):
        dtype = cli.autocast_dtype(self.precision)
        device = self._params[0].device.type
        return torch.autocast(device, dtype=dtype, enabled=dtype is not None)

    def route(self, micro: int, local_batch: int):
        """The token-routing draw of this step's micro-batch ``micro`` for this process's samples, or
        None for a model without routing. Drawn for the global batch from a generator seeded by
        (seed, step, micro): identical on every process, and the same after a resume."""
        if getattr(self.model, "routing", "none") == "none":
            return None
        seed = int(np.random.SeedSequence([self.seed, self.step, micro]).generate_state(1, np.uint64)[0])
        route = self.model.draw_route(local_batch * self.world, torch.Generator().manual_seed(seed))
        return route.rows(self.rank * local_batch, (self.rank + 1) * local_batch)

    def no_sync(self, sync: bool):
        """DDP's gradient all-reduce only on the last micro-batch of an optimizer step."""
        if sync or not hasattr(self.forward, "no_sync"):
            return contextlib.nullcontext()
        return self.forward.no_sync()


def train_step(state: TrainState, micro_batches, objective: REGObjective, prepare) -> dict[str, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    ``prepare(batch)`` turns a loader batch into the objective's inputs (x, y, zs, cls_token, ...).
    Returns device tensors, never synced: every term averaged over the micro-batches, the
    pre-clipping ``grad_norm``, and ``finite`` (False: the update was skipped)."""
    n = len(micro_batches)
    totals = {}
    for i, batch in enumerate(micro_batches):
        with torch.no_grad():
            inputs = prepare(batch)                                            # x (N, C, h, w), y (N,), ...
        route = state.route(i, inputs["x"].shape[0])
        if route is not None:
            inputs["route"] = route
        with state.no_sync(i == n - 1), state.autocast():
            terms = objective(state.forward, **inputs)
        state.scaler.scale(terms["loss"] / n).backward()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0) + value.detach().float() / n
    state.scaler.unscale_(getattr(state.optimizer, "optimizer", state.optimizer))
    grad_norm = torch.nn.utils.clip_grad_norm_(state._params, state.max_grad_norm)
    # The norm of the all-reduced gradients is the same on every process, so all skip together;
    # a non-finite loss makes it non-finite too.
    finite = torch.isfinite(grad_norm)
    if isinstance(state.optimizer, GuardedAdamW):
        state.optimizer.step(finite)                                           # skipped where not finite
    else:
        state.scaler.step(state.optimizer)                                     # --nonfinite stop: as released
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:  # every step, as released (a skipped step leaves the weights as they were)
        update_ema(state._ema_params, state._params, state.ema_decay)
    state.step += 1
    return {**totals, "grad_norm": grad_norm.detach().float(), "finite": finite}


class Prepare:
    """A loader batch -> the objective's inputs: latents drawn from the stored [mean, std]
    (scale and bias from the dataset's manifest: no VAE weights needed), labels, and the
    encoder targets, from the feature cache or from the encoders run on the images (with a
    class-token-only cache: the class token from the cache, the patch tokens from the encoders).
    REG aligns class + patch tokens; plain REPA/SiT models align the patch tokens only."""

    def __init__(self, model, device, scale: float, bias: float, encoders=(), use_features=False, autocast=None):
        self.device, self.scale, self.bias = device, scale, bias
        self.encoders, self.use_features = list(encoders), use_features
        self.align, self.cls_dim = bool(model.z_dims), model.cls_token_dim
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, batch) -> dict:
        moments = batch["moments"].to(self.device, non_blocking=True)
        x = sample_latents(moments, self.scale, self.bias)                     # (N, C, h, w)
        y = batch["label"].to(self.device, non_blocking=True)
        if not (self.use_features or self.encoders):
            return dict(x=x, y=y)
        cls_list = tok_list = None
        if self.use_features:
            cls_list = [c.to(self.device, non_blocking=True).float() for c in _as_list(batch["enc_cls"])]
            if "enc_tokens" in batch:
                tok_list = [t.to(self.device, non_blocking=True).float() for t in _as_list(batch["enc_tokens"])]
        if self.encoders and (cls_list is None or (self.align and tok_list is None)):
            images = batch["image"].to(self.device, non_blocking=True)
            with self.autocast():
                outs = [enc(images) for enc in self.encoders]                  # [(cls (N, Z), tokens (N, 1+T, Z))]
            cls_list = cls_list or [c for c, _ in outs]                        # a cls cache wins for the class token
            tok_list = [t for _, t in outs]
        zs = cls = None
        if self.align:
            zs = tok_list if self.cls_dim else [t[:, 1:] for t in tok_list]
        if self.cls_dim:
            cls = cls_list[0].float()
        return dict(x=x, y=y, zs=zs, cls_token=cls)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


#################################################################################
#                 Data order, RNG and logs: what resume restores                 #
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


class DataPosition:
    """The loader's place in the stream: micro-batches consumed = step x accumulation. The stream
    is a function of (seed, processes, batch per process), so the position is all resume needs."""

    def __init__(self, state: TrainState, accumulation: int, world: int, local_batch: int, seed: int):
        self.state, self.accumulation, self.layout = state, accumulation, dict(world=world, local_batch=local_batch, seed=seed)

    @property
    def microbatch(self) -> int:
        return self.state.step * self.accumulation

    def state_dict(self) -> dict:
        return {"microbatch": self.microbatch, **self.layout}

    def load_state_dict(self, saved: dict | None) -> None:
        """The step (restored with the rest) fixes the position; a changed layout gives another order."""
        if saved and {k: saved.get(k) for k in self.layout} != self.layout:
            logger.warning(f"the checkpoint's data layout {saved} differs from this run's {self.layout}: "
                           "the data order after resume is a different (equally random) one")


class RNGStates:
    """Every process's RNG states (CPU, and the current CUDA device), saved as a list by rank.
    ``state_dict`` is a collective: every process calls it at a save."""

    def __init__(self, gather, rank: int, world: int, device):
        self.gather, self.rank, self.world, self.device = gather, rank, world, device

    def _mine(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> list:
        return self.gather(self._mine())

    def load_state_dict(self, states, reseed: int) -> bool:
        """Restore this process's state; False (and a fresh seed) when the process count changed."""
        if not states or len(states) != self.world:
            torch.manual_seed(reseed)
            return False
        torch.set_rng_state(states[self.rank]["torch"])
        if self.device.type == "cuda" and "cuda" in states[self.rank]:
            torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        return True


class MetricsLog:
    """Sums the step's outputs on the device and, every --log-every steps, reduces them across
    processes (the only host sync), writes one strict-JSON line to metrics.jsonl and the trackers.
    The grad norm is averaged over finite steps only; ``skipped_steps`` counts the others."""

    def __init__(self, path: str, accelerator, batch_size: int, step: int):
        self.path, self.acc, self.batch_size = path, accelerator, batch_size
        self.names, self.sums, self.count, self.t0 = None, None, 0, time.time()
        if accelerator.is_main_process:
            truncate_metrics(path, step)

    def add(self, out: dict) -> None:
        if self.names is None:
            self.names = [k for k in out if k not in ("grad_norm", "finite")]
        finite = out["finite"].float()
        norm = torch.where(out["finite"], out["grad_norm"], torch.zeros_like(out["grad_norm"]))
        row = torch.stack([out[k] for k in self.names] + [norm, finite, 1 - finite])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (an evaluation) out of the step rate."""
        self.t0 += seconds

    def flush(self, step: int, extra: dict | None = None) -> dict:
        sums = self.acc.reduce(self.sums, reduction="mean").tolist()           # host sync
        steps, elapsed = self.count, time.time() - self.t0
        logs = {k: v / steps for k, v in zip(self.names, sums)}
        finite_steps = sums[-2]
        logs["grad_norm"] = sums[-3] / finite_steps if finite_steps > 0 else None
        logs["skipped_steps"] = int(round(sums[-1]))
        logs["steps_per_sec"] = steps / elapsed
        logs["images_per_sec"] = steps * self.batch_size / elapsed
        logs.update(extra or {})
        logs = {k: (v if v is None or math.isfinite(v) else None) for k, v in logs.items()}
        self.acc.log({k: v for k, v in logs.items() if v is not None}, step=step)
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}, allow_nan=False) + "\n")
        self.sums, self.count, self.t0 = None, 0, time.time()
        return logs


def truncate_metrics(path: str, step: int) -> None:
    """Drop metrics.jsonl lines past ``step`` (left by a run that went on after its last checkpoint),
    so a resumed curve never loops back."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    if len(keep) != len(lines):
        atomic_write_bytes(path, "".join(keep).encode())


#################################################################################
#                                  Building a run                               #
#################################################################################

WEIGHT_FREE_CONFIG = ("fused_attn",)  # model settings that change no weight: free to toggle on resume


def build(args, parser):
    """Everything a run needs, as a namespace; errors are one line through parser.error."""
    run = argparse.Namespace(args=args)
    load_data(run, parser)
    start_processes(run, parser)
    build_model(run, parser)
    build_training(run, parser)
    return run


def load_data(run, parser) -> None:
    """The dataset, and which encoder outputs come from its feature cache: all (a full cache), the
    class token only (a cls cache; the encoders still run for the patch tokens when aligning), or none."""
    from dataset import REGDataset
    from models.encoders import parse_enc_types, weights_record

    args = run.args
    run.needs_encoder = args.proj_coeff > 0 or args.cls > 0
    try:
        run.enc_types = parse_enc_types(args.enc_type) if run.needs_encoder else []
        weights = {}
        for name in run.enc_types:       # a cache made with other weights than this run's is refused
            with contextlib.suppress(OSError, ValueError):
                weights[name] = weights_record(name)
        run.dataset = REGDataset(args.data_dir, enc_types=run.enc_types, encoder_weights=weights,
                                 skip_bad=args.skip_bad_samples,
                                 use_features={"auto": "auto", "yes": True, "no": False}[args.cached_features])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if run.dataset.resolution != args.resolution:
        parser.error(f"--resolution {args.resolution} does not match the data in {args.data_dir} ({run.dataset.resolution})")
    kind = run.dataset.feature_kind if run.needs_encoder else "none"
    run.use_features = kind != "none"
    run.online_encoders = run.needs_encoder and (kind == "none" or (kind == "cls" and args.proj_coeff > 0))


def start_processes(run, parser) -> None:
    """One data-parallel job on whatever device exists (gloo when there is no GPU), never independent
    copies; a generous collective timeout, so a slow checkpoint write cannot abort it."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    args = run.args
    _, world_env, local_rank = launcher_env()
    device = resolve_device(args.device, local_rank, world_env)       # checked in check_args
    pinned_device = world_env == 1 and device.type == "cuda" and args.device and ":" in args.device
    if pinned_device:
        os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)           # one process on the GPU asked for
    run.exp_dir = os.path.join(args.output_dir, args.exp_name)
    run.accelerator = acc = Accelerator(
        gradient_accumulation_steps=1, mixed_precision="no", cpu=device.type == "cpu",
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=run.exp_dir, logging_dir=os.path.join(run.exp_dir, args.logging_dir)),
        # Every parameter gets a gradient at every step: no unused-parameter search, and a static
        # graph lets DDP reuse its bucket order (it does not support no_sync, i.e. accumulation).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                       static_graph=args.gradient_accumulation_steps == 1),
                         InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.dist_timeout))],
    )
    if pinned_device:
        del os.environ["ACCELERATE_TORCH_DEVICE"]
    if acc.num_processes != world_env:
        parser.error(f"the launcher started {world_env} processes but only {acc.num_processes} joined the job; "
                     "check the launcher's settings (--cpu / --device)")
    run.device, run.world, run.rank = acc.device, acc.num_processes, acc.process_index
    run.local_batch, rem = divmod(args.batch_size, run.world * args.gradient_accumulation_steps)
    if rem or run.local_batch == 0:
        parser.error(f"--batch-size {args.batch_size} is not divisible by processes x accumulation steps "
                     f"({run.world} x {args.gradient_accumulation_steps})")
    run.ckpt_dir = os.path.join(run.exp_dir, "checkpoints")
    if acc.is_main_process:
        try:
            os.makedirs(run.ckpt_dir, exist_ok=True)
            probe = os.path.join(run.ckpt_dir, ".write-test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            parser.error(f"cannot write to {run.ckpt_dir} ({one_line(e)}); choose a writable --output-dir")
        setup_logging(os.path.join(run.exp_dir, "log.txt"))
    cli.set_tf32(args.tf32 and run.device.type == "cuda")
    run.checkpointer = Checkpointer(run.ckpt_dir, args.keep_last, log=logger.info)


def build_model(run, parser) -> None:
    """The encoders that must run online, and the SiT: its architecture from --resume-from's
    checkpoint when given, else from the flags; the token counts are checked before anything heavy."""
    from models.encoders import check_token_count, load_encoders
    from models.sit import SiT, create_model

    args, dataset, acc = run.args, run.dataset, run.accelerator
    channels, size = dataset.latent_shape[0] // 2, dataset.latent_shape[-1]
    patch = SIT_CONFIGS[args.model][3]
    if args.proj_coeff > 0 and not args.resume_from:
        try:
            check_token_count(run.enc_types, args.resolution, (size // patch) ** 2)
        except ValueError as e:
            parser.error(str(e))
    try:
        with acc.local_main_process_first():  # a download (torch.hub) once per node, then the others read it
            run.encoders = load_encoders(run.enc_types, args.resolution, run.device) if run.online_encoders else []
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    z_dims = ([dataset.encoder_widths[e] for e in run.enc_types] if run.use_features
              else [e.embed_dim for e in run.encoders])
    config = dict(input_size=size, in_channels=channels, num_classes=args.num_classes or dataset.num_classes,
                  class_dropout_prob=args.cfg_prob, z_dims=z_dims if args.proj_coeff > 0 else [],
                  projector_dim=args.projector_dim, encoder_depth=args.encoder_depth,
                  cls_token_dim=z_dims[0] if args.cls > 0 else 0, qk_norm=args.qk_norm, fused_attn=args.fused_attn,
                  norm=args.norm, rope=args.rope, pos_embed=args.pos_embed, value_residual=args.value_residual,
                  routing=args.routing, route_start=args.route_start, route_end=args.route_end,
                  route_drop=args.route_drop, path_drop=args.path_drop)
    run.resume_ckpt = None
    if args.resume_from:
        run.resume_ckpt = read_checkpoint(args.resume_from, parser)
        config = checkpoint_config(run.resume_ckpt, fused_attn=args.fused_attn)
        check_data_fits(config, z_dims, channels, size, args.resume_from, parser)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    try:
        run.model = SiT(**config) if args.resume_from else create_model(args.model, **config)
    except ValueError as e:
        parser.error(str(e))
    run.model.grad_checkpointing = args.grad_checkpointing
    if args.init_from:
        init_weights_from(run.model, read_checkpoint(args.init_from, parser), args.init_from)
    run.model_name = run.resume_ckpt.get("model_name", args.model) if args.resume_from else args.model
    run.latent_shape = (channels, size, size)


def build_training(run, parser) -> None:
    """EMA (on the saving process), optimizer (under the non-finite guard), grad scaler, DDP, the
    objective and the batch preparation."""
    args, acc, model = run.args, run.accelerator, run.model
    ema = copy.deepcopy(model).requires_grad_(False).eval() if acc.is_main_process else None  # an exact copy
    model.to(run.device)
    if ema is not None:
        ema.to(run.device)
    try:
        optimizer = make_optimizer(model.parameters(), args.adam_impl, lr=args.learning_rate,
                                   betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                   eps=args.adam_epsilon)
    except ValueError as e:
        parser.error(str(e))
    if args.nonfinite == "skip":
        optimizer = GuardedAdamW(optimizer)
    if args.compile:
        # Before DDP wraps the model; in place, so state-dict keys (and checkpoints) are unchanged.
        model.compile_blocks()
        for enc in run.encoders:
            enc.compile()
    run.state = TrainState(model=model, optimizer=optimizer, ema=ema, precision=args.precision,
                           scaler=torch.amp.GradScaler(run.device.type, enabled=args.precision == "fp16"),
                           forward=acc.prepare(model), ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm,
                           seed=args.seed, rank=run.rank, world=run.world)
    shift = resolution_shift(run.latent_shape, args.shift_base) if args.time_shift else 1.0
    run.objective = REGObjective(proj_coeff=args.proj_coeff, cls_coeff=args.cls, path_type=args.path_type,
                                 weighting=args.weighting, prediction=args.prediction, time_shift=shift,
                                 cfm_coeff=args.cfm_coeff, cfm_weighting=args.cfm_weighting)
    run.prepare = Prepare(model, run.device, run.dataset.latent_scale, run.dataset.latent_bias, run.encoders,
                          run.use_features, autocast=run.state.autocast)
    run.rng = RNGStates(lambda obj: gather_objects(acc, obj), run.rank, run.world, run.device)
    run.data_position = DataPosition(run.state, args.gradient_accumulation_steps, run.world, run.local_batch, args.seed)


def setup_logging(path: str) -> None:
    """The run's log to stderr and log.txt (replacing those of an earlier main() in this process)."""
    for handler in [h for h in logger.handlers if getattr(h, "_train_log", False)]:
        logger.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(), logging.FileHandler(path)):
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
        handler._train_log = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def gather_objects(acc, obj) -> list:
    if acc.num_processes == 1:
        return [obj]
    out = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def read_checkpoint(path: str, parser) -> dict:
    from checkpoint import load_checkpoint
    try:
        return load_checkpoint(path)
    except (OSError, ValueError) as e:
        parser.error(one_line(e))


def checkpoint_config(ckpt: dict, **overrides) -> dict:
    """The SiT constructor arguments a checkpoint describes (ours store them; the release's are
    read off the state_dict's shapes)."""
    weights = ckpt.get("model") or ckpt["ema"]
    config = dict(ckpt.get("model_config") or infer_model_config(weights, ckpt.get("args")))
    config.update(overrides)
    return config


def check_data_fits(config, z_dims, channels, size, path, parser):
    problems = []
    if (config["in_channels"], config["input_size"]) != (channels, size):
        problems.append(f"it denoises {config['in_channels']} x {config['input_size']}^2 latents, the data has "
                        f"{channels} x {size}^2")
    if config["cls_token_dim"] and z_dims and config["cls_token_dim"] != z_dims[0]:
        problems.append(f"its class token has width {config['cls_token_dim']}, the encoder gives {z_dims[0]}")
    if problems:
        parser.error(f"{path} does not fit this dataset: " + "; ".join(problems))


def init_weights_from(model, ckpt: dict, path: str) -> None:
    """Copy every tensor of the checkpoint's EMA (else raw) weights whose name and shape match;
    what the checkpoint lacks keeps its fresh initialisation (e.g. REG's class-token layers when
    starting from REPA). The fixed position table is never copied (REPA's has no class row)."""
    source = {k.removeprefix("module."): v for k, v in (ckpt.get("ema") or ckpt["model"]).items()}
    own = model.state_dict()
    loaded = {k: v for k, v in source.items() if k in own and k != "pos_embed" and own[k].shape == v.shape}
    model.load_state_dict(loaded, strict=False)
    fresh = sorted(k for k in own if k not in loaded and k != "pos_embed")
    skipped = sorted(k for k in source if k not in loaded and k != "pos_embed")
    logger.info(f"initialised {len(loaded)} tensors from {path}; fresh: {', '.join(fresh) or 'none'}"
                + (f"; not used: {', '.join(skipped)}" if skipped else ""))


#################################################################################
#                                     Resume                                    #
#################################################################################

def resume(run, parser) -> None:
    """Rank 0 chooses the checkpoint (the newest readable one, --resume-step's, or --resume-from)
    and broadcasts it; every process restores it and confirms it holds that step."""
    args, acc, state = run.args, run.accelerator, run.state
    choice, error = None, None
    if acc.is_main_process:
        try:
            choice = choose_checkpoint(run, args)
        except (OSError, ValueError) as e:
            error = one_line(e)
    choice, error = broadcast_object(acc, (choice, error))
    if error:
        parser.error(error)
    if acc.is_main_process:
        run.checkpointer.remove_stale_temp_files()
    if choice is None:
        return
    path, step = choice
    try:
        from_flag = args.resume_from and path == os.path.abspath(args.resume_from)
        ckpt = run.resume_ckpt if from_flag else load_checkpoint_or_raise(path)
        restore(run, ckpt, path)
        problem = None if state.step == step else f"holds step {state.step}, not {step}"
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        problem = one_line(e)
    problems = gather_objects(acc, problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        parser.error(f"process {bad[0][0]} cannot resume from {path}: {bad[0][1]} (every process must read the "
                     "same checkpoint: check that the run folder is on storage all nodes share)")
    if acc.is_main_process:
        logger.info(f"resumed from {path} (step {step})")


def choose_checkpoint(run, args):
    """(path, step) or None for a fresh start; refuses to mix a fresh start into an old run."""
    saved = run.checkpointer.paths()
    if args.resume_from and not saved:
        return os.path.abspath(args.resume_from), int(run.resume_ckpt.get("steps", 0))
    if args.resume_from:
        logger.info(f"{run.ckpt_dir} already holds checkpoints: resuming from them (--resume-from only starts a run)")
    if args.resume_step == 0:
        if saved and not args.archive_old_run:
            raise ValueError(f"{run.ckpt_dir} holds checkpoints up to step {saved[-1][0]}; --resume-step 0 would mix "
                             "a fresh run into them: add --archive-old-run to move them aside, or use another --exp-name")
        if saved:
            archive_old_run(run)
        return None
    path, ckpt = run.checkpointer.choose(args.resume_step, log=logger.warning)
    return None if path is None else (path, int(ckpt["steps"]))


def archive_old_run(run) -> None:
    folder = os.path.join(run.exp_dir, time.strftime("archived-%Y%m%d-%H%M%S"))
    os.makedirs(folder)
    for name in ("checkpoints", "metrics.jsonl", "samples", run.args.logging_dir, "args.json"):
        src = os.path.join(run.exp_dir, name)
        if os.path.exists(src):
            shutil.move(src, os.path.join(folder, name))
    os.makedirs(run.ckpt_dir, exist_ok=True)
    logger.info(f"moved the previous run's checkpoints, metrics and samples to {folder}")


def load_checkpoint_or_raise(path):
    from checkpoint import load_checkpoint
    return load_checkpoint(path)


def restore(run, ckpt: dict, path: str) -> None:
    """Load a checkpoint into the run's state. A REG release checkpoint has no RNG or data
    position: the run goes on with fresh ones (said once)."""
    args, state = run.args, run.state
    stored = ckpt.get("model_config")
    if stored is not None and not args.resume_from:
        stored, ours = complete_config(stored), state.model.config
        diff = sorted(k for k in set(stored) | set(ours)
                      if k not in WEIGHT_FREE_CONFIG and stored.get(k) != ours.get(k))
        if diff:
            raise ValueError(f"{path} was trained with a different model configuration "
                             f"({', '.join(f'{k}: {stored.get(k)} -> {ours.get(k)}' for k in diff)}); "
                             "use another --exp-name")
    weights = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    state.model.load_state_dict(weights)
    if state.ema is not None:
        state.ema.load_state_dict({k.removeprefix("module."): v for k, v in (ckpt.get("ema") or weights).items()})
    load_optimizer_state(state.optimizer, ckpt["opt"])
    apply_optimizer_flags(state.optimizer, args)
    if ckpt.get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["steps"])
    run.data_position.load_state_dict(ckpt.get("data"))
    restored_rng = run.rng.load_state_dict(ckpt.get("rng"), reseed=args.seed + run.rank + state.step)
    if not restored_rng and run.accelerator.is_main_process:
        why = "has none (a release checkpoint)" if not ckpt.get("rng") else f"was written by {len(ckpt['rng'])} processes"
        logger.warning(f"{path} {why}: RNG states reseeded and the data order restarts at step {state.step}'s "
                       "position of this run's order (not restorable)")


def load_optimizer_state(optimizer, saved: dict) -> None:
    """Load AdamW state written with any kernel choice (the release's default, foreach, fused) into
    this run's optimizer, keeping this run's kernels: flags restored, step counters moved to where
    those kernels keep them (fused: on the parameter's device; foreach: on the CPU)."""
    kernel_keys = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad")
    keep = [{k: g.get(k) for k in kernel_keys} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, flags in zip(inner.param_groups, keep):
        group.update(flags)
        for p in group["params"]:
            st = inner.state.get(p)
            if st and "step" in st:
                st["step"] = st["step"].to(p.device if flags["fused"] else "cpu", torch.float32)


def apply_optimizer_flags(optimizer, args) -> None:
    """The flags given now win over the values stored in the checkpoint (and the change is logged),
    so args.json, new checkpoints and the optimizer always agree."""
    want = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                weight_decay=args.adam_weight_decay)
    for group in optimizer.param_groups:
        changed = {k: (group[k], v) for k, v in want.items() if tuple(_seq(group[k])) != tuple(_seq(v))}
        if changed:
            logger.info("optimizer settings changed on resume: "
                        + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        group.update(want)


def _seq(v):
    return v if isinstance(v, (list, tuple)) else [v]


def broadcast_object(acc, obj):
    if acc.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


#################################################################################
#                                Saving and grids                               #
#################################################################################

def save(run) -> None:
    """Checkpoint the run: the replicas are compared first (cheaply), RNG states gathered from
    every process, then rank 0 writes in the background while training goes on."""
    acc, state, args = run.accelerator, run.state, run.args
    rng = run.rng.state_dict()                                                   # collective
    sums = gather_objects(acc, float(sum(p.detach().double().sum() for p in state.model.parameters())))
    if len(set(sums)) != 1:
        raise RuntimeError(f"model replicas diverged across processes at step {state.step}: checksums {sums}")
    if not acc.is_main_process:
        return
    run.checkpointer.save(state.step, dict(
        model=state.model, ema=state.ema, opt=state.optimizer, steps=state.step, args=vars(args),
        model_name=run.model_name, model_config=state.model.config, autoencoder=run.dataset.autoencoder_spec,
        codec=run.dataset.codec_identity,
        enc_types=run.enc_types, scaler=state.scaler if state.scaler.is_enabled() else None,
        rng=rng, data=run.data_position))
    logger.info(f"step {state.step}: writing a checkpoint" + (f" ({run.world} replicas in sync)" if run.world > 1 else ""))


class SampleGrids:
    """EMA samples from fixed noise and labels (the same at every grid and after resume), decoded
    on the saving process. The decoder is loaded at the first grid; if it cannot be, training
    goes on without grids (one warning naming --vae / REG_VAE_PATH)."""

    def __init__(self, run):
        model, args = run.state.model, run.args
        g = torch.Generator().manual_seed(args.seed)
        n, c, size = args.num_sample_images, model.in_channels, model.input_size
        self.inputs = dict(latents=torch.randn(n, c, size, size, generator=g),
                           y=torch.randint(0, model.num_classes, (n,), generator=g),
                           cls_latents=torch.randn(n, model.cls_token_dim, generator=g) if model.cls_token_dim else None)
        self.run, self.codec, self.disabled = run, None, False

    def __call__(self) -> None:
        run, args = self.run, self.run.args
        if self.disabled or run.state.ema is None:
            return
        if self.codec is None:
            from models.autoencoder import Autoencoder, decoder_for
            spec = args.vae or run.dataset.autoencoder_spec
            try:
                # SD-VAE latents decode with the EMA decoder (as released); --vae ema|mse or a path chooses
                chosen = dict(vae=args.vae) if args.vae in ("ema", "mse") else dict(vae_path=args.vae)
                spec = decoder_for(run.dataset.codec_identity, **chosen)
                self.codec = Autoencoder.from_spec(spec, device=run.device)
            except (OSError, ValueError, ImportError, RuntimeError) as e:
                self.disabled = True
                logger.warning(f"no EMA sample grids: cannot load the decoder {spec!r} ({one_line(e)[:200]}); "
                               "give --vae or set REG_VAE_PATH to a local copy (training goes on)")
                return
        write_grid(run, self.codec, self.inputs)


@torch.no_grad()
def write_grid(run, codec, grid_inputs) -> None:
    import numpy as np
    from PIL import Image

    from samplers import euler_sampler

    args, step, ema = run.args, run.state.step, run.state.ema
    inputs = {k: (v.to(run.device) if v is not None else None) for k, v in grid_inputs.items()}
    cfg = args.sample_cfg_scale if args.cfg_prob > 0 else 1.0
    x = euler_sampler(ema, inputs["latents"], inputs["y"], num_steps=args.sample_num_steps, cfg_scale=cfg,
                      path_type=args.path_type, cls_latents=inputs["cls_latents"], cls_cfg_scale=cfg,
                      time_shift=run.objective.loss.time_shift)     # the grid the model was trained on
    images = codec.to_uint8(codec.decode(x.float())).cpu().numpy()          # (N, H, W, 3)
    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    h, w = images.shape[1:3]
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    path = os.path.join(run.exp_dir, "samples", f"{step:07d}.png")
    with atomic_open(path) as f:
        Image.fromarray(grid).save(f, format="PNG")
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("ema_samples", grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"ema_samples": wandb.Image(grid)}, step=step)
    logger.info(f"saved EMA samples {path}")


def make_loader(run):
    args = run.args
    return torch.utils.data.DataLoader(
        run.dataset, batch_size=run.local_batch,
        sampler=ResumableSampler(len(run.dataset), run.local_batch, run.rank, run.world, args.seed,
                                 start_microbatch=run.data_position.microbatch),
        num_workers=args.num_workers, pin_memory=run.device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # keeps iter() off the global RNG (exact resume)
    )


def feature_source(run) -> str:
    if not run.use_features:
        return "online"
    return "cached class tokens, patch tokens online" if run.online_encoders else "cached features"


def tracker_resume(run) -> dict:
    """Trackers continue the run from the resumed step: TensorBoard purges events past it, wandb keeps
    one run id per experiment folder and rewinds it to the step (steps after it are dropped)."""
    args, step = run.args, run.state.step
    if args.report_to == "tensorboard":
        return {"tensorboard": {"purge_step": step}}
    if args.report_to != "wandb":
        return {}
    path = os.path.join(run.exp_dir, "wandb-run-id.txt")
    existed = os.path.isfile(path)
    if existed:
        run_id = open(path).read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        atomic_write_bytes(path, run_id.encode())
    if step > 0 and existed and os.environ.get("WANDB_MODE") != "offline":
        return {"wandb": {"name": args.exp_name, "resume_from": f"{run_id}?_step={step}"}}
    return {"wandb": {"id": run_id, "name": args.exp_name, "resume": "allow"}}


def start_logging(run) -> None:
    args, acc, model = run.args, run.accelerator, run.state.model
    if not acc.is_main_process:
        return
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{run.model_name}: {n_params / 1e6:.2f}M parameters; class token: {model.cls_token_dim or 'off'}; "
                f"projectors: {model.z_dims or 'off'}; encoders: {run.enc_types or 'none'} "
                f"({feature_source(run)}); {run.world} process(es), "
                f"{run.local_batch} per micro-batch")
    config = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool))}
    acc.init_trackers("REG", config=config, init_kwargs=tracker_resume(run))
    with atomic_open(os.path.join(run.exp_dir, "args.json")) as f:
        f.write(json.dumps(vars(args), indent=2).encode())


#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    try:
        train(args, parser)
    finally:
        forget_process_state()   # a later run in this process (the demos, tests) builds its own


def train(args, parser) -> None:
    from tqdm.auto import tqdm

    run = build(args, parser)
    resume(run, parser)
    state, acc = run.state, run.accelerator
    if state.step == 0:
        torch.manual_seed(args.seed + run.rank)  # the release's per-process seed for t, noise and label dropout
    start_logging(run)
    log = MetricsLog(os.path.join(run.exp_dir, "metrics.jsonl"), acc, args.batch_size, state.step)
    grids = SampleGrids(run)
    evaluate = build_online_eval(run, parser)
    data = iter(make_loader(run))
    progress = tqdm(total=args.max_train_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not acc.is_main_process)
    if state.step >= args.max_train_steps and acc.is_main_process:
        logger.info(f"already at step {state.step} >= --max-train-steps {args.max_train_steps}; nothing to do")
    state.forward.train()
    try:
        while state.step < args.max_train_steps:
            batches = next_batches(data, args.gradient_accumulation_steps, state.step)
            log.add(train_step(state, batches, run.objective, run.prepare))
            progress.update(1)
            check_nonfinite(run)
            step, last = state.step, state.step == args.max_train_steps
            scores = evaluate() if evaluate and step % args.fid_every == 0 else None
            if scores is not None:
                log.exclude(scores.get("eval_seconds", 0.0))
            if step % args.log_every == 0 or step % args.checkpointing_steps == 0 or last or scores is not None:
                logs = log.flush(step, scores)
                progress.set_postfix(loss=f"{logs['loss']:.4f}" if logs["loss"] is not None else "nan",
                                     img_s=f"{logs['images_per_sec']:.1f}")
                check_nonfinite(run, logs)
                if acc.is_main_process:
                    run.checkpointer.raise_if_failed()       # a background save that failed stops the run now
            if step % args.checkpointing_steps == 0 or last:
                save(run)
            if args.sampling_steps > 0 and (step % args.sampling_steps == 0 or last):
                grids()
    finally:
        progress.close()
        if acc.is_main_process:
            run.checkpointer.wait()
    acc.end_training()
    if acc.is_main_process:
        logger.info(f"done: {state.step} steps; checkpoints in {run.ckpt_dir}")


def forget_process_state() -> None:
    """Clear Accelerate's process-wide state (it outlives the Accelerator); the process group, if
    any, stays for the process's other work."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build_online_eval(run, parser):
    """FID (or the --fid-metric) of the EMA model every --fid-every steps; None when off."""
    if not run.args.fid_every:
        return None
    try:
        return online_eval.OnlineEvaluation(run)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"cannot set up the evaluation during training: {one_line(e)}")


def next_batches(data, n: int, step: int) -> list:
    """The micro-batches of the next step; a damaged file stops the run naming it and the step."""
    from dataset import DataFileError
    try:
        return [next(data) for _ in range(n)]
    except DataFileError as e:   # raised in a loader worker, its message wrapped in the worker's traceback
        raise DataFileError(f"{last_line(e)} (while reading the data of step {step + 1})") from None


def last_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].split("DataFileError: ", 1)[-1] if lines else type(e).__name__


def check_nonfinite(run, logs: dict | None = None) -> None:
    """--nonfinite skip: stop after --nonfinite-patience consecutive skipped steps (known on the host
    one step late, for free). --nonfinite stop: stop at the first log step whose window had one."""
    args, opt = run.args, run.state.optimizer

    def last_good():
        saved = checkpoint_paths(run.ckpt_dir)
        return f"the last good checkpoint is {saved[-1][1]}" if saved else "no checkpoint was written yet"
    if isinstance(opt, GuardedAdamW) and opt.consecutive >= args.nonfinite_patience:
        raise FloatingPointError(f"{opt.consecutive} consecutive steps up to step {run.state.step} had a non-finite "
                                 f"loss or gradient (updates skipped); {last_good()} (try --precision bf16 or a lower lr)")
    if args.nonfinite == "stop" and logs is not None and logs["loss"] is None:
        raise FloatingPointError(f"non-finite loss at or before step {run.state.step}; {last_good()} "
                                 "(try --precision bf16 or a lower lr, or --nonfinite skip)")


if __name__ == "__main__":
    from dataset import DataFileError
    try:
        main()
    except (FloatingPointError, CheckpointError, DataFileError) as e:   # one line, not a traceback
        print(f"error: {last_line(e)}", file=sys.stderr)
        sys.exit(1)
