"""Image <-> latent codecs and their latent scaling, in one place.

The SiT models never see raw latents: training feeds z = latent * scale + bias and sampling
decodes codec.decode((z - bias) / scale). For SD-VAE the release hard-codes scale = 0.18215,
bias = 0; this module is the only place that number lives (``SD_VAE_SCALE``).

Codecs are small classes behind a registry (``CODECS``; the first whose ``matches(spec)`` is
true builds it). Specs understood by ``Autoencoder.from_spec`` (recorded in manifests and
checkpoints, with the codec's identity, so the same codec can be rebuilt later):

* ``"ema"`` / ``"mse"``: ``stabilityai/sd-vae-ft-ema`` / ``-mse`` (same encoder, different
  decoder fine-tune; the release encodes with mse and decodes with ema);
* any other Hugging Face id, a local diffusers ``AutoencoderKL`` directory, or a single
  ``.safetensors`` / ``.ckpt`` file: any channel count and downsampling; scale and shift from its
  config (``scaling_factor``, ``shift_factor``: z = (latent - shift) * scale, as diffusers);
* ``"identity"``: pixel-space stand-in (3 channels, no downsampling) for the CPU demo;
  ``"identity-f8"`` (any factor): the same pixels folded losslessly into 3*8*8 channels on an
  H/8 x W/8 grid (pixel unshuffle), so the token grid matches an SD-VAE's and a DINOv2
  encoder's at the same resolution (REPA alignment needs equal token counts);
* ``"pca:FILE"``: a linear patch codec fitted to a dataset by ``dataset_tools.py fit-pca``: each
  f x f pixel patch (3 f^2 values) is projected on its top C principal components, giving a
  C-channel latent on an H/f x W/f grid like an SD-VAE's. A stand-in for the CPU demo, where no
  VAE weights exist: it compresses like a VAE (tokens carry C p^2 values, not 3 f^2 p^2), which
  is what lets a tiny SiT learn in minutes; lossless up to the discarded components;
* ``"random-tiny"``: a tiny ``AutoencoderKL`` with random weights (seed 0), for tests only.

Identity (``Autoencoder.identity``, ``codec_identity(spec)``): family (``sd-vae``,
``autoencoder-kl``, ``pca``, ``identity``, ``random-tiny``), variant (``ft-mse`` / ``ft-ema`` for
SD-VAEs), source (hub id or absolute path), scale, bias, channels, downsample.
``decoder_for(identity_or_spec, vae, vae_path)`` decides what decodes such latents: SD-VAE
latents (hub id or a local copy) decode with the EMA decoder unless ``--vae`` / ``--vae-path``
say otherwise; every other codec decodes with itself.

Offline use: the environment variable ``REG_VAE_PATH`` may point at a local copy, either a
diffusers directory / single file used for every Hugging Face spec, or a folder holding one
sub-directory per model named like the id's last part (``sd-vae-ft-mse/``, ``sd-vae-ft-ema/``).
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
import torch.nn.functional as F

from fileio import read_json

SD_VAE_SCALE = 0.18215   # latent scaling of the Stable Diffusion VAE (release: hard-coded)
SD_VAE_BIAS = 0.0
SD_VAE_IDS = {"ft-mse": "stabilityai/sd-vae-ft-mse", "ft-ema": "stabilityai/sd-vae-ft-ema"}
RELEASE_ENCODER = SD_VAE_IDS["ft-mse"]      # what the release's encode step uses
VAE_ALIASES = {
    "ema": SD_VAE_IDS["ft-ema"],
    "mse": SD_VAE_IDS["ft-mse"],
}
ENV_VAE_PATH = "REG_VAE_PATH"
SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PCA_PREFIX = "pca:"
PCA_KIND = "patch-pca"


#################################################################################
#                              Loading helpers                                   #
#################################################################################

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _missing_error(what: str, reason: str) -> FileNotFoundError:
    first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return FileNotFoundError(
        f"could not load the VAE {what!r} ({first_line}); without network, point --model-url / "
        f"--vae at a local diffusers directory or .safetensors file, or set {ENV_VAE_PATH}")


def _resolve_env_copy(hf_id: str) -> str | None:
    """Local copy of a Hugging Face id from REG_VAE_PATH, if that variable is set."""
    root = os.environ.get(ENV_VAE_PATH)
    if not root:
        return None
    if not os.path.exists(root):
        raise FileNotFoundError(f"{ENV_VAE_PATH}={root} does not exist; unset it or point it at a "
                                f"local copy of {hf_id}")
    for candidate in (os.path.join(root, hf_id), os.path.join(root, hf_id.split("/")[-1])):
        if os.path.isdir(candidate):
            return candidate
    return root


def _load_autoencoder_kl(source: str, what: str):
    """diffusers.AutoencoderKL from a directory, a single file, or a Hugging Face id."""
    from diffusers import AutoencoderKL

    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FileNotFoundError(f"VAE directory {source} has no config.json; expected a diffusers "
                                    f"AutoencoderKL folder (save_pretrained layout)")
        try:
            return AutoencoderKL.from_pretrained(source, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised as one line
            raise _missing_error(f"{what} (from {source})", e) from e
    if source.lower().endswith(SINGLE_FILE_EXTS):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"VAE weights file {source} does not exist")
        try:
            return AutoencoderKL.from_single_file(source, local_files_only=_offline())
        except Exception as e:  # noqa: BLE001
            raise _missing_error(f"{what} (single file {source}; its diffusers config must be "
                                 f"reachable or cached)", e) from e
    # A Hugging Face id: cache first (no network), then the hub unless offline.
    try:
        return AutoencoderKL.from_pretrained(source, local_files_only=True)
    except Exception as cache_error:  # noqa: BLE001
        if _offline():
            raise _missing_error(what, cache_error) from cache_error
    try:
        return AutoencoderKL.from_pretrained(source)
    except Exception as e:  # noqa: BLE001
        raise _missing_error(what, e) from e


def _random_tiny_autoencoder_kl():
    """A 4-channel, /8 AutoencoderKL with a few thousand random parameters (seed 0). Tests only."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            sample_size=32, scaling_factor=SD_VAE_SCALE)


