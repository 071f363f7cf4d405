"""Train SiT + REG (or REPA, or plain SiT) on preprocessed latents: the flags and the loop.

    accelerate launch train.py --model SiT-B/2 --enc-type dinov2-vit-b --encoder-depth 4 --data-dir DATA
    torchrun --nproc_per_node 8 train.py ...            # the same; python train.py ... for one process

Where each part of a run lives:
    training_run.py   build the run: data, processes, model, EMA, optimizer, objective
    train_step.py     TrainState and train_step (the objective: loss.REGObjective)
    data_order.py     the resumable order of the data and the loader
    checkpoint.py     checkpoints, and resume: choose, restore, save
    tracking.py       log.txt, metrics.jsonl, TensorBoard / wandb
    online_eval.py    what the run shows while it trains: EMA sample grids, FID
Rerunning the same command resumes from the newest checkpoint of the experiment (model, EMA,
optimizer, grad scaler, step, RNG states and data position are all restored), so N steps in one go
equal N/2 + resume + N/2 (bitwise on the CPU in float32). See README.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import cli
import online_eval
import preemption
from checkpoint import CheckpointError, checkpoint_paths, log_disk_plan, resume, save_run
from data_order import make_loader, next_batches
from dataset import DATA_ERRORS
from loss import PATH_TYPES, PREDICTIONS, SHIFT_BASE, WEIGHTINGS
from models.sit import SIT_CONFIGS, SiT_models
from optim import ADAM_IMPLS, GuardedAdamW
from preemption import Preempted, StopRequest
from run_lock import release_held
from runtime import (DEFAULT_TIMEOUT_MIN, check_launcher, forget_process_state, last_line, launcher_env,
                     resolve_device)
from tracking import MetricsLog, Progress, logger, start_logging, tracker_problem
from train_step import train_step
from training_run import build, label_dropout, release_flag_warnings


#################################################################################
#                                   Arguments                                   #
#################################################################################

def build_parser() -> argparse.ArgumentParser:
    p = cli.RankZeroParser(prog="train.py", description="Train SiT with REG / REPA.",
                           formatter_class=cli.DefaultsHelpFormatter)
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
    g.add_argument("--keep-every", type=int, default=0,
                   help="with --keep-last: also keep every checkpoint whose step is a multiple of N (milestones; "
                        "a multiple of --checkpointing-steps; 0: none)")
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
                   help="minutes ranks wait for each other at a collective before the job aborts (checkpoints "
                        "are written in the background, so no collective waits for a save)")


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
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per micro-batch over all processes, as released (an optimizer step sees it x "
                        "--gradient-accumulation-steps); default 256 unless --total-batch-size is given")
    g.add_argument("--total-batch-size", type=int, default=None,
                   help="images per optimizer step over all processes and accumulation steps (instead of --batch-size)")
    g.add_argument("--num-workers", type=int, default=4, help="data-loader worker processes per training process")
    g.add_argument("--cached-features", choices=["auto", "yes", "no"], default="auto",
                   help="use the dataset's cached encoder outputs instead of running the encoder")
    g.add_argument("--skip-bad-samples", action="store_true",
                   help="replace a damaged sample by the next readable one (warned once; the same on every "
                        "process and rerun, so resume stays exact) instead of stopping with its file named")
    g.add_argument("--allow-partial-data", action="store_true",
                   help="train although the data lists fewer items than its manifests record (default: stop with "
                        "both numbers)")


def _runtime_args(p) -> None:
    g = p.add_argument_group("precision, speed and device")
    cli.add_runtime_args(g, precision_default="fp16", tf32_default=False, train=True,
                         seed_help="seed; process k uses seed + k for t, noise and label dropout")
    g.add_argument("--compile", action="store_true", help="torch.compile the SiT blocks and the online encoder (numbers change slightly)")


def _optimisation_args(p) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=1400,
                   help="stop after this many epochs or at --max-train-steps, whichever comes first (an epoch: the "
                        "release's, ceil(micro-batches per epoch / accumulation) optimizer steps; counted from step 0)")
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
    g.add_argument("--cfg-prob", type=float, default=0.1,
                   help="as released: ignored in training (labels dropped at 0.1) except by --legacy; "
                        "--label-dropout sets the rate")
    g.add_argument("--label-dropout", type=float, default=None,
                   help="class-label dropout for classifier-free guidance (default: 0.1, the release's fixed rate; "
                        "0: no null class)")
    g.add_argument("--enc-type", type=str, default="dinov2-vit-b", help="comma-separated encoder names")
    g.add_argument("--proj-coeff", type=float, default=0.5,
                   help="REPA alignment weight (0: the projectors are still built and the term weighted 0, as released)")
    g.add_argument("--projectors", action=argparse.BooleanOptionalAction, default=True,
                   help="REPA projectors and the alignment term (--no-projectors: neither, i.e. no alignment)")
    g.add_argument("--weighting", default="uniform", type=str, choices=list(WEIGHTINGS), help="time sampling: U(0,1) or log-normal")
    g.add_argument("--cls", "--cls-coeff", dest="cls", type=float, default=0.03,
                   help="REG class-token loss weight (0: the token stays in the input, its loss weighted 0, as released)")
    g.add_argument("--class-token", action=argparse.BooleanOptionalAction, default=True,
                   help="REG's class token (--no-class-token: none, i.e. plain REPA, or SiT with --no-projectors)")
    g.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="the release's early runs: labels dropped at --cfg-prob before the model drops them again "
                        "(~19%% null labels at 0.1)")
    g.add_argument("--cfm-coeff", type=float, default=0.0,
                   help="contrastive flow matching weight (SpeedrunDiT: 0.05; 0: off, the release)")
    g.add_argument("--cfm-weighting", choices=["uniform", "linear"], default="uniform",
                   help="CFM term per sample: uniform, or linear = weighted by its time t (SpeedrunDiT's option)")
    g.add_argument("--time-shift", action=argparse.BooleanOptionalAction, default=False,
                   help="shift t by sqrt(latent elements / --shift-base) (SD3/SpeedrunDiT); sampling follows")
    g.add_argument("--shift-base", type=int, default=SHIFT_BASE,
                   help="latent elements with no shift (SD-VAE latents at 256 px: 4 x 32 x 32)")


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
    if args.batch_size is not None and args.total_batch_size is not None:
        parser.error("give --batch-size (per micro-batch, as released) or --total-batch-size (per optimizer step), not both")
    if args.batch_size is None and args.total_batch_size is None:
        args.batch_size = 256
    if any(v is not None and v < 1 for v in (args.batch_size, args.total_batch_size, args.gradient_accumulation_steps)):
        parser.error("--batch-size, --total-batch-size and --gradient-accumulation-steps must be positive")
    if args.epochs < 1:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    if args.max_train_steps < 1 or args.checkpointing_steps < 1 or args.log_every < 1:
        parser.error("--max-train-steps, --checkpointing-steps and --log-every must be positive")
    if args.keep_every < 0 or args.keep_every % args.checkpointing_steps:
        parser.error(f"--keep-every must be 0 or a multiple of --checkpointing-steps ({args.checkpointing_steps}), "
                     f"got {args.keep_every}")
    if args.proj_coeff < 0 or args.cls < 0 or args.cfm_coeff < 0:
        parser.error("--proj-coeff, --cls and --cfm-coeff must be >= 0")
    if args.shift_base < 1:
        parser.error(f"--shift-base must be positive, got {args.shift_base}")
    if not 0 <= args.cfg_prob < 1:
        parser.error(f"--cfg-prob must be in [0, 1), got {args.cfg_prob}")
    if args.label_dropout is not None and not 0 <= args.label_dropout < 1:
        parser.error(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if args.legacy and label_dropout(args) == 0:
        parser.error("--legacy drops labels to the null class, which needs --label-dropout > 0")
    if args.nonfinite_patience < 1:
        parser.error(f"--nonfinite-patience must be >= 1, got {args.nonfinite_patience}")
    if args.dist_timeout <= 0:
        parser.error(f"--dist-timeout must be positive (minutes), got {args.dist_timeout}")
    depth = SIT_CONFIGS[args.model][0]
    if args.projectors and not 1 <= args.encoder_depth <= depth:
        parser.error(f"--encoder-depth must be in 1..{depth} for {args.model}, got {args.encoder_depth}")
    if args.compile and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        parser.error(f"--compile needs torch >= 2.5 (one compiled graph for all SiT blocks), found {torch.__version__}")
    if args.resume_from and args.init_from:
        parser.error("give --resume-from (continue a run) or --init-from (new run from its weights), not both")
    for flag, path in (("--resume-from", args.resume_from), ("--init-from", args.init_from)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such checkpoint file")
    online_eval.check_args(args, parser)
    if not os.path.isdir(args.data_dir) and "://" not in args.data_dir:     # a URL: sharded data (data_shards.py)
        parser.error(f"--data-dir {args.data_dir} does not exist; prepare it with preprocessing/dataset_tools.py (see README)")
    _, world, local_rank = launcher_env()
    try:
        check_launcher()
        resolve_device(args.device, local_rank, world)
    except ValueError as e:
        parser.error(str(e))
    if os.environ.get("RANK", "0") == "0":
        for line in release_flag_warnings(args, world):
            print(f"warning: {line}", file=sys.stderr)
    problem = tracker_problem(args.report_to)       # last: it may ask the wandb server
    if problem:
        parser.error(problem)


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
        release_held()           # the run folder's lock (run_lock), also when the build failed
        forget_process_state()   # a later run in this process (the demos, tests) builds its own


def train(args, parser) -> None:
    run = build(args, parser)
    resume(run, parser)
    log_disk_plan(run)
    state, acc = run.state, run.accelerator
    if state.step == 0:
        torch.manual_seed(args.seed + run.rank)  # the release's per-process seed for t, noise and label dropout
    start_logging(run)
    log = MetricsLog(os.path.join(run.exp_dir, "metrics.jsonl"), acc, run.step_images, state.step)
    grids = online_eval.SampleGrids(run)
    evaluate = online_eval.build(run, parser)
    data = iter(make_loader(run.dataset, run.local_batch, run.rank, run.world, args.seed,
                            run.data_position.microbatch, args.num_workers, run.device.type == "cuda"))
    progress = Progress(run.stop_step, state.step, acc.is_main_process)
    if state.step >= run.stop_step and acc.is_main_process:
        logger.info(f"already at step {state.step} >= {run.stop_reason}; nothing to do")
    state.forward.train()
    stop = StopRequest(run.procs)              # SIGTERM / SIGUSR1 / SIGINT: finish the step, save, exit 3
    try:
        while state.step < run.stop_step:
            batches = next_batches(data, args.gradient_accumulation_steps, state.step)
            for note in run.dataset.skipped_notes(batches):    # replacements made in loader workers
                logger.warning(note)
            log.add(train_step(state, batches, run.objective, run.prepare))
            progress.update(1)
            check_nonfinite(run)
            step, last = state.step, state.step == run.stop_step
            if not last and stop.requested():  # every rank, every step (one tiny all-reduce): they stop together
                stop_here(run, log, stop)
            scores = evaluate() if evaluate and step % args.fid_every == 0 else None
            if scores is not None:
                log.exclude(scores.get("eval_seconds", 0.0))
                if not last and stop.requested():          # a signal during a long evaluation
                    stop_here(run, log, stop, scores)
            if step % args.log_every == 0 or step % args.checkpointing_steps == 0 or last or scores is not None:
                logs = log.flush(step, scores)
                progress.show(step, logs)
                check_nonfinite(run, logs)
                if acc.is_main_process:
                    run.checkpointer.raise_if_failed()       # a background save that failed stops the run now
            if step % args.checkpointing_steps == 0 or last:
                save_run(run)
            if args.sampling_steps > 0 and (step % args.sampling_steps == 0 or last):
                grids()
    finally:
        stop.close()
        progress.close()
        if acc.is_main_process:
            run.checkpointer.wait()
    acc.end_training()
    if acc.is_main_process:
        logger.info(f"done: {state.step} steps; checkpoints in {run.ckpt_dir}")


def stop_here(run, log, stop, scores=None) -> None:
    """A signal reached some process: every process logs the step's window, writes this step's
    checkpoint and raises Preempted (exit status 3); nothing poisoned is saved (--nonfinite stop)."""
    check_nonfinite(run, log.flush(run.state.step, scores))
    saved = save_run(run)
    if run.accelerator.is_main_process:
        run.checkpointer.wait()
    run.accelerator.end_training()                          # trackers flushed and closed, as at the end
    preemption.stop(run, stop.received or "a signal to another process", saved)


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
    if args.nonfinite == "stop" and logs is not None and logs["loss_final"] is None:
        raise FloatingPointError(f"non-finite loss at or before step {run.state.step}; {last_good()} "
                                 "(try --precision bf16 or a lower lr, or --nonfinite skip)")


if __name__ == "__main__":
    try:
        main()
    except Preempted as e:                 # the line is in the log already (rank 0)
        sys.exit(e.exit_code)
    except (FloatingPointError, CheckpointError, *DATA_ERRORS) as e:   # one line, not a traceback
        print(f"error: {last_line(e)}", file=sys.stderr)
        sys.exit(1)
