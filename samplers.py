"""Samplers that denoise image latents and REG's class token jointly from pure noise.

* ``euler_maruyama_sampler``: the release's SDE (``--mode sde``). Times linspace(1, 0.04, n) then 0;
  the first n-1 steps are Euler-Maruyama with diffusion w(t) = 2t, the last one (0.04 -> 0) is a
  plain drift step that returns the mean. Drift d = v - w/2 * score, score from the velocity.
* ``euler_sampler``: the probability-flow ODE (``--mode ode``), Euler or Heun on REPA's grid
  linspace(1, 0, n + 1); Heun corrects every step but the last. The release has no ODE mode.

Both: classifier-free guidance when cfg_scale > 1 and guidance_low <= t <= guidance_high (t of the
step's start, for both Heun evaluations); the batch is doubled as [conditional; null class]; the
class token is guided with ``cls_cfg_scale`` if > 0, else left conditional, and it is never dropped
for the unconditional branch (as released). ``path_drop_guidance=True`` (path-drop guidance, SPRINT's
paper; models trained with ``routing="sprint"`` only): the unconditional branch runs without the sparse
path (``drop_sparse_path``, the mask token fused in its place), as a second network call beside the
conditional one, as SpeedrunDiT's ``euler_maruyama_sampler_path_drop`` does. State is kept in float64; the network runs in the
latents' dtype. Models without a class token (REPA, SiT) are sampled the same way.
``time_shift`` s (1 = none, the default) maps the time grid through loss.time_shift,
t -> s t / (1 + (s - 1) t) (SpeedrunDiT's resolution shift); the guidance interval is tested on the
shifted times.

Noise. A sampler draws every random number it needs through one ``NoiseSource`` (an object with
``randn_like(x) -> tensor``), never from torch directly: ``GLOBAL_NOISE`` (torch.randn_like on the
global generator, the release's behaviour and the default) or ``PerSampleNoise`` (one CPU generator
per sample, so a sample's noise does not depend on its batch). ``replay_draws`` runs a sampler
with a zero network, so it makes exactly the draws a real run makes on a batch, in the same
order, without the network; ``draw_plan`` lists them without drawing. A resume that has to advance
a generator past finished work (generate.py's release seed scheme) uses these, so it follows any
sampler registered in ``SAMPLERS``, provided its draws do not depend on the network's outputs
(generate.py checks that on the first batch it samples).
"""
from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

import torch

from loss import interpolant, time_shift as shift_times


#################################################################################
#                                 Noise sources                                 #
#################################################################################

@runtime_checkable
class NoiseSource(Protocol):
    """Where a sampler's random numbers come from: ``randn_like(x)`` is standard normal noise with
    x's shape, dtype and device."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor: ...


class GlobalNoise:
    """torch.randn_like: the global generator of x's device (the releases' samplers)."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x)

    def __repr__(self):
        return "GlobalNoise()"


GLOBAL_NOISE = GlobalNoise()


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on ``device``: through pinned memory (no copy when ``t`` is pinned already)
    with a non-blocking copy on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class PerSampleNoise:
    """One CPU ``torch.Generator`` per sample of the batch: row i of every draw comes from
    generator i, so a sample's noise never depends on the batch it is in. Drawn on the CPU (the
    same numbers on any machine) and moved to x's device through pinned memory."""

    def __init__(self, generators):
        self.generators = list(generators)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"noise for {x.shape[0]} samples requested from {len(self.generators)} generators")
        # drawn straight into one (pinned, on CUDA) buffer: no stack, no second copy to pin it
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
        for row, g in zip(out, self.generators):
            torch.randn(x.shape[1:], generator=g, dtype=x.dtype, out=row)
        return to_device(out, x.device)                                        # x's shape

    def __repr__(self):
        return f"PerSampleNoise({len(self.generators)} generators)"


