"""Sampling benchmark: the project's samplers against release-like baselines, side by side.

For the SDE (Euler-Maruyama, the release's sampler) and the ODE (Euler, or Heun with --heun),
each without guidance, with guidance over the whole path and with a guidance interval, it
prints images/s and network evaluations per image (NFE; a guided step counts 2: the batch is
doubled), for:

  project        fused attention (SDPA), REPA projectors skipped (return_zs=False)
  release-like   plain attention (the release's generate.py default) and the projectors run
                 at every evaluation (the release's model always computes them)
  release-ref    (with --release-ref DIR) the release's own samplers from DIR: the REG SDE on a
                 release-like model; the ODE (REPA's Euler/Heun) on the release's REPA model,
                 compared against 'project' on the same REPA config (no class token)

Decoding latents to pixels is not timed (it is the same VAE call for all). Warm-up excluded;
median of --runs full sampling runs of one batch.

    python benchmarks/bench_sample.py                                           # CPU, SiT-T/2
    python benchmarks/bench_sample.py --model SiT-XL/2 --batch-size 64 --resolution 256 \\
        --num-steps 250 --precision bf16 --compile                              # one GPU
"""
from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.common import autocast_dtype, add_runtime_args, setup, sync  # noqa: E402
from benchmarks.common import build_parser as common_parser  # noqa: E402
from benchmarks.flops import sit_macs  # noqa: E402
from models.sit import SIT_CONFIGS, create_model, paper_encoder_depth  # noqa: E402
from samplers import euler_maruyama_sampler, euler_sampler  # noqa: E402



#################################################################################
#                                   Models                                      #
#################################################################################