#################################################################################
#                      Linear patch codec (PCA), for the demo                    #
#################################################################################

class PatchPCA:
    """Top-C principal components of f x f RGB patches (pixels in [-1, 1]); fitted by fit_patch_pca.

    encode: (N, 3, H, W) -> (N, C, H/f, W/f), latent = components @ (patch - mean)
    decode: the transpose, + mean; exact for images whose patches lie in the components' span.
    """

    def __init__(self, components: torch.Tensor, mean: torch.Tensor, factor: int):
        self.components = components.float()          # (C, 3 f^2), orthonormal rows
        self.mean = mean.float()                      # (3 f^2,)
        self.factor = int(factor)

    def to(self, device):
        self.components, self.mean = self.components.to(device), self.mean.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.pixel_unshuffle(x, self.factor) - self.mean[:, None, None]         # (N, 3f^2, h, w)
        return torch.einsum("cd,ndhw->nchw", self.components, patches)                # (N, C, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        patches = torch.einsum("cd,nchw->ndhw", self.components, z) + self.mean[:, None, None]
        return F.pixel_shuffle(patches, self.factor)                                  # (N, 3, H, W)


def fit_patch_pca(batches, factor: int, channels: int) -> dict:
    """Fit a PatchPCA on uint8 (N, 3, H, W) batches; returns the dict ``pca:FILE`` loads.

    Statistics are accumulated in float64 (sum and sum of outer products), so any number of
    batches can stream through. ``scale`` makes the latents unit-variance overall (one number,
    like SD-VAE's 0.18215, so the channels keep their relative sizes).
    """
    d = 3 * factor * factor
    if not 1 <= channels <= d:
        raise ValueError(f"--channels must be between 1 and 3*factor^2 = {d}, got {channels}")
    total, outer, count, images = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0, 0
    for batch in batches:
        x = batch.to(torch.float64) / 127.5 - 1
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by --factor {factor}")
        p = F.pixel_unshuffle(x, factor).permute(0, 2, 3, 1).reshape(-1, d)            # (N h w, 3f^2)
        total += p.sum(0)
        outer += p.T @ p
        count += p.shape[0]
        images += x.shape[0]
    if count == 0:
        raise ValueError("no images to fit the PCA codec on")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    evals, evecs = torch.linalg.eigh(cov)                                             # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    comps = evecs[:, :channels].T.contiguous()                                        # (C, d)
    # Deterministic signs: the largest-magnitude entry of each component is positive.
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * signs
    latent_var = float(evals[:channels].sum() / channels)
    return {"kind": PCA_KIND, "factor": int(factor), "channels": int(channels),
            "components": comps.float(), "mean": mean.float(),
            "scale": 1.0 / max(latent_var, 1e-12) ** 0.5,
            "explained_variance": float(evals[:channels].sum() / evals.sum().clamp_min(1e-12)),
            "num_images": images}


