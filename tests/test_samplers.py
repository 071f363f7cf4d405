"""Tests of samplers.py against the spec (reg-reference.md section 5).

Two kinds of checks:
* closed forms: Gaussian data x0 ~ N(mu_y, s^2 I) has an exact velocity field, score and ODE flow map,
  served by ``GaussianVelocity`` (a stand-in network with the model's call signature);
* RNG/bitwise parity with straightforward references of the release's SDE loop and REPA's
  Euler/Heun ODE loop written here, run on tiny real models with random weights.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import samplers
from loss import time_shift
from samplers import (GLOBAL_NOISE, PerSampleNoise, draw_plan, euler_maruyama_sampler, euler_sampler, replay_draws,
                      velocity_to_score)

from conftest import build_sit, randomize_weights_

# tiny tensors: one intra-op thread is faster and keeps the suite quick on a busy 2-core box
pytestmark = pytest.mark.usefixtures("single_thread")

#################################################################################
#                          Gaussian data: closed forms                          #
#################################################################################


def path_coeffs(t, path):
    """alpha, sigma, alpha', sigma' written out independently of loss.interpolant."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def gaussian_velocity(x, t, mu, s, path):
    """E[alpha' x0 + sigma' eps | x_t = x] for x0 ~ N(mu, s^2 I): with V = alpha^2 s^2 + sigma^2,
    v = alpha' mu + (alpha alpha' s^2 + sigma sigma') / V (x - alpha mu)."""
    a, sg, da, ds = path_coeffs(t, path)
    V = a ** 2 * s ** 2 + sg ** 2
    return da * mu + (a * da * s ** 2 + sg * ds) / V * (x - a * mu)


def gaussian_score(x, t, mu, s, path):
    a, sg, _, _ = path_coeffs(t, path)
    return -(x - a * mu) / (a ** 2 * s ** 2 + sg ** 2)


def gaussian_flow_map(z, mu, s, path):
    """The ODE from t=1 to t=0 keeps (x_t - alpha_t mu) / sqrt(V_t) fixed: x_0 = mu + s (z - alpha_1 mu)/sqrt(V_1)."""
    one = torch.ones((), dtype=torch.float64)
    a1, s1, _, _ = path_coeffs(one, path)
    return mu + s * (z - a1 * mu) / torch.sqrt(a1 ** 2 * s ** 2 + s1 ** 2)


class GaussianVelocity(nn.Module):
    """Stand-in network for per-class Gaussian data (images and class token), exact velocity.

    Class k (k = num_classes is the null class) has image mean mu[k] and class-token mean
    mu_cls[k]; stds s and s_cls. Records (batch size, t, y) of every call."""

    def __init__(self, path="linear", num_classes=7, s=0.5, s_cls=1.5, with_cls=True):
        super().__init__()
        self.path, self.num_classes, self.s, self.s_cls, self.with_cls = path, num_classes, s, s_cls, with_cls
        k = torch.arange(num_classes + 1, dtype=torch.float64)
        self.mu = 2.0 * torch.sin(k + 1.0)            # distinct per class; null class included
        self.mu_cls = -1.0 + 0.5 * k
        self.calls = []

    def image_mean(self, y, like):
        return self.mu[y].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def cls_mean(self, y, like):
        return self.mu_cls[y].view(-1, 1).to(like.dtype)

    def forward(self, x, t, y=None, cls_token=None, return_zs=False):
        self.calls.append(dict(n=x.shape[0], t=float(t[0]), y=y.clone(), dtype=x.dtype))
        tx = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        v = gaussian_velocity(x, tx, self.image_mean(y, x), self.s, self.path)
        v_cls = None
        if self.with_cls:
            tc = t.view(-1, 1).to(cls_token.dtype)
            v_cls = gaussian_velocity(cls_token, tc, self.cls_mean(y, cls_token), self.s_cls, self.path)
        return v, [], v_cls


class Recorder(nn.Module):
    """Wraps a model and records (batch size, t, y) of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_classes, self.calls = inner, inner.num_classes, []

    def forward(self, x, t, y=None, cls_token=None, return_zs=False):
        self.calls.append(dict(n=x.shape[0], t=float(t[0]), y=y.clone()))
        return self.inner(x, t, y=y, cls_token=cls_token, return_zs=return_zs)


#################################################################################
#                      References of the releases' loops                        #
#################################################################################

def release_score(v, x, t, path):
    """The release's velocity -> score, in its arithmetic order."""
    t = t.view(t.shape[0], *([1] * (x.ndim - 1)))
    if path == "linear":
        alpha, d_alpha = 1 - t, torch.ones_like(x) * -1
        sigma, d_sigma = t, torch.ones_like(x)
    else:
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)
    r = alpha / d_alpha
    var = sigma ** 2 - r * d_sigma * sigma
    return (r * v - x) / var


