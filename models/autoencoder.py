"""Image <-> latent codec and its latent scaling, in one place.

The SiT models never see raw VAE latents: training feeds z = latent * scale + bias and
sampling decodes vae.decode((z - bias) / scale). For SD-VAE the release hard-codes
scale = 0.18215, bias = 0; this module is the only place that number lives.

Specs understood by ``Autoencoder.from_spec`` (the string is recorded in manifests and
checkpoints so the same codec can be rebuilt later):

* ``"ema"`` / ``"mse"``: ``stabilityai/sd-vae-ft-ema`` / ``-mse`` (same encoder, different
  decoder fine-tune; the release encodes with mse and decodes with ema);
* any other Hugging Face id, a local diffusers directory, or a single
  ``.safetensors`` / ``.ckpt`` file;
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

Offline use: the environment variable ``REG_VAE_PATH`` may point at a local copy, either a
diffusers directory / single file used for every Hugging Face spec, or a folder holding one
sub-directory per model named like the id's last part (``sd-vae-ft-mse/``, ``sd-vae-ft-ema/``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

SD_VAE_SCALE = 0.18215   # latent scaling of the Stable Diffusion VAE (release: hard-coded)
SD_VAE_BIAS = 0.0

VAE_ALIASES = {
    "ema": "stabilityai/sd-vae-ft-ema",
    "mse": "stabilityai/sd-vae-ft-mse",
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
#                                 Autoencoder                                    #
#################################################################################

class Autoencoder:
    """Wraps an image <-> latent codec and its latent scaling: z = latent * scale + bias.

    encode_moments stores what the release stores (the posterior's [mean, std] on channels);
    sample draws the training input from it; decode inverts the scaling and runs the decoder.
    """

    def __init__(self, spec: str, vae=None, *, latent_channels: int, downsample: int,
                 scale: float, bias: float, device="cpu", dtype=torch.float32, pca: PatchPCA | None = None):
        self.spec = spec
        self.vae = vae                      # diffusers AutoencoderKL, or None for "identity"/"pca:"
        self.pca = pca.to(device) if pca is not None else None
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scale = float(scale)
        self.bias = float(bias)
        self.device = torch.device(device)
        self.dtype = dtype
        if self.vae is not None:
            self.vae = self.vae.eval().requires_grad_(False)
            self._move_vae()

    # ---------------------------------------------------------------- build
    @classmethod
    def from_spec(cls, spec: str, device="cpu", dtype=torch.float32) -> "Autoencoder":
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("autoencoder spec must be a non-empty string such as 'mse', 'ema', "
                             "a Hugging Face id, a local path, 'identity', 'pca:FILE' or 'random-tiny'")
        if spec.startswith(PCA_PREFIX):
            path = os.path.abspath(os.path.expanduser(spec.removeprefix(PCA_PREFIX)))
            st = _load_patch_pca(path)
            pca = PatchPCA(st["components"], st["mean"], st["factor"])
            # recorded absolute, so checkpoints and manifests rebuild it from any directory
            return cls(PCA_PREFIX + path, None, latent_channels=st["channels"], downsample=st["factor"],
                       scale=st["scale"], bias=0.0, device=device, dtype=dtype, pca=pca)
        if spec == "identity" or spec.startswith("identity-f"):
            f = 1 if spec == "identity" else spec.removeprefix("identity-f")
            if not str(f).isdigit() or int(f) < 1:
                raise ValueError(f"bad autoencoder spec {spec!r}: use 'identity' or 'identity-fN' with N a positive integer")
            f = int(f)
            return cls(spec, None, latent_channels=3 * f * f, downsample=f, scale=1.0, bias=0.0,
                       device=device, dtype=dtype)
        if spec == "random-tiny":
            vae = _random_tiny_autoencoder_kl()
        elif os.path.exists(spec):
            vae = _load_autoencoder_kl(spec, spec)
            spec = os.path.abspath(spec)   # recorded absolute, like pca:FILE
        elif spec.lower().endswith(SINGLE_FILE_EXTS) or spec.startswith((".", "/", "~")):
            raise FileNotFoundError(f"VAE path {spec} does not exist")
        else:
            hf_id = VAE_ALIASES.get(spec, spec)
            local = _resolve_env_copy(hf_id)
            vae = _load_autoencoder_kl(local if local else hf_id, hf_id)
        return cls._from_autoencoder_kl(spec, vae, device, dtype)

    @classmethod
    def _from_autoencoder_kl(cls, spec, vae, device, dtype) -> "Autoencoder":
        cfg = vae.config
        # diffusers' config default for scaling_factor is the SD-VAE value; SD-VAE's configs agree.
        scale = getattr(cfg, "scaling_factor", None) or SD_VAE_SCALE
        bias = getattr(cfg, "shift_factor", None) or SD_VAE_BIAS
        downsample = 2 ** (len(cfg.block_out_channels) - 1)
        return cls(spec, vae, latent_channels=cfg.latent_channels, downsample=downsample,
                   scale=scale, bias=bias, device=device, dtype=dtype)

    def to(self, device=None, dtype=None) -> "Autoencoder":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype if dtype is not None else self.dtype
        if self.vae is not None:
            self._move_vae()
        if self.pca is not None:
            self.pca.to(self.device)
        return self

    def _move_vae(self):
        # dtype only when it changes: diffusers warns about any dtype cast, even a no-op one.
        if self.vae.dtype != self.dtype:
            self.vae.to(dtype=self.dtype)
        self.vae.to(self.device)

    def __repr__(self):
        return (f"Autoencoder(spec={self.spec!r}, latent_channels={self.latent_channels}, "
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
        if self.pca is not None:
            mean = self.pca.encode(x)                                   # (N, C, h, w)
            return torch.cat([mean, torch.zeros_like(mean)], dim=1)     # (N, 2C, h, w): std 0
        if self.vae is None:
            x = F.pixel_unshuffle(x, self.downsample)                   # (N, 3 f^2, H/f, W/f)
            return torch.cat([x, torch.zeros_like(x)], dim=1)           # (N, 2C, h, w): std 0
        dist = self.vae.encode(x.to(self.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()          # (N, 2C, h, w)

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[mean, std] (N, 2C, h, w) -> z = (mean + std * eps) * scale + bias, (N, C, h, w)."""
        if moments.ndim != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise ValueError(f"moments must be (N, {2 * self.latent_channels}, h, w) for "
                             f"{self.spec!r}, got {tuple(moments.shape)}")
        return sample_latents(moments, self.scale, self.bias, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, H, W), roughly in [-1, 1]."""
        latents = (z - self.bias) / self.scale
        if self.pca is not None:
            return self.pca.decode(latents.to(self.device, torch.float32))
        if self.vae is None:
            return F.pixel_shuffle(latents, self.downsample)
        out = self.vae.decode(latents.to(self.device, self.dtype)).sample
        return out.float()

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in ~[-1, 1] -> uint8 (N, H, W, 3), the release's truncating quantisation."""
        x = torch.clamp(255.0 * ((x + 1) / 2), 0, 255)
        return x.permute(0, 2, 3, 1).to(torch.uint8)
