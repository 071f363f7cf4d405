"""Training-step benchmark: the project's step against release-like baselines, side by side.

One step = latent sampling from [mean, std] moments, alignment targets (encoder forward on the
images, or cached features copied to the device), the loss forward, backward, grad clipping,
AdamW, EMA. Variants (each with cached features and with the encoder online):

  project            the project's train_step (train_step.py) (TrainState, Prepare, REGObjective) as train.py
                     builds it by default: foreach AdamW (bitwise the release's update) under the
                     non-finite guard, fused EMA, batched fp32-normalised projection loss
  project+fused      the same with --adam-impl fused
  project+stop       the same with --nonfinite stop (plain AdamW: the guard's cost)
  release-like       per-sample Python loop projection loss, per-parameter EMA loop, one
                     host sync per step for logging (.item()), as the release's train.py
  release-like+plain the same with plain (non-fused) attention
  release-ref        (with --release-ref DIR) the release's own REPA model from DIR with the
                     release-like loop; compared against 'project' on a REPA config (no class token)

Warm-up steps are excluded; each figure is the median over --runs runs of --steps-per-run steps.

    python benchmarks/bench_train.py                                   # CPU, SiT-T/2, batch 8
    python benchmarks/bench_train.py --model SiT-XL/2 --batch-size 32 --precision bf16 \\
        --compile --encoder dinov2-vit-b                               # one GPU
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import loss as loss_module  # noqa: E402
from benchmarks.common import autocast_dtype, add_runtime_args, peak_bytes, reset_peak, setup, sync  # noqa: E402
from benchmarks.common import build_parser as common_parser  # noqa: E402
from benchmarks.flops import peak_tflops, train_flops_per_image  # noqa: E402
from loss import REGObjective, SILoss  # noqa: E402
from models.autoencoder import SD_VAE_SCALE  # noqa: E402
from models.encoders import ENCODER_WIDTHS, random_encoder  # noqa: E402
from models.sit import SIT_CONFIGS, create_model, paper_encoder_depth  # noqa: E402
from optim import GuardedAdamW, make_optimizer  # noqa: E402
from train_step import Prepare, TrainState, train_step  # noqa: E402



#################################################################################
#                              Release-like pieces                              #
#################################################################################

def loop_projection_loss(zs, zs_tilde):
    """The release's alignment loss: a Python loop over encoders and samples, normalising in the
    autocast dtype; the sum is divided by (encoders x batch). Same value as loss.projection_loss."""
    total = 0.0
    n = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):                       # (L, Z) each
            cos = (F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)
            total = total + (-cos).mean()
    return total / (len(zs) * n)


def loop_update_ema(ema_named, model_named, decay):
    """The release's EMA: one mul_ and one add_ per parameter tensor."""
    with torch.no_grad():
        for name, p in model_named.items():
            ema_named[name].mul_(decay).add_(p.data, alpha=1 - decay)