def _evaluate(model, x, c, y, t, guided, null_class, dtype, cfg_scale, cls_cfg_scale, path, sde):
    """One network call of the references: the (possibly doubled) batch, velocities -> drifts."""
    y_null = torch.full_like(y, null_class)
    xin = torch.cat([x, x]) if guided else x
    yin = torch.cat([y, y_null]) if guided else y
    cin = None if c is None else (torch.cat([c, c]) if guided else c)
    tin = torch.ones(xin.shape[0], dtype=torch.float64) * t
    if cin is None:
        v, _, vc = model(xin.to(dtype), tin.to(dtype), y=yin)
    else:
        v, _, vc = model(xin.to(dtype), tin.to(dtype), y=yin, cls_token=cin.to(dtype))
    v = v.to(torch.float64)
    vc = None if vc is None else vc.to(torch.float64)
    if sde:
        diffusion = 2 * t
        v = v - 0.5 * diffusion * release_score(v, xin, tin, path)
        if vc is not None:
            vc = vc - 0.5 * diffusion * release_score(vc, cin, tin, path)
    if guided:
        v_c, v_u = v.chunk(2)
        v = v_u + cfg_scale * (v_c - v_u)
        if vc is not None:
            c_c, c_u = vc.chunk(2)
            vc = c_u + cls_cfg_scale * (c_c - c_u) if cls_cfg_scale > 0 else c_c
    return v, vc


def reference_release_sde(model, latents, y, num_steps, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                          path="linear", cls_latents=None, cls_cfg_scale=0.0, null_class=None,
                          randn_like=torch.randn_like):
    """The REG release's Euler-Maruyama loop as the spec describes it: num_steps-1 stochastic intervals
    (image noise, then class-token noise, drawn with randn_like on the float64 state before the
    network call), then a separate last drift step 0.04 -> 0 returning the mean."""
    null_class = model.num_classes if null_class is None else null_class
    dtype = latents.dtype
    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                    torch.tensor([0.0], dtype=torch.float64)])
    x = latents.to(torch.float64)
    c = None if cls_latents is None else cls_latents.to(torch.float64)
    args = (null_class, dtype, cfg_scale, cls_cfg_scale, path, True)
    for i in range(num_steps - 1):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        diffusion = 2 * t_cur
        eps = randn_like(x)
        eps_c = None if c is None else randn_like(c)
        d, dc = _evaluate(model, x, c, y, t_cur, guided, *args)
        x = x + d * dt + torch.sqrt(diffusion) * (eps * torch.sqrt(torch.abs(dt)))
        if c is not None:
            c = c + dc * dt + torch.sqrt(diffusion) * (eps_c * torch.sqrt(torch.abs(dt)))
    # last step: plain drift, no noise
    t_cur, t_next = ts[-2], ts[-1]
    guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
    d, dc = _evaluate(model, x, c, y, t_cur, guided, *args)
    x = x + (t_next - t_cur) * d
    c = None if c is None else c + (t_next - t_cur) * dc
    return x, c


def reference_repa_ode(model, latents, y, num_steps, heun, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                       cls_latents=None, cls_cfg_scale=0.0, null_class=None):
    """REPA's Euler/Heun ODE loop (the class token, when given, follows the same update):
    grid linspace(1, 0, n+1), Heun on all but the last step, both evaluations guided iff t_cur is."""
    null_class = model.num_classes if null_class is None else null_class
    dtype = latents.dtype
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = latents.to(torch.float64)
    c = None if cls_latents is None else cls_latents.to(torch.float64)
    args = (null_class, dtype, cfg_scale, cls_cfg_scale, "linear", False)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        d, dc = _evaluate(model, x, c, y, t_cur, guided, *args)
        x_next = x + (t_next - t_cur) * d
        c_next = None if c is None else c + (t_next - t_cur) * dc
        if heun and i < num_steps - 1:
            d2, dc2 = _evaluate(model, x_next, c_next, y, t_next, guided, *args)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
            if c is not None:
                c_next = c + (t_next - t_cur) * (0.5 * dc + 0.5 * dc2)
        x, c = x_next, c_next
    return x, c


