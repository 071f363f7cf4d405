"""Tests of the SiT options of issue 15 (models/sit.py): RMSNorm, 2-D RoPE, value residual, SPRINT
and TREAD token routing, gradient checkpointing; and of their bookkeeping (config, init, loading).

Every option is OFF by default and the default model is the release's (tests/test_model.py pins
that). Here: each option off changes nothing, bitwise; each option on is checked against a closed
form or an invariant, and the whole forward pass with options against a float64 re-implementation
written from the option descriptions (``ref_forward_opts``), one sample at a time.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import models.sit as sit
from checkpoint import infer_model_config, model_from_checkpoint
from models.sit import SiT, AxialRoPE, Route, apply_rope, complete_config

from conftest import ROOT, TINY, randomize_weights_
from test_model import _gelu_tanh, _inputs, _lin, _ln, _silu, ref_timestep_embedding

pytestmark = pytest.mark.usefixtures("single_thread")

# TINY with 4 blocks, so that routing has a dense head (block 0), a routed range (blocks 1, 2)
# and a dense tail (block 3); encoder_depth 1 taps the head.
DEEP = {**TINY, "depth": 4}
ROUTE = dict(route_start=1, route_end=3)
ALL_ON = dict(norm="rmsnorm", qk_norm=True, rope=True, value_residual=True, routing="sprint", **ROUTE)


def build(seed=0, randomize=False, **overrides) -> SiT:
    torch.manual_seed(seed)
    model = SiT(**{**DEEP, **overrides}).eval()
    return randomize_weights_(model, seed + 1000) if randomize else model


def _loss(out):
    """A scalar touching every output (velocity, projections, class-token velocity)."""
    v, zs, v_cls = out
    total = v.square().mean() + sum(z.sin().mean() for z in zs)
    return total + (v_cls.square().mean() if v_cls is not None else 0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _forward_backward(model, inputs, route=None):
    model.zero_grad(set_to_none=True)
    x, t, y, cls = inputs
    out = model(x, t, y, cls_token=cls, route=route)
    _loss(out).backward()
    return out, _grads(model)


def _assert_same(a, b, grads_exact=True):
    """Outputs (v, zs, v_cls) equal bitwise; gradients bitwise too, or (grads_exact=False) to
    float32 rounding, for the parameters with a gradient in b."""
    (va, za, ca), ga = a
    (vb, zb, cb), gb = b
    assert torch.equal(va, vb)
    assert len(za) == len(zb) and all(torch.equal(p, q) for p, q in zip(za, zb))
    assert (ca is None and cb is None) or torch.equal(ca, cb)
    assert ga.keys() == gb.keys() if grads_exact else gb.keys() <= ga.keys()
    for k in gb:
        if grads_exact:
            assert torch.equal(ga[k], gb[k]), k
        else:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


#################################################################################
#                  Float64 re-implementation with the options                   #
#################################################################################

def _rms(x, eps, weight=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def ref_rope_angles(grid: int, head_dim: int, cls: bool) -> torch.Tensor:
    """(L, hd/2) angle of every channel pair (2k, 2k+1): pairs k < hd/4 turn with the token's row,
    the others with its column, by pos * 10000^(-2k'/(hd/2)), k' = k mod hd/4; the class token
    (first, if any) by 0."""
    quarter = head_dim // 4
    rows = [[0.0] * (head_dim // 2)] if cls else []
    for j in range(grid * grid):
        r, c = divmod(j, grid)
        rows.append([(r if k < quarter else c) * 10000.0 ** (-2 * (k % quarter) / (head_dim / 2))
                     for k in range(head_dim // 2)])
    return torch.tensor(rows, dtype=torch.float64)


def ref_rotate(x, angles):
    """x (..., L, hd), angles (L, hd/2): rotate each pair (x_2k, x_2k+1) by its angle."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def ref_forward_opts(model: SiT, x, t, y, cls_token=None, route: Route | None = None):
    """The forward pass with every option, in float64, one sample at a time; routed blocks see
    the tokens listed by the route (class token first), written back by position."""
    cfg = model.config
    sd = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}
    D, p, C, H = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"], cfg["num_heads"]
    hd, g = D // H, cfg["input_size"] // p
    T, has_cls, rms = g * g, cfg["cls_token_dim"] > 0, cfg["norm"] == "rmsnorm"
    N = x.shape[0]

    def norm(v, eps, name=None):
        w = sd.get(name + ".weight") if name else None
        return _rms(v, eps, w) if rms else _ln(v, eps, w, sd.get(name + ".bias") if name else None)

    angles = ref_rope_angles(g, hd, has_cls) if cfg["rope"] else None
    patches = x.double().reshape(N, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(N, T, C * p * p)
    tokens = patches @ sd["x_embedder.proj.weight"].reshape(D, -1).T + sd["x_embedder.proj.bias"]
    if has_cls:
        e = norm(_lin(cls_token.double(), sd, "cls_projectors2"), 1e-6, "wg_norm")
        tokens = torch.cat([e[:, None], tokens], dim=1)
    if cfg["pos_embed"] == "sincos":
        tokens = tokens + sd["pos_embed"]
    L = tokens.shape[1]
    cond = (_lin(_silu(_lin(ref_timestep_embedding(t), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
            + sd["y_embedder.embedding_table.weight"][y])

    def block(i, h, c, pos, v1):
        b = f"blocks.{i}."
        mod = _lin(_silu(c), sd, b + "adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = [mod[k * D:(k + 1) * D] for k in range(6)]
        a = norm(h, 1e-6) * (1 + sc1) + sh1
        qkv = _lin(a, sd, b + "attn.qkv").reshape(len(pos), 3, H, hd)
        q, k, v = (qkv[:, j].transpose(0, 1) for j in range(3))           # (H, L', hd)
        if cfg["qk_norm"]:
            q, k = norm(q, 1e-5, b + "attn.q_norm"), norm(k, 1e-5, b + "attn.k_norm")
        own_v = v
        if cfg["value_residual"] and i > 0:
            lam = sd[b + "attn.v1_lambda"]
            v = lam * v1[:, pos] + (1 - lam) * v
        if angles is not None:
            q, k = ref_rotate(q, angles[pos]), ref_rotate(k, angles[pos])
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        s = torch.exp(s - s.max(-1, keepdim=True).values)
        att = ((s / s.sum(-1, keepdim=True)) @ v).transpose(0, 1).reshape(len(pos), D)
        h = h + g1 * _lin(att, sd, b + "attn.proj")
        m = norm(h, 1e-6) * (1 + sc2) + sh2
        return h + g2 * _lin(_gelu_tanh(_lin(m, sd, b + "mlp.fc1")), sd, b + "mlp.fc2"), own_v

    imgs, zs, cls_outs = [], [[] for _ in cfg["z_dims"]], []
    for n in range(N):
        h, c, v1 = tokens[n], cond[n], None
        full = list(range(L))

        def run(first, stop, h, pos, v1, c=c):
            for i in range(first, stop):
                h, v = block(i, h, c, pos, v1)
                if i == 0:
                    v1 = v
                if i + 1 == cfg["encoder_depth"]:
                    for e in range(len(cfg["z_dims"])):
                        z = _silu(_lin(_silu(_lin(h, sd, f"projectors.{e}.0")), sd, f"projectors.{e}.2"))
                        zs[e].append(_lin(z, sd, f"projectors.{e}.4"))
            return h, v1

        if cfg["routing"] == "none":
            h, _ = run(0, cfg["depth"], h, full, v1)
        else:
            start, end = cfg["route_start"], cfg["route_end"]
            f, v1 = run(0, start, h, full, v1)
            if route is None:
                pos = full
            else:
                pos = ([0] if has_cls else []) + [j + int(has_cls) for j in route.keep[n].tolist()]
            out, _ = run(start, end, f[pos], pos, v1)
            if cfg["routing"] == "tread":
                h = f.clone()
                h[pos] = out
            else:
                mask = sd["sprint.mask_token"][0, 0]
                pad = mask.expand(L, D).clone()
                pad[pos] = out
                if route is not None and route.drop_path:
                    pad = mask.expand(L, D)
                h = _lin(torch.cat([f, pad], dim=-1), sd, "sprint.proj")
            h, _ = run(end, cfg["depth"], h, full, v1)
        mod = _lin(_silu(c), sd, "final_layer.adaLN_modulation.1")
        h = norm(h, 1e-6) * (1 + mod[D:]) + mod[:D]
        out = _lin(h[1:] if has_cls else h, sd, "final_layer.linear")
        imgs.append(out.reshape(g, g, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, g * p, g * p))
        if has_cls:
            cls_outs.append(_lin(h[0], sd, "final_layer.linear_cls"))
    return (torch.stack(imgs), [torch.stack(z) for z in zs],
            torch.stack(cls_outs) if has_cls else None)


FORWARD_CASES = {
    "rmsnorm-qknorm": (dict(norm="rmsnorm", qk_norm=True), False),
    "rmsnorm-repa": (dict(norm="rmsnorm", cls_token_dim=0), False),
    "rope": (dict(rope=True), False),
    "rope-only-repa": (dict(rope=True, pos_embed="none", cls_token_dim=0), False),
    "value-residual": (dict(value_residual=True), False),
    "tread-routed": (dict(routing="tread", **ROUTE), True),
    "tread-routed-repa": (dict(routing="tread", cls_token_dim=0, **ROUTE), True),
    "sprint-dense": (dict(routing="sprint", **ROUTE), False),
    "sprint-routed": (dict(routing="sprint", **ROUTE), True),
    "sprint-path-drop": (dict(routing="sprint", **ROUTE), "drop_path"),
    "all-on-routed": (ALL_ON, True),
    "all-on-tail-tap-repa": ({**ALL_ON, "cls_token_dim": 0, "encoder_depth": 4}, True),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_with_options_matches_reference(case):
    overrides, routed = FORWARD_CASES[case]
    model = build(randomize=True, **overrides)
    x, t, y, cls = _inputs(model)
    route = None
    if routed:
        route = model.draw_route(3, torch.Generator().manual_seed(5))
        if routed == "drop_path":
            route = Route(route.keep, drop_path=True)
        assert route.keep.shape[1] < model.x_embedder.num_patches       # really sparse
    v, zs, v_cls = model(x, t, y, cls_token=cls, route=route)
    assert 0.1 < v.abs().mean() < 10
    rv, rzs, rcls = ref_forward_opts(model, x, t, y, cls, route)
    torch.testing.assert_close(v.double(), rv, atol=2e-5, rtol=2e-5)
    assert len(zs) == len(rzs) == 1
    torch.testing.assert_close(zs[0].double(), rzs[0], atol=2e-5, rtol=2e-5)
    if rcls is not None:
        torch.testing.assert_close(v_cls.double(), rcls, atol=2e-5, rtol=2e-5)


#################################################################################
#                      Options off: the default model, bitwise                  #
#################################################################################

OFF = dict(norm="layernorm", rope=False, pos_embed="sincos", value_residual=False, routing="none",
           grad_checkpointing=False)


@pytest.mark.parametrize("cls_dim", [16, 0], ids=["reg", "repa"])
def test_options_off_are_the_default_model_bitwise(cls_dim):
    """Every option passed explicitly OFF: same parameters (order, values) under the same seed,
    same outputs and gradients, bit for bit, in training mode (label dropout included)."""
    default = build(cls_token_dim=cls_dim).train()
    off = build(cls_token_dim=cls_dim, **OFF).train()
    assert [n for n, _ in off.named_parameters()] == [n for n, _ in default.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), off.state_dict().values()))
    for m in (default, off):
        randomize_weights_(m, 7)
    inputs = _inputs(default)
    torch.manual_seed(3)
    a = _forward_backward(default, inputs)
    torch.manual_seed(3)
    b = _forward_backward(off, inputs)
    _assert_same(a, b)


@pytest.mark.parametrize("cls_dim", [16, 0], ids=["reg", "repa"])
def test_tread_model_without_route_is_the_default_model(cls_dim):
    """TREAD adds no parameter: its dense forward (route=None, i.e. sampling) is the default
    model's, bitwise, with the same weights."""
    default = build(randomize=True, cls_token_dim=cls_dim)
    tread = build(cls_token_dim=cls_dim, routing="tread", **ROUTE)
    tread.load_state_dict(default.state_dict(), strict=True)
    inputs = _inputs(default)
    _assert_same(_forward_backward(default, inputs), _forward_backward(tread, inputs))


@pytest.mark.parametrize("overrides", [
    dict(norm="rmsnorm"), dict(rope=True), dict(value_residual=True), dict(routing="tread", **ROUTE),
    dict(routing="sprint", **ROUTE), dict(rope=True, pos_embed="none"), ALL_ON,
], ids=["rmsnorm", "rope", "value-residual", "tread", "sprint", "rope-only", "all-on"])
def test_option_models_start_from_the_default_init(overrides):
    """Under one seed an option model starts from the default model's values on every tensor they
    share (option parameters draw last), keeps the default parameter order for those, and its own
    parameters start at their documented init."""
    default = build()
    model = build(**overrides)
    dsd, msd = default.state_dict(), model.state_dict()
    shared = [k for k in msd if k in dsd]
    assert shared == [k for k in dsd if k in msd]                              # same relative order
    for k in shared:
        assert torch.equal(dsd[k], msd[k]), k
    missing = set(dsd) - set(msd)
    if overrides.get("norm") == "rmsnorm":
        assert missing == {"wg_norm.bias"}                      # (the default has no q/k norms)
    elif overrides.get("pos_embed") == "none":
        assert missing == {"pos_embed"}
    else:
        assert not missing
    for k in set(msd) - set(dsd):
        if k.endswith("attn.v1_lambda"):
            assert msd[k].shape == () and msd[k].item() == 0.5
        elif k == "sprint.mask_token":
            assert msd[k].shape == (1, 1, 32) and torch.count_nonzero(msd[k]) == 0
        elif k == "sprint.proj.bias":
            assert torch.count_nonzero(msd[k]) == 0
        elif k == "sprint.proj.weight":                                      # xavier-uniform
            bound = math.sqrt(6.0 / (64 + 32))
            assert msd[k].shape == (32, 64) and 0.9 * bound <= msd[k].abs().max() <= bound
        elif k.endswith("norm.weight"):                                      # RMSNorm weights
            assert torch.equal(msd[k], torch.ones_like(msd[k]))
        else:
            raise AssertionError(f"undocumented parameter {k}")
    # the option parameters come after all of the default ones in parameters() (optimizer order)
    names = [n for n, _ in model.named_parameters()]
    if "sprint.proj.weight" in names:
        assert names[-3:] == ["sprint.mask_token", "sprint.proj.weight", "sprint.proj.bias"]


#################################################################################
#                                    RMSNorm                                    #
#################################################################################

def test_rmsnorm_option_replaces_every_norm_by_the_formula():
    model = build(norm="rmsnorm", qk_norm=True)
    blk = model.blocks[1]
    cases = [(blk.norm1, 32, 1e-6, False), (blk.norm2, 32, 1e-6, False),
             (model.final_layer.norm_final, 32, 1e-6, False), (model.wg_norm, 32, 1e-6, True),
             (blk.attn.q_norm, 16, 1e-5, True), (blk.attn.k_norm, 16, 1e-5, True)]
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    g = torch.Generator().manual_seed(0)
    for norm, dim, eps, affine in cases:
        assert isinstance(norm, nn.RMSNorm) and norm.eps == eps and norm.normalized_shape == (dim,)
        assert (norm.weight is not None) == affine
        if affine:
            with torch.no_grad():
                norm.weight.copy_(1 + torch.randn(dim, generator=g))
        # a strided input (as the patch embedding gives) and tiny values, where eps matters
        x = torch.randn(3, dim, 5, generator=g).transpose(1, 2) * torch.tensor([1.0, 1e-3, 10.0]).view(3, 1, 1)
        ref = x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + eps)
        if affine:
            ref = ref * norm.weight.double()
        torch.testing.assert_close(norm(x).double(), ref, atol=1e-6, rtol=1e-5)
    # half-precision input (q, k under autocast): computed in float32, returned in the input dtype
    q = torch.randn(2, 16, generator=g).to(torch.bfloat16)
    out = blk.attn.q_norm(q)
    assert out.dtype == torch.bfloat16
    ref = q.double() / torch.sqrt(q.double().square().mean(-1, keepdim=True) + 1e-5) * blk.attn.q_norm.weight.double()
    torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double())


#################################################################################
#                                  2-D RoPE                                     #
#################################################################################

def test_rope_tables_are_evas_axial_rotation():
    for cls in (True, False):
        rope = AxialRoPE(head_dim=16, grid=4, cls_token=cls)
        angles = ref_rope_angles(4, 16, cls)
        x = torch.randn(2, 3, 17 if cls else 16, 16, dtype=torch.float64)
        cos, sin = rope()
        got = apply_rope(x.float(), cos, sin).double()
        torch.testing.assert_close(got, ref_rotate(x, angles), atol=1e-5, rtol=1e-5)
        if cls:                                               # the class token is not rotated, exactly
            xf = x.float()
            assert torch.equal(apply_rope(xf, cos, sin)[:, :, 0], xf[:, :, 0])
    assert not AxialRoPE(16, 4, True).state_dict()            # no state_dict entries


def test_rope_keeps_norms_and_scores_depend_on_relative_position_only():
    grid, hd = 5, 16
    rope = AxialRoPE(hd, grid, cls_token=False)
    cos, sin = rope()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, grid * grid, hd, generator=g)
    # every token's vector keeps its norm (a product of plane rotations)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # one q and one k placed at every grid cell: score(P, P') must depend only on P - P'
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    qs = apply_rope(q.expand(1, 1, grid * grid, hd), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, grid * grid, hd), cos, sin)[0, 0]
    scores = qs @ ks.T                                           # (T, T)
    by_offset = {}
    for a in range(grid * grid):
        for b in range(grid * grid):
            (ra, ca), (rb, cb) = divmod(a, grid), divmod(b, grid)
            by_offset.setdefault((ra - rb, ca - cb), []).append(scores[a, b])
    assert len(by_offset) == (2 * grid - 1) ** 2
    for offset, values in by_offset.items():
        values = torch.stack(values)
        assert (values - values[0]).abs().max() < 1e-4, offset
    # ... and it does depend on the offset (not a constant)
    firsts = torch.stack([v[0] for v in by_offset.values()])
    assert firsts.std() > 0.1


