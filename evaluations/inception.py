"""InceptionV3 features for ADM-compatible metrics, through torch-fidelity.

ADM's evaluator (openai/guided-diffusion, evaluations/evaluator.py) runs the TensorFlow graph
`classify_image_graph_def.pb` of 2015-12-05 and reads three things from it:

- `pool_3:0`, the 2048-d average pool, for FID and precision/recall;
- `mixed_6/conv:0`, sliced to its first 7 channels and flattened in TF's channels-last order
  (17 x 17 x 7 = 2023 values), for sFID;
- pool_3 times the weight of `softmax/logits/MatMul` (no bias), softmaxed, for the Inception Score.

torch-fidelity ships the same network converted to PyTorch (`FeatureExtractorInceptionV3`, weights
`weights-inception-2015-12-05-6726825d.pth`) with TF1's bilinear resize to 299 and TF's padding rules,
so we take it from there instead of porting the graph by hand:

- pool_3 is its "2048" feature, the unbiased logits its "logits_unbiased" (1008 classes).
- `mixed_6/conv` is not among its outputs, so we hook it. Which module it is: the graph names the
  eleven inception blocks mixed, mixed_1, ..., mixed_10. mixed..mixed_2 are the 35x35 blocks
  (Mixed_5b-5d), mixed_3 is the 35->17 reduction (Mixed_6a), mixed_4..mixed_7 are the 17x17 blocks
  Mixed_6b..Mixed_6e, so mixed_6 is Mixed_6d (NOT Mixed_6e). Inside a block, the graph's bare `conv`
  scope is the 1x1 branch (the other branches live under `tower*/`); torch-fidelity's weight converter
  maps `mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` onto `Mixed_6d.branch1x1.conv/.bn`.
  The graph's node named `mixed_6/conv` itself is the ReLU after that batchnorm (the node order is
  Conv2D, batchnorm, CheckNumerics, then `conv`), which is exactly what `BasicConv2d.forward` returns.
  So the hook sits on the output of `Mixed_6d.branch1x1`: (N, 192, 17, 17) -> first 7 channels ->
  NHWC -> (N, 2023).

Weights are never downloaded: pass a path or set REG_INCEPTION_WEIGHTS. `save_random_weights` writes a
seeded random-weight file of the same layout for tests and demos (numbers from it mean nothing).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from fileio import atomic_torch_save

# ----------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------

WEIGHTS_ENV = "REG_INCEPTION_WEIGHTS"
PUBLISHED_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_SHA256_PREFIX = "6726825d"
PUBLISHED_WEIGHTS_URL = URL_INCEPTION_V3  # torch-fidelity's GitHub release asset

INPUT_SIZE = 299  # the graph resizes every image to 299 x 299 (TF1 bilinear, align_corners=False)
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008  # the 2015 graph has 1008 output classes (1000 ImageNet + unused)


# ----------------------------------------------------------------------------------------------------
# Weights file
# ----------------------------------------------------------------------------------------------------


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path` if given, else $REG_INCEPTION_WEIGHTS; must exist.

    Raises FileNotFoundError with a one-line message naming the expected file and where it is published.
    """
    source = "--inception-weights"
    if path is None or str(path) == "":
        path = os.environ.get(WEIGHTS_ENV) or None
        source = f"${WEIGHTS_ENV}"
    hint = (
        f"ADM-compatible metrics need torch-fidelity's InceptionV3 weights {PUBLISHED_WEIGHTS_NAME} "
        f"(SHA-256 starts with {PUBLISHED_SHA256_PREFIX}), published at {PUBLISHED_WEIGHTS_URL}; "
        f"download it on a machine with network access and pass --inception-weights PATH or set {WEIGHTS_ENV}"
    )
    if path is None:
        raise FileNotFoundError(f"no Inception weights given. {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {str(path)!r} (from {source}) does not exist. {hint}")
    return path


def is_published_weights(sha256: str) -> bool:
    """True if a file hash matches the published weights (the name carries the hash's first 8 digits)."""
    return sha256.startswith(PUBLISHED_SHA256_PREFIX)