def _real_model(kind="reg", seed=0, **overrides):
    extra = {"reg": {}, "repa": dict(cls_token_dim=0), "sit": dict(cls_token_dim=0, z_dims=[])}[kind]
    return randomize_weights_(build_sit(seed, **extra, **overrides), seed + 100)


def _noise(n=3, z=16, seed=0, with_cls=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    cls = torch.randn(n, z, generator=g) if with_cls else None
    return x, y, cls


#################################################################################
#                              velocity -> score                                #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_velocity_to_score_is_exact_for_gaussian_data(path):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98], dtype=torch.float64)
    if path == "linear":
        t = torch.cat([t, torch.ones(1, dtype=torch.float64)])  # alpha = 0 is fine on the linear path
    n = t.shape[0]
    for shape, mu, s in (((n, 3, 4, 4), 1.3, 0.4), ((n, 5), -0.7, 2.0)):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        tb = t.view(-1, *([1] * (len(shape) - 1)))
        v = gaussian_velocity(x, tb, mu, s, path)
        score = velocity_to_score(v, x, t, path)
        torch.testing.assert_close(score, gaussian_score(x, tb, mu, s, path), atol=1e-10, rtol=1e-10)


def test_gaussian_velocity_is_the_conditional_expectation():
    """Sanity of the closed form itself: Monte Carlo E[alpha' x0 + sigma' eps | x_t] near a point."""
    g = torch.Generator().manual_seed(1)
    mu, s, t = 0.8, 0.6, torch.tensor(0.4, dtype=torch.float64)
    x0 = mu + s * torch.randn(400000, generator=g, dtype=torch.float64)
    eps = torch.randn(400000, generator=g, dtype=torch.float64)
    for path in ("linear", "cosine"):
        a, sg, da, ds = path_coeffs(t, path)
        xt, target = a * x0 + sg * eps, da * x0 + ds * eps
        near = (xt - 0.5).abs() < 0.01
        mc = target[near].mean()
        assert mc.item() == pytest.approx(gaussian_velocity(torch.tensor(0.5, dtype=torch.float64), t, mu, s, path).item(),
                                          abs=0.03)


#################################################################################
#                           ODE: the known flow map                             #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_lands_on_the_gaussian_flow_map_and_heun_beats_euler(path):
    model = GaussianVelocity(path)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 2, 3, 3, generator=g, dtype=torch.float64)
    z_cls = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (64,), generator=g)
    exact = gaussian_flow_map(z, model.image_mean(y, z), model.s, path)
    exact_cls = gaussian_flow_map(z_cls, model.cls_mean(y, z_cls), model.s_cls, path)

    def error(n, heun):
        x, c = euler_sampler(model, z, y, num_steps=n, heun=heun, path_type=path, cls_latents=z_cls,
                             return_cls=True)
        assert x.dtype == torch.float64 and c.dtype == torch.float64
        return max((x - exact).abs().max().item(), (c - exact_cls).abs().max().item())

    euler = {n: error(n, False) for n in (20, 40)}
    heun = {n: error(n, True) for n in (20, 40, 160)}
    # first order vs second order (Heun's last step is a plain Euler step, still O(h^2) locally)
    assert 1.8 < euler[20] / euler[40] < 2.2, euler
    assert 3.5 < heun[20] / heun[40] < 4.5, heun
    assert heun[40] < euler[40] / 8, (heun, euler)
    assert heun[160] < 5e-4, heun                              # lands on the flow map


def test_ode_guidance_one_euler_step_closed_form():
    """Linear path, one Euler step from t=1: v(x, 1) = x - mu, so x_0 = mu_u + s (mu_c - mu_u);
    the class token uses cls_cfg_scale, or stays conditional when it is 0."""
    model = GaussianVelocity("linear")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64)
    zc = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (8,), generator=g)
    null = torch.full_like(y, 7)
    mu_c, mu_u = model.image_mean(y, z), model.image_mean(null, z)
    mc_c, mc_u = model.cls_mean(y, zc), model.cls_mean(null, zc)
    for cls_scale, expect_cls in ((2.5, mc_u + 2.5 * (mc_c - mc_u)), (0.0, mc_c)):
        x, c = euler_sampler(model, z, y, num_steps=1, cfg_scale=4.0, cls_latents=zc, cls_cfg_scale=cls_scale,
                             return_cls=True)
        torch.testing.assert_close(x, (mu_u + 4.0 * (mu_c - mu_u)).expand_as(z), atol=1e-12, rtol=0)
        torch.testing.assert_close(c, expect_cls.expand_as(zc), atol=1e-12, rtol=0)