def test_rope_is_applied_to_q_and_k_in_attention(monkeypatch):
    """Inside the model: SDPA receives the rotated q and k, and the unrotated values."""
    model = build(randomize=True, rope=True)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q, k, v)) or real(q, k, v, **kw))
    captured = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o))
    x, t, y, cls = _inputs(model)
    model(x, t, y, cls_token=cls)
    q, k, v = seen[0]
    raw = captured[0].reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4).double()   # (3, N, H, L, hd)
    angles = ref_rope_angles(4, 16, True)
    torch.testing.assert_close(q.double(), ref_rotate(raw[0], angles), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), ref_rotate(raw[1], angles), atol=1e-5, rtol=1e-5)
    assert torch.equal(v, captured[0].reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)[2])


#################################################################################
#                                Value residual                                 #
#################################################################################

def test_value_residual_weight_starts_at_half_mixes_block0_values_and_learns():
    model = build(randomize=True, value_residual=True)
    assert not hasattr(model.blocks[0].attn, "v1_lambda")
    lambdas = [b.attn.v1_lambda for b in model.blocks[1:]]
    with torch.no_grad():
        fresh = build(value_residual=True)
        assert [b.attn.v1_lambda.item() for b in fresh.blocks[1:]] == [0.5] * 3
    # lam = 1: block 1 attends with block 0's values exactly; lam = 0: with its own
    x, t, y, cls = _inputs(model)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(v)
        return real(q, k, v, **kw)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        for lam in (1.0, 0.0):
            for p in lambdas:
                p.fill_(lam)
            seen.clear()
            model(x, t, y, cls_token=cls)
            assert torch.equal(seen[1], seen[0]) == (lam == 1.0)
        assert not torch.equal(seen[1], seen[0])
    with torch.no_grad():
        for p in lambdas:
            p.fill_(0.5)
    model.train()
    _loss(model(x, t, y, cls_token=cls)).backward()
    for p in lambdas:
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.abs() > 0


