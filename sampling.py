"""Sampling images from a model: the settings, the seed schemes, sampling a batch and decoding it.

generate.py (the FID batches) and the evaluation during training (online_eval.py) both sample
through ``sample_batch``, so the same settings and indices give the same images in both.

Seed schemes (generate.py's ``--seed-scheme``):
    per-image (default)  image i owns a CPU generator seeded with
                         SeedSequence([seed, i]).generate_state(1, uint64); it draws, in order,
                         the latent noise, a label (uniform over num_classes), the class-token noise,
                         then every noise the sampler asks for (the SDE: image, then class token, at
                         each stochastic step). Image i is therefore the same whatever the world size
                         or batch size (bit for bit on CPU; GPU kernels picked per batch size may move
                         the low bits, so now and then a pixel by one grey level).
    release              the release's: torch.manual_seed(seed * world_size + rank); per batch z, y,
                         class-token noise from the global generator, the sampler's noise from
                         randn_like; image index = batch * world_size * batch_size + k * world_size
                         + rank. Reproduces its samples (with --no-fused-attn, as it sampled), but
                         depends on world size and batch size. A resumed run advances the generator
                         past finished batches by replaying the sampler's draws without the network
                         (samplers.replay_draws), so any sampler in samplers.SAMPLERS resumes exactly.
Class-balanced labels replace the label of image i by i % num_classes (50 per class for 50K); the
label is still drawn, so the noises of image i are the same with and without it.

Memory: latents are decoded ``decode_batch_size`` at a time; a chunk that runs out of GPU memory
is retried at half the size (the finished latents are kept), which does not change the images.
"""
from __future__ import annotations

import dataclasses
import gc

import numpy as np
import torch

from cli import PRECISIONS, autocast_dtype
from loss import PATH_TYPES
from models.autoencoder import Autoencoder
from samplers import GLOBAL_NOISE, SAMPLERS, PerSampleNoise, RecordingNoise, draw_plan, replay_draws, to_device

DEFAULT_DECODE_BATCH = 32