class ReleaseREPA(torch.nn.Module):
    """The release's REPA SiT (from --release-ref) behind the project's call signature."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.z_dims, self.cls_token_dim = inner.z_dims_, 0

    def forward(self, x, t, y, cls_token=None):
        v, zs = self.inner(x, t, y)
        return v, zs, None


#################################################################################
#                                    Setup                                      #
#################################################################################

def build_parser():
    p = common_parser("Benchmark one training step (project vs release-like).", batch_help="per-device batch")
    p.add_argument("--encoder", default="random-vit-tiny",
                   help="encoder architecture (random weights): random-vit-tiny or a DINOv2 name built through timm")
    add_runtime_args(p, runs=5, warmup_help="untimed steps per variant (compile happens here)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the SiT blocks and the encoder as train.py --compile (release-like: the whole model)")
    p.add_argument("--steps-per-run", type=int, default=1)
    p.add_argument("--variants", default="project,project+fused,release-like,release-like+plain",
                   help="comma-separated subset")
    p.add_argument("--modes", default="cached,online", help="cached features, encoder online, or both")
    p.add_argument("--release-ref", default=None, metavar="DIR",
                   help="folder with the release's repa_sit.py: also time the release's own model")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build all variants, then time them round-robin (default: on for CPU, off for CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table in flops.py)")
    p.add_argument("--optimizer-share", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the optimizer step (each --adam-impl) and the EMA alone on this model's parameters: "
                        "bytes moved per step and share of the 'project' step (benchmarks/bench_optim.py)")
    return p


def check_args(args, p):
    if args.batch_size < 1 or args.runs < 1 or args.steps_per_run < 1 or args.warmup < 0:
        p.error("--batch-size, --runs, --steps-per-run must be positive and --warmup >= 0")
    if args.resolution % 16:
        p.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.encoder not in ENCODER_WIDTHS:
        p.error(f"unknown --encoder {args.encoder!r}; choose from {', '.join(ENCODER_WIDTHS)}")
    patch = SIT_CONFIGS[args.model][3]
    sit_tokens = (args.resolution // 8 // patch) ** 2
    enc_tokens = (224 * args.resolution // 256 // 14) ** 2
    if sit_tokens != enc_tokens:
        p.error(f"{args.model} has {sit_tokens} tokens at {args.resolution} px but the encoder has {enc_tokens}; "
                "REPA alignment needs equal counts (use a /2 model)")
    known = {"project", "project+fused", "project+stop", "release-like", "release-like+plain"}
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in known]
    if bad or not args.variant_list:
        p.error(f"unknown --variants {bad}; choose from {sorted(known)}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in ("cached", "online") for m in args.mode_list):
        p.error("--modes must be a comma-separated subset of cached,online")
    if args.release_ref and not os.path.isfile(os.path.join(args.release_ref, "repa_sit.py")):
        p.error(f"--release-ref {args.release_ref} holds no repa_sit.py")


def make_encoder(name, resolution, device):
    """The encoder's registered architecture with random weights (timing does not depend on them)."""
    return random_encoder(name, resolution).to(device)


def make_batch(args, z, device, with_images):
    """One pinned (on CUDA) host batch, reused every step: labels, moments, images or cached features."""
    n, h = args.batch_size, args.resolution // 8
    g = torch.Generator().manual_seed(0)
    grid = 224 * args.resolution // 256 // 14
    batch = {
        "label": torch.randint(0, 1000, (n,), generator=g),
        "moments": torch.cat([torch.randn(n, 4, h, h, generator=g), torch.rand(n, 4, h, h, generator=g) * 0.1], 1),
    }
    if with_images:
        batch["image"] = torch.randint(0, 256, (n, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=g)
    else:
        batch["enc_cls"] = torch.randn(n, z, generator=g)
        batch["enc_tokens"] = torch.randn(n, 1 + grid * grid, z, generator=g)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


#################################################################################
#                                    Timing                                     #
#################################################################################

def build_variant(args, variant, mode, device, encoder_proto, release_mod):
    """A fresh model/optimizer/EMA for one variant; returns (step function, info dict).

    The project's variants run the project's ``train_step`` with its TrainState, Prepare and
    REGObjective, built as train.py builds them; only the release-like baselines have a loop
    of their own (the release's, for comparison)."""
    amp_dtype = autocast_dtype(args.precision)
    release = variant.startswith("release")
    online = mode == "online"
    z = encoder_proto.embed_dim
    torch.manual_seed(0)
    depth, width, heads, patch = SIT_CONFIGS[args.model]
    if variant == "release-ref":
        inner = release_mod.SiT(input_size=args.resolution // 8, depth=depth, hidden_size=width,
                                decoder_hidden_size=width, num_heads=heads, patch_size=patch, z_dims=[z],
                                encoder_depth=paper_encoder_depth(depth), projector_dim=args.projector_dim,
                                qk_norm=False, fused_attn=True)
        inner.z_dims_ = [z]
        model = ReleaseREPA(inner)
    else:
        model = create_model(args.model, input_size=args.resolution // 8, z_dims=[z], projector_dim=args.projector_dim,
                             encoder_depth=paper_encoder_depth(depth), cls_token_dim=0 if args.repa_config else z,
                             fused_attn=not variant.endswith("+plain"))
    model.grad_checkpointing = getattr(args, "grad_checkpointing", False)   # train.py --grad-checkpointing
    ema = copy.deepcopy(model)  # an exact copy, as train.py makes it
    model.to(device).train()
    ema.to(device).eval().requires_grad_(False)
    opt_kwargs = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    encoders = [encoder_proto] if online else []
    if args.compile:
        if not release:
            model.compile_blocks()   # in place, as train.py --compile
        if online:
            encoders = [torch.compile(encoder_proto)]
    host = make_batch(args, z, device, online)
    cls_on = bool(getattr(model, "cls_token_dim", 0))
    info = dict(variant=variant, mode=mode, cls=cls_on, times=[], peak=None)

    if not release:
        impl = "fused" if variant == "project+fused" else "foreach"
        optimizer = make_optimizer(model.parameters(), impl, **opt_kwargs)
        if variant != "project+stop":            # train.py's default --nonfinite skip
            optimizer = GuardedAdamW(optimizer)
        state = TrainState(model=model, optimizer=optimizer, ema=ema, precision=args.precision,
                           scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))
        objective = REGObjective()
        prepare = Prepare(model, device, SD_VAE_SCALE, 0.0, encoders, use_features=not online, autocast=state.autocast)
        return (lambda: train_step(state, [host], objective, prepare)), info

    # The release's step: default AdamW kernels, per-sample projection loop, per-parameter EMA,
    # and its per-step logging (.item(): one host sync per step).
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    net = torch.compile(model) if args.compile else model
    loss_fn = SILoss()
    ema_named, model_named = dict(ema.named_parameters()), dict(model.named_parameters())
    prepare = Prepare(model, device, SD_VAE_SCALE, 0.0, encoders, use_features=not online,
                      autocast=lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                      enabled=amp_dtype is not None))

    def step():
        inputs = prepare(host)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = loss_fn.terms(net, inputs["x"], dict(y=inputs["y"]), cls_token=inputs.get("cls_token"))
            proj = loop_projection_loss(inputs["zs"], out["zs_tilde"])
            loss = out["denoising_loss"].mean() + 0.5 * proj + 0.03 * out["denoising_loss_cls"].mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop_update_ema(ema_named, model_named, 0.9999)
        _ = (loss.detach().item(), proj.detach().item(), grad_norm.item())

    return step, info


