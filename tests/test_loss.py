"""Tests of loss.py against the spec (reg-reference.md section 2)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import LossTerms, SILoss, interpolant, projection_loss

from conftest import build_sit

# tiny tensors: one intra-op thread is faster and keeps the suite quick on a busy 2-core box
pytestmark = pytest.mark.usefixtures("single_thread")

#################################################################################
#                                    Helpers                                    #
#################################################################################


def coeffs(t: float, path: str):
    """(alpha, sigma, alpha', sigma') at a python float t, written out by hand."""
    if path == "linear":
        return 1 - t, t, -1.0, 1.0
    h = math.pi / 2
    return math.cos(h * t), math.sin(h * t), -h * math.sin(h * t), h * math.cos(h * t)


class StubModel(nn.Module):
    """v = a x_t + b t, v_cls = c cls_t, fixed projector outputs; records what it was called with."""

    def __init__(self, zs_tilde=(), with_cls=True):
        super().__init__()
        self.a, self.b, self.c = 0.7, -0.3, 1.3
        self.zs_tilde = list(zs_tilde)
        self.with_cls = with_cls
        self.calls = []

    def forward(self, x, t, y=None, cls_token=None):
        self.calls.append(dict(x=x, t=t, y=y, cls_token=cls_token))
        v = self.a * x + self.b * t.view(-1, 1, 1, 1)
        v_cls = self.c * cls_token if self.with_cls else None
        return v, self.zs_tilde, v_cls


def release_projection_loss(zs, zs_tilde):
    """The release's per-sample double loop: sum over encoders and samples of the token-mean
    negative cosine similarity, divided by (encoders x batch)."""
    total = 0.0
    n = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for zj, ztj in zip(z, z_tilde):
            zj, ztj = F.normalize(zj, dim=-1), F.normalize(ztj, dim=-1)
            total = total + (-(zj * ztj).sum(dim=-1)).mean()
    return total / (len(zs) * n)


def total_loss(terms: LossTerms, proj_coeff=0.5, cls_coeff=0.03):
    return terms.denoising_loss.mean() + proj_coeff * terms.proj_loss + cls_coeff * terms.denoising_loss_cls.mean()


#################################################################################
#                           Terms against hand values                           #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_terms_against_hand_computed_values(path):
    g = torch.Generator().manual_seed(0)
    N, Z = 3, 5
    x = torch.randn(N, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(N, 2, 3, 3, generator=g, dtype=torch.float64)
    cls = torch.randn(N, Z, generator=g, dtype=torch.float64)
    eps_cls = torch.randn(N, Z, generator=g, dtype=torch.float64)
    ts = [0.15, 0.5, 0.85]
    zs = [torch.randn(N, 4, 6, generator=g, dtype=torch.float64)]
    zs_tilde = [torch.randn(N, 4, 6, generator=g, dtype=torch.float64)]
    model = StubModel(zs_tilde)
    y = torch.tensor([1, 2, 3])

    out = SILoss(path_type=path)(model, x, dict(y=y), zs=zs, cls_token=cls,
                                 time_input=torch.tensor(ts, dtype=torch.float64).view(N, 1, 1, 1),
                                 noises=eps, noises_cls=eps_cls)
    assert isinstance(out, LossTerms)
    assert out.denoising_loss.shape == (N,) and out.denoising_loss_cls.shape == (N,)

    call = model.calls[0]
    assert torch.equal(call["y"], y)
    assert call["t"].shape == (N,) and call["t"].tolist() == ts
    for i, t in enumerate(ts):
        a, s, da, ds = coeffs(t, path)
        xt = a * x[i] + s * eps[i]
        target = da * x[i] + ds * eps[i]
        pred = model.a * xt + model.b * t
        ct = a * cls[i] + s * eps_cls[i]
        ctarget = da * cls[i] + ds * eps_cls[i]
        torch.testing.assert_close(call["x"][i], xt, atol=1e-12, rtol=0)
        torch.testing.assert_close(call["cls_token"][i], ct, atol=1e-12, rtol=0)
        assert out.denoising_loss[i].item() == pytest.approx(((pred - target) ** 2).mean().item(), abs=1e-12)
        assert out.denoising_loss_cls[i].item() == pytest.approx(
            ((model.c * ct - ctarget) ** 2).mean().item(), abs=1e-12)
    assert out.proj_loss.item() == pytest.approx(release_projection_loss(zs, zs_tilde).item(), abs=1e-6)
    assert torch.equal(out.time_input.flatten(), torch.tensor(ts, dtype=torch.float64))
    assert out.time_input.shape == (N, 1, 1, 1)
    assert torch.equal(out.noises, eps)


def test_loss_terms_come_in_the_release_order():
    assert LossTerms._fields == ("denoising_loss", "proj_loss", "time_input", "noises", "denoising_loss_cls")


def test_cosine_class_token_target_is_per_sample_not_the_release_broadcast():
    """Two samples with different t: ours equals the per-sample target; the release's
    (N,1,1,1) x (N,Z) broadcast gives a different (sample-mixing) loss."""
    g = torch.Generator().manual_seed(1)
    N, Z = 2, 6
    x = torch.randn(N, 1, 2, 2, generator=g)
    cls, eps_cls = torch.randn(N, Z, generator=g), torch.randn(N, Z, generator=g)
    t = torch.tensor([0.1, 0.8]).view(N, 1, 1, 1)
    model = StubModel()
    ours = SILoss(path_type="cosine")(model, x, {}, cls_token=cls, time_input=t,
                                      noises=torch.randn_like(x), noises_cls=eps_cls).denoising_loss_cls
    v_cls = model.c * model.calls[0]["cls_token"]                        # (N, Z)

    per_sample = []
    for i in range(N):
        a, s, da, ds = coeffs(t[i].item(), "cosine")
        per_sample.append(((v_cls[i] - (da * cls[i] + ds * eps_cls[i])) ** 2).mean())
    torch.testing.assert_close(ours, torch.stack(per_sample), atol=1e-6, rtol=1e-6)

    # the release: derivative tensors (N,1,1,1) times (N,Z) -> target (N,1,N,Z)
    _, _, da, ds = interpolant(t, "cosine")
    release_target = da * cls + ds * eps_cls
    assert release_target.shape == (N, 1, N, Z)
    release = ((v_cls - release_target) ** 2).mean(dim=(1, 2, 3))
    assert (release - ours).abs().max() > 0.1

    # on the linear path the release's derivatives are plain numbers: no broadcast, same values
    model = StubModel()
    ours_lin = SILoss(path_type="linear")(model, x, {}, cls_token=cls, time_input=t,
                                          noises=torch.randn_like(x), noises_cls=eps_cls).denoising_loss_cls
    _, _, da, ds = interpolant(t, "linear")
    release_lin = ((model.c * model.calls[0]["cls_token"] - (da * cls + ds * eps_cls)) ** 2).mean(dim=1)
    torch.testing.assert_close(ours_lin, release_lin, atol=1e-6, rtol=0)


#################################################################################
#                                Projection loss                                #
#################################################################################

def test_projection_loss_equals_release_double_loop():
    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(4, 7, 16, generator=g), torch.randn(4, 7, 8, generator=g) * 5]
    zs_tilde = [torch.randn(4, 7, 16, generator=g), torch.randn(4, 7, 8, generator=g)]
    ours = projection_loss(zs, zs_tilde)
    assert ours.shape == ()
    torch.testing.assert_close(ours, release_projection_loss(zs, zs_tilde), atol=1e-6, rtol=0)
    # aligned features give -1, opposite ones +1
    assert projection_loss([zs[0]], [3 * zs[0]]).item() == pytest.approx(-1.0, abs=1e-6)
    assert projection_loss([zs[0]], [-zs[0]]).item() == pytest.approx(1.0, abs=1e-6)


def test_projection_loss_normalises_in_float32():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 32, generator=g).half()
    zt = torch.randn(2, 5, 32, generator=g).half()
    ours = projection_loss([z], [zt])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, release_projection_loss([z.float()], [zt.float()]), atol=1e-6, rtol=0)


def test_projection_loss_rejects_mismatches():
    z = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="projectors"):
        projection_loss([z, z], [z])
    with pytest.raises(ValueError, match="do not match"):
        projection_loss([z], [torch.randn(2, 4, 8)])


#################################################################################
#                           REG / REPA / SiT variants                           #
#################################################################################

def _batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    T = (cfg["input_size"] // cfg["patch_size"]) ** 2
    L = T + (1 if cfg["cls_token_dim"] else 0)
    x = torch.randn(n, 4, 8, 8, generator=g)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    zs = [torch.randn(n, L, z, generator=g) for z in cfg["z_dims"]]
    cls = torch.randn(n, cfg["cls_token_dim"], generator=g) if cfg["cls_token_dim"] else None
    return x, y, zs, cls


def test_missing_terms_are_zero_for_repa_and_sit_models():
    loss_fn = SILoss()
    repa = build_sit(cls_token_dim=0)
    x, y, zs, cls = _batch(repa)
    assert cls is None and zs[0].shape == (4, 16, 16)
    out = loss_fn(repa, x, dict(y=y), zs=zs)
    assert torch.equal(out.denoising_loss_cls, torch.zeros(4))
    assert out.proj_loss.abs() > 0
    assert (out.denoising_loss > 0).all()

    plain = build_sit(cls_token_dim=0, z_dims=[])
    x, y, zs, cls = _batch(plain)
    for zs_arg in (None, []):
        out = loss_fn(plain, x, dict(y=y), zs=zs_arg)
        assert out.proj_loss.item() == 0.0 and out.proj_loss.shape == ()
        assert torch.equal(out.denoising_loss_cls, torch.zeros(4))
        assert torch.isfinite(total_loss(out))

    reg = build_sit()
    x, y, zs, cls = _batch(reg)
    out = loss_fn(reg, x, dict(y=y), zs=zs, cls_token=cls)
    assert (out.denoising_loss_cls > 0).all() and out.proj_loss.abs() > 0


def test_encoder_features_for_a_model_without_projectors_raise():
    plain = build_sit(cls_token_dim=0, z_dims=[])
    x, y, _, _ = _batch(plain)
    with pytest.raises(ValueError, match="0 projectors"):
        SILoss()(plain, x, dict(y=y), zs=[torch.randn(4, 16, 16)])


#################################################################################
#                               Random draw order                               #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_random_draws_in_the_release_order(path, weighting):
    model = build_sit()
    x, y, zs, cls = _batch(model)
    loss_fn = SILoss(path_type=path, weighting=weighting)

    torch.manual_seed(123)
    auto = loss_fn(model, x, dict(y=y), zs=zs, cls_token=cls)
    after_auto = torch.rand(3)

    torch.manual_seed(123)
    if weighting == "uniform":
        t = torch.rand((4, 1, 1, 1))
    else:
        s = torch.randn((4, 1, 1, 1)).exp()
        t = s / (1 + s) if path == "linear" else 2 / math.pi * torch.atan(s)
    eps = torch.randn_like(x)
    eps_cls = torch.randn_like(cls)
    after_manual = torch.rand(3)
    manual = loss_fn(model, x, dict(y=y), zs=zs, cls_token=cls, time_input=t, noises=eps, noises_cls=eps_cls)

    assert torch.equal(after_auto, after_manual)  # exactly those three draws, nothing more
    assert torch.equal(auto.time_input, t) and torch.equal(auto.noises, eps)
    for a, b in zip(auto, manual):
        assert torch.equal(a, b)


def test_fixed_image_noise_still_draws_the_class_token_noise():
    """The release leaves eps_cls undefined when noises are passed; ours draws it."""
    model = build_sit()
    x, y, zs, cls = _batch(model)
    eps = torch.randn_like(x)
    t = torch.full((4, 1, 1, 1), 0.5)
    torch.manual_seed(7)
    a = SILoss()(model, x, dict(y=y), zs=zs, cls_token=cls, time_input=t, noises=eps)
    torch.manual_seed(7)
    b = SILoss()(model, x, dict(y=y), zs=zs, cls_token=cls, time_input=t, noises=eps,
                 noises_cls=torch.randn_like(cls))
    assert torch.equal(a.denoising_loss_cls, b.denoising_loss_cls)


def test_time_input_of_shape_n_is_accepted():
    model = StubModel(with_cls=False)
    x = torch.randn(3, 1, 2, 2)
    eps = torch.randn_like(x)
    a = SILoss()(model, x, {}, time_input=torch.tensor([0.1, 0.2, 0.3]), noises=eps)
    b = SILoss()(model, x, {}, time_input=torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1), noises=eps)
    assert torch.equal(a.denoising_loss, b.denoising_loss) and a.time_input.shape == (3, 1, 1, 1)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_mapping(path):
    torch.manual_seed(5)
    t = SILoss(path_type=path, weighting="lognormal").sample_time(2000)
    torch.manual_seed(5)
    n = torch.randn(2000, 1, 1, 1)
    sigma = torch.exp(n)
    expected = sigma / (1 + sigma) if path == "linear" else torch.atan(sigma) * 2 / math.pi
    assert t.shape == (2000, 1, 1, 1)
    torch.testing.assert_close(t, expected, atol=1e-6, rtol=0)
    assert ((t > 0) & (t < 1)).all()
    # n = 0 (sigma = 1) maps to t = 1/2 on both paths, so the median is near 1/2
    assert abs(t.median().item() - 0.5) < 0.03


def test_uniform_time_is_torch_rand():
    torch.manual_seed(9)
    t = SILoss().sample_time(5)
    torch.manual_seed(9)
    assert torch.equal(t, torch.rand((5, 1, 1, 1)))


#################################################################################
#                                  Interpolant                                  #
#################################################################################

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_derivatives_match_finite_differences(path):
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    h = 1e-6
    a, s, da, ds = interpolant(t, path)
    ap, sp, _, _ = interpolant(t + h, path)
    am, sm, _, _ = interpolant(t - h, path)
    da = torch.as_tensor(da, dtype=torch.float64).expand_as(t)
    ds = torch.as_tensor(ds, dtype=torch.float64).expand_as(t)
    torch.testing.assert_close(da, (ap - am) / (2 * h), atol=1e-8, rtol=0)
    torch.testing.assert_close(ds, (sp - sm) / (2 * h), atol=1e-8, rtol=0)
    # end points: data at t = 0, noise at t = 1
    a0, s0, _, _ = interpolant(torch.tensor(0.0, dtype=torch.float64), path)
    a1, s1, _, _ = interpolant(torch.tensor(1.0, dtype=torch.float64), path)
    assert (a0.item(), s0.item()) == (1.0, 0.0)
    assert a1.item() == pytest.approx(0.0, abs=1e-15) and s1.item() == 1.0
    if path == "cosine":
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t), atol=1e-15, rtol=0)
    else:
        assert (da.unique().tolist(), ds.unique().tolist()) == ([-1.0], [1.0])


#################################################################################
#                                Training signal                                #
#################################################################################

@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_one_optimisation_step_lowers_the_total_loss(opt):
    model = build_sit().train()
    model.y_embedder.dropout_prob = 0.0  # a fixed batch: no label dropout between the two evaluations
    x, y, zs, cls = _batch(model, n=8, seed=4)
    g = torch.Generator().manual_seed(5)
    fixed = dict(time_input=torch.rand(8, 1, 1, 1, generator=g), noises=torch.randn(8, 4, 8, 8, generator=g),
                 noises_cls=torch.randn(8, 16, generator=g))
    loss_fn = SILoss()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.05) if opt == "sgd" else torch.optim.Adam(params, lr=1e-3)

    before = total_loss(loss_fn(model, x, dict(y=y), zs=zs, cls_token=cls, **fixed))
    optimiser.zero_grad()
    before.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.final_layer.linear_cls.weight.grad.abs().sum() > 0
    assert model.projectors[0][4].weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is None                          # frozen
    optimiser.step()
    with torch.no_grad():
        after = total_loss(loss_fn(model, x, dict(y=y), zs=zs, cls_token=cls, **fixed))
    assert after < before - 1e-3, (before.item(), after.item())


#################################################################################
#                                  Bad names                                    #
#################################################################################

@pytest.mark.parametrize("kwargs,match", [
    (dict(path_type="edm"), "path_type"),
    (dict(weighting="cosine"), "weighting"),
    (dict(prediction="noise"), "prediction"),
])
def test_bad_names_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SILoss(**kwargs)


def test_interpolant_bad_path():
    with pytest.raises(ValueError, match="path_type"):
        interpolant(torch.tensor(0.5), "sigmoid")


#################################################################################
#                 The objective: named terms, weights, CFM, time shift          #
#################################################################################

def _inputs(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3][:n]),
            [torch.randn(n, 4, 6, generator=g, dtype=torch.float64)], torch.randn(n, 5, generator=g, dtype=torch.float64))


def test_objective_terms_and_weights_equal_the_release_total():
    from loss import REGObjective
    x, y, zs, cls = _inputs()
    zs_tilde = [torch.randn(4, 4, 6, dtype=torch.float64)]
    torch.manual_seed(3)
    terms = REGObjective(proj_coeff=0.5, cls_coeff=0.03)(StubModel(zs_tilde), x, y, zs=zs, cls_token=cls)
    torch.manual_seed(3)
    release = SILoss()(StubModel(zs_tilde), x, dict(y=y), zs=zs, cls_token=cls)
    # the release's logged names, with its values: proj_loss and loss_mean_cls already weighted
    assert list(terms) == ["loss_final", "loss_mean", "proj_loss", "loss_mean_cls", "proj_loss_raw",
                           "loss_mean_cls_raw"]
    assert torch.equal(terms["loss_final"], total_loss(release))                # bitwise: same order of sums
    assert torch.equal(terms["proj_loss"], release.proj_loss.mean() * 0.5)
    assert torch.equal(terms["loss_mean_cls"], release.denoising_loss_cls.mean() * 0.03)
    assert torch.equal(terms["proj_loss_raw"], release.proj_loss.mean())
    assert torch.equal(terms["loss_mean_cls_raw"], release.denoising_loss_cls.mean())
    with pytest.raises(ValueError, match="cls_coeff must be >= 0"):
        REGObjective(cls_coeff=-1)


def test_contrastive_flow_matching_term_on_hand_computed_tensors():
    from loss import REGObjective, contrastive_flow_matching
    out = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    # negatives = target rolled by one sample: [[1, 1], [0, 1], [2, 2]]
    want = -((0 ** 2 + 1 ** 2) + (3 ** 2 + 4 ** 2) + (2 ** 2 + 3 ** 2)) / 6
    assert contrastive_flow_matching(out, target).item() == pytest.approx(want)
    x, y, zs, cls = _inputs()
    torch.manual_seed(3)
    with_cfm = REGObjective(cfm_coeff=0.05)(StubModel([torch.randn(4, 4, 6, dtype=torch.float64)]), x, y, zs=zs,
                                            cls_token=cls)
    assert "cfm_loss" in with_cfm and with_cfm["cfm_loss"] == 0.05 * with_cfm["cfm_loss_raw"]
    rest = with_cfm["loss_mean"] + with_cfm["proj_loss"] + with_cfm["loss_mean_cls"]
    assert torch.equal(with_cfm["loss_final"], rest + with_cfm["cfm_loss"])
    assert "cfm_loss" not in REGObjective()(StubModel([torch.randn(4, 4, 6, dtype=torch.float64)]), x, y, zs=zs,
                                             cls_token=cls)


def test_contrastive_flow_matching_linear_weighting():
    """SpeedrunDiT's --cfm-weighting linear: each sample's squared distances times its time t."""
    from loss import REGObjective, contrastive_flow_matching
    out = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([0.5, 0.25, 1.0]).reshape(3, 1, 1, 1)
    want = -(0.5 * (0 ** 2 + 1 ** 2) + 0.25 * (3 ** 2 + 4 ** 2) + 1.0 * (2 ** 2 + 3 ** 2)) / 6
    assert contrastive_flow_matching(out, target, "linear", t).item() == pytest.approx(want)
    assert contrastive_flow_matching(out, target, "uniform", t).item() != pytest.approx(want)
    with pytest.raises(ValueError, match="cfm_weighting must be one of"):
        REGObjective(cfm_coeff=0.05, cfm_weighting="cosine")
    x, y, zs, cls = _inputs()
    torch.manual_seed(3)
    terms = REGObjective(cfm_coeff=0.05, cfm_weighting="linear")(
        StubModel([torch.randn(4, 4, 6, dtype=torch.float64)]), x, y, zs=zs, cls_token=cls)
    assert torch.isfinite(terms["cfm_loss"]) and terms["cfm_loss"] < 0


def test_time_shift_closed_form_and_no_shift_for_sd_vae_latents_at_256px():
    from loss import resolution_shift, time_shift
    assert resolution_shift((4, 32, 32)) == 1.0                                  # SD-VAE, 256 px: exactly none
    assert resolution_shift((32, 16, 16), base=4096) == math.sqrt(2)            # a 32-channel /16 VAE at 256 px
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert time_shift(t, 1.0) is t
    shifted = time_shift(t, 2.0)
    torch.testing.assert_close(shifted, 2 * t / (1 + t), rtol=0, atol=0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted >= t).all()        # more time at high noise
    # the loss draws t, then shifts it: the same draws, shifted
    torch.manual_seed(7)
    plain = SILoss().sample_time(5)
    torch.manual_seed(7)
    torch.testing.assert_close(SILoss(time_shift=3.0).sample_time(5), 3 * plain / (1 + 2 * plain), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="time_shift must be > 0"):
        SILoss(time_shift=0)