#################################################################################
#                                 Token routing                                 #
#################################################################################

@pytest.mark.parametrize("routing", ["sprint", "tread"])
@pytest.mark.parametrize("cls_dim", [16, 0], ids=["reg", "repa"])
def test_routing_ratio_zero_is_the_dense_forward_bitwise(routing, cls_dim):
    """drop 0 and path drop 0: every token routed through the gather/scatter path gives the dense
    forward of the same model (route=None) bit for bit, with every other option on as well. The
    gradients agree to float32 rounding only: a tensor with several consumers (the dense head's
    output feeds the routed blocks, the fusion/re-insertion and the projector; block 0's values
    feed every block) sums its gradient contributions in another order when the graph differs."""
    over = {**ALL_ON, "routing": routing, "cls_token_dim": cls_dim}
    model = build(randomize=True, **over)
    route = model.draw_route(3, torch.Generator().manual_seed(0), drop=0.0, path_drop=0.0)
    assert route.keep.shape == (3, 16) and not route.drop_path
    assert torch.equal(route.keep, torch.arange(16).expand(3, 16))
    inputs = _inputs(model)
    routed = _forward_backward(model, inputs, route)
    _assert_same(routed, _forward_backward(model, inputs, None), grads_exact=False)
    if routing == "sprint":           # no position was left to the mask token
        assert torch.count_nonzero(routed[1]["sprint.mask_token"]) == 0