# ----------------------------------------------------------------------------------------------------
# Random-weight network (tests and demos only)
# ----------------------------------------------------------------------------------------------------


class _InceptionWithoutLoading(FeatureExtractorInceptionV3):
    """torch-fidelity's layers with the constructor's weight loading turned into a no-op.

    Only used to get a freshly initialised copy of the architecture whose state dict we then fill with
    seeded random numbers; the extractor itself is always the unmodified torch-fidelity class.
    """

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - signature mirrors nn.Module
        return None


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the published file's keys and shapes, filled with seeded random weights.

    Convs get He-normal weights, batchnorms are identity-like with small random shifts and the logit
    layer is scaled so logits are O(1): activations then stay finite and input-dependent through all
    layers, which is all tests need. Keys mirror the published file (no `num_batches_tracked`).
    """
    # fork_rng: the layers' default init draws from the global RNG, which callers may have seeded.
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _InceptionWithoutLoading("inception-v3-random", ["2048"], feature_extractor_weights_path=str(empty))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=gen) / value.shape[1] ** 0.5 * 4.0
        elif key == "fc.bias":
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight") or key.endswith("bn.running_var"):
            state[key] = torch.ones(value.shape)
        elif key.endswith("bn.bias"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("bn.running_mean"):
            state[key] = torch.zeros(value.shape)
        else:
            raise RuntimeError(f"unexpected parameter {key} in torch-fidelity's InceptionV3")
    return state


def save_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a RANDOM-weight InceptionV3 file (same layout as the published one) atomically.

    For tests and CPU demos only: metrics computed with it are not comparable with anything.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(random_state_dict(seed), path)
    return path


# ----------------------------------------------------------------------------------------------------
# Resize (exposed for tests)
# ----------------------------------------------------------------------------------------------------


def tf1_bilinear_resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)` as the extractor applies it: (N,C,H,W) float -> (N,C,size,size)."""
    return interpolate_bilinear_2d_like_tensorflow1x(images, size=(size, size), align_corners=False)


# ----------------------------------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_tf32():
    """Full float32 convolutions and matmuls on CUDA (TF32 perturbs activations ~1e-3); restores the flags."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures(torch.nn.Module):
    """ADM's three feature sets from uint8 NHWC images, via torch-fidelity's FeatureExtractorInceptionV3.

    forward(images uint8 (N, H, W, 3)) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)},
    all float32 on the CPU as numpy arrays. Images of any size; the network resizes them to 299.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        path = resolve_weights_path(weights_path)
        self.weights_path = path
        self.device = torch.device(device)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as e:  # state-dict mismatch or unreadable file: keep the first line only
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{str(path)!r} is not torch-fidelity's InceptionV3 weights file ({first}); "
                f"expected {PUBLISHED_WEIGHTS_NAME} from {PUBLISHED_WEIGHTS_URL}"
            ) from None
        except Exception as e:  # pickle errors, truncated files, ...
            raise ValueError(
                f"could not read Inception weights {str(path)!r}: {type(e).__name__}: {e}".splitlines()[0]
            ) from None
        self.net.to(self.device)
        if self.device.type == "cpu":  # oneDNN is ~30% faster channels-last; changes activations ~1e-6
            self.net.to(memory_format=torch.channels_last)
        self._spatial: torch.Tensor | None = None
        # mixed_6/conv:0 of the TF graph == output of Mixed_6d.branch1x1 (see module docstring).
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output  # (N, 192, 17, 17)

    @torch.no_grad()
    def forward(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch warns on read-only buffers (np.frombuffer batches)
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        self._spatial = None
        with no_tf32():
            pool, logits = self.net(x)  # (N, 2048), (N, 1008) float32
        spatial = self._spatial
        self._spatial = None
        if spatial is None or tuple(spatial.shape[1:]) != (192, SPATIAL_GRID, SPATIAL_GRID):
            raise RuntimeError("Mixed_6d.branch1x1 hook did not capture a (N, 192, 17, 17) map")
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), SPATIAL_DIM)  # NHWC flat
        return {
            "pool": pool.float().cpu().numpy(),
            "spatial": spatial.float().cpu().numpy(),
            "logits": logits.float().cpu().numpy(),
        }
