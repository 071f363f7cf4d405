"""AdamW, its non-finite guard, and the EMA: the optimizer side of one training step.

The release trains with torch's default AdamW (foreach kernels on CUDA) and, under fp16, lets
the grad scaler skip an overflowing step. ``GuardedAdamW`` skips a non-finite step in EVERY
precision without a host sync: the finite flag stays on the device, folded into the scalars of
torch's own foreach ops (fused: torch's ``found_inf``). A finite step computes exactly torch's
update (bitwise, tested) in about torch's memory traffic; a skipped one leaves weights and
optimizer state untouched. The step counter, which torch keeps on the host for the bias corrections, is
settled one step late: the flag is copied to pinned memory without blocking and read before
the next update, when the device has long finished computing it.
"""
from __future__ import annotations

import torch

ADAM_IMPLS = ("foreach", "fused", "auto")
_CHUNK_ELEMENTS = 1 << 26  # the guarded update's temporary denominator: at most 256 MB at a time (fp32)


def make_optimizer(params, impl: str = "foreach", **adam_kwargs) -> torch.optim.AdamW:
    """AdamW over params already on their device. 'foreach' = torch's default kernels, as the
    release builds its AdamW: batched foreach kernels on CUDA, the per-tensor loop on the CPU
    (bitwise the same update, tested; on the CPU the batched kernels only add full-size
    temporaries: ~10% slower and +1 copy of the weights at SiT-B/2); 'fused' = one kernel
    for all parameters (CUDA; CPU with torch >= 2.4), the same rule up to the last bits; 'auto' =
    fused where the device has it, else foreach."""
    params = list(params)
    if impl in ("fused", "auto"):
        try:
            return torch.optim.AdamW(params, fused=True, **adam_kwargs)
        except (RuntimeError, ValueError, TypeError) as e:
            if impl == "auto":
                return torch.optim.AdamW(params, **adam_kwargs)
            device = params[0].device.type if params else "?"
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"--adam-impl fused is not available on {device} with torch {torch.__version__} "
                             f"({first}); use --adam-impl foreach") from e
    if impl != "foreach":
        raise ValueError(f"unknown AdamW implementation {impl!r}; choose one of {ADAM_IMPLS}")
    return torch.optim.AdamW(params, **adam_kwargs)  # foreach=None: torch chooses per device at step time


