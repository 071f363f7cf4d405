"""Frozen representation encoders: REPA's alignment targets and REG's class token.

Every encoder takes raw images (uint8 or float in 0..255, (N, 3, R, R) at the dataset resolution
R) and returns ``(global token (N, Z), tokens (N, 1 + T, Z))``: the global token followed by the
T patch tokens (registers excluded). REG denoises the global token and aligns all 1 + T tokens;
REPA aligns the T patch tokens.

One class per family, one registry entry per released model (``ENCODERS``). A family class holds
its facts as data -- input preprocessing (``Preprocessing``), which tokens it gives, where its
weights live (env variable, published file names) and how its published checkpoint's keys map
onto timm's ViT -- so a new encoder is one class (or one entry of an existing class).

Per-family facts (REPA's ``preprocess_raw_image`` / ``load_encoders``, written out):

=========  ========================  ===========================  =====================================
family     preprocessing             position embedding           tokens
=========  ========================  ===========================  =====================================
dinov2     x/255, ImageNet norm,     resampled to the grid        class + patches after the final norm
           then bicubic 224*R/256    (bicubic, antialiased)
clip       x/255, bicubic 224*R/256, native 16x16 at 256 px;      patches: last block, no ln_post (REPA);
           then CLIP norm            resampled otherwise          class: after ln_post
mocov3     x/255, ImageNet norm,     checkpoint's 14x14           class + patches after the final norm
           no resize (R px, /16)     resampled to R/16
mae        x/255, ImageNet norm,     checkpoint's 14x14           patches: last block, no norm (REPA);
           no resize                 resampled to R/16            class: after the final norm
dinov1     x/255, ImageNet norm,     checkpoint's 14x14           class + patches after the final norm
           no resize                 resampled to R/16
jepa       x/255, ImageNet norm,     native 16x16 at 256 px;      patches after the final norm; no class
           then bicubic 224*R/256    resampled otherwise          token: global = mean of those patches
=========  ========================  ===========================  =====================================

Every family gives (R/16)^2 patch tokens at R px (14-px patches on 224*R/256 px, or 16-px patches
on R px), the token count of SiT-*/2 on /8 latents. ``num_patch_tokens(name, R)`` computes it
without building anything. REPA runs its non-DINOv2 families at 256 px only; at other
resolutions we resample their position embeddings the same way (an extension, not a release fact).

Where weights come from, first match wins (``resolve_weights``):
  1. ``local_paths[name]`` (the CLI's ``--enc-weights``): a weights file in the family's published
     layout, or a folder holding it under its published name or REPA's ``ckpts/`` name
     (DINOv2 only: also a local clone of facebookresearch/dinov2);
  2. the family's env variable (``REG_DINOV2_WEIGHTS``, ``REG_CLIP_WEIGHTS``, ``REG_MOCOV3_WEIGHTS``,
     ``REG_MAE_WEIGHTS``, ``REG_DINOV1_WEIGHTS``, ``REG_JEPA_WEIGHTS``): a file or such a folder;
  3. DINOv2: env ``REG_DINOV2_REPO`` (a local hub clone), then torch.hub (its cache works offline);
     CLIP: the ``clip`` package's download cache (``~/.cache/clip/ViT-L-14.pt``) if present;
  4. otherwise a one-line FileNotFoundError naming the file and where it is published.
Weights files are converted to timm's ViT of the same architecture; torch.hub keeps DINOv2's code.

``random-vit-tiny`` (and ``-reg``): a 2-block, 64-wide DINOv2-style ViT/14 with random weights
(seed 0) for tests and the CPU demo. ``dinov2-vit-tiny``: DINOv2's architecture at depth 4, width
128, 4 heads, loaded like any DINOv2 from a file in the official layout (``save_official_layout``
writes one); no such weights are published -- train them yourself.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ENV_WEIGHTS = "REG_DINOV2_WEIGHTS"   # DINOv2's, kept under its old name
ENV_REPO = "REG_DINOV2_REPO"
HUB_REPO = "facebookresearch/dinov2"
RANDOM_SEED = 0


#################################################################################
#                         Preprocessing and registry entries                     #
#################################################################################

@dataclass(frozen=True)
class Preprocessing:
    """x / 255, per-channel (x - mean) / std, and optionally a bicubic resize to 224 * R / 256.

    ``resize_first``: CLIP resizes before normalising; the other resized families normalise first
    (the same values up to rounding: bicubic weights sum to 1; the order is kept as REPA has it).
    """
    mean: tuple
    std: tuple
    resize: bool
    resize_first: bool = False

    def input_size(self, resolution: int) -> int:
        return 224 * resolution // 256 if self.resize else resolution

    def record(self, resolution: int) -> dict:
        """What a feature cache records (and compares) about the preprocessing."""
        steps = ["resize", "normalize"] if self.resize_first else ["normalize", "resize"]
        return {"scale": "x/255", "mean": list(self.mean), "std": list(self.std),
                "resize": self.input_size(resolution) if self.resize else None,
                "interpolation": "bicubic" if self.resize else None,
                "order": steps if self.resize else ["normalize"]}


DINOV2_PRE = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, resize=True)
IMAGENET_NO_RESIZE = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, resize=False)
CLIP_PRE = Preprocessing(CLIP_MEAN, CLIP_STD, resize=True, resize_first=True)


@dataclass(frozen=True)
class EncoderSpec:
    """One released encoder: its architecture and where its weights are published. No weights."""
    name: str                       # canonical name (ours)
    family: type                    # the Encoder subclass
    width: int
    depth: int
    heads: int
    patch: int
    timm_name: str                  # timm model it is built as (patch, width, depth, heads from here)
    registers: int = 0
    weights_file: str | None = None  # the published file's name
    repa_file: str | None = None     # REPA's ./ckpts/ name for it
    url: str | None = None           # where it is published
    hub_model: str | None = None     # DINOv2 torch.hub entry
    aliases: tuple = ()

    @property
    def preprocessing(self) -> Preprocessing:
        return self.family.preprocessing

    def input_size(self, resolution: int) -> int:
        return self.preprocessing.input_size(check_resolution(resolution))

    def grid(self, resolution: int) -> int:
        """Patch grid side at R px: the ONE token-count formula."""
        return self.input_size(resolution) // self.patch

    def file_names(self) -> list[str]:
        return [n for n in (self.weights_file, self.repa_file) if n]


ENCODERS: dict[str, EncoderSpec] = {}
ALIASES: dict[str, str] = {}
ENCODER_WIDTHS: dict[str, int] = {}


def check_resolution(resolution: int) -> int:
    if int(resolution) != resolution or resolution <= 0 or resolution % 16:
        raise ValueError(f"encoder resolution must be a positive multiple of 16 (encoders see 224 * R / 256 "
                         f"pixels in 14-pixel patches, or R pixels in 16-pixel patches), got {resolution}")
    return int(resolution)


def canonical_name(name: str) -> str:
    """Our name for an encoder given by ours or a release's spelling ('dinov2reg-vit-b' -> 'dinov2-vit-b-reg')."""
    name = str(name).strip()
    if name in ENCODERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")


