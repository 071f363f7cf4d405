"""FD-DINOv2: the Frechet distance in DINOv2 ViT-L/14 feature space, as EDM2 computes it.

NVlabs/edm2 ``calculate_metrics.py`` (``fd_dinov2``, after layer6ai-labs/dgm-eval), written out:

* input: uint8 images (N, 3, H, W) at any size, as float 0..255;
* resize to 224 x 224: ``F.interpolate(mode="bicubic", antialias=True)`` on the 0..255 values (EDM2's
  default "torch" resize; no clamping), then /255 and ImageNet mean/std;
* network: DINOv2 ViT-L/14 (``dinov2_vitl14`` of facebookresearch/dinov2), its position table
  (37 x 37, trained at 518 px) interpolated to the 16 x 16 grid the hub code's way: bicubic, no
  antialias, scale factor (16 + 0.1) / 37; the feature is the class token after the final norm
  (the hub model's ``forward``: ``x_norm_clstoken``, head = Identity), 1024 numbers;
* statistics in float64: mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1);
* distance: ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) with scipy's sqrtm, real part. This is
  metrics.frechet_distance (ADM's fallbacks only act on a non-finite or clearly complex sqrtm, where
  EDM2 would return NaN or a meaningless number).

The network is timm's ViT with DINOv2's layout, the published ``dinov2_vitl14_pretrain.pth`` loaded
through models.encoders (official -> timm names); weights are never downloaded: pass a path or set
``$REG_FD_DINOV2_WEIGHTS``. Reference statistics are computed once from a reference batch (ADM's
``.npz``, ``arr_0``) or an image folder and cached next to it (``<name>.fd_dinov2.npz``), keyed by the
weights' SHA-256 and the source's size/mtime (folder: its files' names, sizes and mtimes).

Comparable with EDM2's published FD_DINOv2 and SPRINT's / SpeedrunDiT's "FDD" (the same code) when
computed on the same reference images (EDM2: its ImageNet-512 training-set statistics).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluations import metrics
from evaluations.image_batches import list_images, source_images
from fileio import atomic_save_npz, file_sha256

WEIGHTS_ENV = "REG_FD_DINOV2_WEIGHTS"
WEIGHTS_NAME = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
FEATURE_DIM = 1024
INPUT_SIZE = 224
NATIVE_SIZE = 518          # DINOv2's training resolution: a 37 x 37 position table
INTERPOLATE_OFFSET = 0.1   # the hub model's interpolate_offset (its "historical kludge")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------


def resolve_weights(path=None) -> str:
    """The DINOv2 ViT-L/14 weights file: ``path``, else $REG_FD_DINOV2_WEIGHTS; must exist."""
    source = "the given path"
    if path is None:
        path, source = os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}"
    if path is None or not os.path.isfile(path):
        where = "no path given" if path is None else f"{source} {path!r} is not a file"
        raise FileNotFoundError(f"FD-DINOv2 needs DINOv2 ViT-L/14 weights ({where}): download {WEIGHTS_NAME} from "
                                f"{WEIGHTS_URL} and pass its path or set {WEIGHTS_ENV}")
    return str(path)


def vit_l14(depth: int = 24, width: int = 1024, heads: int = 16):
    """timm's ViT in DINOv2's layout (patch 14, layer scale, 37 x 37 position table); ViT-L/14 by
    default, shallower/narrower for tests."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=NATIVE_SIZE, patch_size=14, embed_dim=width, depth=depth, num_heads=heads,
                             mlp_ratio=4.0, init_values=1e-5, num_classes=0)


def load_vit_l14(weights: str) -> torch.nn.Module:
    """timm ViT-L/14 with DINOv2's published weights (official layout, as models.encoders reads it)."""
    from models.encoders import DINOv2, encoder_spec

    model = vit_l14()
    raw = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(DINOv2.to_timm(raw, encoder_spec("dinov2-vit-l"), model), strict=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ValueError(f"{weights} is not DINOv2 ViT-L/14 in the official layout ({first})") from None
    return model


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M^2, D) -> (1, 1 + grid^2, D) the way DINOv2's hub model does it (float32)."""
    n = pos_embed.shape[1] - 1
    m = int(round(n ** 0.5))
    if grid == m:
        return pos_embed
    pe = pos_embed.float()
    scale = (grid + INTERPOLATE_OFFSET) / m
    patch = F.interpolate(pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                          scale_factor=(scale, scale))                                  # (1, D, grid, grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pe[:, :1], patch], dim=1).to(pos_embed.dtype)