@torch.no_grad()
def update_ema(ema_params, model_params, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param over all parameters in two foreach calls: the
    release's per-parameter mul_ then add_(alpha), bit for bit (tested), 5 passes over the
    weights. The cheapest exact form: lerp_ would take 3 but rounds once where this rounds twice
    (different bits)."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, list(model_params), alpha=1 - decay)   # read under no_grad: no detach needed


class GuardedAdamW:
    """Steps a torch AdamW only where ``ok`` (a 0-d bool tensor on the parameters' device) holds.

    On an accelerator ``step(ok)`` never reads ``ok`` on the host (``masked``); on the CPU, where
    reading it costs nothing, it simply calls torch's step or not (``masked=False``, the same
    result without the extra passes). Counters: ``skipped`` (all skipped steps) and
    ``consecutive`` (the current run of skipped steps), exact after ``settle()``, which the
    next ``step`` and every checkpoint call first (it waits for at most one step's flag). The masked
    foreach update zeroes the gradients of a skipped step in place (they are spent anyway)."""

    def __init__(self, optimizer: torch.optim.AdamW, masked: bool | None = None):
        group = optimizer.defaults
        if group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            raise ValueError("the non-finite guard supports plain AdamW (no amsgrad/maximize/capturable/differentiable)")
        self.optimizer = optimizer
        self.fused = bool(group.get("fused"))
        self.masked = masked                  # None: masked on accelerators, a plain branch on the CPU
        self.skipped = 0
        self.consecutive = 0
        self._pending = None          # (host flag tensor, event or None, the step tensors advanced)

    # ------------------------------------------------------------------ counters
    def settle(self) -> None:
        """Read the last step's flag (one step late, so this never stalls the device) and undo the
        host step count of a skipped update."""
        if self._pending is None:
            return
        flag, event, advanced = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        if bool(flag.item()):
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        for step in advanced:
            step -= 1

    def _remember(self, ok: torch.Tensor, advanced) -> None:
        if ok.device.type == "cuda":
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = ok.detach().clone(), None
        self._pending = (flag, event, advanced)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, ok: torch.Tensor) -> None:
        self.settle()
        masked = self.masked if self.masked is not None else ok.device.type != "cpu"
        if not masked:
            if bool(ok):
                self.optimizer.step()
            self._remember(ok, [])
            return
        if self.fused:
            # torch's fused kernel skips the whole update (step count included) where found_inf != 0.
            self.optimizer.found_inf = (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self._remember(ok, [])
            return
        advanced = []
        for group in self.optimizer.param_groups:
            advanced += self._foreach_group(group, ok)
        self._remember(ok, advanced)

    def _foreach_group(self, group: dict, ok: torch.Tensor) -> list:
        """torch's foreach AdamW update for one param group, in place, with the flag folded into
        device scalars so that a skipped step is an exact no-op. Returns the host step tensors
        it advanced.

        The ops and Python scalars are torch's own (``_multi_tensor_adam``, not capturable), so a
        finite step gives its bits; where torch passes a constant, a 0-d device tensor holds the
        same float32 value when ``ok`` and the no-op value when not:

            g  <- 0 where not ok (its inf/NaN would poison everything)      2 passes over the weights
            p  *= 1 - lr wd  | 1          (only with weight decay, as torch)  2
            m  <- lerp(m, g, 1 - b1 | -0)     m + (-0)(0 - m) == m, bit for bit, -0 included    3
            v  *= b2 | 1;  v += (1 - b2) g g  v + (+0) == v as v >= +0 always                  2 + 4
            d  = sqrt(v) / sqrt(bc2) + eps | inf   (the division skipped once sqrt(bc2) == 1.0)  2 + 2 + 2
            p  += -lr/bc1 * m / d             p + (+-0): unchanged (a weight of exactly -0.0 with
                                              m <= -0 would come back +0.0; training never makes one) 4

        = 21 passes (19 after ~37k steps at b2 = 0.999) against torch's 19 and the 31 of an update
        selected by torch.where; on the CPU the lerp and the zeroing run tensor by tensor, on CUDA
        those two launch one kernel per tensor (torch has no foreach lerp with a device weight)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("the non-finite guard's masked update expects float32 weights (as trained here)")
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = []
        for p in params:
            state = self.optimizer.state[p]
            if not state:  # lazy init, as torch.optim.AdamW does
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        steps = [s["step"] for s in states]
        if any(s.device.type != "cpu" for s in steps):
            raise ValueError("the non-finite guard expects AdamW's step counters on the CPU (foreach, not capturable)")
        for s in steps:
            s += 1
        # The flag as device scalars (Python numbers, so nothing is copied from the host).
        bad = ~ok
        lerp_w = torch.where(ok, 1 - beta1, -0.0)
        v_decay = torch.where(ok, beta2, 1.0)
        eps_or_inf = torch.where(ok, eps, float("inf"))
        grads = [p.grad for p in params]
        m_all = [s["exp_avg"] for s in states]
        v_all = [s["exp_avg_sq"] for s in states]
        for g in grads:
            g.masked_fill_(bad, 0.0)
        if wd != 0:
            torch._foreach_mul_(params, torch.where(ok, 1 - lr * wd, 1.0))
        torch._foreach_lerp_(m_all, grads, [lerp_w] * len(params))
        torch._foreach_mul_(v_all, v_decay)
        torch._foreach_addcmul_(v_all, grads, grads, 1 - beta2)
        bc1 = [1 - beta1 ** s.item() for s in steps]
        bc2_sqrt = [(1 - beta2 ** s.item()) ** 0.5 for s in steps]
        step_size = [(lr / b) * -1 for b in bc1]
        for lo, hi in _chunks(params):   # the denominator is the one temporary: at most a chunk at a time
            denom = torch._foreach_sqrt(v_all[lo:hi])
            if any(b != 1.0 for b in bc2_sqrt[lo:hi]):
                torch._foreach_div_(denom, bc2_sqrt[lo:hi])
            torch._foreach_add_(denom, eps_or_inf)
            torch._foreach_addcdiv_(params[lo:hi], m_all[lo:hi], denom, step_size[lo:hi])
        return steps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        self.settle()
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = None
        self.optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def _chunks(params, limit: int = _CHUNK_ELEMENTS):
    """[lo, hi) ranges over params of at most ``limit`` elements each (at least one tensor)."""
    lo, size = 0, 0
    for i, p in enumerate(params):
        if i > lo and size + p.numel() > limit:
            yield lo, i
            lo, size = i, 0
        size += p.numel()
    if lo < len(params):
        yield lo, len(params)