def encoder_spec(name: str) -> EncoderSpec:
    return ENCODERS[canonical_name(name)]


def parse_enc_types(s) -> list[str]:
    """'dinov2-vit-b,clip-vit-L' -> ['dinov2-vit-b', 'clip-vit-L'] (canonical names), validated."""
    names = s if isinstance(s, (list, tuple)) else str(s).split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no encoder given; choose from {', '.join(ENCODERS)}")
    names = [canonical_name(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"encoder listed twice in {','.join(names)}")
    return names


def encoder_width(name: str) -> int:
    """Z: the width of the global token (REG's class-token width) and of the patch tokens."""
    return encoder_spec(name).width


def num_patch_tokens(name: str, resolution: int) -> int:
    """T, the patch tokens an encoder gives at R px, without building it."""
    spec = encoder_spec(name)
    return spec.grid(resolution) ** 2


def check_token_count(enc_types, resolution: int, sit_tokens: int) -> None:
    """One-line ValueError when an encoder's patch tokens differ from the SiT's image tokens."""
    for name in parse_enc_types(enc_types):
        t = num_patch_tokens(name, resolution)
        if t != sit_tokens:
            raise ValueError(f"encoder {name} gives {t} patch tokens at {resolution} px but the SiT has "
                             f"{sit_tokens} image tokens; REPA aligns them one to one: choose a SiT patch size "
                             f"or resolution with {t} tokens")


def encoder_record(name: str, resolution: int) -> dict:
    """The facts a feature cache records about an encoder (all from the registry, no weights)."""
    spec = encoder_spec(name)
    fam = spec.family
    return {"name": spec.name, "family": fam.family, "width": spec.width, "patch": spec.patch,
            "registers": spec.registers, "num_patch_tokens": num_patch_tokens(name, resolution),
            "preprocessing": spec.preprocessing.record(resolution),
            "pos_embed": fam.pos_embed_rule, "patch_tokens": fam.patch_tokens,
            "global_token": fam.global_token}


def official_weights_name(name: str) -> str:
    spec = encoder_spec(name)
    if not spec.weights_file:
        raise ValueError(f"{spec.name} has random weights; it has no weights file")
    return spec.weights_file


#################################################################################
#                               Encoder (base)                                   #
#################################################################################

class Encoder(nn.Module):
    """A frozen encoder with its family's preprocessing; forward -> (global (N, Z), [global, patches]).

    ``Encoder(name, backbone, backend, resolution)`` wraps an already-built backbone and picks the
    family class from the registry. Family classes set the data below and, where their
    published checkpoints differ from timm's key names, ``to_timm``.
    """
    family: ClassVar[str] = ""
    preprocessing: ClassVar[Preprocessing] = DINOV2_PRE
    env_var: ClassVar[str | None] = None
    patch_tokens: ClassVar[str] = "final-norm"       # or "last-block" (before the final norm)
    global_token: ClassVar[str] = "class-token"      # after the final norm; or "mean-of-patches"
    pos_embed_rule: ClassVar[str] = "bicubic resample (antialiased) to the patch grid when it differs"
    # The published checkpoint's layout, as data: the containers holding the state dict (first
    # found, repeatedly), key prefixes to strip, key prefixes to drop (heads, decoders).
    weights_containers: ClassVar[tuple] = ("model", "state_dict")
    weights_prefixes: ClassVar[tuple] = ()
    weights_drop: ClassVar[tuple] = ()

    def __new__(cls, name=None, *args, **kwargs):
        if cls is Encoder:                       # Encoder(name, ...) builds the family's class
            cls = encoder_spec(name).family
        return super().__new__(cls)

    def __init__(self, name: str, backbone: nn.Module, backend: str = "timm", resolution: int = 256):
        super().__init__()
        if backend not in ("hub", "timm"):
            raise ValueError(f"unknown backend {backend!r}")
        self.spec = encoder_spec(name)
        self.name = self.spec.name
        self.backbone = backbone
        self.backend = backend
        self.resolution = check_resolution(resolution)
        self.input_size = self.spec.input_size(self.resolution)   # what the backbone sees
        self.grid = self.spec.grid(self.resolution)
        self.embed_dim = self.spec.width
        self.num_patch_tokens = self.grid ** 2
        self.num_tokens = 1 + self.num_patch_tokens
        self.weights = None                                        # set by the builders: where they came from
        self.register_buffer("mean", torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.preprocessing.std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # Frozen: stays in eval mode whatever the caller asks.
        return super().train(False)

    # ------------------------------------------------------------ the architecture (class-level)
    @classmethod
    def architecture(cls, spec: EncoderSpec, input_size: int, depth: int | None = None) -> nn.Module:
        """The family's timm ViT at ``input_size`` px (random init; build under torch.device('meta')
        to skip it). ``depth`` shortens it (tests)."""
        import timm

        # Patch, width, depth and heads from the registry; timm's model supplies the rest
        # (norms, activation, layer scale, registers, class token).
        return timm.create_model(spec.timm_name, pretrained=False, img_size=input_size, num_classes=0,
                                 patch_size=spec.patch, embed_dim=spec.width, depth=int(depth or spec.depth),
                                 num_heads=spec.heads)

    @classmethod
    def to_timm(cls, raw, spec: EncoderSpec, model: nn.Module) -> dict:
        """A published checkpoint (as loaded) -> timm state dict, by the layout data above; families
        whose key names differ from timm's extend it."""
        sd = _strip(_unwrap(raw, cls.weights_containers), cls.weights_prefixes)
        return {k: v for k, v in sd.items() if not k.startswith(cls.weights_drop)} if cls.weights_drop else sd

    # ------------------------------------------------------------ forward
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in 0..255 -> the backbone's input (N, 3, S, S) float, S = input_size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (N, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"{self.name} was built for {self.resolution}x{self.resolution} images, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        pre = self.preprocessing
        x = images.to(self.mean.device, torch.float32) / 255.0
        if pre.resize and pre.resize_first:
            x = F.interpolate(x, size=self.input_size, mode="bicubic")
        x = (x - self.mean) / self.std
        if pre.resize and not pre.resize_first:
            x = F.interpolate(x, size=self.input_size, mode="bicubic")
        return x

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed input -> (global (N, Z), patches (N, T, Z)), by the family's token rules."""
        b = self.backbone
        h = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
        h = b.blocks(h)                                              # last block's tokens, (N, P + T, Z)
        prefix = b.num_prefix_tokens
        normed = b.norm(h) if (self.patch_tokens == "final-norm" or self.global_token == "mean-of-patches") else None
        patches = normed[:, prefix:] if self.patch_tokens == "final-norm" else h[:, prefix:]
        if self.global_token == "mean-of-patches":
            glob = normed[:, prefix:].mean(1)
        elif normed is not None:
            glob = normed[:, 0]
        else:
            glob = b.norm(h[:, 0])                                   # LayerNorm is per token
        return glob, patches

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        glob, patches = self.features(self.preprocess(images))
        if patches.shape[1] != self.num_patch_tokens or glob.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.name}: backbone returned {patches.shape[1]} patches of width "
                             f"{glob.shape[-1]}, expected {self.num_patch_tokens} of {self.embed_dim}")
        tokens = torch.cat([glob[:, None], patches], dim=1)                    # (N, 1 + T, Z)
        return glob, tokens