class FunctionNoise:
    """A plain function ``fn(like) -> tensor`` as a NoiseSource (the samplers' older ``noise_fn``)."""

    def __init__(self, fn):
        self.fn = fn

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class RecordingNoise:
    """Passes draws through to ``inner`` and logs (shape, dtype, device type) of each one."""

    def __init__(self, inner: NoiseSource):
        self.inner, self.log = inner, []

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(_draw_entry(x))
        return self.inner.randn_like(x)


class _PlanNoise:
    """Logs the draws a sampler asks for and returns zeros: no generator is touched."""

    def __init__(self):
        self.log = []

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(_draw_entry(x))
        return torch.zeros_like(x)


def _draw_entry(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device.type


def as_noise_source(noise=None, noise_fn=None) -> NoiseSource:
    """The sampler's noise source: ``noise`` (a NoiseSource, or a function like torch.randn_like),
    else ``noise_fn`` (a function), else the global generator."""
    if noise is not None and noise_fn is not None:
        raise ValueError("pass either noise= (a NoiseSource) or noise_fn= (a function), not both")
    source = noise if noise is not None else noise_fn
    if source is None:
        return GLOBAL_NOISE
    if isinstance(source, NoiseSource):
        return source
    if callable(source):
        return FunctionNoise(source)
    raise TypeError(f"noise must have a randn_like(x) method or be a function, got {type(source).__name__}")


class _ZeroVelocity(torch.nn.Module):
    """Stands in for the network when only a sampler's draws are wanted: zero velocities."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, t, y=None, cls_token=None, return_zs=False):
        return torch.zeros_like(x), [], None if cls_token is None else torch.zeros_like(cls_token)


def replay_draws(sampler, latents, y, noise: NoiseSource, cls_latents=None, **kwargs) -> list:
    """Make, through ``noise``, exactly the draws ``sampler`` makes on this batch (same number, order,
    shapes, dtypes and device), with a zero network instead of the model: e.g. to advance a global
    generator past a batch that a resumed run does not sample again. ``kwargs`` are the sampler's
    (num_steps, cfg_scale, ...). Returns the draws as (shape, dtype, device type). Valid for any
    sampler whose draws do not depend on the network's outputs."""
    recorder = RecordingNoise(noise)
    # path-drop guidance changes the network calls, not the draws (the zero network has no SPRINT path)
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("noise", "noise_fn", "return_cls", "null_class", "path_drop_guidance")}
    with torch.no_grad():
        sampler(_ZeroVelocity(0), latents, y, cls_latents=cls_latents, noise=recorder, null_class=0, **kwargs)
    return recorder.log


def draw_plan(sampler, latents, y, cls_latents=None, **kwargs) -> list:
    """The draws ``sampler`` makes on this batch, as (shape, dtype, device type), without drawing any."""
    return replay_draws(sampler, latents, y, _PlanNoise(), cls_latents=cls_latents, **kwargs)


#################################################################################
#                                     Drift                                     #
#################################################################################

def velocity_to_score(v, x, t, path_type: str = "linear"):
    """Score of p_t from the velocity: with r = alpha/alpha', var = sigma^2 - r sigma' sigma,
    score = (r v - x) / var. t is (B,) and broadcast over x's trailing dims."""
    t = t.view(t.shape[0], *([1] * (x.ndim - 1)))
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(t, path_type)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * v - x) / var


def _null_labels(model, y, null_class):
    """Labels of the unconditional branch: the model's null class (num_classes), never a literal."""
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            raise ValueError("pass null_class= (the index of the null class) for a model without .num_classes")
        table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
        if table is not None and table.num_embeddings <= null_class:
            raise ValueError("classifier-free guidance needs a model trained with class dropout > 0 "
                             "(it has no null-class embedding); use cfg_scale 1")
    return torch.full_like(y, null_class)


