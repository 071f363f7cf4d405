"""Analytic FLOPs of SiT (+ REG token, + REPA projectors) and of a ViT encoder, per image.

Counts matrix multiplies only (2 FLOPs per multiply-add); norms, activations, softmax and
elementwise work are left out, as is usual for MFU. A training step costs 3x the forward
(forward + backward for activations and weights); the frozen encoder costs 1x.

Check: SiT-XL/2 at 256 px (32x32 latents, 256 tokens) gives 118.6 G multiply-adds per
forward, the figure the DiT/SiT papers print as "Gflops" (they count multiply-adds).

Also the training memory of a SiT, computed from the architecture (not measured): the bytes
autograd keeps for the backward pass per image, block by block, with and without block
checkpointing (``sit_activation_bytes``), plus weights, gradients, AdamW state, EMA
(``static_train_bytes``).

    python benchmarks/flops.py --model SiT-XL/2 --encoder dinov2-vit-b --batch-size 32
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.sit import SIT_CONFIGS  # noqa: E402

# DINOv2 ViT/14 family: name -> (depth, width); heads do not change the FLOPs.
VIT_CONFIGS = {"s": (12, 384), "b": (12, 768), "l": (24, 1024), "g": (40, 1536)}
TINY_VIT = (2, 64)  # random-vit-tiny(-reg) of models/encoders.py

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},  # fp32 = TF32 tensor cores
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A6000": {"bf16": 154.8, "fp16": 154.8, "fp32": 77.4},
    "4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "V100": {"bf16": None, "fp16": 125.0, "fp32": 15.7},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak of the first table entry whose key occurs in the CUDA device name (None if unknown).
    fp32 assumes TF32 tensor cores are allowed; without them the real peak is far lower."""
    for key, row in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return row.get(precision)
    return None


#################################################################################
#                                   SiT                                         #
#################################################################################

