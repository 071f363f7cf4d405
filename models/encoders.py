"""Frozen representation encoders (DINOv2 family) for REPA alignment and REG's class token.

Every encoder takes raw images (uint8 or float in 0..255, (N, 3, R, R) at the dataset
resolution R) and returns (class token (N, Z), tokens (N, 1 + T, Z)) where the tokens are the
class token followed by the T patch tokens, registers excluded. Preprocessing follows the
release (spec section 3): x / 255, ImageNet mean/std, bicubic resize to 224 * R / 256, and the
absolute position embedding resampled once to the matching (16 * R / 256)^2 grid.

Where the weights come from, first match wins:
  1. ``local_paths[name]`` (the CLI's ``--enc-weights``): a weights file (official DINOv2
     ``.pth`` or timm ``.safetensors``) or a local clone of facebookresearch/dinov2;
  2. env ``REG_DINOV2_WEIGHTS``: a weights file, or a folder with the official file names
     (``dinov2_vitb14_pretrain.pth``, ``dinov2_vitb14_reg4_pretrain.pth`` ...);
  3. env ``REG_DINOV2_REPO``: a local clone of facebookresearch/dinov2 (torch.hub source='local');
  4. torch.hub ``facebookresearch/dinov2`` (its cache works offline once filled).
Weights files are loaded into timm's DINOv2 architecture; hub models keep DINOv2's own code.

``random-vit-tiny`` (and ``-reg``) is a 2-block, 64-wide ViT/14 of the same architecture with
random weights (seed 0), for tests and the CPU demo. It is only ever built when asked for by name.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14

_DINOV2_SIZES = {"s": 384, "b": 768, "l": 1024, "g": 1536}
ENCODER_WIDTHS = {}
for _size, _width in _DINOV2_SIZES.items():
    ENCODER_WIDTHS[f"dinov2-vit-{_size}"] = _width
    ENCODER_WIDTHS[f"dinov2-vit-{_size}-reg"] = _width
ENCODER_WIDTHS["random-vit-tiny"] = 64
ENCODER_WIDTHS["random-vit-tiny-reg"] = 64

ENV_WEIGHTS = "REG_DINOV2_WEIGHTS"
ENV_REPO = "REG_DINOV2_REPO"
HUB_REPO = "facebookresearch/dinov2"


#################################################################################
#                                   Names                                        #
#################################################################################

def parse_enc_types(s) -> list[str]:
    """'dinov2-vit-b,dinov2-vit-l' -> ['dinov2-vit-b', 'dinov2-vit-l'], validated."""
    names = s if isinstance(s, (list, tuple)) else str(s).split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no encoder given; choose from {', '.join(ENCODER_WIDTHS)}")
    for n in names:
        if n not in ENCODER_WIDTHS:
            raise ValueError(f"unknown encoder {n!r}; choose from {', '.join(ENCODER_WIDTHS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"encoder listed twice in {','.join(names)}")
    return names


def _dinov2_parts(name: str) -> tuple[str, bool]:
    """'dinov2-vit-b-reg' -> ('b', True)."""
    parts = name.split("-")
    return parts[2], name.endswith("-reg")


def hub_model_name(name: str) -> str:
    size, reg = _dinov2_parts(name)
    return f"dinov2_vit{size}14" + ("_reg" if reg else "")


def official_weights_name(name: str) -> str:
    size, reg = _dinov2_parts(name)
    return f"dinov2_vit{size}14" + ("_reg4" if reg else "") + "_pretrain.pth"


def timm_model_name(name: str) -> str:
    size, reg = _dinov2_parts(name)
    long = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    return f"vit_{long}_patch14" + ("_reg4" if reg else "") + "_dinov2"


def check_resolution(resolution: int) -> int:
    if int(resolution) != resolution or resolution <= 0 or resolution % 16:
        raise ValueError(f"encoder resolution must be a positive multiple of 16 (the DINOv2 input is "
                         f"224 * R / 256 pixels in 14-pixel patches), got {resolution}")
    return int(resolution)


#################################################################################
#                                  Encoder                                       #
#################################################################################

class Encoder(nn.Module):
    """A frozen encoder with the release's preprocessing; returns (cls, [cls, patches])."""

    def __init__(self, name: str, backbone: nn.Module, backend: str, resolution: int):
        super().__init__()
        if backend not in ("hub", "timm"):
            raise ValueError(f"unknown backend {backend!r}")
        self.name = name
        self.backbone = backbone
        self.backend = backend
        self.resolution = check_resolution(resolution)
        self.input_size = 224 * self.resolution // 256        # bicubic target (release: 224 * R/256)
        self.grid = self.input_size // PATCH_SIZE              # 16 at R = 256
        self.embed_dim = ENCODER_WIDTHS[name]
        self.num_tokens = 1 + self.grid ** 2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # Frozen: stays in eval mode whatever the caller asks.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in 0..255 -> normalised, resized (N, 3, 224R/256, 224R/256) float."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"{self.name} was built for {self.resolution}x{self.resolution} images, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=self.input_size, mode="bicubic")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        if self.backend == "hub":
            out = self.backbone.forward_features(x)
            cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]   # (N, Z), (N, T, Z)
        else:
            out = self.backbone.forward_features(x)                             # (N, P + T, Z)
            cls, patches = out[:, 0], out[:, self.backbone.num_prefix_tokens:]
        if patches.shape[1] != self.num_tokens - 1 or cls.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.name}: backbone returned {patches.shape[1]} patches of width "
                             f"{cls.shape[-1]}, expected {self.num_tokens - 1} of {self.embed_dim}")
        tokens = torch.cat([cls[:, None], patches], dim=1)                      # (N, 1 + T, Z)
        return cls, tokens


