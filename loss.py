"""REG's training objective (the release's ``SILoss``), per training step.

    x_t   = alpha_t x   + sigma_t eps         cls_t = alpha_t cls + sigma_t eps_cls   (same t)
    v     = alpha'_t x  + sigma'_t eps        v_cls = alpha'_t cls + sigma'_t eps_cls
    total = mean ||v_theta - v||^2 + proj_coeff * proj + cls_coeff * mean ||v_cls_theta - v_cls||^2

with proj the REPA alignment: mean over encoders, samples and tokens of -cos(h_phi(h_t), y_*)
(paper eqs. for REPA and REG; spec section 2). ``REGObjective`` owns the weights and names
the terms; ``SILoss`` keeps the release's call.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")
PREDICTIONS = ("v",)


def interpolant(t, path_type: str = "linear"):
    """(alpha_t, sigma_t, alpha'_t, sigma'_t) of the stochastic interpolant x_t = alpha_t x + sigma_t eps.

    The linear path's derivatives are plain numbers (-1, 1), as in the release; broadcasting
    therefore never mixes samples whatever the shape of t."""
    if path_type == "linear":
        return 1 - t, t, -1, 1
    if path_type == "cosine":
        return (torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2),
                -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2))
    raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")


SHIFT_BASE = 4096   # latent values with no shift: SD-VAE latents at 256 px (4 x 32 x 32), SpeedrunDiT's


def resolution_shift(latent_shape, base: int = SHIFT_BASE) -> float:
    """The time shift of a latent shape (C, H, W): sqrt(C H W / base). SD-VAE latents at 256 px
    (4 x 32 x 32 = 4096 values) give exactly 1, i.e. no shift."""
    return math.sqrt(math.prod(int(s) for s in latent_shape) / base)


def time_shift(t, shift: float):
    """t' = s t / (1 + (s - 1) t), clamped to [0, 1] (SD3's resolution shift, as SpeedrunDiT uses it;
    t = 1 is noise here, so s > 1 spends more time at high noise). s = 1 returns t itself."""
    if shift == 1:
        return t
    return (shift * t / (1 + (shift - 1) * t)).clamp(0.0, 1.0)


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return torch.mean(x, dim=list(range(1, x.ndim)))


def projection_loss(zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA alignment: mean over encoders, samples and tokens of the negative cosine similarity.

    Same value as the release's per-sample loop (sum over samples / (encoders x batch)),
    computed for the whole batch at once with the features normalised in float32, as in the
    release (whose Accelerate-prepared forward returns float32 outputs)."""
    if len(zs) != len(zs_tilde):
        raise ValueError(f"got {len(zs)} encoder feature sets but the model has {len(zs_tilde)} projectors")
    losses = []
    for z, z_tilde in zip(zs, zs_tilde):
        if z.shape != z_tilde.shape:
            raise ValueError(f"encoder features {tuple(z.shape)} do not match the projector output {tuple(z_tilde.shape)} "
                             "(REG aligns class + patch tokens; plain REPA/SiT models align patch tokens only)")
        z = F.normalize(z.float(), dim=-1)
        z_tilde = F.normalize(z_tilde.float(), dim=-1)
        losses.append(-(z * z_tilde).sum(dim=-1).mean(dim=-1))       # (N,): mean over tokens
    return torch.stack(losses).mean()


class LossTerms(NamedTuple):
    """In the release's order. Per-sample terms are (N,); proj_loss is a scalar."""
    denoising_loss: torch.Tensor
    proj_loss: torch.Tensor
    time_input: torch.Tensor
    noises: torch.Tensor
    denoising_loss_cls: torch.Tensor