#################################################################################
#                          SDE: the target distribution                         #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_samples_have_the_target_mean_and_std(path):
    model = GaussianVelocity(path)
    torch.manual_seed(4)
    z = torch.randn(3000, 1, 2, 2, dtype=torch.float64)
    zc = torch.randn(3000, 4, dtype=torch.float64)
    y = torch.randint(0, 7, (3000,))
    torch.manual_seed(5)
    x, c = euler_maruyama_sampler(model, z, y, num_steps=60, path_type=path, cls_latents=zc, return_cls=True)
    u = (x - model.image_mean(y, x)) / model.s                   # should be ~ N(0, 1)
    uc = (c - model.cls_mean(y, c)) / model.s_cls
    for w in (u, uc):
        assert abs(w.mean().item()) < 0.05, w.mean()
        assert abs(w.std().item() - 1.0) < 0.05, w.std()
    # and not just the ODE in disguise: the output is not the deterministic flow map of z
    assert (x - gaussian_flow_map(z, model.image_mean(y, z), model.s, path)).abs().mean() > 0.1


#################################################################################
#                                   Guidance                                    #
#################################################################################

@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_guidance_scale_one_is_no_guidance(sampler):
    model = GaussianVelocity("linear")
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    zc = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=g)
    torch.manual_seed(0)
    base = sampler(model, z, y, num_steps=6, cls_latents=zc, return_cls=True)
    model.calls.clear()
    torch.manual_seed(0)
    one = sampler(model, z, y, num_steps=6, cfg_scale=1.0, guidance_low=0.2, guidance_high=0.8,
                  cls_latents=zc, cls_cfg_scale=3.0, return_cls=True)
    assert all(call["n"] == 5 for call in model.calls)          # never doubled
    assert torch.equal(base[0], one[0]) and torch.equal(base[1], one[1])
    # the guided formula is continuous at scale 1: d_u + s (d_c - d_u) -> d_c
    torch.manual_seed(0)
    near = sampler(model, z, y, num_steps=6, cfg_scale=1.0 + 1e-9, cls_latents=zc, cls_cfg_scale=1.0 + 1e-9,
                   return_cls=True)
    torch.testing.assert_close(near[0], base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(near[1], base[1], atol=1e-6, rtol=0)
    # real guidance does change the result
    torch.manual_seed(0)
    strong = sampler(model, z, y, num_steps=6, cfg_scale=3.0, cls_latents=zc, return_cls=True)
    assert (strong[0] - base[0]).abs().max() > 0.1


def test_sde_guidance_interval_runs_the_network_once_on_the_undoubled_batch():
    model = GaussianVelocity("linear")
    z = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    zc = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    euler_maruyama_sampler(model, z, y, num_steps=6, cfg_scale=2.0, guidance_low=0.3, guidance_high=0.7,
                           cls_latents=zc)
    # grid 1, .808, .616, .424, .232, .04 (then 0): one call per step, doubled only inside [0.3, 0.7]
    assert [round(c["t"], 3) for c in model.calls] == [1.0, 0.808, 0.616, 0.424, 0.232, 0.04]
    assert [c["n"] for c in model.calls] == [4, 4, 8, 8, 4, 4]
    for call in model.calls:
        if call["n"] == 8:
            assert torch.equal(call["y"], torch.tensor([0, 1, 2, 3, 7, 7, 7, 7]))
        else:
            assert torch.equal(call["y"], y)


def test_ode_heun_both_evaluations_follow_t_cur():
    model = GaussianVelocity("linear")
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 2])
    euler_sampler(model, z, y, num_steps=10, heun=True, cfg_scale=2.0, guidance_low=0.25, guidance_high=0.55,
                  cls_latents=torch.randn(2, 3, dtype=torch.float64))
    grid = [1 - k / 10 for k in range(11)]
    expected = []
    for i in range(10):
        n = 4 if 0.25 <= grid[i] <= 0.55 else 2
        expected.append((round(grid[i], 6), n))
        if i < 9:
            expected.append((round(grid[i + 1], 6), n))          # t_cur's decision, not t_next's
    assert [(round(c["t"], 6), c["n"]) for c in model.calls] == expected
    # the two boundary cases spelled out: 0.6 -> 0.5 unguided, 0.3 -> 0.2 guided
    assert (0.5, 2) in expected and (0.2, 4) in expected


