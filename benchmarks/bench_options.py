"""Step time and memory of the SiT options (issue 15) against the default model, side by side.

One training step = SILoss forward (REG: image + class token + REPA alignment), backward, AdamW
(optim.make_optimizer). Time: all variants are built in one process and stepped round-robin (one
step of each per round, the order alternating), so background load hits them alike; the median
and the minimum wall time over the rounds are printed, and on a CPU the median process CPU time
too, which a busy shared machine disturbs far less (use --threads 1 there: then CPU time is the
uncontended step time). Memory: every variant runs once more in a process of its own, first,
so its peak is its own: the process's peak RSS (VmHWM) and the growth of the peak RSS during the
loss forward and backward of one step above the RSS before it (CPU, with glibc's mmap threshold pinned so that freed activations
leave the RSS), or torch.cuda.max_memory_allocated (CUDA). The "computed" column is the
activation memory benchmarks/flops.py derives from the architecture.

Variants (any subset with --variants):
  default      the release's model
  rmsnorm      norm="rmsnorm"                 qknorm    qk_norm=True
  rope         rope=True (+ sin-cos table)    vres      value_residual=True
  sprint       routing="sprint" (drop 0.75 of the image tokens in blocks [2, depth-2), path drop 0.05)
  tread        routing="tread"  (drop 0.5 in the same blocks)
  ckpt         grad_checkpointing=True
  all          rmsnorm + qknorm + rope + vres + sprint (SpeedrunDiT's architecture)
  all+ckpt     the same with grad checkpointing

The timed body is ``step(state, batch)``: the project's train_step (train_step.py), so the figures time the
project's real step (it draws the routing from a generator seeded like train.py would).

    python benchmarks/bench_options.py --threads 2                 # CPU: SiT-S/2, 128 px, batch 8
    python benchmarks/bench_options.py --model SiT-B/1 --resolution 256 --latent-down 16 \\
        --batch-size 64 --precision bf16                           # one GPU, SpeedrunDiT's size
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import add_runtime_args, peak_bytes, reset_peak, setup, status_kb, sync  # noqa: E402
from benchmarks.common import build_parser as common_parser  # noqa: E402
from benchmarks.flops import sit_activation_bytes  # noqa: E402
from loss import REGObjective  # noqa: E402
from optim import GuardedAdamW, make_optimizer  # noqa: E402
from train_step import TrainState, train_step  # noqa: E402
from models.sit import SIT_CONFIGS, create_model  # noqa: E402

SPEEDRUN = dict(norm="rmsnorm", qk_norm=True, rope=True, value_residual=True, routing="sprint")
VARIANTS = {  # name -> (model options, grad checkpointing)
    "default": ({}, False),
    "rmsnorm": (dict(norm="rmsnorm"), False),
    "qknorm": (dict(qk_norm=True), False),
    "rope": (dict(rope=True), False),
    "vres": (dict(value_residual=True), False),
    "sprint": (dict(routing="sprint"), False),
    "tread": (dict(routing="tread"), False),
    "ckpt": ({}, True),
    "all": (SPEEDRUN, False),
    "all+ckpt": (SPEEDRUN, True),
}
OBJECTIVE = REGObjective(proj_coeff=0.5, cls_coeff=0.03)


#################################################################################
#                        The timed body: one training step                      #
#################################################################################

def step(state, batch):
    """One training step: the project's ``train_step`` (REGObjective, the guarded foreach AdamW,
    the EMA, and for routed models the step's route drawn from (seed, step) as in training)."""
    return train_step(state, [batch], OBJECTIVE, prepare=lambda b: b)["loss_final"]


def forward_backward(state, batch):
    """The part of the step whose memory the options change: the loss forward and backward (the
    optimizer's own temporaries, the same for every variant, would hide it at small sizes)."""
    inputs = dict(batch)
    route = state.route(0, batch["x"].shape[0])
    if route is not None:
        inputs["route"] = route
    with state.autocast():
        loss = OBJECTIVE(state.forward, **inputs)["loss_final"]
    loss.backward()
    state.model.zero_grad(set_to_none=True)


#################################################################################
#                                    Worker                                     #
#################################################################################