def test_tread_restores_routed_tokens_in_place_and_always_keeps_the_class_token():
    model = build(randomize=True, routing="tread", **ROUTE)
    seen = {}
    for i in range(4):
        model.blocks[i].register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, (inp[0], out[0])))
    x, t, y, cls = _inputs(model)
    route = model.draw_route(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x, t, y, cls_token=cls, route=route)
    keep = route.keep
    assert keep.shape == (3, 8)
    head_out = seen[0][1]                                         # (3, 17, 32)
    routed_in, routed_out = seen[1][0], seen[2][1]                # (3, 9, 32)
    tail_in = seen[3][0]                                          # (3, 17, 32)
    assert routed_in.shape == (3, 9, 32)
    for n in range(3):
        pos = [0] + (keep[n] + 1).tolist()                        # class token first, then the kept
        assert torch.equal(routed_in[n], head_out[n, pos])
        assert torch.equal(tail_in[n, pos], routed_out[n])        # routed tokens back in place
        dropped = sorted(set(range(17)) - set(pos))
        assert torch.equal(tail_in[n, dropped], head_out[n, dropped])   # the others skipped the range


@pytest.mark.parametrize("routing,drop_path", [("sprint", False), ("sprint", True), ("tread", False)])
@pytest.mark.parametrize("cls_dim", [16, 0], ids=["reg", "repa"])
def test_every_parameter_gets_a_gradient_after_a_routed_step(routing, drop_path, cls_dim):
    """DDP with a static graph needs every parameter in every step's graph, path drop included;
    on a path-drop step the sparse blocks get zero gradients (their path is replaced)."""
    model = build(randomize=True, **{**ALL_ON, "routing": routing, "cls_token_dim": cls_dim}).train()
    route = model.draw_route(3, torch.Generator().manual_seed(2))
    route = Route(route.keep, drop_path)
    inputs = _inputs(model)
    _, grads = _forward_backward(model, inputs, route)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(trainable)
    for n, grad in grads.items():
        assert torch.isfinite(grad).all(), n
        sparse = n.startswith(("blocks.1.", "blocks.2."))
        if drop_path and sparse:
            assert torch.count_nonzero(grad) == 0, n
        elif n != "final_layer.linear_cls.bias" or cls_dim:
            assert torch.count_nonzero(grad) > 0, n