def test_guidance_interval_bounds_are_inclusive():
    """Grid points exactly on guidance_low / guidance_high are guided (low <= t <= high)."""
    model = GaussianVelocity("linear")
    z, y = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([1, 2])
    euler_sampler(model, z, y, num_steps=4, cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75,
                  cls_latents=torch.randn(2, 3, dtype=torch.float64))
    assert [(c["t"], c["n"]) for c in model.calls] == [(1.0, 2), (0.75, 4), (0.5, 4), (0.25, 4)]
    model.calls.clear()
    euler_maruyama_sampler(model, z, y, num_steps=3, cfg_scale=2.0, guidance_low=0.04, guidance_high=1.0,
                           cls_latents=torch.randn(2, 3, dtype=torch.float64))
    assert [(round(c["t"], 6), c["n"]) for c in model.calls] == [(1.0, 4), (0.52, 4), (0.04, 4)]


def test_euler_ode_makes_one_call_per_step():
    model = GaussianVelocity("linear", with_cls=False)
    euler_sampler(model, torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1]), num_steps=7)
    assert len(model.calls) == 7


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_cls_cfg_scale_zero_leaves_the_class_token_conditional(sampler):
    """The class-token velocity of GaussianVelocity depends on y only, so with cls_cfg_scale=0 the
    guided run's class token must equal the unguided run's, while the image differs."""
    model = GaussianVelocity("linear")
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    zc = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (6,), generator=g)
    runs = {}
    for key, cfg, cls_cfg in (("plain", 1.0, 0.0), ("img-only", 3.0, 0.0), ("both", 3.0, 3.0)):
        torch.manual_seed(1)
        runs[key] = sampler(model, z, y, num_steps=8, cfg_scale=cfg, cls_latents=zc, cls_cfg_scale=cls_cfg,
                            return_cls=True)
    assert torch.equal(runs["img-only"][1], runs["plain"][1])
    assert (runs["img-only"][0] - runs["plain"][0]).abs().max() > 0.1
    assert (runs["both"][1] - runs["plain"][1]).abs().max() > 0.1
    assert torch.equal(runs["both"][0], runs["img-only"][0])     # the image does not see the class token here


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_null_label_is_model_num_classes(sampler):
    model = build_sit(num_classes=7)
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    x, _, cls = _noise(n=2)
    y = torch.tensor([3, 5])
    sampler(model, x, y, num_steps=3, cfg_scale=2.0, cls_latents=cls)
    assert len(seen) >= 3
    for labels in seen:
        assert torch.equal(labels, torch.tensor([3, 5, 7, 7]))


def test_guidance_needs_a_null_class_row():
    model = build_sit(class_dropout_prob=0.0)
    x, y, cls = _noise()
    with pytest.raises(ValueError, match="null"):
        euler_maruyama_sampler(model, x, y, num_steps=2, cfg_scale=2.0, cls_latents=cls)
    # without guidance it samples fine
    assert torch.isfinite(euler_maruyama_sampler(model, x, y, num_steps=2, cls_latents=cls)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=2.5), "num_steps"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(guidance_low=0.6, guidance_high=0.4), "guidance_low"),
    (dict(guidance_high=1.5), "guidance_high"),
])
@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_bad_sampler_arguments(sampler, kwargs, match):
    model = GaussianVelocity("linear")
    args = dict(num_steps=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampler(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), cls_latents=torch.randn(2, 3), **args)


#################################################################################
#                       Bitwise parity with the releases                        #
#################################################################################