#################################################################################
#                                  Families                                      #
#################################################################################

def _unwrap(raw, keys) -> dict:
    """The state dict inside a checkpoint container (first of ``keys`` present, repeatedly)."""
    sd = raw
    changed = True
    while changed and isinstance(sd, dict):
        changed = False
        for k in keys:
            if k in sd and isinstance(sd[k], dict):
                sd, changed = sd[k], True
                break
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, found {type(sd).__name__}")
    return sd


def _strip(sd: dict, prefixes) -> dict:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


class DINOv2(Encoder):
    """DINOv2 (facebookresearch/dinov2), with or without 4 registers; also torch.hub."""
    family = "dinov2"
    preprocessing = DINOV2_PRE
    env_var = ENV_WEIGHTS

    def features(self, x):
        if self.backend == "hub":
            out = self.backbone.forward_features(x)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]
        return super().features(x)

    weights_containers = ("model", "state_dict", "teacher")
    weights_prefixes = ("module.", "backbone.")
    weights_drop = ("head.", "dino_head.", "ibot_head.")

    @classmethod
    def to_timm(cls, raw, spec, model):
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(super().to_timm(raw, spec, model), model)  # official -> timm names, resample


class RandomViT(DINOv2):
    """random-vit-tiny(-reg): a 2-block, 64-wide DINOv2-style ViT/14, random weights (seed 0)."""
    family = "random"
    env_var = None

    @classmethod
    def architecture(cls, spec, input_size, depth=None):
        from timm.models.vision_transformer import VisionTransformer

        # init_values=1 (not DINOv2's 1e-5) so random blocks actually mix tokens.
        return VisionTransformer(
            img_size=input_size, patch_size=spec.patch, embed_dim=spec.width, depth=depth or spec.depth,
            num_heads=spec.heads, mlp_ratio=4.0, init_values=1.0, num_classes=0,
            reg_tokens=spec.registers, no_embed_class=spec.registers > 0)