class SILoss:
    """Stochastic-interpolant loss with REG's class-token term and REPA's alignment term.

    ``__call__`` is the release's call and returns its 5-tuple; ``terms`` returns everything one
    step computes (outputs and targets included), which ``REGObjective`` turns into named terms.
    ``time_shift`` (1 = none, the release) shifts the sampled t as SD3 / SpeedrunDiT do."""

    def __init__(self, prediction: str = "v", path_type: str = "linear", weighting: str = "uniform",
                 time_shift: float = 1.0):
        for name, value, choices in (("prediction", prediction, PREDICTIONS),
                                     ("path_type", path_type, PATH_TYPES),
                                     ("weighting", weighting, WEIGHTINGS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
        if not time_shift > 0:
            raise ValueError(f"time_shift must be > 0 (1 = no shift), got {time_shift}")
        self.prediction = prediction
        self.path_type = path_type
        self.weighting = weighting
        self.time_shift = float(time_shift)

    def sample_time(self, n: int) -> torch.Tensor:
        """(n, 1, 1, 1) on the CPU generator, as the release draws it (then shifted, if asked)."""
        if self.weighting == "uniform":
            t = torch.rand((n, 1, 1, 1))
        else:
            s = torch.randn((n, 1, 1, 1)).exp()                        # EDM-style log-normal sigma
            t = s / (1 + s) if self.path_type == "linear" else 2 / math.pi * torch.atan(s)
        return time_shift(t, self.time_shift)

    def terms(self, model, images, model_kwargs=None, zs=None, cls_token=None,
              time_input=None, noises=None, noises_cls=None) -> dict:
        """images (N, C, H, W) clean latents; zs: per encoder (N, L, Z) clean features;
        cls_token (N, Z) clean class token (REG) or None (REPA/SiT). Missing random inputs are
        drawn in the release's order: t, then eps, then eps_cls.

        Returns per-sample ``denoising_loss`` and ``denoising_loss_cls`` (N,), the scalar
        ``proj_loss``, and ``time_input``, ``noises``, ``output``, ``target``, ``cls_output``,
        ``cls_target``, ``zs_tilde`` (the projector outputs) for terms built on top."""
        model_kwargs = model_kwargs or {}
        n = images.shape[0]
        if time_input is None:
            time_input = self.sample_time(n)
        if images.device.type == "cuda" and time_input.device.type == "cpu":
            # Same numbers as the release's CPU draw, but copied without stalling the host.
            time_input = time_input.pin_memory().to(images.device, non_blocking=True)
        time_input = time_input.to(device=images.device, dtype=images.dtype).reshape(n, 1, 1, 1)
        if noises is None:
            noises = torch.randn_like(images)
        if cls_token is not None and noises_cls is None:
            noises_cls = torch.randn_like(cls_token)

        alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(time_input, self.path_type)
        model_input = alpha_t * images + sigma_t * noises
        model_target = d_alpha_t * images + d_sigma_t * noises

        cls_input = cls_target = None
        if cls_token is not None:
            # Per-sample coefficients (N, 1): the release broadcasts (N,1,1,1) x (N,Z) on the cosine path.
            a, s, da, ds = interpolant(time_input.reshape(n, 1), self.path_type)
            cls_input = a * cls_token + s * noises_cls
            cls_target = da * cls_token + ds * noises_cls

        output, zs_tilde, cls_output = model(model_input, time_input.flatten(), **model_kwargs, cls_token=cls_input)
        denoising_loss = mean_flat((output - model_target) ** 2)

        if cls_output is not None and cls_target is not None:
            denoising_loss_cls = mean_flat((cls_output - cls_target) ** 2)
        else:
            denoising_loss_cls = torch.zeros_like(denoising_loss)

        if zs:
            proj_loss = projection_loss(zs, zs_tilde)
        else:
            proj_loss = torch.zeros((), device=images.device)
        return dict(denoising_loss=denoising_loss, proj_loss=proj_loss, denoising_loss_cls=denoising_loss_cls,
                    time_input=time_input, noises=noises, output=output, target=model_target,
                    cls_output=cls_output, cls_target=cls_target, zs_tilde=zs_tilde)

    def __call__(self, model, images, model_kwargs=None, zs=None, cls_token=None,
                 time_input=None, noises=None, noises_cls=None) -> LossTerms:
        """The release's call: (denoising_loss, proj_loss, time_input, noises, denoising_loss_cls)."""
        out = self.terms(model, images, model_kwargs, zs, cls_token, time_input, noises, noises_cls)
        return LossTerms(out["denoising_loss"], out["proj_loss"], out["time_input"], out["noises"],
                         out["denoising_loss_cls"])


CFM_WEIGHTINGS = ("uniform", "linear")


def contrastive_flow_matching(output: torch.Tensor, target: torch.Tensor, weighting: str = "uniform",
                              t: torch.Tensor | None = None) -> torch.Tensor:
    """Contrastive flow matching's extra term (Stoica et al. 2025, as SpeedrunDiT uses it): minus the
    mean squared distance between each prediction and the target of ANOTHER sample (the batch
    rolled by one), pushing flows of different samples apart. Added with a small weight (0.05).
    ``weighting="linear"`` (SpeedrunDiT's --cfm-weighting linear) weights each sample's squared
    distances by its (shifted) time t (N, 1, 1, 1) before the mean: strongest near the noise."""
    if weighting not in CFM_WEIGHTINGS:
        raise ValueError(f"cfm weighting must be one of {CFM_WEIGHTINGS}, got {weighting!r}")
    negatives = torch.roll(target, shifts=1, dims=0)
    sq = (output - negatives) ** 2                                     # (N, C, H, W)
    if weighting == "linear":
        sq = sq * t.reshape(-1, *([1] * (sq.ndim - 1)))
    return -sq.mean()


class REGObjective:
    """The training objective: named terms and the weights that make the total.

        loss_final = loss_mean + proj_coeff * proj_loss_raw + cls_coeff * loss_mean_cls_raw  [+ cfm_coeff * cfm_loss_raw]

    Calling it returns a dict of scalar tensors under the release's logged names: ``loss_final``
    (the total, to backpropagate), ``loss_mean`` (image v-loss, weight 1), ``proj_loss`` and
    ``loss_mean_cls`` (REPA alignment and class-token v-loss, already weighted, as the release
    logged them; ``cfm_loss`` likewise when on), and every unweighted term as ``<name>_raw``.
    Training logs whatever names come back, so a new term is this class plus one flag."""

    TOTAL = "loss_final"

    def __init__(self, proj_coeff: float = 0.5, cls_coeff: float = 0.03, path_type: str = "linear",
                 weighting: str = "uniform", prediction: str = "v", time_shift: float = 1.0,
                 cfm_coeff: float = 0.0, cfm_weighting: str = "uniform"):
        for name, value in (("proj_coeff", proj_coeff), ("cls_coeff", cls_coeff), ("cfm_coeff", cfm_coeff)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.loss = SILoss(prediction=prediction, path_type=path_type, weighting=weighting, time_shift=time_shift)
        # name of a weighted term -> its weight in the total (the image v-loss has weight 1)
        self.weights = {"proj_loss": float(proj_coeff), "loss_mean_cls": float(cls_coeff)}
        if cfm_weighting not in CFM_WEIGHTINGS:
            raise ValueError(f"cfm_weighting must be one of {CFM_WEIGHTINGS}, got {cfm_weighting!r}")
        self.cfm_weighting = cfm_weighting
        if cfm_coeff > 0:
            self.weights["cfm_loss"] = float(cfm_coeff)

    @property
    def term_names(self) -> list[str]:
        """The names a call returns, in order (stable for a given configuration)."""
        return [self.TOTAL, "loss_mean", *self.weights, *(f"{k}_raw" for k in self.weights)]

    def __call__(self, model, x, y, zs=None, cls_token=None, **model_kwargs) -> dict[str, torch.Tensor]:
        out = self.loss.terms(model, x, dict(y=y, **model_kwargs), zs=zs, cls_token=cls_token)
        raw = {"proj_loss": out["proj_loss"].mean(), "loss_mean_cls": out["denoising_loss_cls"].mean()}
        if "cfm_loss" in self.weights:
            raw["cfm_loss"] = contrastive_flow_matching(out["output"], out["target"], self.cfm_weighting,
                                                        out["time_input"])
        total = loss_mean = out["denoising_loss"].mean()
        weighted = {}
        for name, weight in self.weights.items():      # the release's order of sums
            weighted[name] = weight * raw[name]
            total = total + weighted[name]
        return {self.TOTAL: total, "loss_mean": loss_mean, **weighted, **{f"{k}_raw": v for k, v in raw.items()}}