SDE_CASES = [
    dict(),
    dict(cfg_scale=2.5),                                            # class token conditional
    dict(cfg_scale=2.5, cls_cfg_scale=1.8),
    dict(cfg_scale=2.3, cls_cfg_scale=2.3, guidance_high=0.7),      # the paper's setting, scaled down
    dict(cfg_scale=3.0, cls_cfg_scale=2.0, guidance_low=0.3, guidance_high=0.6),
]


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("case", SDE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sde_matches_the_release_loop_bitwise(path, case):
    model = _real_model("reg")
    x, y, cls = _noise()
    torch.manual_seed(11)
    ours, ours_cls = euler_maruyama_sampler(model, x, y, num_steps=7, path_type=path, cls_latents=cls,
                                            return_cls=True, **case)
    after_ours = torch.rand(2)
    torch.manual_seed(11)
    ref, ref_cls = reference_release_sde(model, x, y, 7, path=path, cls_latents=cls, **case)
    after_ref = torch.rand(2)
    assert torch.isfinite(ref).all() and ref.abs().mean() > 0.1
    assert torch.equal(ours, ref)
    assert torch.equal(ours_cls, ref_cls)
    assert torch.equal(after_ours, after_ref)                      # same number of draws


@pytest.mark.parametrize("kind", ["repa", "sit"])
@pytest.mark.parametrize("case", [dict(), dict(cfg_scale=2.0, guidance_high=0.6)], ids=["plain", "guided"])
def test_sde_without_class_token_matches_the_repa_loop(kind, case):
    model = _real_model(kind)
    x, y, _ = _noise(with_cls=False)
    torch.manual_seed(12)
    ours = euler_maruyama_sampler(model, x, y, num_steps=6, **case)
    torch.manual_seed(12)
    ref, _ = reference_release_sde(model, x, y, 6, **case)
    assert torch.equal(ours, ref)
    out, cls = euler_maruyama_sampler(model, x, y, num_steps=2, return_cls=True)
    assert cls is None and out.shape == x.shape


ODE_CASES = [
    dict(heun=False), dict(heun=True),
    dict(heun=True, cfg_scale=2.0),
    dict(heun=True, cfg_scale=2.0, cls_cfg_scale=1.5, guidance_low=0.2, guidance_high=0.65),
    dict(heun=False, cfg_scale=3.0, guidance_high=0.5),
]


@pytest.mark.parametrize("kind", ["reg", "repa", "sit"])
@pytest.mark.parametrize("case", ODE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ode_matches_the_repa_loop_bitwise(kind, case):
    model = _real_model(kind)
    x, y, cls = _noise(with_cls=kind == "reg")
    ours, ours_cls = euler_sampler(model, x, y, num_steps=7, cls_latents=cls, return_cls=True, **case)
    ref, ref_cls = reference_repa_ode(model, x, y, 7, cls_latents=cls, **case)
    assert torch.isfinite(ref).all() and ref.abs().mean() > 0.1
    assert torch.equal(ours, ref)
    if kind == "reg":
        assert torch.equal(ours_cls, ref_cls)
    else:
        assert ours_cls is None


def test_sde_noise_fn_replaces_randn_like_in_the_same_order():
    """noise_fn(like) is called for the image, then the class token, per stochastic step, on the
    float64 state; with per-call generators the result matches the reference fed the same noise."""
    model = _real_model("reg")
    x, y, cls = _noise()

    def make_noise_fn(log):
        g = torch.Generator().manual_seed(21)

        def noise_fn(like):
            log.append((tuple(like.shape), like.dtype))
            return torch.randn(like.shape, generator=g, dtype=like.dtype)
        return noise_fn

    ours_log, ref_log = [], []
    torch.manual_seed(0)
    ours, ours_cls = euler_maruyama_sampler(model, x, y, num_steps=5, cfg_scale=2.0, cls_latents=cls,
                                            cls_cfg_scale=1.5, return_cls=True, noise_fn=make_noise_fn(ours_log))
    after = torch.rand(1)
    ref, ref_cls = reference_release_sde(model, x, y, 5, cfg_scale=2.0, cls_latents=cls, cls_cfg_scale=1.5,
                                         randn_like=make_noise_fn(ref_log))
    assert ours_log == ref_log == [((3, 4, 8, 8), torch.float64), ((3, 16), torch.float64)] * 4
    assert torch.equal(ours, ref) and torch.equal(ours_cls, ref_cls)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))                      # the global generator was not touched
    # the default is torch.randn_like on the global generator
    torch.manual_seed(3)
    a = euler_maruyama_sampler(model, x, y, num_steps=4, cls_latents=cls)
    torch.manual_seed(3)
    b = euler_maruyama_sampler(model, x, y, num_steps=4, cls_latents=cls, noise_fn=torch.randn_like)
    assert torch.equal(a, b)


