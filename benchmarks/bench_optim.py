"""The optimizer side of a training step: bytes moved and time of one AdamW step and one EMA
update, for each --adam-impl, on a SiT's own parameter set.

Bytes are counted, not guessed: every aten op the step dispatches is seen by a
TorchDispatchMode, and each tensor operand it reads (inputs) or writes (outputs, and inputs the
op mutates) adds its size once. That is the traffic of kernels that do not reuse an operand from
cache (addcmul(v, g, g) reads g twice) and of fused AdamW as its schema declares it (the grads
counted as written too); views move nothing; "passes" = bytes / the bytes of the weights in fp32.

    python benchmarks/bench_optim.py                       # CPU: SiT-B/2's parameters
    python benchmarks/bench_optim.py --model SiT-XL/2      # one GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks.common import setup, sync  # noqa: E402
from optim import GuardedAdamW, make_optimizer, update_ema  # noqa: E402

ADAM_KW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)   # the release's AdamW


#################################################################################
#                                 Byte counting                                  #
#################################################################################

class ByteCounter(TorchDispatchMode):
    """Sums the bytes each dispatched op reads and writes (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out                       # a view (detach, ...): no data moves
        reads = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        written = []
        for i, arg in enumerate(func._schema.arguments):   # operands the op mutates (in-place, out=) are written too
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs[arg.name] if arg.name in kwargs else (args[i] if i < len(args) else None)
                written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        fresh = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                 and not any(t is w or (t.data_ptr() == w.data_ptr() and t.numel() == w.numel()) for w in written)]
        self.bytes += sum(t.numel() * t.element_size() for t in reads + written + fresh)
        self.ops += 1
        return out


def count_bytes(fn) -> int:
    """Bytes read and written by the aten ops fn() dispatches."""
    with ByteCounter() as counter:
        fn()
    return counter.bytes


#################################################################################
#                                  The variants                                  #
#################################################################################

def param_set(model: str, device, latent_size: int = 32, enc_dim: int = 768):
    """The fp32 parameters of a SiT (REG class token + one REPA projector, as trained), with grads."""
    from models.sit import SIT_CONFIGS, create_model, paper_encoder_depth
    torch.manual_seed(0)
    net = create_model(model, input_size=latent_size, z_dims=[enc_dim], cls_token_dim=enc_dim,
                       encoder_depth=paper_encoder_depth(SIT_CONFIGS[model][0]))
    params = [p.detach().to(device).requires_grad_(True) for p in net.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def optimizer_variants(device) -> dict:
    """name -> how to build a stepper(params) whose call is one optimizer step. 'torch foreach' is
    torch's own multi-tensor AdamW (the release's kernels on CUDA); the guarded ones are
    train.py's --nonfinite skip with each --adam-impl, masked as on an accelerator."""
    def torch_opt(**kw):
        def build(params):
            opt = torch.optim.AdamW(params, **ADAM_KW, **kw)
            return opt.step
        return build

    def guarded(impl, masked):
        def build(params):
            opt = GuardedAdamW(make_optimizer(params, impl, **ADAM_KW), masked=masked)
            ok = torch.tensor(True, device=device)
            return lambda: opt.step(ok)
        return build

    variants = {
        "torch foreach": torch_opt(foreach=True),
        "torch fused": torch_opt(fused=True),
        "guarded foreach": guarded("foreach", True),
        "guarded fused": guarded("fused", True),
    }
    if device.type == "cpu":
        variants["guarded foreach (CPU branch)"] = guarded("foreach", False)
    return variants


def ema_variants(ema_params, params) -> dict:
    def release_loop():
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
    return {"EMA (update_ema)": lambda: update_ema(ema_params, params, 0.9999),
            "EMA (release loop)": release_loop}


def time_call(fn, device, runs: int, warmup: int = 1) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(params, device, runs: int, step_s: float | None = None, names=None) -> list[dict]:
    """One row per optimizer variant and EMA form: bytes per step, passes over the weights, ms per
    step, and the share of step_s (a whole training step) when given."""
    weight_bytes = sum(p.numel() * 4 for p in params)
    rows = []
    builders = {k: v for k, v in optimizer_variants(device).items() if names is None or k in names}
    for name, build in builders.items():
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        for p, q in zip(ps, params):
            p.grad = q.grad.clone()
        try:
            stepper = build(ps)
        except (RuntimeError, ValueError) as e:
            rows.append(dict(name=name, error=str(e).splitlines()[0]))
            continue
        stepper()                                  # lazy state init outside the count
        nbytes = count_bytes(stepper)
        rows.append(dict(name=name, bytes=nbytes, passes=nbytes / weight_bytes, s=time_call(stepper, device, runs)))
        del ps, stepper
    ema = [p.detach().clone() for p in params]
    for name, fn in ema_variants(ema, params).items():
        nbytes = count_bytes(fn)
        rows.append(dict(name=name, bytes=nbytes, passes=nbytes / weight_bytes, s=time_call(fn, device, runs)))
    if step_s:
        for r in rows:
            if "s" in r:
                r["share"] = r["s"] / step_s
    return rows


def print_rows(rows, weight_bytes: int) -> None:
    print(f"{'optimizer side':30s} {'GB/step':>8s} {'passes':>7s} {'ms/step':>8s} {'share':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:30s} not available: {r['error']}")
            continue
        share = f"{100 * r['share']:5.1f}%" if "share" in r else "    -"
        print(f"{r['name']:30s} {r['bytes'] / 1e9:8.3f} {r['passes']:7.1f} {1e3 * r['s']:8.1f} {share:>6s}")
    print(f"passes: bytes read + written per step / the fp32 weights ({weight_bytes / 1e6:.0f} MB), "
          "each operand of each op counted once (benchmarks/bench_optim.py)")


def main(argv=None):
    from models.sit import SIT_CONFIGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="SiT-B/2", choices=list(SIT_CONFIGS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--step-ms", type=float, default=None, help="a whole training step's time, for the share column")
    args = p.parse_args(argv)
    device = setup(args, p)
    params = param_set(args.model, device)
    n = sum(q.numel() for q in params)
    print(f"device {device}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.model}: {n / 1e6:.1f} M parameters "
          f"in {len(params)} tensors")
    rows = measure(params, device, args.runs, args.step_ms / 1e3 if args.step_ms else None)
    print_rows(rows, 4 * n)


if __name__ == "__main__":
    main()
