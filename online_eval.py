"""What a run shows while it trains: EMA sample grids (every --sampling-steps) and FID (and the
rest of ADM's numbers, or another metric) of the EMA model on K fixed images every --fid-every
steps, sampled on all processes and scored against a reference batch.

    train.py ... --fid-every 50000 --fid-num-samples 10000 --fid-ref VIRTUAL_imagenet256_labeled.npz

The same K images (per-image seeds: the same noises and labels at every evaluation, whatever the
number of processes), so the curve shows the model, not the noise. Sampling and decoding come from
sampling.py (``sample_batch``, as generate.py), the features and statistics from the evaluator (Inception loaded
once and kept; the reference statistics read, or computed once and cached). Evaluating does not
touch the training trajectory: no RNG state changes, the weights are only read.

The metric is pluggable: ``adm`` (ADM's five numbers on Inception features) or ``digits`` (the
built-in digits dataset's Frechet distance on a digit classifier's features, evaluations/digits.py).
Anything with ``activations(images) -> dict of arrays`` and ``metrics_from_activations(list) ->
dict`` fits; a metric with ``wants_labels = True`` gets ``activations(images, labels)``, the labels
the images were sampled for (the digits metric's accuracy). Names carry K (``fid_10k``): an FID of
10K samples is not comparable with the paper's 50K-sample FID (it is biased upwards by a few tenths
at that size).
"""
from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import os
import time

import numpy as np
import torch

from fileio import atomic_open
from runtime import one_line
from sampling import SampleSettings, sample_batch, setting_problems
from samplers import euler_sampler

logger = logging.getLogger("train")

METRICS = ("adm", "digits", "fd_dinov2")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation during training (off by default)")
    g.add_argument("--fid-every", type=int, default=0, help="evaluate the EMA model every N steps (0: never)")
    g.add_argument("--fid-num-samples", type=int, default=10000, help="K images per evaluation (names say K)")
    g.add_argument("--fid-ref", default=None, help="reference batch (ADM's .npz, e.g. VIRTUAL_imagenet256_labeled.npz)")
    g.add_argument("--fid-metric", choices=METRICS, default="adm",
                   help="adm: IS/FID/sFID/precision/recall on Inception features (+ FD-DINOv2 when "
                        "$REG_FD_DINOV2_WEIGHTS is set); fd_dinov2: EDM2's FD-DINOv2 only (--fid-ref: a reference "
                        "batch or an image folder); digits: the built-in data's metric")
    g.add_argument("--fid-inception-weights", default=None, help="Inception weights (default: $REG_INCEPTION_WEIGHTS)")
    g.add_argument("--fid-mode", choices=["sde", "ode"], default="sde", help="sampler (the paper's evaluation: sde)")
    g.add_argument("--fid-num-steps", type=int, default=250)
    g.add_argument("--fid-cfg-scale", type=float, default=2.3)
    g.add_argument("--fid-cls-cfg-scale", type=float, default=2.3)
    g.add_argument("--fid-guidance-low", type=float, default=0.0)
    g.add_argument("--fid-guidance-high", type=float, default=0.85)
    g.add_argument("--fid-seed", type=int, default=0, help="seed of the K images' noises and labels")
    g.add_argument("--fid-batch-size", type=int, default=64, help="images per process and sampler call")
    g.add_argument("--fid-class-balanced", action="store_true", help="label of image i = i %% num_classes")
    g.add_argument("--fid-path-drop-guidance", action="store_true",
                   help="path-drop guidance (--routing sprint only), as generate.py --path-drop-guidance")