# One rule per numeric setting, shared by SampleSettings and the CLI (which says --num-steps for num_steps).
SETTING_RULES = {
    "num_steps": (lambda v: v >= 1, ">= 1"),
    "cfg_scale": (lambda v: v >= 1.0, ">= 1 (1 = no guidance)"),
    "cls_cfg_scale": (lambda v: v is None or v >= 0.0, ">= 0 (0 = class token unguided)"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "decode_batch_size": (lambda v: v >= 1, ">= 1"),
    "num_classes": (lambda v: v is None or v >= 1, ">= 1"),
}


def setting_problems(values: dict, name=lambda key: key) -> list[str]:
    """What is wrong with the sampler settings in ``values`` (those it holds), one phrase each."""
    out = [f"{name(k)} must be {requirement}, got {values[k]}"
           for k, (ok, requirement) in SETTING_RULES.items() if k in values and not ok(values[k])]
    low, high = values.get("guidance_low"), values.get("guidance_high")
    if low is not None and high is not None and not 0.0 <= low <= high <= 1.0:
        out.append(f"need 0 <= {name('guidance_low')} <= {name('guidance_high')} <= 1, got {low}, {high}")
    return out


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Everything besides the model, the decoder and the image indices that decides the images.

    ``time_shift`` is the shift factor itself (1 = none; generate.py's CLI derives it from the
    checkpoint, see --time-shift). ``num_classes`` None = the model's. ``decode_batch_size`` only
    bounds memory."""
    mode: str = "sde"
    num_steps: int = 50
    heun: bool = False
    cfg_scale: float = 1.5
    cls_cfg_scale: float = 1.5
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path_type: str = "linear"
    time_shift: float = 1.0
    path_drop_guidance: bool = False
    precision: str = "fp32"
    class_balanced: bool = False
    num_classes: int | None = None
    seed: int = 0
    decode_batch_size: int = DEFAULT_DECODE_BATCH

    def __post_init__(self):
        problems = setting_problems(dataclasses.asdict(self))
        for name, value, choices in (("mode", self.mode, sorted(SAMPLERS)), ("precision", self.precision, PRECISIONS),
                                     ("path_type", self.path_type, PATH_TYPES)):
            if value not in choices:
                problems.append(f"{name} {value!r} is not one of {choices}")
        if problems:
            raise ValueError("bad sample settings: " + "; ".join(problems))

    def sampler_kwargs(self) -> dict:
        """Keyword arguments of the sampler (samplers.SAMPLERS[mode])."""
        return dict(num_steps=self.num_steps, heun=self.heun, cfg_scale=self.cfg_scale,
                    guidance_low=self.guidance_low, guidance_high=self.guidance_high, path_type=self.path_type,
                    cls_cfg_scale=self.cls_cfg_scale, time_shift=self.time_shift,
                    path_drop_guidance=self.path_drop_guidance)


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s generator (64 bits, well mixed for neighbouring indices)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


class PerImageNoise(PerSampleNoise):
    """The per-image seed scheme: one CPU generator per image, seeded by (seed, index).

    Per image, in order: latent noise, label, class-token noise (REG models), then every noise the
    sampler asks for through ``randn_like`` (copied to the device from pinned memory)."""

    def __init__(self, seed: int, indices):
        super().__init__(torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices)

    def inputs(self, n: int, latent_shape, num_classes: int, cls_dim: int, device):
        if n != len(self.generators):
            raise ValueError(f"inputs for {n} images requested from {len(self.generators)} generators")
        z, y, cls = [], [], []
        for g in self.generators:
            z.append(torch.randn(latent_shape, generator=g))                     # (C, h, w)
            y.append(torch.randint(0, num_classes, (1,), generator=g))
            if cls_dim:
                cls.append(torch.randn(cls_dim, generator=g))                    # (Z,)
        cls = to_device(torch.stack(cls), device) if cls_dim else None
        return to_device(torch.stack(z), device), to_device(torch.cat(y), device), cls


class ReleaseNoise(RecordingNoise):
    """The release's seed scheme: everything from the global generator of the device, per batch z,
    then y, then the class-token noise, then the sampler's randn_like draws (logged in ``log``)."""

    def __init__(self):
        super().__init__(GLOBAL_NOISE)

    def inputs(self, n: int, latent_shape, num_classes: int, cls_dim: int, device):
        z = torch.randn(n, *latent_shape, device=device)                         # (n, C, h, w)
        y = torch.randint(0, num_classes, (n,), device=device)
        cls = torch.randn(n, cls_dim, device=device) if cls_dim else None        # (n, Z)
        return z, y, cls


def model_shape(model) -> tuple[tuple, int, int]:
    """(latent shape (C, h, w), num_classes, class-token width) of a SiT."""
    cfg = model.config
    return (cfg["in_channels"], cfg["input_size"], cfg["input_size"]), cfg["num_classes"], cfg["cls_token_dim"]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def free_memory(device) -> None:
    """Called AFTER an except block: inside it the traceback still holds the failed tensors."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def sample_latents(model, indices, settings: SampleSettings, device=None, noise=None):
    """Images ``indices`` -> (float64 latents (n, C, h, w) on the device, int64 labels (n,) numpy).

    ``noise``: the seed scheme's noise source; default the per-image generators of
    (settings.seed, index). The model must be in eval mode (sample_batch takes care of it)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    device = torch.device(device) if device is not None else model_device(model)
    latent_shape, model_classes, cls_dim = model_shape(model)
    num_classes = settings.num_classes or model_classes
    if num_classes > model_classes:
        raise ValueError(f"settings.num_classes {num_classes} exceeds the model's {model_classes} classes")
    noise = noise if noise is not None else PerImageNoise(settings.seed, indices)
    z, y, cls = noise.inputs(len(indices), latent_shape, num_classes, cls_dim, device)
    if settings.class_balanced:
        y = to_device(torch.as_tensor(indices % num_classes), device)
    dtype = autocast_dtype(settings.precision)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        latents = SAMPLERS[settings.mode](model, z, y, cls_latents=cls, noise=noise, **settings.sampler_kwargs())
    return latents, y.cpu().numpy().astype(np.int64)


@torch.no_grad()
def decode_latents(codec, latents, batch_size: int = DEFAULT_DECODE_BATCH, log=None) -> tuple[np.ndarray, int]:
    """Latents (n, C, h, w) -> uint8 images (n, H, W, 3), decoded ``batch_size`` at a time.

    A chunk that runs out of GPU memory is retried at half the size: the latents are kept, nothing
    is sampled again. Returns (images, the chunk size that worked: keep it for later batches)."""
    out, start, size = [], 0, max(1, int(batch_size))
    while start < len(latents):
        chunk = latents[start:start + size]
        failed = False
        try:
            pixels = codec.decode(chunk.float())                                 # (k, 3, H, W) ~[-1, 1]
            out.append(Autoencoder.to_uint8(pixels).cpu().numpy())
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            failed = True
        if failed:
            pixels = None
            free_memory(latents.device)
            size = max(1, size // 2)
            if log is not None:
                log(f"out of memory decoding {len(chunk)} images; decoding {size} at a time from now on")
            continue
        start += len(chunk)
    return np.concatenate(out), size


def sample_batch(model, codec, indices, settings: SampleSettings, device=None, noise=None):
    """In-process sampling: images ``indices`` -> (uint8 images (n, H, W, 3), int64 labels (n,)).

    The same images as ``generate.py`` with the same settings and the per-image seed scheme (its
    default), whatever the batch; the global RNG is not touched. The model is put in eval mode for
    the call and restored after; TF32 follows the caller's torch.backends settings (the CLI's
    --tf32, on by default, sets them). ``device`` defaults to the model's; ``noise`` is the seed
    scheme's noise source (default PerImageNoise(settings.seed, indices)). Call it on each rank
    with that rank's indices and gather the results."""
    training = model.training
    model.eval()
    try:
        latents, labels = sample_latents(model, indices, settings, device, noise)
        images, _ = decode_latents(codec, latents, settings.decode_batch_size)
    finally:
        model.train(training)
    return images, labels


def skip_release_batch(model, n: int, settings: SampleSettings, device, noise: ReleaseNoise) -> None:
    """Advance the release scheme's global generator past one batch without sampling it: its inputs,
    then the sampler's own draws, replayed without the network."""
    latent_shape, model_classes, cls_dim = model_shape(model)
    z, y, cls = noise.inputs(n, latent_shape, settings.num_classes or model_classes, cls_dim, device)
    replay_draws(SAMPLERS[settings.mode], z, y, noise, cls_latents=cls, **settings.sampler_kwargs())


def check_replayable(model, n: int, settings: SampleSettings, device, drawn: list) -> None:
    """The draws of a sampled batch must be those the replay makes, or a resume would skip wrongly."""
    latent_shape, _, cls_dim = model_shape(model)
    z = torch.zeros(n, *latent_shape, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    cls = torch.zeros(n, cls_dim, device=device) if cls_dim else None
    plan = draw_plan(SAMPLERS[settings.mode], z, y, cls_latents=cls, **settings.sampler_kwargs())
    if plan != drawn:
        raise RuntimeError(f"sampler {settings.mode!r} drew {len(drawn)} noises but its replay without the network "
                           f"draws {len(plan)} (its draws depend on the network's outputs?); --seed-scheme release "
                           "could not resume it: use --seed-scheme per-image")
