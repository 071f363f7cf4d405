"""Shared fixtures for the core tests: tiny SiT/REG/REPA models and weight randomisation.

The repository root goes on sys.path here so the tests import the modules the way the
scripts do (``import models.sit``, ``import loss``, ``import samplers``).
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.sit import SiT  # noqa: E402

#################################################################################
#                              Tiny model configs                               #
#################################################################################

# input 8, patch 2 -> a 4x4 grid, T = 16 image tokens; D = 32 with 2 heads of 16.
TINY = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, z_dims=[16], projector_dim=24,
    encoder_depth=1, cls_token_dim=16, qk_norm=False, fused_attn=True,
)
REPA_OVERRIDES = dict(cls_token_dim=0)              # REPA: projectors, no class token
SIT_OVERRIDES = dict(cls_token_dim=0, z_dims=[])    # plain SiT: neither


def build_sit(seed: int = 0, **overrides) -> SiT:
    """A tiny SiT (REG by default) built under a fixed seed, in eval mode."""
    cfg = {**TINY, **overrides}
    torch.manual_seed(seed)
    return SiT(**cfg).eval()


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised ones included) with O(1)-output random values.

    Matrices get N(0, 1/fan_in) so activations stay O(1); LayerNorm weights 1 + N(0, 0.2^2);
    other vectors N(0, 0.2^2). pos_embed keeps its fixed sin-cos values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            std = 1.0 if "embedding_table" in name else 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif ("norm" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: tiny tensors are several times faster that way (no
    thread hand-off), especially on a shared 2-core machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_sit():
    """Factory: make_sit(seed=0, randomize=False, **overrides) -> tiny SiT in eval mode."""
    def make(seed: int = 0, randomize: bool = False, **overrides):
        model = build_sit(seed, **overrides)
        return randomize_weights_(model, seed + 1000) if randomize else model
    return make


@pytest.fixture(params=["reg", "repa", "sit"])
def variant(request):
    """(name, overrides) for the three models of the paper's tables."""
    return request.param, {"reg": {}, "repa": dict(REPA_OVERRIDES), "sit": dict(SIT_OVERRIDES)}[request.param]


#################################################################################
#                 The tiny training dataset of the train and fault tests          #
#################################################################################

@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """100 of scikit-learn's bundled digits at 32 px, made with the project's own CLIs: convert,
    fit-pca (a 4-channel /8 linear codec: 4 x 4 x 4 latents), encode, and a full feature cache of
    the random tiny ViT (1 + 4 tokens of width 64)."""
    from demo.make_digits import main as make_digits
    from preprocessing import dataset_tools

    root = tmp_path_factory.mktemp("digits")
    make_digits(["--out", str(root / "raw"), "--size", "32"])
    data = root / "data"
    run = dataset_tools.main
    run(["convert", "--source", str(root / "raw"), "--dest", str(data / "images"), "--resolution", "32x32",
         "--transform", "center-crop", "--max-images", "100", "--workers", "0"])
    run(["fit-pca", "--source", str(data / "images"), "--dest", str(data / "pca-f8c4.pt")])
    run(["encode", "--source", str(data / "images"), "--dest", str(data / "vae-latents"),
         "--model-url", f"pca:{data / 'pca-f8c4.pt'}", "--workers", "0"])
    run(["cache-features", "--source", str(data / "images"), "--enc-type", "random-vit-tiny", "--kind", "full",
         "--workers", "0"])
    return data


def train_args(data_dir, out, name, steps, **extra):
    """train.py arguments for a SiT-XS/2 REG run on the tiny dataset (0.3M parameters: fast steps and
    small checkpoints); extra flags as keyword arguments (flag=None for a bare switch)."""
    args = ["--data-dir", str(data_dir), "--output-dir", str(out), "--exp-name", name, "--resolution", "32",
            "--model", "SiT-XS/2", "--enc-type", "random-vit-tiny", "--encoder-depth", "2", "--projector-dim", "64",
            "--batch-size", "8", "--max-train-steps", str(steps), "--precision", "fp32", "--report-to", "none",
            "--num-workers", "0", "--device", "cpu", "--learning-rate", "1e-3", "--log-every", "1",
            "--checkpointing-steps", "3", "--sampling-steps", "0"]
    for k, v in extra.items():
        flag = f"--{k.replace('_', '-')}"
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        args += [flag] + ([] if v is None else [str(v)])
    return args


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons; reset them around an in-process train.main()."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    reset()
    yield
    reset()