class DINOv1(Encoder):
    """DINO (facebookresearch/dino) ViT-B/16: the published backbone file has timm's key names."""
    family = "dinov1"
    preprocessing = IMAGENET_NO_RESIZE
    env_var = "REG_DINOV1_WEIGHTS"
    weights_containers = ("teacher", "model", "state_dict")      # full training checkpoints hold 'teacher'
    weights_prefixes = ("module.", "backbone.")
    weights_drop = ("head.",)


class MoCoV3(Encoder):
    """MoCo v3 ViT (facebookresearch/moco-v3; ViT-L via LTH14/rcg): 'state_dict' of 'module.base_encoder.*'."""
    family = "mocov3"
    preprocessing = IMAGENET_NO_RESIZE
    env_var = "REG_MOCOV3_WEIGHTS"
    # Misnamed keys in the published ViT-L checkpoint (as REPA renames them).
    KEY_FIXES = (("blocks.13.norm13.", "blocks.13.norm1."), ("blocks.13.mlp.fc13.", "blocks.13.mlp.fc1."),
                 ("blocks.14.norm14.", "blocks.14.norm2."), ("blocks.14.mlp.fc14.", "blocks.14.mlp.fc2."))

    @classmethod
    def to_timm(cls, raw, spec, model):
        sd = _unwrap(raw, ("state_dict", "model"))
        prefix = "module.base_encoder."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        out = {}
        for k, v in sd.items():
            for bad, good in cls.KEY_FIXES:
                if k.startswith(bad):
                    k = good + k[len(bad):]
            if k.split(".")[0] in ("head", "fc"):     # projection MLP / classifier: not part of the backbone
                continue
            out[k] = v
        return out


class MAE(Encoder):
    """MAE (facebookresearch/mae) pretrained ViT: {'model': timm keys}. REPA aligns to the last
    block's patch tokens without the final norm; the class token is taken after it."""
    family = "mae"
    preprocessing = IMAGENET_NO_RESIZE
    env_var = "REG_MAE_WEIGHTS"
    patch_tokens = "last-block"
    weights_drop = ("decoder", "mask_token", "head.")


