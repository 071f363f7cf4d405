"""The training step: ``train_step(state, micro_batches, objective, prepare)``.

``TrainState`` holds what one optimizer step changes (model, EMA, optimizer, grad scaler, step);
the objective (loss.REGObjective) owns the loss terms and their weights; ``Prepare`` turns a
loader batch into the objective's inputs. train.py, the benchmarks and the README's example all
call this one step, so a change here is measured where it runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

import cli
from loss import REGObjective
from models.autoencoder import sample_latents
from optim import GuardedAdamW, update_ema


@dataclass
class TrainState:
    """What one optimizer step changes. ``forward`` is what the objective calls (the DDP wrapper
    under several processes, else the model); ``ema`` lives on the process that saves (None on
    the others, which never read it)."""
    model: torch.nn.Module
    optimizer: GuardedAdamW | torch.optim.Optimizer
    ema: torch.nn.Module | None = None
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))
    step: int = 0
    forward: torch.nn.Module | None = None
    precision: str = "fp32"
    ema_decay: float = 0.9999
    max_grad_norm: float = 1.0
    seed: int = 0               # token routing: the draw of step s comes from (seed, s), the same on every
    rank: int = 0               # process; each process takes its rows of the global batch
    world: int = 1

    def __post_init__(self):
        self.forward = self.forward or self.model
        self._params = list(self.model.parameters())
        self._ema_params = list(self.ema.parameters()) if self.ema is not None else None

    def autocast(self):
        dtype = cli.autocast_dtype(self.precision)
        device = self._params[0].device.type
        return torch.autocast(device, dtype=dtype, enabled=dtype is not None)

    def route(self, micro: int, local_batch: int):
        """The token-routing draw of this step's micro-batch ``micro`` for this process's samples, or
        None for a model without routing. Drawn for the global batch from a generator seeded by
        (seed, step, micro): identical on every process, and the same after a resume."""
        if getattr(self.model, "routing", "none") == "none":
            return None
        seed = int(np.random.SeedSequence([self.seed, self.step, micro]).generate_state(1, np.uint64)[0])
        route = self.model.draw_route(local_batch * self.world, torch.Generator().manual_seed(seed))
        return route.rows(self.rank * local_batch, (self.rank + 1) * local_batch)

    def no_sync(self, sync: bool):
        """DDP's gradient all-reduce only on the last micro-batch of an optimizer step."""
        if sync or not hasattr(self.forward, "no_sync"):
            return contextlib.nullcontext()
        return self.forward.no_sync()


def train_step(state: TrainState, micro_batches, objective: REGObjective, prepare) -> dict[str, torch.Tensor]:
    """One optimizer step over ``micro_batches`` (gradient accumulation when there are several).

    ``prepare(batch)`` turns a loader batch into the objective's inputs (x, y, zs, cls_token, ...).
    Returns device tensors, never synced: every term averaged over the micro-batches, the
    pre-clipping ``grad_norm``, and ``finite`` (False: the update was skipped)."""
    n = len(micro_batches)
    totals = {}
    for i, batch in enumerate(micro_batches):
        with torch.no_grad():
            inputs = prepare(batch)                                            # x (N, C, h, w), y (N,), ...
        route = state.route(i, inputs["x"].shape[0])
        if route is not None:
            inputs["route"] = route
        with state.no_sync(i == n - 1), state.autocast():
            terms = objective(state.forward, **inputs)
        state.scaler.scale(terms["loss_final"] / n).backward()
        for name, value in terms.items():
            totals[name] = totals.get(name, 0) + value.detach().float() / n
    state.scaler.unscale_(getattr(state.optimizer, "optimizer", state.optimizer))
    grad_norm = torch.nn.utils.clip_grad_norm_(state._params, state.max_grad_norm)
    # The norm of the all-reduced gradients is the same on every process, so all skip together;
    # a non-finite loss makes it non-finite too.
    finite = torch.isfinite(grad_norm)
    if isinstance(state.optimizer, GuardedAdamW):
        state.optimizer.step(finite)                                           # skipped where not finite
    else:
        state.scaler.step(state.optimizer)                                     # --nonfinite stop: as released
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:  # every step, as released (a skipped step leaves the weights as they were)
        update_ema(state._ema_params, state._params, state.ema_decay)
    state.step += 1
    return {**totals, "grad_norm": grad_norm.detach().float(), "finite": finite}


class Prepare:
    """A loader batch -> the objective's inputs: latents drawn from the stored [mean, std]
    (scale and bias from the dataset's manifest: no VAE weights needed), labels, and the
    encoder targets, from the feature cache or from the encoders run on the images (with a
    class-token-only cache: the class token from the cache, the patch tokens from the encoders).
    REG aligns class + patch tokens; plain REPA/SiT models align the patch tokens only."""

    def __init__(self, model, device, scale: float, bias: float, encoders=(), use_features=False, autocast=None,
                 legacy_drop: float | None = None):
        self.device, self.scale, self.bias = device, scale, bias
        self.encoders, self.use_features = list(encoders), use_features
        self.align, self.cls_dim = bool(model.z_dims), model.cls_token_dim
        self.autocast = autocast or contextlib.nullcontext
        self.legacy_drop, self.null_class = legacy_drop, model.num_classes

    def __call__(self, batch) -> dict:
        moments = batch["moments"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        if self.legacy_drop is not None:
            # The release's --legacy: a first label dropout before the model's own (its early runs
            # dropped twice), drawn where it drew it: before the latents' noise.
            drop = torch.rand(y.shape[0], device=y.device) < self.legacy_drop
            y = torch.where(drop, self.null_class, y)
        x = sample_latents(moments, self.scale, self.bias)                     # (N, C, h, w)
        if not (self.use_features or self.encoders):
            return dict(x=x, y=y)
        cls_list = tok_list = None
        if self.use_features:
            cls_list = [c.to(self.device, non_blocking=True).float() for c in as_list(batch["enc_cls"])]
            if "enc_tokens" in batch:
                tok_list = [t.to(self.device, non_blocking=True).float() for t in as_list(batch["enc_tokens"])]
        if self.encoders and (cls_list is None or (self.align and tok_list is None)):
            images = batch["image"].to(self.device, non_blocking=True)
            with self.autocast():
                outs = [enc(images) for enc in self.encoders]                  # [(cls (N, Z), tokens (N, 1+T, Z))]
            cls_list = cls_list or [c for c, _ in outs]                        # a cls cache wins for the class token
            tok_list = [t for _, t in outs]
        zs = cls = None
        if self.align:
            zs = tok_list if self.cls_dim else [t[:, 1:] for t in tok_list]
        if self.cls_dim:
            cls = cls_list[0].float()
        return dict(x=x, y=y, zs=zs, cls_token=cls)


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]