#################################################################################
#                                  Builders                                      #
#################################################################################

def _missing(name: str, detail) -> FileNotFoundError:
    text = str(detail).strip().splitlines()[0] if str(detail).strip() else type(detail).__name__
    return FileNotFoundError(
        f"could not load encoder {name!r} (torch.hub {HUB_REPO}:{hub_model_name(name)}): {text}. "
        f"Offline? point --enc-weights or {ENV_WEIGHTS} at {official_weights_name(name)} (or a folder "
        f"holding it), or {ENV_REPO} at a local clone of {HUB_REPO} with its weights cached")


def _random_timm_vit(name: str, input_size: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    reg = name.endswith("-reg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # init_values=1 (not DINOv2's 1e-5) so random blocks actually mix tokens.
        return VisionTransformer(
            img_size=input_size, patch_size=PATCH_SIZE, embed_dim=ENCODER_WIDTHS[name], depth=2,
            num_heads=2, mlp_ratio=4.0, init_values=1.0, num_classes=0,
            reg_tokens=4 if reg else 0, no_embed_class=reg)


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _timm_from_weights(name: str, path: str, input_size: int) -> nn.Module:
    """timm DINOv2 architecture at input_size; official or timm weights, pos_embed resampled."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):   # no random init: every tensor comes from the file
        model = timm.create_model(timm_model_name(name), pretrained=False, img_size=input_size,
                                  num_classes=0)
    try:
        sd = _read_state_dict(path)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd = checkpoint_filter_fn(sd, model)          # official -> timm names, bicubic resample
        model.load_state_dict(sd, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"weights file {path} does not fit encoder {name!r} ({first}); "
                         f"expected {official_weights_name(name)}") from e
    return model


def _hub_model(name: str, repo_or_dir: str, source: str, resolution: int) -> nn.Module:
    from timm.layers import resample_abs_pos_embed

    try:
        model = torch.hub.load(repo_or_dir, hub_model_name(name), source=source, trust_repo=True)
    except Exception as e:  # noqa: BLE001 - network, cache or import errors all mean "missing"
        raise _missing(name, e) from e
    model.head = nn.Identity()
    grid = (224 * resolution // 256) // PATCH_SIZE
    # Release: the hub's 37x37 absolute embedding resampled once (bicubic, antialias, class row kept).
    model.pos_embed.data = resample_abs_pos_embed(model.pos_embed.data, [grid, grid], num_prefix_tokens=1)
    return model


def _weights_from_env(name: str) -> str | None:
    path = os.environ.get(ENV_WEIGHTS)
    if not path:
        return None
    if os.path.isdir(path):
        candidate = os.path.join(path, official_weights_name(name))
        return candidate if os.path.isfile(candidate) else None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ENV_WEIGHTS}={path} does not exist; unset it or point it at "
                                f"{official_weights_name(name)}")
    return path


def build_encoder(name: str, resolution: int, local_path: str | None = None) -> Encoder:
    """One encoder on CPU, frozen. See the module docstring for where weights come from."""
    resolution = check_resolution(resolution)
    input_size = 224 * resolution // 256
    if name.startswith("random-"):
        if local_path:
            raise ValueError(f"{name} has random weights; it takes no weights path")
        return Encoder(name, _random_timm_vit(name, input_size), "timm", resolution)

    if local_path:
        if os.path.isfile(local_path):
            return Encoder(name, _timm_from_weights(name, local_path, input_size), "timm", resolution)
        if os.path.isdir(local_path) and os.path.isfile(os.path.join(local_path, "hubconf.py")):
            return Encoder(name, _hub_model(name, local_path, "local", resolution), "hub", resolution)
        if os.path.isdir(local_path) and os.path.isfile(os.path.join(local_path, official_weights_name(name))):
            path = os.path.join(local_path, official_weights_name(name))
            return Encoder(name, _timm_from_weights(name, path, input_size), "timm", resolution)
        raise FileNotFoundError(f"encoder weights for {name!r} not found at {local_path}: expected a "
                                f"weights file, a folder holding {official_weights_name(name)}, or a "
                                f"clone of {HUB_REPO} (with hubconf.py)")
    env_weights = _weights_from_env(name)
    if env_weights:
        return Encoder(name, _timm_from_weights(name, env_weights, input_size), "timm", resolution)
    env_repo = os.environ.get(ENV_REPO)
    if env_repo:
        if not os.path.isfile(os.path.join(env_repo, "hubconf.py")):
            raise FileNotFoundError(f"{ENV_REPO}={env_repo} is not a clone of {HUB_REPO} (no hubconf.py)")
        return Encoder(name, _hub_model(name, env_repo, "local", resolution), "hub", resolution)
    return Encoder(name, _hub_model(name, HUB_REPO, "github", resolution), "hub", resolution)


def load_encoders(enc_types, resolution: int, device="cpu", local_paths: dict | None = None) -> list[Encoder]:
    """Frozen encoders, in the order given, on `device`."""
    names = parse_enc_types(enc_types)
    local_paths = dict(local_paths or {})
    unknown = set(local_paths) - set(names)
    if unknown:
        raise ValueError(f"weights given for encoders not requested: {', '.join(sorted(unknown))}")
    return [build_encoder(n, resolution, local_paths.get(n)).to(device) for n in names]
