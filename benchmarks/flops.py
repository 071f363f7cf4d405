"""Analytic FLOPs of SiT (+ REG token, + REPA projectors) and of a ViT encoder, per image.

Counts matrix multiplies only (2 FLOPs per multiply-add); norms, activations, softmax and
elementwise work are left out, as is usual for MFU. A training step costs 3x the forward
(forward + backward for activations and weights); the frozen encoder costs 1x.

Check: SiT-XL/2 at 256 px (32x32 latents, 256 tokens) gives 118.6 G multiply-adds per
forward, the figure the DiT/SiT papers print as "Gflops" (they count multiply-adds).

    python benchmarks/flops.py --model SiT-XL/2 --encoder dinov2-vit-b
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Analytic FLOPs of SiT (+ encoder) per image.")
    p.add_argument("--model", default="SiT-XL/2", choices=list(SIT_CONFIGS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--encoder", default="dinov2-vit-b")
    p.add_argument("--no-cls-token", action="store_true", help="REPA (no REG class token)")
    p.add_argument("--projector-dim", type=int, default=2048)
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


if __name__ == "__main__":
    main()