def test_sde_ignores_heun_flag():
    model = GaussianVelocity("linear")
    z, zc, y = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.tensor([0, 1])
    torch.manual_seed(0)
    a = euler_maruyama_sampler(model, z, y, num_steps=4, heun=False, cls_latents=zc)
    calls = len(model.calls)
    torch.manual_seed(0)
    b = euler_maruyama_sampler(model, z, y, num_steps=4, heun=True, cls_latents=zc)
    assert torch.equal(a, b) and len(model.calls) == 2 * calls == 8


def test_ode_ignores_noise_fn():
    model = GaussianVelocity("linear")
    z, zc, y = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.tensor([0, 1])

    def forbidden(like):
        raise AssertionError("the ODE drew noise")
    a = euler_sampler(model, z, y, num_steps=3, heun=True, cls_latents=zc, noise_fn=forbidden)
    assert torch.equal(a, euler_sampler(model, z, y, num_steps=3, heun=True, cls_latents=zc))


def test_samplers_run_the_network_in_the_latents_dtype_and_return_float64():
    model = GaussianVelocity("linear")
    z, zc = torch.randn(2, 1, 2, 2), torch.randn(2, 3)
    for sampler in (euler_sampler, euler_maruyama_sampler):
        model.calls.clear()
        x, c = sampler(model, z, torch.tensor([0, 1]), num_steps=3, cls_latents=zc, return_cls=True)
        assert {call["dtype"] for call in model.calls} == {torch.float32}
        assert x.dtype == torch.float64 and c.dtype == torch.float64


#################################################################################
#                                  Time shift                                   #
#################################################################################

@pytest.mark.parametrize("shift", [1.0, 1])
def test_time_shift_one_is_bitwise_the_unshifted_samplers(shift):
    model = _real_model("reg")
    x, y, cls = _noise()
    case = dict(cfg_scale=2.3, cls_cfg_scale=2.3, guidance_high=0.7)
    torch.manual_seed(7)
    sde, sde_cls = euler_maruyama_sampler(model, x, y, num_steps=6, cls_latents=cls, return_cls=True,
                                          time_shift=shift, **case)
    torch.manual_seed(7)
    ref, ref_cls = reference_release_sde(model, x, y, 6, cls_latents=cls, **case)
    assert torch.equal(sde, ref) and torch.equal(sde_cls, ref_cls)
    ode = euler_sampler(model, x, y, num_steps=5, heun=True, cls_latents=cls, time_shift=shift, **case)
    assert torch.equal(ode, reference_repa_ode(model, x, y, 5, True, cls_latents=cls, **case)[0])


def test_shifted_grids_match_the_closed_form():
    """The network sees t' = s t / (1 + (s - 1) t) of the unshifted grid; the guidance interval is decided
    on t' (here s = 3: 0.5 -> 0.75 leaves [0, 0.7] while 0.2 -> 0.4286 stays inside)."""
    s = 3.0
    model = GaussianVelocity("linear")
    z, zc, y = torch.randn(2, 1, 2, 2), torch.randn(2, 3), torch.tensor([0, 1])

    def closed(t):
        return s * t / (1 + (s - 1) * t)
    euler_sampler(model, z, y, num_steps=5, cls_latents=zc, time_shift=s, cfg_scale=2.0, guidance_high=0.7)
    grid = [1 - k / 5 for k in range(5)]
    assert [c["t"] for c in model.calls] == pytest.approx([closed(t) for t in grid], abs=1e-7)
    assert [c["n"] for c in model.calls] == [2 if closed(t) > 0.7 else 4 for t in grid] == [2, 2, 2, 4, 4]
    model.calls.clear()
    euler_maruyama_sampler(model, z, y, num_steps=4, cls_latents=zc, time_shift=s)
    sde_grid = [1.0, 0.68, 0.36, 0.04]
    assert [c["t"] for c in model.calls] == pytest.approx([closed(t) for t in sde_grid], abs=1e-7)
    # the library's own formula, on the float64 grid
    t = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    assert torch.equal(time_shift(t, 1.0), t)
    torch.testing.assert_close(time_shift(t, s), s * t / (1 + (s - 1) * t), rtol=0, atol=1e-15)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_shifted_ode_still_lands_on_the_gaussian_flow_map(path):
    """A time shift only re-spaces the grid: the ODE's solution is the same flow map."""
    model = GaussianVelocity(path)
    g = torch.Generator().manual_seed(9)
    z = torch.randn(32, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (32,), generator=g)
    exact = gaussian_flow_map(z, model.image_mean(y, z), model.s, path)
    x = euler_sampler(model, z, y, num_steps=160, heun=True, path_type=path, time_shift=2.5,
                      cls_latents=torch.zeros(32, 3, dtype=torch.float64))
    assert (x - exact).abs().max() < 5e-3     # coarser last steps than unshifted (s > 1 crowds t near 1)
    coarse = euler_sampler(model, z, y, num_steps=10, heun=True, path_type=path, time_shift=2.5,
                           cls_latents=torch.zeros(32, 3, dtype=torch.float64))
    assert (coarse - exact).abs().max() > 5 * (x - exact).abs().max()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2"])