def check_args(args, parser) -> None:
    if args.fid_every < 0 or args.fid_num_samples < 1 or args.fid_batch_size < 1:
        parser.error("--fid-every must be >= 0; --fid-num-samples and --fid-batch-size positive")
    if args.fid_every and args.fid_metric in ("adm", "fd_dinov2") and not args.fid_ref:
        parser.error("--fid-every needs --fid-ref (a reference batch, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    # the sampler settings follow generate.py's own rules
    keys = ("num_steps", "cfg_scale", "cls_cfg_scale", "guidance_low", "guidance_high", "seed")
    problems = setting_problems({k: getattr(args, "fid_" + k) for k in keys}, name=lambda k: "--fid-" + k.replace("_", "-"))
    if problems:
        parser.error("; ".join(problems))
    if args.fid_path_drop_guidance and args.routing != "sprint":
        parser.error(f"--fid-path-drop-guidance needs --routing sprint (the model's path-drop steps), "
                     f"got --routing {args.routing}")


def suffix(k: int) -> str:
    """'10k' for 10000 images, '200' for 200: the K in a metric's name."""
    return f"{k // 1000}k" if k % 1000 == 0 else str(k)


class OnlineEvaluation:
    """Built once at the start of a run (decoder and metric loaded, errors one line); called at
    evaluation steps on every process; returns the metrics on the main process ({} elsewhere)."""

    def __init__(self, run, metric=None):
        from models.autoencoder import Autoencoder, decoder_for

        args, model = run.args, run.state.model
        self.run, self.k = run, args.fid_num_samples
        self.settings = SampleSettings(
            mode=args.fid_mode, num_steps=args.fid_num_steps, cfg_scale=args.fid_cfg_scale,
            cls_cfg_scale=args.fid_cls_cfg_scale if model.cls_token_dim else 0.0,
            guidance_low=args.fid_guidance_low, guidance_high=args.fid_guidance_high, path_type=args.path_type,
            time_shift=run.objective.loss.time_shift, class_balanced=args.fid_class_balanced, seed=args.fid_seed,
            path_drop_guidance=args.fid_path_drop_guidance,
            precision=args.precision)    # the run's precision (the online number only; generate.py: --precision)
        devices = [run.device] if run.device.type == "cuda" else []
        # building networks draws random initial weights: keep that off the training's RNG streams
        with run.accelerator.local_main_process_first(), torch.random.fork_rng(devices=devices):
            self.codec = Autoencoder.from_spec(decoder_for(run.dataset.codec_identity), device=run.device)
            self.metric = metric or build_metric(args, run.device)
        lo, hi = self.k * run.rank // run.world, self.k * (run.rank + 1) // run.world
        self.indices = np.arange(lo, hi)           # contiguous: gathered in rank order = image order
        self._sampler = None

    def _sampling_model(self):
        """The EMA weights on every process: rank 0's own EMA, a broadcast copy elsewhere (freed after)."""
        run = self.run
        if run.world == 1:
            return run.state.ema
        model = run.state.ema if run.state.ema is not None else copy.deepcopy(run.state.model).eval()
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
        return model

    @torch.no_grad()
    def __call__(self) -> dict:
        run, t0 = self.run, time.time()
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model = self._sampling_model()
            images, labels = [], []
            for start in range(0, len(self.indices), run.args.fid_batch_size):
                idx = self.indices[start:start + run.args.fid_batch_size]
                batch, batch_labels = sample_batch(model, self.codec, idx, self.settings, run.device)
                images.append(batch)
                labels.append(batch_labels)
            images = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
            if getattr(self.metric, "wants_labels", False):       # e.g. the digits metric's accuracy
                acts = self.metric.activations(images, np.concatenate(labels) if labels else np.zeros(0, np.int64))
            else:
                acts = self.metric.activations(images)
            if model is not run.state.ema:
                del model
            del images, labels
        gathered = run.procs.gather_to_main(acts)              # the metric is computed on rank 0 only
        del acts
        free_memory(run.device)                                # training gets its memory back
        if not run.accelerator.is_main_process:
            return {}
        values = self.metric.metrics_from_activations(gathered)
        k = suffix(self.k)
        logs = {f"{name}_{k}": float(v) for name, v in values.items()}
        logs["eval_seconds"] = time.time() - t0
        return logs


def free_memory(device) -> None:
    """Give the evaluation's sampling buffers back (the caching allocator keeps them otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_metric(args, device):
    if args.fid_metric == "digits":
        from evaluations.digits import DigitsMetric
        return DigitsMetric(device=device)
    if args.fid_metric == "fd_dinov2":
        from evaluations.fd_dinov2 import FDDINOv2Metric
        return FDDINOv2Metric(args.fid_ref, device=device)        # weights: $REG_FD_DINOV2_WEIGHTS
    from evaluations.evaluator import Evaluator
    return Evaluator(args.fid_ref, args.fid_inception_weights, device=device)


def build(run, parser):
    """FID (or the --fid-metric) of the EMA model every --fid-every steps; None when off."""
    if not run.args.fid_every:
        return None
    try:
        return OnlineEvaluation(run)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        parser.error(f"cannot set up the evaluation during training: {one_line(e)}")


#################################################################################
#                               EMA sample grids                                #
#################################################################################

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


def write_grid(run, codec, grid_inputs) -> None:
    from PIL import Image

    args, step, ema = run.args, run.state.step, run.state.ema
    inputs = {k: (v.to(run.device) if v is not None else None) for k, v in grid_inputs.items()}
    cfg = args.sample_cfg_scale if args.cfg_prob > 0 else 1.0
    x = euler_sampler(ema, inputs["latents"], inputs["y"], num_steps=args.sample_num_steps, cfg_scale=cfg,
                      path_type=args.path_type, cls_latents=inputs["cls_latents"], cls_cfg_scale=cfg,
                      time_shift=run.objective.loss.time_shift)     # the grid the model was trained on
    images = codec.to_uint8(codec.decode(x.float())).cpu().numpy()          # (N, H, W, 3)
    grid = image_grid(images, cols=int(math.ceil(math.sqrt(len(images)))))
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


GRID_GAP, GRID_GAP_GREY = 2, 128  # pixels between cells, mid-grey: no stroke runs into the next cell


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image of ``cols`` columns, cells GRID_GAP pixels apart."""
    from torchvision.utils import make_grid

    cells = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)        # (N, 3, H, W)
    return make_grid(cells, nrow=cols, padding=GRID_GAP, pad_value=GRID_GAP_GREY).permute(1, 2, 0).numpy()