class _Drift:
    """One network evaluation per call, guided or not, returning float64 drifts for x and cls.

    ``sde=True`` turns the velocity into the reverse-SDE drift v - w/2 score (w = 2t), computed
    on the whole (possibly doubled) batch before guidance mixes the halves, as released."""

    def __init__(self, model, y, null_class, cfg_scale, cls_cfg_scale, guidance_low, guidance_high,
                 path_type, dtype, sde, path_drop_guidance=False):
        self.model, self.y, self.dtype, self.sde, self.path_type = model, y, dtype, sde, path_type
        self.cfg_scale, self.cls_cfg_scale = cfg_scale, cls_cfg_scale
        self.low, self.high = guidance_low, guidance_high
        self.y_null = _null_labels(model, y, null_class) if cfg_scale > 1.0 else None
        self.path_drop = bool(path_drop_guidance)
        if self.path_drop and getattr(model, "routing", None) != "sprint":
            raise ValueError("path-drop guidance needs a model trained with --routing sprint "
                             f"(this one has routing={getattr(model, 'routing', 'none')!r}); drop the option")

    def guided(self, t) -> bool:
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(self, x, cls, t, guided: bool):
        if guided:
            x_in, y_in = torch.cat([x, x]), torch.cat([self.y, self.y_null])
            cls_in = None if cls is None else torch.cat([cls, cls])
        else:
            x_in, y_in, cls_in = x, self.y, cls
        t_in = torch.ones(x_in.shape[0], device=x.device, dtype=torch.float64) * t
        if guided and self.path_drop:  # conditional branch dense, unconditional without the sparse path
            x_h, t_h = x.to(self.dtype), t_in[: x.shape[0]].to(self.dtype)
            cls_h = None if cls is None else cls.to(self.dtype)
            v_c, _, c_c = self.model(x_h, t_h, y=self.y, cls_token=cls_h, return_zs=False)
            v_u, _, c_u = self.model(x_h, t_h, y=self.y_null, cls_token=cls_h, return_zs=False, drop_sparse_path=True)
            v, v_cls = torch.cat([v_c, v_u]), None if cls is None else torch.cat([c_c, c_u])
        else:
            v, _, v_cls = self.model(
                x_in.to(self.dtype), t_in.to(self.dtype), y=y_in,
                cls_token=None if cls_in is None else cls_in.to(self.dtype), return_zs=False,
            )
        d = self._drift(v.to(torch.float64), x_in, t_in, t)
        d_cls = None if cls is None else self._drift(v_cls.to(torch.float64), cls_in, t_in, t)
        if guided:
            d_cond, d_uncond = d.chunk(2)
            d = d_uncond + self.cfg_scale * (d_cond - d_uncond)
            if d_cls is not None:
                c_cond, c_uncond = d_cls.chunk(2)
                d_cls = c_uncond + self.cls_cfg_scale * (c_cond - c_uncond) if self.cls_cfg_scale > 0 else c_cond
        return d, d_cls

    def _drift(self, v, x_in, t_in, t):
        if not self.sde:
            return v
        diffusion = 2 * t
        return v - 0.5 * diffusion * velocity_to_score(v, x_in, t_in, self.path_type)


def _prepare(latents, cls_latents):
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)
    return x, cls


def _time_grid(t_steps, time_shift):
    """The sampler's grid (float64) mapped through the time shift (1 = unchanged, bit for bit)."""
    return t_steps if time_shift == 1 else shift_times(t_steps, time_shift)


