"""The first check on a GPU machine, one table: is training fast, is it finite, does compile agree.

Rows (random weights; the encoder is DINOv2-B's architecture; 256 px):

  train     SiT-B/2 and SiT-XL/2: images/s, MFU and peak memory for fp16 (the release's setting),
            bf16, bf16 + compile, bf16 + compile + activation checkpointing, with cached features
            and with the encoder online (train.py's own train_step, as bench_train.py runs it)
  sample    SiT-B/2 / SiT-XL/2 SDE sampling images/s, eager and compiled
  finite    SiT-B/2: losses over 50 steps in fp16, bf16 and fp32, all finite? (and skipped steps)
  compile   SiT-B/2 bf16: the compiled step's losses against the eager step's, same draws
  release   with --release-dir: the release's own REPA model in the release's loop (fp16, cached
            features) next to the project's step on the same REPA configuration

    bash benchmarks/gpu_check.sh                         # one GPU, about 8 minutes
    bash benchmarks/gpu_check.sh --release-dir ~/REG     # + the release's step side by side
    python benchmarks/gpu_check.py --tiny                # CPU: tiny sizes, seconds (what the test runs)

--tiny (automatic without a GPU): SiT-XS/2 at 32 px with a random ViT-tiny encoder, batch 2, a
64-wide projector, 10 finite-loss steps, no compile rows (they need a GPU to be worth their compile time).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_train import build_variant, make_encoder  # noqa: E402
from benchmarks.common import peak_bytes, reset_peak, sync  # noqa: E402
from benchmarks.flops import peak_tflops, train_flops_per_image  # noqa: E402
from models.sit import SIT_CONFIGS, create_model, paper_encoder_depth  # noqa: E402
from samplers import euler_maruyama_sampler  # noqa: E402

COLUMNS = ("check", "model", "setting", "features", "img/s", "MFU", "peak mem", "result")
# (setting, precision, compile, activation checkpointing, feature modes)
TRAIN_SETTINGS = [
    ("fp16 (release)", "fp16", False, False, ("cached", "online")),
    ("bf16", "bf16", False, False, ("cached",)),
    ("bf16+compile", "bf16", True, False, ("cached", "online")),
    ("bf16+compile+ckpt", "bf16", True, True, ("cached",)),
]


def sizes(args) -> SimpleNamespace:
    if args.tiny:
        return SimpleNamespace(models=("SiT-XS/2",), resolution=32, encoder="random-vit-tiny", batch=2, projector_dim=64,
                               warmup=1, timed=1, loss_steps=args.loss_steps or 10, sample_batch=2, sample_steps=4,
                               compile=False)
    return SimpleNamespace(models=("SiT-B/2", "SiT-XL/2"), resolution=256, encoder="dinov2-vit-b", batch=args.batch_size,
                           projector_dim=2048, warmup=3, timed=args.steps, loss_steps=args.loss_steps or 50,
                           sample_batch=64, sample_steps=50, compile=True)


def variant_args(sz, model, precision, compile_, ckpt, repa=False) -> SimpleNamespace:
    """The namespace bench_train.build_variant reads."""
    return SimpleNamespace(model=model, resolution=sz.resolution, projector_dim=sz.projector_dim, precision=precision,
                           compile=compile_, grad_checkpointing=ckpt, batch_size=sz.batch, repa_config=repa)


def row(check, model, setting, features="", img_s=None, mfu=None, peak=None, result=""):
    return dict(zip(COLUMNS, (check, model, setting, features, img_s, mfu, peak, result)))


#################################################################################
#                                    Checks                                     #
#################################################################################

def time_steps(step, device, sz):
    """(images/s, peak bytes, the last output) over sz.timed steps after sz.warmup."""
    for _ in range(sz.warmup):
        step()
    sync(device)
    base = reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(sz.timed):
        out = step()
    sync(device)
    return sz.batch * sz.timed / (time.perf_counter() - t0), peak_bytes(device, base), out


def train_rows(args, sz, device, encoder, dev_name):
    rows = []
    for model in sz.models:
        for setting, precision, compile_, ckpt, modes in TRAIN_SETTINGS:
            if compile_ and not sz.compile:
                continue
            peak = peak_tflops(dev_name, precision) if device.type == "cuda" else None
            for mode in modes:
                step, _ = build_variant(variant_args(sz, model, precision, compile_, ckpt), "project", mode,
                                           device, encoder, None)
                img_s, mem, out = time_steps(step, device, sz)
                flops = train_flops_per_image(model, sz.resolution // 8, 4, encoder.embed_dim, [encoder.embed_dim], sz.projector_dim,
                                              sz.encoder if mode == "online" else None, sz.resolution)
                rows.append(row("train", model, setting, mode, img_s, flops * img_s / (peak * 1e12) if peak else None, mem,
                                f"loss {out['loss_final'].item():.4f}"))
                del step
                free(device)
    return rows


def finite_rows(sz, device, encoder, model):
    """50 steps per precision: every loss finite, no update skipped."""
    rows = []
    for precision in ("fp16", "bf16", "fp32"):
        step, _ = build_variant(variant_args(sz, model, precision, False, False), "project", "cached", device, encoder, None)
        torch.manual_seed(0)
        outs = [step() for _ in range(sz.loss_steps)]
        losses = torch.stack([o["loss_final"] for o in outs]).float().cpu()
        finite = int(torch.isfinite(losses).sum())
        skipped = int(sum(int(not bool(o["finite"])) for o in outs))
        rows.append(row("finite", model, precision, "cached",
                        result=f"{finite}/{len(outs)} finite losses, {skipped} skipped; loss {losses[0]:.4f} -> {losses[-1]:.4f}"))
        del step
        free(device)
    return rows


def compile_rows(sz, device, encoder, model, steps: int = 3):
    """The compiled step against the eager one from the same weights and draws (bf16)."""
    losses = {}
    for compile_ in (False, True):
        step, _ = build_variant(variant_args(sz, model, "bf16", compile_, False), "project", "cached", device, encoder, None)
        torch.manual_seed(1)
        losses[compile_] = torch.stack([step()["loss_final"].float() for _ in range(steps)]).cpu()
        del step
        free(device)
    rel = ((losses[True] - losses[False]).abs() / losses[False].abs()).max().item()
    return [row("compile", model, "bf16 compiled vs eager", "cached",
                result=f"max relative loss difference {rel:.1e} over {steps} steps")]


def sample_rows(sz, device, model_name, enc_dim: int = 768):
    rows = []
    h = sz.resolution // 8
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(sz.sample_batch, 4, h, h, generator=g).to(device)
    y = torch.randint(0, 1000, (sz.sample_batch,), generator=g).to(device)
    cls = torch.randn(sz.sample_batch, enc_dim, generator=g).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    for compile_ in ((False, True) if sz.compile else (False,)):
        torch.manual_seed(0)
        model = create_model(model_name, input_size=h, z_dims=[enc_dim], cls_token_dim=enc_dim, projector_dim=sz.projector_dim,
                             encoder_depth=paper_encoder_depth(SIT_CONFIGS[model_name][0])).to(device).eval()
        if compile_:
            model.compile_blocks()

        def run(model=model):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return euler_maruyama_sampler(model, latents, y, num_steps=sz.sample_steps, cfg_scale=1.0, cls_latents=cls)
        run()
        sync(device)
        t0 = time.perf_counter()
        out = run()
        sync(device)
        img_s = sz.sample_batch / (time.perf_counter() - t0)
        ok = bool(torch.isfinite(out[0] if isinstance(out, tuple) else out).all())
        rows.append(row("sample", model_name, ("bf16" if dtype else "fp32") + (" compile" if compile_ else " eager"),
                        img_s=img_s, result=f"SDE {sz.sample_steps} steps, no guidance; samples finite: {ok}"))
        del model
        free(device)
    return rows


def release_rows(args, sz, device, encoder):
    """The release's own model and loop next to the project's step on the same REPA configuration."""
    if not args.release_dir:
        return [row("release", "-", "-", result="skipped: no --release-dir (a checkout of the REG release)")]
    import importlib
    sys.path.insert(0, os.path.abspath(args.release_dir))
    release_mod = importlib.import_module("repa_sit")
    rows = []
    for model in sz.models:
        for variant in ("project", "release-ref"):
            step, _ = build_variant(variant_args(sz, model, "fp16", False, False, repa=True), variant, "cached",
                                    device, encoder, release_mod)
            img_s, mem, _ = time_steps(step, device, sz)
            rows.append(row("release", model, f"{variant} (REPA cfg) fp16", "cached", img_s, None, mem))
            del step
            free(device)
    return rows


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


#################################################################################
#                                     Main                                      #
#################################################################################

def fmt(r):
    img = "" if r["img/s"] is None else f"{r['img/s']:.1f}"
    mfu = "" if r["MFU"] is None else f"{100 * r['MFU']:.1f}%"
    mem = "" if r["peak mem"] is None else f"{r['peak mem'] / 2**30:.2f} GiB"
    return f"| {r['check']} | {r['model']} | {r['setting']} | {r['features']} | {img} | {mfu} | {mem} | {r['result']} |"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without a GPU)")
    p.add_argument("--batch-size", type=int, default=32, help="training images per step (paper: 256 over 8 GPUs)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    p.add_argument("--loss-steps", type=int, default=None, help="steps of the finite-loss check per precision (default: 50; --tiny: 10)")
    p.add_argument("--release-dir", default=None, metavar="PATH",
                   help="a checkout of the REG release (its repa_sit.py): time the release's own step too")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def main(argv=None) -> list[dict]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or (args.loss_steps is not None and args.loss_steps < 1):
        p.error("--batch-size, --steps and --loss-steps must be positive")
    if args.release_dir and not os.path.isfile(os.path.join(args.release_dir, "repa_sit.py")):
        p.error(f"--release-dir {args.release_dir} holds no repa_sit.py; pass a checkout of the REG release")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but torch sees no GPU")
    args.tiny = args.tiny or device.type != "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 rows as the release runs them
        torch.backends.cudnn.allow_tf32 = True
    sz = sizes(args)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"gpu_check: {device} ({dev_name}); torch {torch.__version__}; {'tiny sizes' if args.tiny else 'paper sizes'}: "
          f"{', '.join(sz.models)} at {sz.resolution} px, encoder {sz.encoder} (random weights), batch {sz.batch}, "
          f"{sz.timed} timed steps after {sz.warmup}")
    t0 = time.perf_counter()
    encoder = make_encoder(sz.encoder, sz.resolution, device)
    first = sz.models[0]
    rows = train_rows(args, sz, device, encoder, dev_name)
    rows += [r for m in sz.models for r in sample_rows(sz, device, m)]
    rows += finite_rows(sz, device, encoder, first)
    if sz.compile:
        rows += compile_rows(sz, device, encoder, first)
    else:
        rows.append(row("compile", first, "-", result="skipped: compile rows run on a GPU only"))
    rows += release_rows(args, sz, device, encoder)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print(fmt(r))
    print(f"MFU: analytic model FLOPs (benchmarks/flops.py) x img/s / the device's peak; took {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