class DINOv2Features(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> EDM2's FD-DINOv2 features (N, 1024) float32."""

    def __init__(self, backbone: torch.nn.Module, device="cpu"):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.register_buffer("mean", torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD, device=self.device).view(1, 3, 1, 1), persistent=False)
        grid = INPUT_SIZE // 14
        self.register_buffer("pos_embed", interpolate_pos_embed(self.backbone.pos_embed.detach(), grid), persistent=False)

    @classmethod
    def from_weights(cls, weights=None, device="cpu") -> "DINOv2Features":
        return cls(load_vit_l14(resolve_weights(weights)), device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device, torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic",
                          antialias=True)
        return (x / 255 - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FD-DINOv2 expects images (N, 3, H, W), got {tuple(images.shape)}")
        b = self.backbone
        x = b.patch_embed.proj(self.preprocess(images)).flatten(2).transpose(1, 2)   # (N, 256, D)
        x = torch.cat([b.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = b.norm(b.blocks(x))
        return x[:, 0].float()                                                       # (N, D)

    def nhwc(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, 3) -> features (N, D), batch_size at a time."""
        out = [self(torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2)).cpu().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.backbone.embed_dim), np.float32)


# ----------------------------------------------------------------------------------------------------
# Statistics and distance
# ----------------------------------------------------------------------------------------------------


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's (mu, sigma) in float64 from features (N, D): sums of f and f f^T, then the unbiased
    covariance (sum f f^T - n mu mu^T) / (n - 1)."""
    f = torch.as_tensor(np.asarray(features)).to(torch.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FD-DINOv2 needs at least 2 feature vectors (N, D), got shape {tuple(f.shape)}")
    n = f.shape[0]
    mu = f.sum(0) / n
    sigma = (f.T @ f - torch.outer(mu, mu) * n) / (n - 1)
    return mu.numpy(), sigma.numpy()


def fd_dinov2(sample_stats, ref_stats) -> float:
    """The Frechet distance of two (mu, sigma) pairs (float64)."""
    return metrics.frechet_distance(*sample_stats, *ref_stats)


# ----------------------------------------------------------------------------------------------------
# Reference statistics, cached next to their source
# ----------------------------------------------------------------------------------------------------


def cache_path(source) -> Path:
    """``REF.npz`` -> ``REF.fd_dinov2.npz``; folder ``images/`` -> ``images.fd_dinov2.npz`` beside it."""
    source = Path(source)
    return source.with_name((source.stem if source.is_file() else source.name) + ".fd_dinov2.npz")


def source_fingerprint(source, weights_sha256: str) -> str:
    """What the cached statistics depend on: the weights and the source's files (names, sizes, mtimes)."""
    source = Path(source)
    files = [source] if source.is_file() else list_images(source)
    digest = hashlib.sha256(weights_sha256.encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(source) if path != source else path.name}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def reference_statistics(detector: DINOv2Features, source, weights_sha256: str, batch_size: int = 64,
                         use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference batch or folder, read from / written to ``cache_path(source)``."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"FD-DINOv2 reference {str(source)!r} does not exist (a reference batch .npz or an image folder)")
    cache, key = cache_path(source), source_fingerprint(source, weights_sha256)
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["fingerprint"]) == key:
                    _log(f"reading cached FD-DINOv2 reference statistics {cache}")
                    return z["mu"], z["sigma"]
        except Exception as e:  # a damaged cache is just recomputed
            _log(f"ignoring unreadable FD-DINOv2 cache {cache}: {type(e).__name__}")
    feats = np.concatenate([detector.nhwc(batch, batch_size) for batch in source_images(source, batch_size)])
    mu, sigma = statistics(feats)
    if use_cache:
        try:
            atomic_save_npz(cache, mu=mu, sigma=sigma, num_images=np.array(len(feats)), fingerprint=np.array(key))
        except OSError as e:
            _log(f"could not write FD-DINOv2 cache {cache}: {e}")
    return mu, sigma


class FDDINOv2Metric:
    """FD-DINOv2 against one reference, for repeated in-process use (online_eval's interface):
    ``activations(images) -> {"dinov2": (N, 1024)}``, ``metrics_from_activations(list) -> {"fd_dinov2"}``."""

    def __init__(self, reference, weights=None, device="cpu", batch_size: int = 64, use_cache: bool = True):
        self.weights = resolve_weights(weights)
        self.weights_sha256 = file_sha256(self.weights)
        self.reference_path, self.batch_size, self.use_cache = Path(reference), batch_size, use_cache
        if not self.reference_path.exists():
            raise FileNotFoundError(f"FD-DINOv2 reference {str(reference)!r} does not exist "
                                    "(a reference batch .npz or an image folder)")
        self.detector = DINOv2Features.from_weights(self.weights, device)
        self._ref = None

    def reference(self):
        if self._ref is None:
            self._ref = reference_statistics(self.detector, self.reference_path, self.weights_sha256,
                                             self.batch_size, self.use_cache)
        return self._ref

    def activations(self, images) -> dict:
        return {"dinov2": self.detector.nhwc(np.asarray(images), self.batch_size)}

    def metrics_from_activations(self, acts) -> dict:
        if isinstance(acts, (list, tuple)):
            acts = {"dinov2": np.concatenate([a["dinov2"] for a in acts])}
        return {"fd_dinov2": fd_dinov2(statistics(acts["dinov2"]), self.reference())}