class JEPA(Encoder):
    """I-JEPA (facebookresearch/ijepa) ViT-H/14: {'encoder': 'module.*'}, no class token.
    Global token: the mean of the final-normed patch tokens (our documented choice)."""
    family = "jepa"
    preprocessing = DINOV2_PRE
    env_var = "REG_JEPA_WEIGHTS"
    global_token = "mean-of-patches"
    weights_containers = ("encoder",)                 # the context encoder, as REPA loads it
    weights_prefixes = ("module.",)


class CLIP(Encoder):
    """OpenAI CLIP ViT-L/14 image tower: the published TorchScript file (or its state dict) with
    'visual.*' keys. REPA aligns to the last block's patch tokens (no ln_post, no projection);
    the class token is taken after ln_post. Width 1024 (the tower's, not the 768 joint space)."""
    family = "clip"
    preprocessing = CLIP_PRE
    env_var = "REG_CLIP_WEIGHTS"
    patch_tokens = "last-block"
    RENAMES = (("conv1.", "patch_embed.proj."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
               ("transformer.resblocks.", "blocks."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
               (".attn.in_proj_weight", ".attn.qkv.weight"), (".attn.in_proj_bias", ".attn.qkv.bias"),
               (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."))

    @classmethod
    def to_timm(cls, raw, spec, model):
        sd = _unwrap(raw, ("state_dict", "model"))
        prefix = next((p for p in ("visual.", "module.visual.") if f"{p}class_embedding" in sd), None)
        if prefix is None:
            raise ValueError("no 'visual.class_embedding': not an OpenAI CLIP checkpoint")
        out = {}
        for k, v in sd.items():
            if not k.startswith(prefix):
                continue                              # the text tower
            k = k[len(prefix):]
            if k == "proj":
                continue                              # projection to the joint space: unused
            if k == "class_embedding":
                out["cls_token"] = v.reshape(1, 1, -1)
                continue
            if k == "positional_embedding":
                out["pos_embed"] = v.unsqueeze(0)
                continue
            for old, new in cls.RENAMES:
                k = k.replace(old, new)
            out[k] = v
        return out


#################################################################################
#                                  Registry                                      #
#################################################################################

def register(spec: EncoderSpec) -> EncoderSpec:
    for n in (spec.name, *spec.aliases):
        if n in ENCODERS or n in ALIASES:
            raise ValueError(f"encoder name {n!r} registered twice")
    ENCODERS[spec.name] = spec
    ALIASES.update({a: spec.name for a in spec.aliases})
    ENCODER_WIDTHS[spec.name] = spec.width
    return spec


_DINOV2 = {"s": (384, 12, 6, "small"), "b": (768, 12, 12, "base"), "l": (1024, 24, 16, "large"),
           "g": (1536, 40, 24, "giant")}
for _s, (_w, _d, _h, _long) in _DINOV2.items():
    for _reg in (False, True):
        _file = f"dinov2_vit{_s}14" + ("_reg4" if _reg else "") + "_pretrain.pth"
        register(EncoderSpec(
            name=f"dinov2-vit-{_s}" + ("-reg" if _reg else ""), family=DINOv2, width=_w, depth=_d, heads=_h, patch=14,
            timm_name=f"vit_{_long}_patch14" + ("_reg4" if _reg else "") + "_dinov2", registers=4 if _reg else 0,
            weights_file=_file, url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{_s}14/{_file}",
            hub_model=f"dinov2_vit{_s}14" + ("_reg" if _reg else ""),
            aliases=(f"dinov2reg-vit-{_s}",) if _reg else ()))
register(EncoderSpec(
    name="dinov2-vit-tiny", family=DINOv2, width=128, depth=4, heads=4, patch=14,
    timm_name="vit_small_patch14_dinov2",
    weights_file="dinov2_vittiny14_pretrain.pth"))
for _reg in (False, True):
    register(EncoderSpec(name="random-vit-tiny" + ("-reg" if _reg else ""), family=RandomViT, width=64, depth=2,
                         heads=2, patch=14, timm_name="",
                         registers=4 if _reg else 0))
register(EncoderSpec(
    name="dinov1-vit-b", family=DINOv1, width=768, depth=12, heads=12, patch=16, timm_name="vit_base_patch16_224",
    weights_file="dino_vitbase16_pretrain.pth", repa_file="dinov1_vitb.pth",
    url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"))
# MoCo v3's ViT-S has 12 heads (timm's ViT-S has 6): heads come from here, not from timm's model
for _s, (_w, _d, _h, _base) in {"s": (384, 12, 12, "vit_small_patch16_224"), "b": (768, 12, 12, "vit_base_patch16_224"),
                                "l": (1024, 24, 16, "vit_large_patch16_224")}.items():
    _file = {"s": "vit-s-300ep.pth.tar", "b": "vit-b-300ep.pth.tar", "l": "vitl.pth.tar"}[_s]
    _url = (f"https://dl.fbaipublicfiles.com/moco-v3/vit-{_s}-300ep/{_file}" if _s != "l"
            else "https://github.com/LTH14/rcg (MoCo v3 ViT-L, pretrained_enc_ckpts/mocov3/vitl.pth.tar)")
    register(EncoderSpec(
        name=f"mocov3-vit-{_s}", family=MoCoV3, width=_w, depth=_d, heads=_h, patch=16, timm_name=_base,
        weights_file=_file, repa_file=f"mocov3_vit{_s}.pth", url=_url))
register(EncoderSpec(
    name="mae-vit-l", family=MAE, width=1024, depth=24, heads=16, patch=16, timm_name="vit_large_patch16_224",
    weights_file="mae_pretrain_vit_large.pth", repa_file="mae_vitl.pth",
    url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"))
register(EncoderSpec(
    name="jepa-vit-h", family=JEPA, width=1280, depth=32, heads=16, patch=14, timm_name="vit_huge_patch14_gap_224",
    weights_file="IN1K-vit.h.14-300e.pth.tar", repa_file="ijepa_vith.pth",
    url="https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar", aliases=("ijepa-vit-h",)))
register(EncoderSpec(
    name="clip-vit-L", family=CLIP, width=1024, depth=24, heads=16, patch=14,
    timm_name="vit_large_patch14_clip_quickgelu_224", weights_file="ViT-L-14.pt",
    url="https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    aliases=("clip-vit-l",)))


#################################################################################
#                         Where the weights come from                            #
#################################################################################

@dataclass(frozen=True)
class WeightsSource:
    kind: str              # "file" | "hub-clone" | "torch.hub" | "random"
    path: str | None = None


def _in_folder(folder: str, spec: EncoderSpec) -> str | None:
    for fname in spec.file_names():
        candidate = os.path.join(folder, fname)
        if os.path.isfile(candidate):
            return candidate
    return None


def _missing_weights(spec: EncoderSpec) -> FileNotFoundError:
    env = spec.family.env_var
    if spec.url is None:
        return FileNotFoundError(
            f"encoder {spec.name!r} has no published weights: train one, save it with "
            f"models.encoders.save_official_layout(model, '{spec.weights_file}') and set {env}=FILE_OR_FOLDER "
            "(dataset_tools.py also takes --enc-weights FILE)")
    repa = f" (or REPA's name {spec.repa_file})" if spec.repa_file else ""
    return FileNotFoundError(
        f"encoder {spec.name!r} needs its weights offline: supply {spec.weights_file}{repa}, published at "
        f"{spec.url}, with {env}=FILE_OR_FOLDER (dataset_tools.py also takes --enc-weights FILE)")


def resolve_weights(name: str, local_path: str | None = None) -> WeightsSource:
    """Where ``build_encoder`` takes an encoder's weights from (module docstring); nothing is read."""
    spec = encoder_spec(name)
    fam = spec.family
    if issubclass(fam, RandomViT):
        if local_path:
            raise ValueError(f"{spec.name} has random weights; it takes no weights path")
        return WeightsSource("random")
    is_dinov2 = issubclass(fam, DINOv2)
    if local_path:
        local_path = os.path.abspath(os.path.expanduser(local_path))
        if os.path.isfile(local_path):
            return WeightsSource("file", local_path)
        if os.path.isdir(local_path):
            if is_dinov2 and spec.hub_model and os.path.isfile(os.path.join(local_path, "hubconf.py")):
                return WeightsSource("hub-clone", local_path)
            found = _in_folder(local_path, spec)
            if found:
                return WeightsSource("file", found)
        clone = f", or a clone of {HUB_REPO} (with hubconf.py)" if is_dinov2 and spec.hub_model else ""
        raise FileNotFoundError(f"encoder weights for {spec.name!r} not found at {local_path}: expected a weights "
                                f"file, a folder holding {' or '.join(spec.file_names())}{clone}")
    env = os.environ.get(fam.env_var) if fam.env_var else None
    if env:
        env = os.path.abspath(os.path.expanduser(env))
        if os.path.isdir(env):
            found = _in_folder(env, spec)
            if found:
                return WeightsSource("file", found)
        elif os.path.isfile(env):
            return WeightsSource("file", env)
        else:
            raise FileNotFoundError(f"{fam.env_var}={env} does not exist; unset it or point it at "
                                    f"{spec.weights_file}")
    if is_dinov2 and spec.hub_model:
        repo = os.environ.get(ENV_REPO)
        if repo:
            if not os.path.isfile(os.path.join(repo, "hubconf.py")):
                raise FileNotFoundError(f"{ENV_REPO}={repo} is not a clone of {HUB_REPO} (no hubconf.py)")
            return WeightsSource("hub-clone", os.path.abspath(repo))
        return WeightsSource("torch.hub", HUB_REPO)
    if fam is CLIP:
        cached = os.path.join(os.path.expanduser("~/.cache/clip"), spec.weights_file)
        if os.path.isfile(cached):
            return WeightsSource("file", cached)
    raise _missing_weights(spec)


_SHA_CACHE: dict = {}


def _sha256(path: str) -> str:
    from fileio import file_sha256

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def weights_record(name: str, local_path: str | None = None) -> dict:
    """Where an encoder's weights come from, for manifests: {"source", "path"/"model", "sha256"}.
    A torch.hub source is hashed through its cached checkpoint when that is on disk."""
    spec = encoder_spec(name)
    src = resolve_weights(name, local_path)
    if src.kind == "random":
        return {"source": "random", "seed": RANDOM_SEED, "sha256": None}
    if src.kind == "file":
        return {"source": "file", "path": src.path, "sha256": _sha256(src.path)}
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", spec.weights_file)
    return {"source": src.kind, "path": src.path, "model": spec.hub_model,
            "sha256": _sha256(cached) if os.path.isfile(cached) else None}


def weights_differ(recorded: dict | None, current: dict | None) -> str | None:
    """Why two weights records are not the same weights; None when they are, or when it cannot be
    told (a record missing, or one side unhashed: torch.hub weights not downloaded yet)."""
    if not recorded or not current:
        return None

    def show(r):
        sha = f" (sha256 {r['sha256'][:12]})" if r.get("sha256") else ""
        return f"{r.get('path') or r.get('model') or r.get('source')}{sha}"

    a, b = recorded.get("sha256"), current.get("sha256")
    if a and b:
        same = a == b
    elif "random" in (recorded.get("source"), current.get("source")):
        same = (recorded.get("source"), recorded.get("seed")) == (current.get("source"), current.get("seed"))
    elif a or b:
        return None
    else:
        same = all(recorded.get(k) == current.get(k) for k in ("source", "path", "model"))
    return None if same else f"weights {show(recorded)} vs {show(current)}"


#################################################################################
#                                  Builders                                      #
#################################################################################

def _read_checkpoint(path: str):
    """A checkpoint as published: a torch pickle (read weights-only) or a TorchScript archive
    (OpenAI's CLIP files; torch.jit.load runs the archive's code, as the clip package does)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        if scripted:
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    return torch.load(path, map_location="cpu", weights_only=True)


def _resample_pos_embed(sd: dict, model: nn.Module) -> dict:
    """The checkpoint's absolute position embedding resampled to the model's grid (REPA's
    timm resample_abs_pos_embed: bicubic, antialiased; prefix rows kept)."""
    from timm.layers import resample_abs_pos_embed

    pos = sd.get("pos_embed")
    if pos is None or getattr(model, "pos_embed", None) is None or pos.shape == model.pos_embed.shape:
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return sd


def _timm_from_weights(spec: EncoderSpec, path: str, input_size: int) -> nn.Module:
    """The family's timm architecture at input_size, every tensor from the published file."""
    fam = spec.family
    with torch.device("meta"):   # no random init: every tensor comes from the file
        model = fam.architecture(spec, input_size)
    try:
        raw = _read_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        first = " ".join(str(e).split())[:200] or type(e).__name__
        hint = ""
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            hint = (" (it pickles objects other than tensors, e.g. 'args': if you trust the file, re-save it "
                    "without them)")
        raise ValueError(f"cannot read weights file {path}{hint}: {first}; expected {spec.weights_file}") from e
    try:
        sd = fam.to_timm(raw, spec, model)
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}   # CLIP ships fp16
        sd = _resample_pos_embed(sd, model)
        model.load_state_dict(sd, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        raise ValueError(f"weights file {path} does not fit encoder {spec.name!r} ({first}); "
                         f"expected {spec.weights_file}") from e
    return model


def _hub_model(spec: EncoderSpec, repo_or_dir: str, source: str, resolution: int) -> nn.Module:
    from timm.layers import resample_abs_pos_embed

    try:
        model = torch.hub.load(repo_or_dir, spec.hub_model, source=source, trust_repo=True)
    except Exception as e:  # noqa: BLE001 - network, cache or import errors all mean "missing"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"could not load encoder {spec.name!r} (torch.hub {HUB_REPO}:{spec.hub_model}): {text}. "
            f"Offline? point {ENV_WEIGHTS} at {spec.weights_file} (or a folder holding it; dataset_tools.py "
            f"also takes --enc-weights FILE), or {ENV_REPO} at a local clone of {HUB_REPO} with its weights cached") from e
    model.head = nn.Identity()
    grid = spec.grid(resolution)
    # Release: the hub's 37x37 absolute embedding resampled once (bicubic, antialias, class row kept).
    model.pos_embed.data = resample_abs_pos_embed(model.pos_embed.data, [grid, grid], num_prefix_tokens=1)
    return model


def random_encoder(name: str, resolution: int, depth: int | None = None, seed: int = RANDOM_SEED,
                   device=None) -> Encoder:
    """An encoder of the registered architecture with random weights (timm's init under ``seed``,
    the global RNG untouched). ``depth`` shortens it; ``device='meta'`` builds shapes only."""
    spec = encoder_spec(name)
    input_size = spec.input_size(resolution)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        backbone = spec.family.architecture(spec, input_size, depth)
        enc = Encoder(spec.name, backbone, "timm", resolution)
    enc.weights = WeightsSource("random")
    return enc


def build_encoder(name: str, resolution: int, local_path: str | None = None) -> Encoder:
    """One encoder on CPU, frozen. See the module docstring for where weights come from."""
    spec = encoder_spec(name)
    resolution = check_resolution(resolution)
    src = resolve_weights(spec.name, local_path)
    if src.kind == "random":
        enc = random_encoder(spec.name, resolution)
    elif src.kind == "file":
        enc = Encoder(spec.name, _timm_from_weights(spec, src.path, spec.input_size(resolution)), "timm", resolution)
    else:
        repo, source = (src.path, "local") if src.kind == "hub-clone" else (HUB_REPO, "github")
        enc = Encoder(spec.name, _hub_model(spec, repo, source, resolution), "hub", resolution)
    enc.weights = src
    return enc


def load_encoders(enc_types, resolution: int, device="cpu", local_paths: dict | None = None) -> list[Encoder]:
    """Frozen encoders, in the order given, on `device`. local_paths: {name: weights file or folder}."""
    names = parse_enc_types(enc_types)
    local_paths = {canonical_name(k): v for k, v in (local_paths or {}).items()}
    unknown = set(local_paths) - set(names)
    if unknown:
        raise ValueError(f"weights given for encoders not requested: {', '.join(sorted(unknown))}")
    return [build_encoder(n, resolution, local_paths.get(n)).to(device) for n in names]


#################################################################################
#                 Writing DINOv2 weights in the official layout                  #
#################################################################################

def official_dinov2_state_dict(model: nn.Module) -> dict:
    """A timm DINOv2 ViT's weights (or an Encoder's) with facebookresearch/dinov2's key names.

    Registers: the official file keeps the class token without its position row and stores
    ``register_tokens``; the class row written here is zero, so reading it back is exact."""
    backbone = model.backbone if isinstance(model, Encoder) else model
    if isinstance(model, Encoder) and model.backend != "timm":
        raise ValueError("save_official_layout needs a timm backbone (a hub model is already official)")
    sd = {k: v.detach().clone().cpu() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    width = sd["cls_token"].shape[-1]
    out = {}
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
        pos = sd.pop("pos_embed")
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, width, dtype=pos.dtype), pos], dim=1)
    for k, v in sd.items():
        k = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", k) if ".mlp.fc1." in k and _swiglu(backbone) else k
        k = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", k) if ".mlp.fc2." in k and _swiglu(backbone) else k
        out[k] = v
    out["mask_token"] = torch.zeros(1, width)
    return out


def _swiglu(backbone: nn.Module) -> bool:
    from timm.layers import GluMlp          # timm's SwiGLUPacked (ViT-g): official mlp.w12 / mlp.w3
    return any(isinstance(m, GluMlp) for m in backbone.modules())


def save_official_layout(model: nn.Module, path: str) -> str:
    """Write a timm DINOv2 model's (or Encoder's) weights as an official DINOv2 .pth, atomically.
    Load it back with ``--enc-weights PATH`` or ``REG_DINOV2_WEIGHTS=PATH``."""
    from fileio import atomic_torch_save

    atomic_torch_save(official_dinov2_state_dict(model), path)
    return path