def build(args, name):
    """(TrainState, batch) of one variant, on args.device, in training mode."""
    device = torch.device(args.device)
    options, ckpt = VARIANTS[name]
    latent = args.resolution // args.latent_down
    z = args.enc_dim
    torch.manual_seed(0)
    model = create_model(args.model, input_size=latent, in_channels=args.channels, z_dims=[z],
                         projector_dim=args.projector_dim, encoder_depth=args.encoder_depth, cls_token_dim=z,
                         **options).to(device).train()
    model.grad_checkpointing = ckpt
    if args.compile:
        model.compile_blocks()
    opt = GuardedAdamW(make_optimizer(model.parameters(), "foreach", lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0))
    state = TrainState(model, opt, ema=copy.deepcopy(model).requires_grad_(False), precision=args.precision,
                       scaler=torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))
    g = torch.Generator().manual_seed(0)
    n, tokens = args.batch_size, (latent // SIT_CONFIGS[args.model][3]) ** 2
    batch = dict(
        x=torch.randn(n, args.channels, latent, latent, generator=g).to(device),
        y=torch.randint(0, 1000, (n,), generator=g).to(device),
        cls_token=torch.randn(n, z, generator=g).to(device),
        zs=[torch.randn(n, 1 + tokens, z, generator=g).to(device)],
    )
    return state, batch


def computed_activations(args, model) -> float:
    """benchmarks/flops.py's activation bytes for this variant and batch."""
    routing = None
    if model.routing != "none":
        routing = (model.routing, model.route_start, model.route_end, 1 - model.route_drop)
    cfg = model.config
    latent = args.resolution // args.latent_down
    return args.batch_size * sum(sit_activation_bytes(
        args.model, latent, args.enc_dim, (args.enc_dim,), args.projector_dim, args.precision,
        checkpointing=model.grad_checkpointing, routing=routing, norm=cfg["norm"], qk_norm=cfg["qk_norm"],
        rope=cfg["rope"], value_residual=cfg["value_residual"]).values())


def worker(args) -> dict:
    """Memory of one variant (its own process): warm up, then one measured step."""
    device = torch.device(args.device)
    model, batch = build(args, args.worker)
    for _ in range(args.warmup):
        step(model, batch)
    sync(device)
    before = None if device.type == "cuda" else status_kb("VmHWM") * 1024   # the CPU peak so far (warm-up)
    base = reset_peak(device)
    forward_backward(model, batch)
    sync(device)
    top = peak_bytes(device, base)                     # CUDA: the allocator's peak; CPU: peak RSS growth
    peak, growth = (top, top - base) if device.type == "cuda" else (max(before, base + top), top)
    return dict(peak=peak, growth=growth, computed=computed_activations(args, model.model))


def time_variants(args, names) -> dict:
    """All variants in this process, stepped round-robin: {name: [seconds per step]}."""
    device = torch.device(args.device)
    built = {}
    for name in names:
        built[name] = build(args, name)
        for _ in range(args.warmup):
            step(*built[name])
    times = {name: [] for name in names}
    for r in range(args.runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step(*built[name])
            sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


#################################################################################
#                                    Driver                                     #
#################################################################################

def build_parser():
    p = common_parser("Step time and memory of the SiT options, one process per variant.", model="SiT-S/2")
    p.add_argument("--latent-down", type=int, default=8, help="latent downsampling (SD-VAE 8; 16x VAEs 16)")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--enc-dim", type=int, default=768, help="encoder width (class token and alignment target)")
    p.add_argument("--encoder-depth", type=int, default=2,
                   help="projector tap; with routing it must lie in the dense head (SpeedrunDiT: 2)")
    add_runtime_args(p, runs=7, warmup_help="untimed steps per variant (compilation happens here)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.device = str(setup(args, p))
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        p.error(f"unknown --variants {bad}; choose from {', '.join(VARIANTS)}")
    if args.resolution % args.latent_down:
        p.error("--resolution must be a multiple of --latent-down")

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    forwarded = list(argv if argv is not None else sys.argv[1:])
    memory = {}
    for v in names:
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--worker", v, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode or line is None:
            sys.exit(f"variant {v} failed:\n{out.stderr.strip()[-2000:]}")
        memory[v] = json.loads(line[len("RESULT "):])
    times = time_variants(args, names)      # after the memory runs: a big parent would inflate them

    depth, dim, _, patch = SIT_CONFIGS[args.model]
    latent = args.resolution // args.latent_down
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.model} (depth {depth}, width {dim}), {latent}x{latent} latents = {(latent // patch) ** 2} tokens + class token, "
          f"batch {args.batch_size}, {args.precision}, REG with a {args.enc_dim}-wide token and a {args.projector_dim}-wide "
          f"projector at block {args.encoder_depth}, compile {'on' if args.compile else 'off'}")
    print(f"time: {args.runs} rounds, one step of every variant per round; memory: one step in a process of its own")
    cpu = not args.device.startswith("cuda")
    mem = "peak RSS" if cpu else "CUDA peak alloc."
    clock = "CPU ms" if cpu else ""
    print(f"{'variant':10s} {'wall ms':>8s} {'min':>6s} {clock:>8s} {'speed-up':>9s} {mem:>16s} "
          f"{'fwd+bwd growth':>17s} {'computed act.':>14s}")

    def key(v):  # the figure the speed-up is computed from: CPU time on a CPU, wall time on CUDA
        return statistics.median(t[1] if cpu else t[0] for t in times[v])
    for v in names:
        wall = [t[0] for t in times[v]]
        speed = f"{key('default') / key(v):.2f}x" if "default" in times else ""
        m = memory[v]
        cpu_ms = f"{key(v) * 1e3:8.0f}" if cpu else f"{'':8s}"
        print(f"{v:10s} {statistics.median(wall) * 1e3:8.0f} {min(wall) * 1e3:6.0f} {cpu_ms} {speed:>9s} "
              f"{m['peak'] / 2 ** 20:12.0f} MiB {m['growth'] / 2 ** 20:13.0f} MiB {m['computed'] / 2 ** 20:10.0f} MiB")


if __name__ == "__main__":
    main()