def test_bad_time_shift(bad):
    with pytest.raises(ValueError, match="time_shift"):
        euler_sampler(GaussianVelocity("linear"), torch.randn(1, 1, 2, 2), torch.tensor([0]),
                      cls_latents=torch.randn(1, 3), num_steps=2, time_shift=bad)


#################################################################################
#                             Noise sources, replay                             #
#################################################################################

def test_per_sample_noise_does_not_depend_on_the_batch():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x = torch.zeros(3, 2, 4, dtype=torch.float64)
    batch = PerSampleNoise(gens([5, 6, 7])).randn_like(x)
    alone = PerSampleNoise(gens([6])).randn_like(x[:1])
    assert batch.dtype == torch.float64 and batch.shape == x.shape
    assert torch.equal(batch[1:2], alone) and not torch.equal(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 samples requested from 3 generators"):
        PerSampleNoise(gens([1, 2, 3])).randn_like(x[:2])
    torch.manual_seed(0)
    a = GLOBAL_NOISE.randn_like(x)
    torch.manual_seed(0)
    assert torch.equal(a, torch.randn_like(x))
    with pytest.raises(ValueError, match="not both"):
        euler_maruyama_sampler(GaussianVelocity("linear"), torch.randn(1, 1, 2, 2), torch.tensor([0]),
                               cls_latents=torch.randn(1, 3), noise=GLOBAL_NOISE, noise_fn=torch.randn_like)
    with pytest.raises(TypeError, match="randn_like"):
        euler_maruyama_sampler(GaussianVelocity("linear"), torch.randn(1, 1, 2, 2), torch.tensor([0]),
                               cls_latents=torch.randn(1, 3), noise=42)


@pytest.mark.parametrize("case", [dict(), dict(cfg_scale=2.0, cls_cfg_scale=1.5, guidance_high=0.6, time_shift=2.0)])
def test_replay_draws_makes_exactly_the_real_draws_without_the_network(case):
    """replay_draws leaves the global generator where a real run leaves it (same number, shapes and
    dtypes of draws), calls no network; draw_plan lists them and draws nothing."""
    model = Recorder(_real_model("reg"))
    x, y, cls = _noise()
    torch.manual_seed(5)
    euler_maruyama_sampler(model, x, y, num_steps=5, cls_latents=cls, **case)
    after_real = torch.rand(3)
    calls = len(model.calls)
    torch.manual_seed(5)
    log = replay_draws(euler_maruyama_sampler, x, y, GLOBAL_NOISE, cls_latents=cls, num_steps=5, **case)
    assert torch.equal(torch.rand(3), after_real)
    assert len(model.calls) == calls                                   # no network call
    assert log == [((3, 4, 8, 8), torch.float64, "cpu"), ((3, 16), torch.float64, "cpu")] * 4
    torch.manual_seed(5)
    assert draw_plan(euler_maruyama_sampler, x, y, cls_latents=cls, num_steps=5, **case) == log
    after_plan = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_plan, torch.rand(3))                      # the plan drew nothing
    assert draw_plan(euler_sampler, x, y, cls_latents=cls, num_steps=5, heun=True) == []
    assert draw_plan(euler_maruyama_sampler, x, y, num_steps=3) == [((3, 4, 8, 8), torch.float64, "cpu")] * 2


def test_samplers_registry_accepts_the_common_arguments():
    """Every registered sampler takes the keyword arguments generate.py passes."""
    model = GaussianVelocity("linear")
    kwargs = dict(num_steps=2, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, path_type="linear",
                  cls_cfg_scale=0.0, time_shift=1.0, noise=GLOBAL_NOISE, cls_latents=torch.randn(2, 3))
    for name, sampler in samplers.SAMPLERS.items():
        out = sampler(model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), **kwargs)
        assert out.shape == (2, 1, 2, 2), name