def _load_patch_pca(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PCA codec file {path} does not exist; make it with "
                                f"'python preprocessing/dataset_tools.py fit-pca'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line
        raise ValueError(f"cannot read the PCA codec file {path} ({type(e).__name__}: {e}); "
                         f"rerun fit-pca") from e
    if not isinstance(state, dict) or state.get("kind") != PCA_KIND:
        raise ValueError(f"{path} is not a PCA codec file written by fit-pca")
    return state


def sample_latents(moments: torch.Tensor, scale: float, bias: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """[mean, std] (N, 2C, h, w) -> z = (mean + std * eps) * scale + bias, (N, C, h, w): the training
    input, drawn afresh at every step as the release does. Needs only the scale, not the VAE."""
    mean, std = moments.chunk(2, dim=1)                                  # (N, C, h, w) each
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale + bias


#################################################################################
#                                   Codecs                                       #
#################################################################################

def _sd_vae_variant(*hints) -> str | None:
    """'ft-mse' / 'ft-ema' when a name or path says which SD-VAE it is."""
    for h in hints:
        h = str(h or "").lower()
        for variant, hub_id in SD_VAE_IDS.items():
            if hub_id.split("/")[-1] in h:
                return variant
    return None


def _looks_like_sd_vae(channels, downsample, scale, bias) -> bool:
    return channels == 4 and downsample == 8 and scale == SD_VAE_SCALE and not bias


class Codec:
    """pixels in [-1, 1] <-> raw latents, plus the identity recorded with the latents."""
    family: ClassVar[str] = ""

    def __init__(self, spec: str, *, latent_channels: int, downsample: int, scale: float, bias: float,
                 source: str | None = None, variant: str | None = None):
        self.spec = spec
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scale = float(scale)
        self.bias = float(bias)
        self.source = source
        self.variant = variant

    @classmethod
    def matches(cls, spec: str) -> bool:
        raise NotImplementedError

    @classmethod
    def build(cls, spec: str) -> "Codec":
        raise NotImplementedError

    def to(self, device, dtype) -> "Codec":
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) float32 in [-1, 1] -> posterior (mean, std), each (N, C, H/f, W/f)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> pixels (N, 3, H, W), roughly in [-1, 1]."""
        raise NotImplementedError

    def identity(self) -> dict:
        return {"family": self.family, "variant": self.variant, "spec": self.spec, "source": self.source,
                "scale": self.scale, "bias": self.bias, "latent_channels": self.latent_channels,
                "downsample": self.downsample}


class PixelCodec(Codec):
    """'identity' / 'identity-fN': pixels folded into 3 N^2 channels (pixel unshuffle), std 0."""
    family = "identity"

    @classmethod
    def matches(cls, spec):
        return spec == "identity" or spec.startswith("identity-f")

    @classmethod
    def build(cls, spec):
        f = 1 if spec == "identity" else spec.removeprefix("identity-f")
        if not str(f).isdigit() or int(f) < 1:
            raise ValueError(f"bad autoencoder spec {spec!r}: use 'identity' or 'identity-fN' with N a positive integer")
        f = int(f)
        return cls(spec, latent_channels=3 * f * f, downsample=f, scale=1.0, bias=0.0)

    def encode(self, x):
        x = F.pixel_unshuffle(x, self.downsample)                      # (N, 3 f^2, H/f, W/f)
        return x, torch.zeros_like(x)

    def decode(self, latents):
        return F.pixel_shuffle(latents, self.downsample)


class PCACodec(Codec):
    """'pca:FILE': the linear patch codec of fit-pca (std 0)."""
    family = "pca"

    def __init__(self, spec, pca: "PatchPCA", **kw):
        super().__init__(spec, **kw)
        self.pca = pca

    @classmethod
    def matches(cls, spec):
        return spec.startswith(PCA_PREFIX)

    @classmethod
    def build(cls, spec):
        path = os.path.abspath(os.path.expanduser(spec.removeprefix(PCA_PREFIX)))
        st = _load_patch_pca(path)
        # recorded absolute, so checkpoints and manifests rebuild it from any directory
        return cls(PCA_PREFIX + path, PatchPCA(st["components"], st["mean"], st["factor"]),
                   latent_channels=st["channels"], downsample=st["factor"], scale=st["scale"], bias=0.0, source=path)

    def to(self, device, dtype):
        self.pca.to(device)
        return self

    def encode(self, x):
        mean = self.pca.encode(x)                                      # (N, C, h, w)
        return mean, torch.zeros_like(mean)

    def decode(self, latents):
        return self.pca.decode(latents.to(self.pca.components.device, torch.float32))


class KLCodec(Codec):
    """A diffusers AutoencoderKL (a Hugging Face id, a local folder or a single file), any size.

    Scale and shift come from its config: z = (latent - shift_factor) * scaling_factor, i.e.
    scale = scaling_factor, bias = -shift_factor * scaling_factor (SD-VAE: 0.18215, 0)."""
    family = "autoencoder-kl"

    def __init__(self, spec, vae, family: str, **kw):
        super().__init__(spec, **kw)
        self.vae = vae.eval().requires_grad_(False)
        self.family = family

    @classmethod
    def matches(cls, spec):
        return True                                  # anything else is a model to load

    @classmethod
    def build(cls, spec):
        if os.path.exists(spec):
            source = os.path.abspath(spec)           # recorded absolute, like pca:FILE
            vae = _load_autoencoder_kl(spec, spec)
            spec = source
        elif spec.lower().endswith(SINGLE_FILE_EXTS) or spec.startswith((".", "/", "~")):
            raise FileNotFoundError(f"VAE path {spec} does not exist")
        else:
            source = VAE_ALIASES.get(spec, spec)
            local = _resolve_env_copy(source)
            vae = _load_autoencoder_kl(local if local else source, source)
        return cls.from_vae(spec, vae, source)

    @classmethod
    def from_vae(cls, spec, vae, source, family=None):
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None or getattr(cfg, "latents_std", None) is not None:
            raise ValueError(f"VAE {source} normalises its latents per channel (latents_mean / latents_std); "
                             f"only one scaling_factor and shift_factor are supported")
        channels, downsample, scale, bias = _kl_facts(lambda key: getattr(cfg, key, None))
        parts = (source or "").replace("\\", "/").split("/")
        variant = _sd_vae_variant(spec, *parts, getattr(cfg, "_name_or_path", None))
        if family is None:
            family = "sd-vae" if variant and _looks_like_sd_vae(channels, downsample, scale, bias) \
                else "autoencoder-kl"
        return cls(spec, vae, family, latent_channels=channels, downsample=downsample, scale=scale,
                   bias=bias, source=source, variant=variant if family == "sd-vae" else None)

    def to(self, device, dtype):
        # dtype only when it changes: diffusers warns about any dtype cast, even a no-op one.
        if self.vae.dtype != dtype:
            self.vae.to(dtype=dtype)
        self.vae.to(device)
        return self

    def encode(self, x):
        dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def decode(self, latents):
        return self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample.float()


class RandomTinyCodec(KLCodec):
    """'random-tiny': a 4-channel /8 AutoencoderKL, a few thousand random parameters (seed 0)."""

    @classmethod
    def matches(cls, spec):
        return spec == "random-tiny"

    @classmethod
    def build(cls, spec):
        return cls.from_vae(spec, _random_tiny_autoencoder_kl(), None, family="random-tiny")


CODECS: list[type[Codec]] = [PCACodec, PixelCodec, RandomTinyCodec, KLCodec]   # first match builds


def _codec_class(spec: str) -> type[Codec]:
    return next(c for c in CODECS if c.matches(spec))


#################################################################################
#                         Identity without loading; decoders                     #
#################################################################################

def _kl_config(folder: str) -> dict | None:
    path = os.path.join(folder, "config.json")
    return read_json(path) if os.path.isfile(path) else None


def _kl_facts(get) -> tuple:
    """(latent channels, downsampling, scale, bias) of an AutoencoderKL config read through ``get(key)``
    (diffusers' config object or a config.json dict). diffusers' default scaling_factor is the
    SD-VAE's value, and SD-VAE's configs agree."""
    scale = get("scaling_factor") or SD_VAE_SCALE
    shift = get("shift_factor") or 0.0
    bias = -shift * scale if shift else SD_VAE_BIAS
    return get("latent_channels"), 2 ** (len(get("block_out_channels") or [0]) - 1), scale, bias


def codec_identity(spec: str | None) -> dict:
    """The identity of a codec spec, from the spec (and a local folder's config.json) alone.
    For old manifests and checkpoints that recorded only a spec; None means the release's
    latents (stabilityai/sd-vae-ft-mse)."""
    spec = RELEASE_ENCODER if spec is None else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"codec spec must be a non-empty string, got {spec!r}")
    cls = _codec_class(spec)
    if cls is PixelCodec:
        return PixelCodec.build(spec).identity()
    if cls is RandomTinyCodec:
        return {"family": "random-tiny", "variant": None, "spec": spec, "source": None, "scale": SD_VAE_SCALE,
                "bias": SD_VAE_BIAS, "latent_channels": 4, "downsample": 8}
    if cls is PCACodec:
        path = os.path.abspath(os.path.expanduser(spec.removeprefix(PCA_PREFIX)))
        ident = {"family": "pca", "variant": None, "spec": PCA_PREFIX + path, "source": path, "scale": None,
                 "bias": 0.0, "latent_channels": None, "downsample": None}
        if os.path.isfile(path):
            st = _load_patch_pca(path)
            ident.update(scale=float(st["scale"]), latent_channels=int(st["channels"]), downsample=int(st["factor"]))
        return ident
    local = os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(spec)
    source = os.path.abspath(os.path.expanduser(spec)) if local else VAE_ALIASES.get(spec, spec)
    cfg = _kl_config(source) if local and os.path.isdir(source) else None
    variant = _sd_vae_variant(spec, *source.replace("\\", "/").split("/"), (cfg or {}).get("_name_or_path"))
    if cfg is not None:
        channels, down, scale, bias = _kl_facts(cfg.get)
        sd = variant is not None and _looks_like_sd_vae(channels, down, scale, bias)
    elif variant is not None:        # a hub id or a (gone) path named after an SD-VAE
        scale, bias, channels, down, sd = SD_VAE_SCALE, SD_VAE_BIAS, 4, 8, True
    else:
        scale = bias = channels = down = None
        sd = False
    return {"family": "sd-vae" if sd else "autoencoder-kl", "variant": variant if sd else None,
            "spec": source if local else spec, "source": source, "scale": scale, "bias": bias,
            "latent_channels": channels, "downsample": down}


def decoder_for(identity_or_spec, vae: str | None = None, vae_path: str | None = None) -> str:
    """The spec of the decoder for latents made by a codec (its identity dict or spec string).

    SD-VAE latents (hub id or a local copy) decode with the EMA-fine-tuned decoder ('ema', as the
    release; REG_VAE_PATH for an offline copy) unless ``vae`` ('ema' / 'mse') or ``vae_path`` (a
    local AutoencoderKL folder or file) is given; other AutoencoderKLs decode with themselves
    (or a copy at ``vae_path``); pca / identity / random-tiny decode with themselves only.
    """
    ident = identity_or_spec if isinstance(identity_or_spec, dict) else codec_identity(identity_or_spec)
    family, spec, source = ident.get("family"), ident.get("spec"), ident.get("source")
    if family == "pca":
        return _pca_decoder(ident, vae, vae_path)
    if family in ("identity", "random-tiny"):
        if vae is not None or vae_path is not None:
            flag = "--vae" if vae is not None else "--vae-path"
            raise ValueError(f"{flag}: these latents were made by {spec!r}, which decodes with itself; drop {flag}")
        return spec
    if vae_path is not None:
        path = os.path.abspath(os.path.expanduser(vae_path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"--vae-path {path} does not exist; point it at a local AutoencoderKL "
                                    f"folder (config.json + weights) or single file")
        cfg = _kl_config(path) if os.path.isdir(path) else None
        if cfg is not None and ident.get("latent_channels") is not None:
            channels, down, _, _ = _kl_facts(cfg.get)
            if (channels, down) != (ident["latent_channels"], ident["downsample"]):
                raise ValueError(f"--vae-path {path} makes {cfg.get('latent_channels')}-channel /{down} latents but "
                                 f"these are {ident['latent_channels']}-channel /{ident['downsample']} ({source})")
        return path
    if family == "sd-vae":
        if vae is None:
            if ident.get("variant") == "ft-ema" and source and os.path.isabs(source) and os.path.exists(source):
                return source                 # a local copy of the EMA decoder itself
            return "ema"
        if vae in VAE_ALIASES or vae in SD_VAE_IDS.values():
            return vae
        raise ValueError(f"--vae {vae!r}: choose ema or mse (the SD-VAE decoders), or give --vae-path")
    if vae is not None:
        raise ValueError(f"--vae {vae}: these latents were made by {source}, not an SD-VAE; drop --vae, or "
                         f"point --vae-path at a copy of that autoencoder")
    if source and os.path.isabs(source) and not os.path.exists(source):
        raise FileNotFoundError(f"these latents were made by the autoencoder at {source}, which no longer exists; "
                                f"point --vae-path at a copy of it (or --vae ema|mse for SD-VAE latents)")
    return spec


def _pca_decoder(ident: dict, vae: str | None, vae_path: str | None) -> str:
    """A PCA codec decodes with its own file, or with a copy of it at ``vae_path`` (a dataset or
    checkpoint moved to another machine): the copy must have the recorded channels and factor."""
    source = ident.get("source")
    if vae is not None:
        raise ValueError(f"--vae {vae}: these latents were made by the PCA codec {source}, not an SD-VAE; drop "
                         "--vae (give --vae-path with a copy of the codec file if it has moved)")
    if vae_path is None:
        if source and not os.path.isfile(source):
            raise FileNotFoundError(f"these latents were made by the PCA codec {source}, which no longer exists; "
                                    "point --vae-path at a copy of that file")
        return ident["spec"]
    path = os.path.abspath(os.path.expanduser(vae_path.removeprefix(PCA_PREFIX)))
    st = _load_patch_pca(path)
    want = (ident.get("latent_channels"), ident.get("downsample"))
    got = (int(st["channels"]), int(st["factor"]))
    if None not in want and got != want:
        raise ValueError(f"--vae-path {path} is a {got[0]}-channel /{got[1]} PCA codec but these latents are "
                         f"{want[0]}-channel /{want[1]} ({source})")
    return PCA_PREFIX + path


#################################################################################
#                                 Autoencoder                                    #
#################################################################################

class Autoencoder:
    """A codec and its latent scaling: z = latent * scale + bias.

    encode_moments stores what the release stores (the posterior's [mean, std] on channels);
    sample draws the training input from it; decode inverts the scaling and runs the decoder.
    """

    def __init__(self, codec: Codec, device="cpu", dtype=torch.float32):
        self.codec = codec
        self.device = torch.device(device)
        self.dtype = dtype
        self.codec.to(self.device, self.dtype)

    # ---------------------------------------------------------------- build
    @classmethod
    def from_spec(cls, spec: str, device="cpu", dtype=torch.float32) -> "Autoencoder":
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("autoencoder spec must be a non-empty string such as 'mse', 'ema', "
                             "a Hugging Face id, a local path, 'identity', 'pca:FILE' or 'random-tiny'")
        return cls(_codec_class(spec).build(spec), device=device, dtype=dtype)

    # The codec's facts, read through: spec, latent_channels, downsample, scale, bias; and its
    # diffusers AutoencoderKL (vae) or patch PCA (pca), None for codecs without one.
    _CODEC_FACTS = ("spec", "latent_channels", "downsample", "scale", "bias")

    def __getattr__(self, name):
        if name in Autoencoder._CODEC_FACTS:
            return getattr(self.codec, name)
        if name in ("vae", "pca"):
            return getattr(self.codec, name, None)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def identity(self) -> dict:
        """What made these latents: family, variant, spec, source, scale, bias, channels, downsample."""
        return self.codec.identity()

    def to(self, device=None, dtype=None) -> "Autoencoder":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        self.codec.to(self.device, self.dtype)
        return self

    def __repr__(self):
        return (f"Autoencoder(spec={self.spec!r}, family={self.codec.family!r}, latent_channels={self.latent_channels}, "
                f"downsample={self.downsample}, scale={self.scale}, bias={self.bias})")

    # ---------------------------------------------------------------- codec
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 2C, H/f, W/f): posterior [mean, std] on channels."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_moments expects uint8 images (N, 3, H, W), got "
                             f"{tuple(images.shape)} {images.dtype}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's "
                             f"downsampling factor {self.downsample}")
        x = images.to(self.device, torch.float32) / 127.5 - 1          # (N, 3, H, W) in [-1, 1]
        mean, std = self.codec.encode(x)
        return torch.cat([mean, std], dim=1).float()                    # (N, 2C, h, w)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[mean, std] (N, 2C, h, w) -> z = (mean + std * eps) * scale + bias, (N, C, h, w)."""
        if moments.ndim != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise ValueError(f"moments must be (N, {2 * self.latent_channels}, h, w) for "
                             f"{self.spec!r}, got {tuple(moments.shape)}")
        return sample_latents(moments, self.scale, self.bias, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, H, W), roughly in [-1, 1]."""
        return self.codec.decode((z - self.bias) / self.scale)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in ~[-1, 1] -> uint8 (N, H, W, 3), the release's truncating quantisation."""
        x = torch.clamp(255.0 * ((x + 1) / 2), 0, 255)
        return x.permute(0, 2, 3, 1).to(torch.uint8)