@pytest.mark.parametrize("routing", ["sprint", "tread"])
def test_ddp_static_graph_accepts_routed_steps_with_and_without_path_drop(routing, tmp_path):
    """DDP(find_unused_parameters=False, static_graph=True), as train.py runs it (gloo, one
    process): routed steps with and without path drop keep the same graph; a step whose graph
    lost a parameter fails the next step with "Expected to have finished reduction"."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = build(randomize=True, **{**ALL_ON, "routing": routing}).train()
        ddp = DDP(model, find_unused_parameters=False, static_graph=True)
        x, t, y, cls = _inputs(model)
        for i, drop_path in enumerate([False, True, False, True, False]):
            route = model.draw_route(3, torch.Generator().manual_seed(i))
            route = Route(route.keep, drop_path and routing == "sprint")
            _loss(ddp(x, t, y, cls_token=cls, route=route)).backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
            model.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


def test_sprint_path_drop_replaces_the_sparse_path_by_the_mask_token():
    """On a path-drop step the output does not depend on the sparse blocks at all."""
    model = build(randomize=True, routing="sprint", **ROUTE)
    other = build(routing="sprint", **ROUTE)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.blocks[1:3].parameters():
            p.add_(torch.randn_like(p))
    x, t, y, cls = _inputs(model)
    route = model.draw_route(3, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for drop_path, same in ((True, True), (False, False)):
            r = Route(route.keep, drop_path)
            a, b = model(x, t, y, cls_token=cls, route=r)[0], other(x, t, y, cls_token=cls, route=r)[0]
            assert torch.equal(a, b) == same


def test_draw_route_statistics_and_rows():
    model = build(routing="sprint", **ROUTE)
    route = model.draw_route(64, torch.Generator().manual_seed(0))       # drop 0.75 -> keep 4 of 16
    keep = route.keep
    assert keep.dtype == torch.long and keep.shape == (64, 4)
    assert (keep[:, 1:] > keep[:, :-1]).all() and keep.min() >= 0 and keep.max() < 16   # sorted, distinct
    counts = torch.bincount(keep.flatten(), minlength=16).float()    # uniform: 16 per token expected
    assert counts.min() > 3 and counts.max() < 35
    same = model.draw_route(64, torch.Generator().manual_seed(0))
    assert torch.equal(same.keep, keep) and same.drop_path == route.drop_path
    assert not torch.equal(model.draw_route(64, torch.Generator().manual_seed(1)).keep, keep)
    part = route.rows(16, 32)
    assert torch.equal(part.keep, keep[16:32]) and part.drop_path == route.drop_path
    g = torch.Generator().manual_seed(0)
    rate = sum(model.draw_route(1, g).drop_path for _ in range(4000)) / 4000   # path drop 0.05
    assert abs(rate - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 4000)
    assert model.draw_route(5, g, drop=0.5).keep.shape == (5, 8)
    assert not any(model.draw_route(1, g, path_drop=0.0).drop_path for _ in range(200))


# route.keep of draw_route(2, Generator().manual_seed(1234)) on DEEP + SPRINT (16 tokens, keep 4),
# and its path-drop coin: pinned so a change of the draw (or of torch's CPU generator) shows.
PINNED_ROUTE = ([[0, 2, 4, 6], [0, 2, 6, 13]], False)


@pytest.mark.slow  # a fresh interpreter importing torch and timm: ~5 s on a busy 2-core box
def test_route_draw_is_identical_in_a_fresh_process():
    """What every rank does: the same seed gives the same draw in another process."""
    here = build(routing="sprint", **ROUTE).draw_route(2, torch.Generator().manual_seed(1234))
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from models.sit import SiT; "
            "cfg = dict(input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2, num_classes=10, "
            "z_dims=[16], projector_dim=24, encoder_depth=1, routing='sprint', route_start=1, route_end=3); "
            "r = SiT(**cfg).draw_route(2, torch.Generator().manual_seed(1234)); "
            "print(r.keep.tolist(), r.drop_path)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{here.keep.tolist()} {here.drop_path}"


def test_route_draw_is_pinned():
    """The same seed gives the draw pinned above (made in another process): what each rank relies on."""
    here = build(routing="sprint", **ROUTE).draw_route(2, torch.Generator().manual_seed(1234))
    assert (here.keep.tolist(), here.drop_path) == PINNED_ROUTE


#################################################################################
#                             Gradient checkpointing                            #
#################################################################################

@pytest.mark.parametrize("overrides", [{}, dict(cls_token_dim=0), ALL_ON, {**ALL_ON, "routing": "tread"}],
                         ids=["reg", "repa", "all-on-sprint", "all-on-tread"])
def test_grad_checkpointing_gives_the_same_gradients(overrides, monkeypatch):
    """Bitwise on CPU fp32, routed steps and the projector tap included; the blocks really run
    under torch.utils.checkpoint (non-reentrant), once per block."""
    model = build(randomize=True, **overrides).train()
    route = model.draw_route(3, torch.Generator().manual_seed(4)) if model.routing != "none" else None
    inputs = _inputs(model)
    torch.manual_seed(0)
    plain = _forward_backward(model, inputs, route)
    calls = []
    real = sit.checkpoint
    monkeypatch.setattr(sit, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model.grad_checkpointing = True
    torch.manual_seed(0)
    ckpt = _forward_backward(model, inputs, route)
    assert len(calls) == 4 and all(kw == {"use_reentrant": False} for kw in calls)
    _assert_same(plain, ckpt)
    with torch.no_grad():                                        # no recomputation without grad
        model(*inputs[:3], cls_token=inputs[3])
    assert len(calls) == 4
    assert "grad_checkpointing" not in model.config


def _autocast_run(model, inputs, route, ckpt, dtype=torch.bfloat16):
    model.grad_checkpointing = ckpt
    with torch.autocast("cpu", dtype=dtype):
        return _forward_backward(model, inputs, route)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_grad_checkpointing_under_autocast(dtype):
    """Autocast: the recomputation replays the autocast state, so the gradients are the same."""
    model = build(randomize=True, **ALL_ON).train()
    route = model.draw_route(3, torch.Generator().manual_seed(4))
    inputs = _inputs(model)
    plain = _autocast_run(model, inputs, route, False, dtype)
    assert plain[0][0].dtype == dtype
    _assert_same(plain, _autocast_run(model, inputs, route, True, dtype))


@pytest.mark.slow  # dynamo traces the blocks: ~6 s here
def test_grad_checkpointing_with_compiled_blocks():
    """Regional compilation (eager backend: the captured graphs, no kernel fusion) under
    checkpointing and autocast, routing on: the same gradients."""
    model = build(randomize=True, **ALL_ON).train()
    route = model.draw_route(3, torch.Generator().manual_seed(4))
    inputs = _inputs(model)
    plain = _autocast_run(model, inputs, route, False)
    model.compile_blocks(backend="eager")
    _assert_same(plain, _autocast_run(model, inputs, route, True))


#################################################################################
#                      Config, checkpoints, bad arguments                       #
#################################################################################

def test_options_are_recorded_in_config_and_old_configs_complete_to_the_defaults():
    default = build()
    for key, value in sit.OPTION_DEFAULTS.items():
        assert default.config[key] == value
    old = {k: v for k, v in default.config.items() if k not in sit.OPTION_DEFAULTS}   # a pre-option checkpoint
    assert complete_config(old) == default.config
    assert SiT(**old).config == default.config
    sprint = build(routing="sprint", depth=12, encoder_depth=2)
    assert {k: sprint.config[k] for k in ("route_start", "route_end", "route_drop", "path_drop")} == \
        dict(route_start=2, route_end=10, route_drop=0.75, path_drop=0.05)          # SpeedrunDiT's
    tread = build(routing="tread", depth=12, encoder_depth=2)
    assert (tread.config["route_drop"], tread.config["path_drop"]) == (0.5, 0.0)
    assert complete_config(sprint.config) == sprint.config


@pytest.mark.parametrize("overrides", [ALL_ON, {**ALL_ON, "routing": "tread", "pos_embed": "none", "cls_token_dim": 0}],
                         ids=["all-on-sprint", "rope-only-tread-repa"])
def test_model_with_options_rebuilds_from_its_config_and_checkpoint(overrides):
    model = build(randomize=True, **overrides)
    rebuilt = SiT(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    loaded = model_from_checkpoint({"model_config": model.config, "ema": model.state_dict()})
    assert loaded.config == model.config
    x, t, y, cls = _inputs(model)
    route = model.draw_route(3, torch.Generator().manual_seed(6))
    with torch.no_grad():
        for r in (None, route):
            ref = model(x, t, y, cls_token=cls, route=r)
            for other in (rebuilt, loaded.eval()):
                out = other(x, t, y, cls_token=cls, route=r)
                assert torch.equal(out[0], ref[0]) and torch.equal(out[1][0], ref[1][0])


def test_infer_model_config_reads_the_options_off_the_weights():
    for over in (dict(norm="rmsnorm"), dict(value_residual=True), dict(routing="sprint", **ROUTE)):
        model = build(**over)
        cfg = infer_model_config(model.state_dict(), dict(num_heads=2, encoder_depth=1, **ROUTE))
        for k, v in over.items():
            assert cfg[k] == v, k
        SiT(**cfg).load_state_dict(model.state_dict(), strict=True)
    cfg = infer_model_config(build().state_dict(), dict(num_heads=2))
    assert all(cfg[k] == v for k, v in sit.OPTION_DEFAULTS.items() if k in cfg)


@pytest.mark.parametrize("overrides,match", [
    (dict(norm="batchnorm"), "norm must be"),
    (dict(pos_embed="learned"), "pos_embed must be"),
    (dict(pos_embed="none"), "needs rope=True"),
    (dict(rope=True, hidden_size=24, num_heads=4), "divisible by 4"),       # head dim 6
    (dict(routing="mod"), "routing must be"),
    (dict(routing="tread", route_start=0, route_end=3), "1 <= start < end <= depth"),
    (dict(routing="tread", route_start=2, route_end=5), "1 <= start < end <= depth"),
    (dict(routing="sprint", route_start=2, route_end=2), "1 <= start < end <= depth"),
    (dict(routing="sprint", route_drop=1.0, **ROUTE), "route_drop"),
    (dict(routing="tread", path_drop=0.1, **ROUTE), "path_drop"),
    (dict(routing="sprint", encoder_depth=2, **ROUTE), "encoder_depth 2 taps a routed block"),
    (dict(route_start=1), "routing='none'"),
    (dict(routing="sprint"), "1 <= start < end <= depth"),                  # default [2, 2) at depth 4
])
def test_bad_options_raise_one_clear_line(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        SiT(**{**DEEP, **overrides})
    assert "\n" not in str(err.value)


def test_bad_routes_raise():
    model = build(routing="sprint", **ROUTE)
    x, t, y, cls = _inputs(model)
    with pytest.raises(ValueError, match=r"route.keep must be an int64 tensor of shape \(3, K\)"):
        model(x, t, y, cls_token=cls, route=model.draw_route(2, torch.Generator()))
    with pytest.raises(ValueError, match="route drop must be in"):
        model.draw_route(3, torch.Generator(), drop=1.0)
    with pytest.raises(ValueError, match="no token routing"):
        build()(x, t, y, cls_token=cls, route=model.draw_route(3, torch.Generator()))
    with pytest.raises(ValueError, match="no token routing"):
        build().draw_route(3)
    with pytest.raises(ValueError, match="0 for TREAD"):
        build(routing="tread", **ROUTE).draw_route(3, path_drop=0.5)


#################################################################################
#              benchmarks/flops.py's activation count vs autograd               #
#################################################################################

def _saved_bytes(block, x, c, rope=None, v1=None):
    """Bytes of the distinct storages autograd saves in one block's forward, parameters and the
    shared inputs (c, block 0's values, RoPE tables) left out; the block input x counts."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, c, rope, v1)
    shared = [*block.parameters(), c] + ([v1] if v1 is not None else []) + (list(rope) if rope else [])
    for t in shared:
        seen.pop(t.untyped_storage().data_ptr(), None)
    return sum(seen.values())


@pytest.mark.parametrize("options", [{}, dict(norm="rmsnorm"), dict(rope=True), dict(value_residual=True)],
                         ids=["default", "rmsnorm", "rope", "value-residual"])
def test_activation_count_matches_what_autograd_saves_in_fp32(options):
    from benchmarks.flops import block_activation_bytes
    N, L, D, H = 2, 17, 64, 4
    torch.manual_seed(0)
    block = sit.SiTBlock(D, H, norm=options.get("norm", "layernorm"),
                         value_residual=options.get("value_residual", False))
    x, c = torch.randn(N, L, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    rope = AxialRoPE(D // H, 4, cls_token=True)() if options.get("rope") else None
    v1 = torch.randn(N, H, L, D // H) if options.get("value_residual") else None
    counted = sum(block_activation_bytes(L, D, H, precision="fp32", **options).values())
    assert _saved_bytes(block, x, c, rope, v1) == N * counted + (4 if v1 is not None else 0)   # + the lambda