def sit_macs(model: str, latent_size: int = 32, in_channels: int = 4, cls_token_dim: int = 768,
             z_dims=(768,), projector_dim: int = 2048, mlp_ratio: float = 4.0,
             with_projectors: bool = True) -> dict:
    """Multiply-adds of one SiT forward for one image, by part."""
    if model not in SIT_CONFIGS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(SIT_CONFIGS)}")
    depth, d, _, p = SIT_CONFIGS[model]
    t = (latent_size // p) ** 2                       # image tokens
    n = t + (1 if cls_token_dim else 0)               # + REG class token
    h = int(d * mlp_ratio)
    parts = {
        "patch_embed": t * in_channels * p * p * d,
        "cond": 256 * d + d * d + (cls_token_dim * d if cls_token_dim else 0),   # t-MLP, class-token embed
        "attn_linear": depth * n * 4 * d * d,         # qkv (3 D^2) + proj (D^2)
        "attn_scores": depth * 2 * n * n * d,         # q k^T and attn v
        "mlp": depth * 2 * n * d * h,
        "adaln": depth * 6 * d * d + 2 * d * d,       # per image, not per token
        "final": t * d * p * p * in_channels + (d * cls_token_dim if cls_token_dim else 0),
        "projectors": 0,
    }
    if with_projectors:
        parts["projectors"] = sum(n * (d * projector_dim + projector_dim * projector_dim + projector_dim * z)
                                  for z in z_dims)
    return parts


def vit_macs(encoder: str, resolution: int = 256) -> int:
    """Multiply-adds of one encoder forward for one image (DINOv2 at 224 * R / 256 px, 14 px patches)."""
    grid = (224 * resolution // 256) // 14
    t = grid * grid
    if encoder.startswith("random-vit-tiny"):
        depth, d = TINY_VIT
        mlp_per_token = 2 * d * 4 * d
    elif encoder.startswith("dinov2-vit-"):
        size = encoder.split("-")[2]
        if size not in VIT_CONFIGS:
            raise ValueError(f"unknown DINOv2 size in {encoder!r}")
        depth, d = VIT_CONFIGS[size]
        # giant: SwiGLU with 4096 hidden (three D x 4096 linears); the others: GELU MLP, 4D hidden
        mlp_per_token = 3 * d * 4096 if size == "g" else 2 * d * 4 * d
    else:
        raise ValueError(f"unknown encoder {encoder!r}")
    n = 1 + t + (4 if encoder.endswith("-reg") else 0)
    per_block = n * 4 * d * d + 2 * n * n * d + n * mlp_per_token
    return t * 3 * 14 * 14 * d + depth * per_block


def train_flops_per_image(model, latent_size, in_channels, cls_token_dim, z_dims, projector_dim,
                          encoder=None, resolution=256) -> float:
    """FLOPs of one training step per image: 3 x SiT forward (+ 1 x encoder forward if online)."""
    sit = sum(sit_macs(model, latent_size, in_channels, cls_token_dim, z_dims, projector_dim).values())
    enc = vit_macs(encoder, resolution) if encoder else 0
    return 2.0 * (3 * sit + enc)


#################################################################################
#                    Training memory (computed, not measured)                   #
#################################################################################
# What autograd saves for the backward pass, tensor by tensor, for the SiT block of models/sit.py
# on CUDA: attention through SDPA's flash / memory-efficient kernels (they save q, k, v, the
# output and an O(L) logsumexp, never the L x L scores; the output is laid out (N, L, H, hd), so
# proj reads it without a copy), fused norms (LayerNorm, RMSNorm: input + statistics), and
# torch.autocast's CUDA policy under bf16/fp16: linears/SDPA in half precision (their inputs are
# saved as half-precision copies), norms in float32, the residual stream float32 (the patch
# embedding's output + the float32 pos_embed). The fp32 count of the default block equals what
# torch's saved-tensor hooks record (tests/test_model_options.py checks it on the CPU).

def block_activation_bytes(tokens: int, width: int, heads: int, mlp_ratio: float = 4.0, precision: str = "bf16",
                           norm: str = "layernorm", qk_norm: bool = False, rope: bool = False,
                           value_residual: bool = False) -> dict:
    """Bytes saved for backward by ONE SiT block for ONE image of ``tokens`` tokens, by tensor."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    lp = 4 if precision == "fp32" else 2            # bytes of a tensor computed by a linear / SDPA
    L, D, hidden = tokens, width, int(width * mlp_ratio)
    stats = 8 if norm == "layernorm" else 4         # float32 mean + rstd, or rstd, per row
    parts = {
        "block input x (fp32 stream, kept by norm1)": 4 * L * D,
        "norm1 output (fp32, kept by the modulation)": 4 * L * D,
        "qkv input (modulated; half copy under autocast)": lp * L * D,
        "qkv output (q, k, v kept by attention)": 3 * lp * L * D,
        "attention output (kept by SDPA and by proj)": lp * L * D,
        "attention logsumexp (fp32, per head)": 4 * L * heads,
        "proj output (kept by the gate)": lp * L * D,
        "residual after attention (fp32, kept by norm2)": 4 * L * D,
        "norm2 output (fp32, kept by the modulation)": 4 * L * D,
        "fc1 input (modulated; half copy)": lp * L * D,
        "fc1 output (kept by GELU)": lp * L * hidden,
        "GELU output (kept by fc2)": lp * L * hidden,
        "fc2 output (kept by the gate)": lp * L * D,
        "norm statistics": 2 * stats * L,
        "adaLN input, output and 1 + scale (per image)": 9 * lp * D,
    }
    if qk_norm or rope:
        parts["q, k after qk-norm / rope (kept by attention)"] = 2 * lp * L * D
    if qk_norm:
        # the norms keep a float32 copy of q, k (autocast casts them up; RMSNorm makes them contiguous)
        upcast = 2 * 4 * L * D if (lp < 4 or norm == "rmsnorm") else 0
        parts["qk-norm inputs and statistics"] = upcast + 2 * heads * L * stats
    if value_residual:
        parts["mixed values (kept by attention)"] = lp * L * D
    return parts


def sit_activation_bytes(model: str, latent_size: int = 32, cls_token_dim: int = 768, z_dims=(768,),
                         projector_dim: int = 2048, precision: str = "bf16", checkpointing: bool = False,
                         routing: tuple | None = None, mlp_ratio: float = 4.0, **block_options) -> dict:
    """Activation bytes per image of one SiT training step (forward kept for backward), by part.

    checkpointing: each block keeps only its input (the fp32 stream) and one block's activations
    are rebuilt at a time in the backward pass (counted once). routing: (kind, start, end, keep),
    kind "sprint" or "tread", keep = fraction of image tokens the blocks [start, end) process
    (SPRINT 0.25, TREAD 0.5); the class token is always processed.
    block_options: norm, qk_norm, rope, value_residual (see block_activation_bytes)."""
    if model not in SIT_CONFIGS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(SIT_CONFIGS)}")
    depth, d, heads, p = SIT_CONFIGS[model]
    lp = 4 if precision == "fp32" else 2
    t = (latent_size // p) ** 2
    extra = 1 if cls_token_dim else 0
    n = t + extra
    per_block = [n] * depth
    if routing is not None:
        _, start, end, keep = routing
        routed = extra + max(1, round(t * keep))
        per_block[start:end] = [routed] * (end - start)

    def block(tokens):
        return sum(block_activation_bytes(tokens, d, heads, mlp_ratio, precision, **block_options).values())
    parts = {}
    if checkpointing:
        parts["block inputs kept by checkpointing (fp32)"] = sum(4 * tokens * d for tokens in per_block)
        parts["one block rebuilt in the backward pass"] = max(block(tokens) for tokens in per_block)
    else:
        parts["blocks"] = sum(block(tokens) for tokens in per_block)
    parts["final layer (norm input and output, linear input)"] = (8 + lp) * n * d + 8 * n
    # projectors: half copy of their input, 4 P-wide activations, the output normalised in fp32 by the loss
    parts["projectors + alignment loss"] = sum((lp * d + 4 * lp * projector_dim + lp * z + 8 * z) * n for z in z_dims)
    if routing is not None and routing[0] == "sprint":
        parts["SPRINT fusion input (dense head + padded sparse output)"] = 2 * lp * n * d
    return parts


def sit_param_count(model: str, latent_size: int = 32, cls_token_dim: int = 768, z_dims=(768,),
                    projector_dim: int = 2048, **options) -> int:
    """Trainable parameters of the SiT (built on the meta device: no memory, no init)."""
    import torch
    from models.sit import create_model
    depth = SIT_CONFIGS[model][0]
    with torch.device("meta"):
        m = create_model(model, input_size=latent_size, z_dims=list(z_dims), projector_dim=projector_dim,
                         cls_token_dim=cls_token_dim, encoder_depth=min(8, depth), **options)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def static_train_bytes(params: int, precision: str = "bf16", ddp_buckets: bool = False) -> dict:
    """Memory that does not scale with the batch: fp32 weights, fp32 gradients, AdamW's two fp32
    moments, the fp32 EMA copy, and (autocast) the half-precision weight copies the backward pass
    keeps; DDP's gradient buckets add one more fp32 copy unless gradient_as_bucket_view."""
    parts = {"weights (fp32)": 4 * params, "gradients (fp32)": 4 * params,
             "AdamW exp_avg + exp_avg_sq (fp32)": 8 * params, "EMA (fp32)": 4 * params}
    if precision != "fp32":
        parts["autocast half weight copies (kept for backward)"] = 2 * params
    if ddp_buckets:
        parts["DDP gradient buckets (fp32)"] = 4 * params
    return parts


def print_memory(model: str, latent_size: int, batch: int, precision: str, cls_token_dim: int, z_dims,
                 projector_dim: int) -> None:
    gib = 1024 ** 3
    params = sit_param_count(model, latent_size, cls_token_dim, z_dims, projector_dim)
    static = static_train_bytes(params, precision)
    print(f"\nTraining memory of {model} ({latent_size}x{latent_size} latents, {params / 1e6:.1f} M parameters), "
          f"batch {batch} per GPU, {precision} autocast - COMPUTED, NOT MEASURED:")
    for k, v in static.items():
        print(f"  {k:50s} {v / gib:7.2f} GiB")
    static_total = sum(static.values())
    print(f"  {'static total':50s} {static_total / gib:7.2f} GiB  (+ {4 * params / gib:.2f} GiB with DDP's own gradient buckets)")
    for ckpt in (False, True):
        act = sit_activation_bytes(model, latent_size, cls_token_dim, z_dims, projector_dim, precision, checkpointing=ckpt)
        per_image = sum(act.values())
        label = "with block checkpointing" if ckpt else "without checkpointing"
        print(f"  activations {label:26s} {per_image / 2 ** 20:8.1f} MiB/image x {batch} = {batch * per_image / gib:6.2f} GiB"
              f"  -> total ~{(static_total + batch * per_image) / gib:.1f} GiB")
        for k, v in act.items():
            print(f"      {k:52s} {v / 2 ** 20:8.1f} MiB/image")
    print("  (not counted: the CUDA context and allocator slack, ~1-3 GiB; the frozen encoder when run online;"
          " the activation gradients in flight, a few x 4*L*D per image)")


def main(argv=None):
    p = argparse.ArgumentParser(description="Analytic FLOPs of SiT (+ encoder) per image.")
    p.add_argument("--model", default="SiT-XL/2", choices=list(SIT_CONFIGS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--encoder", default="dinov2-vit-b")
    p.add_argument("--no-cls-token", action="store_true", help="REPA (no REG class token)")
    p.add_argument("--projector-dim", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32, help="per-GPU batch for the memory estimate (paper: 256 / 8 GPUs)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype for the memory estimate")
    args = p.parse_args(argv)
    if args.resolution % 16:
        p.error("--resolution must be a multiple of 16")
    from models.encoders import ENCODER_WIDTHS
    if args.encoder not in ENCODER_WIDTHS:
        p.error(f"unknown --encoder {args.encoder!r}; choose from {', '.join(ENCODER_WIDTHS)}")
    z = ENCODER_WIDTHS[args.encoder]
    parts = sit_macs(args.model, args.resolution // 8, 4, 0 if args.no_cls_token else z, (z,), args.projector_dim)
    fwd = sum(parts.values())
    enc = vit_macs(args.encoder, args.resolution)
    print(f"{args.model} at {args.resolution} px, multiply-adds per image (G):")
    for k, v in parts.items():
        print(f"  {k:13s} {v / 1e9:9.3f}")
    print(f"  {'total':13s} {fwd / 1e9:9.3f}   (sampling skips the projectors: {(fwd - parts['projectors']) / 1e9:.3f})")
    print(f"{args.encoder} forward: {enc / 1e9:.3f} G multiply-adds")
    print(f"training FLOPs per image: {2 * 3 * fwd / 1e9:.1f} G (cached features), "
          f"{2 * (3 * fwd + enc) / 1e9:.1f} G (encoder online)")
    print_memory(args.model, args.resolution // 8, args.batch_size, args.precision,
                 0 if args.no_cls_token else z, (z,), args.projector_dim)


if __name__ == "__main__":
    main()
