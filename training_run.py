"""A training run, built: ``build(args, parser)`` returns a namespace holding the dataset, the
processes (Accelerate), the model, its EMA, optimizer and grad scaler (``run.state``), the
objective and the batch preparation, the checkpointer and what resume restores (RNG states, data
position). Every failure is one clear line through ``parser.error``, before anything heavy runs
where it can be.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import errno
import os
import shutil

import torch

import cli
import run_lock
from checkpoint import (Checkpointer, RNGStates, check_data_fits, checkpoint_config, init_weights_from,
                        read_checkpoint)
from data_order import DataPosition, optimizer_steps_per_epoch
from loss import REGObjective, resolution_shift
from models.sit import SIT_CONFIGS
from optim import GuardedAdamW, make_optimizer
from preemption import clear_marker
from runtime import Procs, launcher_env, one_line, raise_open_file_limit, resolve_device
from tracking import logger, setup_logging
from train_step import Prepare, TrainState


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
    from data_shards import open_dataset
    from models.encoders import parse_enc_types, weights_record

    args = run.args
    raise_open_file_limit()              # ulimit -n up to the hard limit, for this process and its loader workers
    run.needs_encoder = args.projectors or args.class_token
    try:
        run.enc_types = parse_enc_types(args.enc_type) if run.needs_encoder else []
        weights = {}
        for name in run.enc_types:       # a cache made with other weights than this run's is refused
            with contextlib.suppress(OSError, ValueError):
                weights[name] = weights_record(name)
        run.dataset = open_dataset(args.data_dir, enc_types=run.enc_types, encoder_weights=weights,
                                 skip_bad=args.skip_bad_samples, allow_partial=args.allow_partial_data,
                                 use_features={"auto": "auto", "yes": True, "no": False}[args.cached_features])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if run.dataset.resolution != args.resolution:
        parser.error(f"--resolution {args.resolution} does not match the data in {args.data_dir} ({run.dataset.resolution})")
    kind = run.dataset.feature_kind if run.needs_encoder else "none"
    run.use_features = kind != "none"
    run.online_encoders = run.needs_encoder and (kind == "none" or (kind == "cls" and args.projectors))


def start_processes(run, parser) -> None:
    """One data-parallel job on whatever device exists (gloo when there is no GPU), never independent
    copies; the run folder locked by rank 0 (run_lock) before anything is written there."""
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
        # Never compile the whole DDP model behind the user's back (an Accelerate config or
        # ACCELERATE_DYNAMO_BACKEND would): --compile compiles the SiT blocks, and nothing else.
        dynamo_backend="no",
        # Every parameter gets a gradient at every step: no unused-parameter search, and a static
        # graph lets DDP reuse its bucket order (it does not support no_sync, i.e. accumulation).
        # Gradients as views of DDP's buckets: one gradient-sized copy and allocation fewer, the
        # same values (exact; the 2-process tests compare resumed and straight runs bit for bit).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                       static_graph=args.gradient_accumulation_steps == 1,
                                                       gradient_as_bucket_view=True),
                         InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.dist_timeout))],
    )
    if pinned_device:
        del os.environ["ACCELERATE_TORCH_DEVICE"]
    if acc.num_processes != world_env:
        parser.error(f"the launcher started {world_env} processes but only {acc.num_processes} joined the job; "
                     "check the launcher's settings (--cpu / --device)")
    run.device, run.world, run.rank = acc.device, acc.num_processes, acc.process_index
    run.procs = Procs.joined(acc.process_index, acc.num_processes, acc.local_process_index, acc.device)
    run.local_batch = micro_batch(args, run.world, parser)
    run.step_images = run.local_batch * run.world * args.gradient_accumulation_steps
    if len(run.dataset) < run.local_batch * run.world:       # before anything is written
        parser.error(f"one micro-batch of all processes ({run.local_batch * run.world} samples) is larger than the "
                     f"dataset in {args.data_dir} ({len(run.dataset)} samples); lower --batch-size")
    run.ckpt_dir = os.path.join(run.exp_dir, "checkpoints")
    problem, run.run_id, run.lock = None, run_lock.run_id(), None
    if acc.is_main_process:
        try:
            run.lock = run_lock.hold(run.exp_dir, run.run_id)    # first, before anything in the folder is written or removed
        except run_lock.FolderInUse as e:
            problem = str(e)
        except OSError as e:
            problem = write_error(run.exp_dir, e)
        problem = problem or write_problem(run.ckpt_dir)
    problem, run.run_id = run.procs.broadcast((problem, run.run_id))   # every rank refuses, none waits
    if problem:
        parser.error(problem)
    if acc.is_main_process:
        setup_logging(os.path.join(run.exp_dir, "log.txt"))
        clear_marker(run.exp_dir)                     # a new segment: the last one's preemption is resolved
        if run.lock.took_over:
            logger.warning(f"took over the stale lock {run.lock.path}: {run.lock.took_over}")
    cli.set_tf32(args.tf32 and run.device.type == "cuda")
    run.checkpointer = Checkpointer(run.ckpt_dir, args.keep_last, log=logger.info, keep_every=args.keep_every)


def build_model(run, parser) -> None:
    """The encoders that must run online, and the SiT: its architecture from --resume-from's
    checkpoint when given, else from the flags; the token counts are checked before anything heavy."""
    from models.encoders import check_token_count, load_encoders
    from models.sit import SiT, create_model

    args, dataset, acc = run.args, run.dataset, run.accelerator
    channels, size = dataset.latent_shape[0] // 2, dataset.latent_shape[-1]
    patch = SIT_CONFIGS[args.model][3]
    if args.projectors and not args.resume_from:
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
                  class_dropout_prob=label_dropout(args), z_dims=z_dims if args.projectors else [],
                  projector_dim=args.projector_dim, encoder_depth=args.encoder_depth,
                  cls_token_dim=z_dims[0] if args.class_token else 0, qk_norm=args.qk_norm, fused_attn=args.fused_attn,
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
    forward = acc.prepare(model)
    if isinstance(forward, torch.nn.parallel.DistributedDataParallel):
        # SiT's only buffers are RoPE's fixed cos/sin tables, equal on every rank: no broadcast
        # before each forward (exact). Set on the wrapper, as the constructor flag is deprecated
        # from torch 2.13 (this attribute works on every version).
        forward.broadcast_buffers = False
    run.state = TrainState(model=model, optimizer=optimizer, ema=ema, precision=args.precision,
                           scaler=torch.amp.GradScaler(run.device.type, enabled=args.precision == "fp16"),
                           forward=forward, ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm,
                           seed=args.seed, rank=run.rank, world=run.world)
    shift = resolution_shift(run.latent_shape, args.shift_base) if args.time_shift else 1.0
    run.objective = REGObjective(proj_coeff=args.proj_coeff if args.projectors else 0.0,
                                 cls_coeff=args.cls if args.class_token else 0.0, path_type=args.path_type,
                                 weighting=args.weighting, prediction=args.prediction, time_shift=shift,
                                 cfm_coeff=args.cfm_coeff, cfm_weighting=args.cfm_weighting)
    run.prepare = Prepare(model, run.device, run.dataset.latent_scale, run.dataset.latent_bias, run.encoders,
                          run.use_features, autocast=run.state.autocast,
                          legacy_drop=args.cfg_prob if args.legacy else None)
    run.rng = RNGStates(run.procs.gather, run.rank, run.world, run.device)
    run.data_position = DataPosition(run.state, args.gradient_accumulation_steps, run.world, run.local_batch, args.seed)
    run.stop_step, run.stop_reason = stop_step(args, len(run.dataset), run.local_batch, run.world, parser)


PROBE_BYTES = 1 << 20   # a full disk still lets an empty file be created: the probe writes real bytes


def write_problem(folder: str) -> str | None:
    """One line if the run cannot write its folder (missing permissions, read-only, full disk or
    quota), found before training starts rather than at the first save; None when it can."""
    probe = os.path.join(folder, ".write-test")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return write_error(folder, e)
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def write_error(folder: str, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free / 2**20 if os.path.isdir(folder) else 0.0
        return f"the disk of {folder} is full ({e.strerror}; {free:.1f} MiB free); free space or choose another --output-dir"
    return f"cannot write to {folder} ({one_line(e)}); choose a writable --output-dir"


#################################################################################
#                 What the release's flags mean (and the project's own)          #
#################################################################################
# The release's spellings keep the release's meanings, non-default values included (a command
# line ported from the release or a paper's appendix trains what it trained there); the project's
# own meanings have their own flags: --total-batch-size, --label-dropout, --no-class-token,
# --no-projectors.

RELEASE_LABEL_DROPOUT = 0.1     # the release's SiT default; its train.py never passes --cfg-prob to the model


def label_dropout(args) -> float:
    """The model's label dropout: --label-dropout, else the release's fixed 0.1 (whatever --cfg-prob says)."""
    return RELEASE_LABEL_DROPOUT if args.label_dropout is None else args.label_dropout


def micro_batch(args, world: int, parser) -> int:
    """Images per process and micro-batch. --batch-size is the release's: per micro-batch over all
    processes, floored per process (an optimizer step sees it x accumulation); --total-batch-size is
    per optimizer step and must divide exactly."""
    accumulation = args.gradient_accumulation_steps
    if args.total_batch_size is not None:
        local, rem = divmod(args.total_batch_size, world * accumulation)
        if rem or local == 0:
            parser.error(f"--total-batch-size {args.total_batch_size} is not divisible by processes x accumulation "
                         f"steps ({world} x {accumulation})")
        return local
    local = args.batch_size // world
    if local == 0:
        parser.error(f"--batch-size {args.batch_size} is smaller than the number of processes ({world})")
    return local


def stop_step(args, n_images: int, local_batch: int, world: int, parser) -> tuple[int, str]:
    """The last optimizer step: --max-train-steps or --epochs epochs, whichever comes first. The
    release's epoch is its loader's length (drop_last) and Accelerate closes an accumulation at the
    end of each epoch, so an epoch is ceil(micro-batches / accumulation) optimizer steps. Counted
    from step 0 (the release restarts its epoch count when it resumes)."""
    try:
        per_epoch = optimizer_steps_per_epoch(n_images, local_batch, world, args.gradient_accumulation_steps)
    except ValueError as e:
        parser.error(str(e))
    if args.epochs * per_epoch < args.max_train_steps:
        return args.epochs * per_epoch, f"--epochs {args.epochs} ({per_epoch} steps each)"
    return args.max_train_steps, f"--max-train-steps {args.max_train_steps}"


def release_flag_warnings(args, world: int) -> list[str]:
    """One line for each release meaning kept although no one should want it, naming the better flag."""
    lines = []
    if args.total_batch_size is None and args.batch_size % world and args.batch_size >= world:
        lines.append(f"--batch-size {args.batch_size} over {world} processes: {args.batch_size // world} per process "
                     f"as released, {args.batch_size // world * world} per micro-batch; use a multiple of {world} "
                     "or --total-batch-size")
    if not args.legacy and args.cfg_prob != RELEASE_LABEL_DROPOUT:
        lines.append(f"--cfg-prob {args.cfg_prob} is ignored in training, as in the release (labels are dropped at "
                     f"{label_dropout(args)}); --label-dropout sets the rate")
    return lines