@torch.no_grad()
def euler_maruyama_sampler(
    model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
    path_type="linear", cls_latents=None, cls_cfg_scale=0.0, null_class=None, return_cls=False,
    noise=None, noise_fn=None, time_shift=1.0, path_drop_guidance=False,
):
    """The release's SDE sampler. Per stochastic step it draws the image noise, then the class-token
    noise (``noise.randn_like`` of the float64 state), before calling the network. ``heun`` is
    accepted for call compatibility and ignored. ``noise``: a NoiseSource (default: the global
    generator); ``noise_fn(like)`` is the older spelling (a function). ``time_shift``: see the module.
    Returns float64 latents (and the class token if return_cls)."""
    noise = as_noise_source(noise, noise_fn)
    _check(num_steps, cfg_scale, guidance_low, guidance_high, time_shift)
    drift = _Drift(model, y, null_class, cfg_scale, cls_cfg_scale, guidance_low, guidance_high,
                   path_type, latents.dtype, sde=True, path_drop_guidance=path_drop_guidance)
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = _time_grid(torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)]), time_shift)
    x, cls = _prepare(latents, cls_latents)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        last = i == num_steps - 1
        if not last:  # noise first, then the network: the release's draw order
            deps = noise.randn_like(x) * torch.sqrt(torch.abs(dt))
            deps_cls = None if cls is None else noise.randn_like(cls) * torch.sqrt(torch.abs(dt))
        d, d_cls = drift(x, cls, t_cur, drift.guided(t_cur))
        if last:  # 0.04 -> 0: return the mean, no noise
            x = x + dt * d
            cls = None if cls is None else cls + dt * d_cls
        else:
            diffusion = 2 * t_cur
            x = x + d * dt + torch.sqrt(diffusion) * deps
            cls = None if cls is None else cls + d_cls * dt + torch.sqrt(diffusion) * deps_cls
    return (x, cls) if return_cls else x


@torch.no_grad()
def euler_sampler(
    model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
    path_type="linear", cls_latents=None, cls_cfg_scale=0.0, null_class=None, return_cls=False,
    noise=None, noise_fn=None, time_shift=1.0, path_drop_guidance=False,
):
    """Deterministic probability-flow ODE dx/dt = v, Euler or Heun (REPA's grid and guidance rule).
    ``path_type`` and the noise do not enter (the network predicts the velocity directly; nothing
    is drawn); they are accepted so both samplers take the same arguments."""
    as_noise_source(noise, noise_fn)  # same argument checks as the SDE
    _check(num_steps, cfg_scale, guidance_low, guidance_high, time_shift)
    drift = _Drift(model, y, null_class, cfg_scale, cls_cfg_scale, guidance_low, guidance_high,
                   path_type, latents.dtype, sde=False, path_drop_guidance=path_drop_guidance)
    t_steps = _time_grid(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), time_shift)
    x, cls = _prepare(latents, cls_latents)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        guided = drift.guided(t_cur)  # both Heun evaluations follow t_cur's decision
        d, d_cls = drift(x, cls, t_cur, guided)
        x_next = x + (t_next - t_cur) * d
        cls_next = None if cls is None else cls + (t_next - t_cur) * d_cls
        if heun and i < num_steps - 1:
            d_prime, d_cls_prime = drift(x_next, cls_next, t_next, guided)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
            if cls is not None:
                cls_next = cls + (t_next - t_cur) * (0.5 * d_cls + 0.5 * d_cls_prime)
        x, cls = x_next, cls_next
    return (x, cls) if return_cls else x


def _check(num_steps, cfg_scale, guidance_low, guidance_high, time_shift=1.0):
    shift = float(time_shift) if isinstance(time_shift, numbers.Real) and not isinstance(time_shift, bool) else math.nan
    if not 0 < shift < math.inf:
        raise ValueError(f"time_shift must be a positive number (1 = no shift), got {time_shift!r}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if not 0.0 <= guidance_low <= guidance_high <= 1.0:
        raise ValueError(f"need 0 <= guidance_low <= guidance_high <= 1, got [{guidance_low}, {guidance_high}]")


# --mode's choices in generate.py. A sampler takes (model, latents, y) and the keyword arguments of
# the two above, and draws all its noise through ``noise.randn_like`` (see the module docstring).
SAMPLERS = {"sde": euler_maruyama_sampler, "ode": euler_sampler}
