"""A semantic encoder for the built-in digits, self-supervised, in a few minutes on a CPU.

    python demo/train_encoder.py --out enc/dinov2_vittiny14_digits.pth [--steps 300 --batch-size 128]

Trains ``dinov2-vit-tiny`` (DINOv2's architecture at depth 4, width 128, 4 heads, patch 14: the
registry's entry) with SimCLR's contrastive objective (NT-Xent, Chen et al. 2020) on two augmented
views of each digit: random affine warps (rotation +-15 deg, scale 0.8-1.2, shear, translation
+-5 px at 64 px), contrast 0.6-1.2 and pixel noise; no flips (a flipped digit is another symbol).
The loss reads the *class token* (the encoder's global token, which REG denoises) through a small
projection head that is thrown away; no labels are used. The images go through the encoder's own
preprocessing (``Encoder.preprocess``: x/255, ImageNet normalisation, bicubic to 224 * R / 256 px),
so training sees exactly what cache-features and train.py feed it.

Every 6th digit (299 of 1,797) is held out of training. At the end the class token is scored on
them: k-nearest-neighbour accuracy (k = 10, cosine) with the other digits as the labelled memory,
for the trained encoder and for a random-weight encoder of the same architecture (timm's init).

Writes, atomically: OUT in the official DINOv2 layout (``models.encoders.save_official_layout``),
loadable through the same path as a DINOv2 checkpoint (``--enc-type dinov2-vit-tiny --enc-weights
OUT`` for cache-features, ``REG_DINOV2_WEIGHTS=OUT`` for train.py), and OUT.json (settings, losses,
the probe, the time). Seeded; rerunning with the same settings reuses the file.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ENCODER = "dinov2-vit-tiny"
HOLDOUT_EVERY = 6
KNN_K = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Self-supervised (SimCLR) dinov2-vit-tiny on the built-in digits.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="weights file to write (official DINOv2 layout); OUT.json beside it")
    p.add_argument("--resolution", type=int, default=64, help="image size the encoder is built for (the data's)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128, help="digits per step (two views each)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warmup then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    p.add_argument("--layer-scale-init", type=float, default=1.0,
                   help="initial LayerScale of every block (timm's DINOv2 init: 1e-5, which leaves the class token "
                        "almost the same for every image after a short run)")
    p.add_argument("--head-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="batch norm in the projection head (SimCLR's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N digits (tests)")
    p.add_argument("--log-every", type=int, default=25)
    return p


# ----------------------------------------------------------------------------------------------------
# Data and augmentations
# ----------------------------------------------------------------------------------------------------

def digits_split(resolution: int, max_images: int | None = None):
    """(images uint8 (N, R, R, 3) as the built-in data renders them, labels (N,), held-out mask (N,))."""
    from evaluations.digits import load_digits_data, render_digits
    images8, labels = load_digits_data()
    if max_images:
        images8, labels = images8[:max_images], labels[:max_images]
    held_out = np.arange(len(labels)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return render_digits(images8, resolution), labels, held_out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of grey digits x (B, 1, R, R) in 0..1 -> (B, 3, R, R) in 0..255."""
    b = x.shape[0]

    def u(lo, hi, shape=(b,)):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    angle = u(-15, 15) * math.pi / 180
    scale = u(0.8, 1.2)
    shear = u(-0.15, 0.15)
    shift = u(-0.15, 0.15, (b, 2))               # in [-1, 1] coordinates: +-0.15 = +-4.8 px at 64 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)          # output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    v = v * u(0.6, 1.2).view(b, 1, 1, 1)                                      # contrast
    v = v + u(0.0, 0.1).view(b, 1, 1, 1) * torch.randn(v.shape, generator=gen)  # pixel noise
    return (v.clamp(0, 1) * 255.0).expand(-1, 3, -1, -1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2B - 1 other views (cosine / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.t() / temperature
    n = len(z1)
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------------------------------
# The class-token probe
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def class_tokens(encoder, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The encoder's global token (what cache-features stores first) of uint8 images (N, R, R, 3)."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.as_tensor(images[s:s + batch_size]).permute(0, 3, 1, 2)
        glob, _ = encoder(x)
        out.append(glob.float().numpy())
    return np.concatenate(out)


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, held_out: np.ndarray, k: int = KNN_K) -> float:
    """Held-out accuracy of a k-nearest-neighbour vote (cosine similarity) with the other digits as memory."""
    f = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    sim = f[held_out] @ f[~held_out].T                        # (test, memory)
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = labels[~held_out][nn_idx]
    pred = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float((pred == labels[held_out]).mean())


def probe(encoder, images, labels, held_out) -> float:
    return knn_accuracy(class_tokens(encoder, images), labels, held_out)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def initial_encoder(args):
    """The starting point: timm's DINOv2 init under the seed, then every block's LayerScale set to
    ``--layer-scale-init``."""
    from models.encoders import random_encoder

    encoder = random_encoder(ENCODER, args.resolution, seed=args.seed)
    with torch.no_grad():
        for name, p in encoder.backbone.named_parameters():
            if name.endswith(".gamma"):                         # the blocks' LayerScale
                p.fill_(args.layer_scale_init)
    return encoder


def train_encoder(images: np.ndarray, args, log=print):
    """SimCLR on ``images`` (uint8 (N, R, R, 3)); returns (the trained Encoder, list of (step, loss))."""
    encoder = initial_encoder(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        norm = torch.nn.BatchNorm1d(256) if args.head_bn else torch.nn.Identity()
        head = torch.nn.Sequential(torch.nn.Linear(encoder.embed_dim, 256), norm, torch.nn.ReLU(),
                                   torch.nn.Linear(256, 64))    # SimCLR's projection head, thrown away after
    encoder.backbone.requires_grad_(True)
    params = list(encoder.backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 10)

    def lr_at(step):                 # linear warmup, then cosine to 0
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    grey = torch.as_tensor(images[..., 0], dtype=torch.float32).unsqueeze(1) / 255.0   # (N, 1, R, R)
    gen = torch.Generator().manual_seed(args.seed)
    batch = min(args.batch_size, len(grey))
    order, pos, losses = torch.randperm(len(grey), generator=gen), 0, []
    for step in range(args.steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(grey), generator=gen), 0
        x = grey[order[pos:pos + batch]]
        pos += batch
        views = torch.cat([augment(x, gen), augment(x, gen)])
        glob, _ = encoder.features(encoder.preprocess(views))
        z = head(glob)
        loss = nt_xent(z[:batch], z[batch:], args.temperature)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append((step + 1, float(loss.detach())))
        if log and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            log(f"step {step + 1}/{args.steps}  nt-xent {losses[-1][1]:.4f}  (chance {math.log(2 * batch - 1):.2f})")
    encoder.backbone.requires_grad_(False)
    return encoder.eval(), losses


def settings(args) -> dict:
    keys = ("resolution", "steps", "batch_size", "lr", "weight_decay", "temperature", "seed", "max_images",
            "layer_scale_init", "head_bn")
    return {k: getattr(args, k) for k in keys} | {"encoder": ENCODER, "objective": "simclr-nt-xent"}


def token_spread(feats: np.ndarray) -> dict:
    """How much a token varies between images: what REG's noised class token can carry."""
    f = np.asarray(feats, np.float64)
    unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return {"mean_square": float((f ** 2).mean()), "across_image_variance": float(f.var(axis=0).mean()),
            "mean_pairwise_cosine": float((unit @ unit.T).mean())}


def trained_report(args) -> dict | None:
    """The report of an encoder file already trained with these settings (and unchanged since), else None."""
    from fileio import file_sha256, read_json
    report_path = args.out + ".json"
    if not (os.path.isfile(args.out) and os.path.isfile(report_path)):
        return None
    try:
        report = read_json(report_path)
    except (OSError, ValueError):
        return None
    if report.get("settings") == settings(args) and report.get("sha256") == file_sha256(args.out):
        return report
    return None


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from evaluations.digits import to_digits_format
    from fileio import atomic_write_json, file_sha256
    from models.encoders import build_encoder, random_encoder, save_official_layout

    report_path = args.out + ".json"
    report = trained_report(args)
    if report is not None:
        print(f"{args.out}: already trained with these settings (k-NN {report['probe']['trained']:.1%} on "
              f"held-out digits; random {report['probe']['random']:.1%})")
        return report
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        t0 = time.time()
        images, labels, held_out = digits_split(args.resolution, args.max_images)
        encoder, losses = train_encoder(images[~held_out], args)
        train_seconds = time.time() - t0
        save_official_layout(encoder, args.out)
        # Score the file as every consumer reads it: through the DINOv2 loader.
        loaded = build_encoder(ENCODER, args.resolution, local_path=args.out)
        tokens = class_tokens(loaded, images)
        spread = token_spread(tokens)
        scores = {"trained": knn_accuracy(tokens, labels, held_out),
                  "random": probe(random_encoder(ENCODER, args.resolution, seed=args.seed), images, labels, held_out),
                  "random_layer_scale_init": probe(initial_encoder(args), images, labels, held_out),
                  "random_vit_tiny": probe(random_encoder("random-vit-tiny", args.resolution), images, labels, held_out),
                  "pixels_8x8": knn_accuracy(to_digits_format(images), labels, held_out)}
    finally:
        torch.set_num_threads(threads)
    report = {"settings": settings(args), "sha256": file_sha256(args.out), "weights": os.path.abspath(args.out),
              "train_images": int((~held_out).sum()), "held_out_images": int(held_out.sum()),
              "probe": {"metric": f"{KNN_K}-NN accuracy of the class token on held-out digits (cosine)",
                        **scores, "chance": 0.1,
                        "notes": {"random": "same architecture, timm's DINOv2 init (LayerScale 1e-5), same seed",
                                  "random_layer_scale_init": "the untrained starting point of this run",
                                  "random_vit_tiny": "the built-in run's random encoder (another architecture)",
                                  "pixels_8x8": "the raw 8x8 digits, for scale (not a class token)"}},
              "class_token_spread": spread, "losses": losses, "train_seconds": train_seconds, "seconds": time.time() - t0,
              "threads": args.threads or threads}
    atomic_write_json(report_path, report)
    print(f"{args.out}: trained in {train_seconds:.0f} s; class-token {KNN_K}-NN accuracy on {report['held_out_images']} "
          f"held-out digits: {scores['trained']:.1%} (random weights, same architecture: {scores['random']:.1%}, "
          f"at the training's init: {scores['random_layer_scale_init']:.1%}; random-vit-tiny: "
          f"{scores['random_vit_tiny']:.1%}; raw 8x8 pixels: {scores['pixels_8x8']:.1%}; chance 10%)")
    return report


if __name__ == "__main__":
    main()