def time_runs(args, device, run, info, n_runs):
    """n_runs timed runs of --steps-per-run steps; appends per-step seconds, keeps the peak memory."""
    for _ in range(n_runs):
        sync(device)
        base = reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(args.steps_per_run):
            run()
        sync(device)
        info["times"].append((time.perf_counter() - t0) / args.steps_per_run)
        peak = peak_bytes(device, base)
        if peak is not None:
            info["peak"] = max(info["peak"] or 0, peak)


def measure(args, device, specs, encoder, release_mod):
    """Time every (variant, mode). Interleaved: all variants built first, then timed round-robin,
    so background load on a shared machine hits them alike. Otherwise one after the other, each
    freed before the next is built (large models on one GPU)."""
    rows = []
    if args.interleave:
        built = [build_variant(args, v, m, device, encoder, release_mod) for v, m in specs]
        for run, _ in built:
            for _ in range(args.warmup):
                run()
        for _ in range(args.runs):
            for run, info in built:
                time_runs(args, device, run, info, 1)
        rows = [info for _, info in built]
    else:
        for v, m in specs:
            run, info = build_variant(args, v, m, device, encoder, release_mod)
            for _ in range(args.warmup):
                run()
            time_runs(args, device, run, info, args.runs)
            rows.append(info)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        r["step_s"] = statistics.median(r["times"])
        r["spread"] = (min(r["times"]), max(r["times"]))
        r["img_s"] = args.batch_size / r["step_s"]
    return rows


#################################################################################
#                                     Main                                      #
#################################################################################