class AlwaysProjects(nn.Module):
    """A SiT that computes the REPA projections at every call, as the release's model does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.y_embedder = inner.y_embedder  # read by the samplers for the null class

    def forward(self, x, t, y, cls_token=None, return_zs=True):
        return self.inner(x, t, y, cls_token=cls_token, return_zs=True)


class NFECounter:
    """Counts network calls and rows (samples) evaluated, through a forward pre-hook."""

    def __init__(self, module):
        self.calls = self.rows = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        self.calls += 1
        self.rows += x.shape[0]

    def reset(self):
        self.calls = self.rows = 0


def build_models(args, z, device, release_mod):
    """{name: (model, counter)} with identical weights."""
    depth, hidden, heads, patch = SIT_CONFIGS[args.model]
    kw = dict(input_size=args.resolution // 8, z_dims=[z], projector_dim=args.projector_dim,
              encoder_depth=paper_encoder_depth(depth), num_classes=1000)
    torch.manual_seed(0)
    reg = create_model(args.model, cls_token_dim=z, fused_attn=True, **kw)
    with torch.no_grad():  # non-zero read-outs, so the samplers do real arithmetic
        for p in reg.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    plain = create_model(args.model, cls_token_dim=z, fused_attn=False, **kw)
    plain.load_state_dict(reg.state_dict())
    models = {"project": reg, "release-like": AlwaysProjects(plain)}
    if release_mod is not None:
        repa = create_model(args.model, cls_token_dim=0, fused_attn=True, **kw)
        ref = release_mod.SiT(input_size=args.resolution // 8, depth=depth, hidden_size=hidden,
                              decoder_hidden_size=hidden, num_heads=heads, patch_size=patch, z_dims=[z],
                              encoder_depth=paper_encoder_depth(depth), projector_dim=args.projector_dim,
                              num_classes=1000, qk_norm=False, fused_attn=False)
        ref.load_state_dict(repa.state_dict(), strict=True)
        models["project (REPA cfg)"] = repa
        models["release-ref (REPA cfg)"] = ref
    out = {}
    for name, m in models.items():
        m.to(device).eval()
        counter = NFECounter(m)
        if args.compile and hasattr(m, "compile_blocks"):
            m.compile_blocks()          # in place, as generate.py --compile
        elif args.compile:
            m = torch.compile(m)
        out[name] = (m, counter)
    return out


#################################################################################
#                                    Timing                                     #
#################################################################################

def build_parser():
    p = common_parser("Benchmark sampling (project vs release-like).", batch_help="images per sampling call")
    p.add_argument("--enc-dim", type=int, default=768, help="class-token / projector output width (DINOv2-B: 768)")
    p.add_argument("--num-steps", type=int, default=10, help="paper: 250 (SDE); the release's default: 50")
    p.add_argument("--heun", action="store_true", help="ODE: Heun instead of Euler")
    p.add_argument("--cfg-scale", type=float, default=2.3, help="paper: 2.3 (and cls-cfg 2.3)")
    p.add_argument("--guidance-high", type=float, default=0.85, help="upper end of the guidance interval (paper: 0.85)")
    p.add_argument("--modes", default="sde,ode")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile: the project's SiT blocks (as generate.py --compile), baselines whole")
    p.add_argument("--release-ref", default=None, metavar="DIR",
                   help="folder with the release's repa_sit.py and ref_samplers.py: also time those")
    add_runtime_args(p, runs=3, warmup_help="untimed sampling runs per setting (the sampler state stays float64)")
    return p


def check_args(args, p):
    if args.batch_size < 1 or args.runs < 1 or args.num_steps < 1 or args.warmup < 0:
        p.error("--batch-size, --runs and --num-steps must be positive and --warmup >= 0")
    if args.resolution % 8 or (args.resolution // 8) % SIT_CONFIGS[args.model][3]:
        p.error(f"--resolution {args.resolution} must give latents (resolution/8) divisible by the patch size")
    if args.cfg_scale <= 1 or not 0 < args.guidance_high < 1:
        p.error("--cfg-scale must be > 1 and --guidance-high in (0, 1) (they define the guided settings)")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in ("sde", "ode") for m in args.mode_list):
        p.error("--modes must be a comma-separated subset of sde,ode")
    if args.release_ref and not all(os.path.isfile(os.path.join(args.release_ref, f))
                                    for f in ("repa_sit.py", "ref_samplers.py")):
        p.error(f"--release-ref {args.release_ref} must hold repa_sit.py and ref_samplers.py")


def make_call(args, name, mode, guide, model, inputs, ref_samplers):
    """A no-argument function running one full sampling of the batch."""
    latents, y, cls = inputs
    cfg, high = {"none": (1.0, 1.0), "full": (args.cfg_scale, 1.0), "interval": (args.cfg_scale, args.guidance_high)}[guide]
    common = dict(num_steps=args.num_steps, cfg_scale=cfg, guidance_low=0.0, guidance_high=high)
    repa_cfg = "(REPA cfg)" in name
    if name.startswith("release-ref"):
        if mode == "ode":
            return lambda: ref_samplers.repa_euler_sampler(model, latents, y, heun=args.heun, **common)
        return None  # the release's REG SDE is timed on the release-like model (row 'release-ref')
    if mode == "sde":
        return lambda: euler_maruyama_sampler(model, latents, y, cls_latents=None if repa_cfg else cls,
                                              cls_cfg_scale=cfg, **common)
    return lambda: euler_sampler(model, latents, y, heun=args.heun, cls_latents=None if repa_cfg else cls,
                                 cls_cfg_scale=cfg, **common)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(args, p)
    device = setup(args, p)
    ref_samplers = release_mod = None
    if args.release_ref:
        sys.path.insert(0, os.path.abspath(args.release_ref))
        release_mod = importlib.import_module("repa_sit")
        ref_samplers = importlib.import_module("ref_samplers")

    z = args.enc_dim
    models = build_models(args, z, device, release_mod)
    h = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch_size, 4, h, h, generator=g).to(device),
              torch.randint(0, 1000, (args.batch_size,), generator=g).to(device),
              torch.randn(args.batch_size, z, generator=g).to(device))
    amp_dtype = autocast_dtype(args.precision)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device      {device} ({dev_name}); torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
          f"python {platform.python_version()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if device.type == "cpu" and os.getloadavg()[0] > 0.5:
        print("warning     the machine is busy: CPU timings will be noisy (try --threads 1, more --runs)")
    parts = sit_macs(args.model, h, 4, z, (z,), args.projector_dim)
    total = sum(parts.values())
    print(f"model       {args.model} (depth {SIT_CONFIGS[args.model][0]}, width {SIT_CONFIGS[args.model][1]}, {SIT_CONFIGS[args.model][2]} heads, patch {SIT_CONFIGS[args.model][3]}) at {args.resolution} px ({h}x{h} latents), REG class token width {z}; "
          f"the projectors are {100 * parts['projectors'] / total:.1f}% of a forward's FLOPs at this size")
    print(f"batch {args.batch_size}; steps {args.num_steps} ({'Heun' if args.heun else 'Euler'} ODE); precision {args.precision} "
          f"(state float64); compile {args.compile}; attention: fused SDPA (project) / plain (release-like); "
          f"cfg {args.cfg_scale} (class token too), interval [0, {args.guidance_high}]; "
          f"timing: median of {args.runs} runs after {args.warmup} warm-up, settings interleaved")

    # One timed entry per (mode, guidance, model); all entries of a setting are timed round-robin.
    entries = []
    for mode in args.mode_list:
        for guide in ("none", "full", "interval"):
            for name, (model, counter) in models.items():
                if mode == "sde" and "(REPA cfg)" in name:
                    continue  # the release has no REPA SDE to compare with
                if name == "release-like" and release_mod is not None and mode == "sde":
                    call = (lambda m=model, gd=guide: ref_samplers.reg_em_sampler(
                        m, inputs[0], inputs[1], num_steps=args.num_steps,
                        cfg_scale=1.0 if gd == "none" else args.cfg_scale, guidance_low=0.0,
                        guidance_high=args.guidance_high if gd == "interval" else 1.0,
                        cls_latents=inputs[2], cls_cfg_scale=1.0 if gd == "none" else args.cfg_scale))
                    entries.append(dict(mode=mode, guide=guide, name="release-ref SDE", call=call, counter=counter, times=[]))
                call = make_call(args, name, mode, guide, model, inputs, ref_samplers)
                if call is not None:
                    entries.append(dict(mode=mode, guide=guide, name=name, call=call, counter=counter, times=[]))

    def timed(e):
        e["counter"].reset()
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            e["call"]()
        sync(device)
        e["nfe"] = e["counter"].rows / args.batch_size
        e["calls"] = e["counter"].calls
        return time.perf_counter() - t0

    for i in range(0, len(entries)):
        for _ in range(args.warmup):
            timed(entries[i])
    for _ in range(args.runs):
        for e in entries:
            e["times"].append(timed(e))

    print()
    print(f"{'mode':4s} {'guidance':9s} {'sampler / model':24s} {'s/batch':>8s} {'img/s':>8s} {'NFE/img':>8s} "
          f"{'calls':>6s} {'speed-up':>8s}")
    for e in entries:
        e["s"] = statistics.median(e["times"])
    for e in entries:
        if "(REPA cfg)" in e["name"]:
            base_name = "release-ref (REPA cfg)"
        else:
            base_name = "release-ref SDE" if (e["mode"] == "sde" and release_mod is not None) else "release-like"
        base = next((b for b in entries if b["mode"] == e["mode"] and b["guide"] == e["guide"] and b["name"] == base_name), None)
        speed = f"{base['s'] / e['s']:7.2f}x" if base else "     -"
        print(f"{e['mode']:4s} {e['guide']:9s} {e['name']:24s} {e['s']:8.3f} {args.batch_size / e['s']:8.1f} "
              f"{e['nfe']:8.0f} {e['calls']:6d} {speed:>8s}")
    print("NFE/img: network evaluations per image (a guided step evaluates 2 rows per image); calls: forward calls per batch.")
    print("speed-up: relative to the release's sampler on the release-like model (release-ref SDE when --release-ref "
          "is given, else release-like); REPA cfg rows relative to release-ref (REPA cfg).")


if __name__ == "__main__":
    main()