def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(args, p)
    device = setup(args, p)
    if args.precision == "fp32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # the release allows TF32
        torch.backends.cudnn.allow_tf32 = True
    if args.interleave is None:
        args.interleave = device.type != "cuda"
    release_mod = None
    if args.release_ref:
        sys.path.insert(0, os.path.abspath(args.release_ref))
        release_mod = importlib.import_module("repa_sit")

    encoder = make_encoder(args.encoder, args.resolution, device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device      {device} ({dev_name}); torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print("warning     the machine is busy: CPU timings will be noisy (try --threads 1, more --runs)")
    print(f"model       {args.model} (depth {SIT_CONFIGS[args.model][0]}, width {SIT_CONFIGS[args.model][1]}, {SIT_CONFIGS[args.model][2]} heads, patch {SIT_CONFIGS[args.model][3]}) at {args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), "
          f"REG class token + REPA projector at depth {paper_encoder_depth(SIT_CONFIGS[args.model][0])}")
    print(f"encoder     {args.encoder} (random weights), width {encoder.embed_dim}")
    print(f"batch {args.batch_size}; precision {args.precision}; compile {args.compile}; "
          f"attention: fused SDPA (project) / plain (variant '+plain'); "
          f"timing: median of {args.runs} runs x {args.steps_per_run} steps after {args.warmup} warm-up steps"
          f"{', variants interleaved' if args.interleave else ''}")

    # Sanity: the loop and batched alignment losses agree (so the comparison is like for like).
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(4, 17, 8, generator=g), torch.randn(4, 17, 8, generator=g)
    diff = (loop_projection_loss([za], [zb]) - loss_module.projection_loss([za], [zb])).abs().item()
    print(f"check       loop vs batched projection loss |diff| = {diff:.1e}")

    args.repa_config = False
    rows = measure(args, device, [(v, m) for m in args.mode_list for v in args.variant_list], encoder, release_mod)
    if release_mod is not None:
        args.repa_config = True
        ref_rows = measure(args, device, [(v, m) for m in args.mode_list for v in ("project", "release-ref")],
                           encoder, release_mod)
        for r in ref_rows:
            r["variant"] += " (REPA cfg)"
        rows += ref_rows

    peak = args.peak_tflops or (peak_tflops(dev_name, args.precision) if device.type == "cuda" else None)
    print()
    print(f"{'variant':26s} {'features':8s} {'step ms':>9s} {'(min-max)':>15s} {'img/s':>8s} {'peak mem':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'speed-up':>8s}")
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and b["variant"].startswith("release-like")
                     and not b["variant"].endswith("+plain") and "(REPA cfg)" not in r["variant"]), None)
        if "(REPA cfg)" in r["variant"]:
            base = next((b for b in rows if b["mode"] == r["mode"] and b["variant"] == "release-ref (REPA cfg)"), None)
        flops = train_flops_per_image(args.model, args.resolution // 8, 4, encoder.embed_dim if r["cls"] else 0,
                                      [encoder.embed_dim], args.projector_dim, args.encoder if r["mode"] == "online" else None,
                                      args.resolution)
        mfu = f"{100 * flops * r['img_s'] / (peak * 1e12):5.1f}%" if peak else "  n/a"
        speed = f"{base['step_s'] / r['step_s']:7.2f}x" if base else "     -"
        lo, hi = r["spread"]
        print(f"{r['variant']:26s} {r['mode']:8s} {1e3 * r['step_s']:9.1f} {f'({1e3 * lo:.0f}-{1e3 * hi:.0f})':>15s} "
              f"{r['img_s']:8.1f} {fmt_mem(r['peak']):>10s} {flops * r['img_s'] / 1e12:8.3f} {mfu:>6s} {speed:>8s}")
    print("TFLOP/s: analytic model FLOPs (benchmarks/flops.py: 3x SiT forward + encoder forward if online) x img/s.")
    print("speed-up: throughput relative to release-like (same features mode); REPA cfg rows relative to release-ref.")
    ours = next((r for r in rows if r["variant"] == "project" and r["mode"] == "cached"), None)
    theirs = next((r for r in rows if r["variant"] == "release-like" and r["mode"] == "online"), None)
    if ours and theirs:
        print(f"project with cached features vs release-like (which always runs the encoder online): "
              f"{theirs['step_s'] / ours['step_s']:.2f}x")
    if args.optimizer_share and ours:
        from benchmarks.bench_optim import measure as measure_optimizer, param_set, print_rows
        params = param_set(args.model, device, args.resolution // 8, encoder.embed_dim)
        print()
        print(f"optimizer side of the 'project' step (cached features, {1e3 * ours['step_s']:.1f} ms), alone on the same parameters:")
        print_rows(measure_optimizer(params, device, args.runs, ours["step_s"]), 4 * sum(q.numel() for q in params))
        del params
    if device.type != "cuda":
        print("peak mem on CPU: growth of the process's peak RSS during the timed runs (0 when reused memory suffices).")


if __name__ == "__main__":
    main()
