"""SpeedrunDiT's checkpoint layout (models/speedrundit.py) and path-drop guidance (samplers.py).

Checked once against SpeedrunDiT's own code (models/sit.py, samplers.py) on random weights: equal
to 2e-7 (see README); these tests need none of it."""
import argparse

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from models import speedrundit as sr
from models.sit import Route, SiT
from samplers import euler_maruyama_sampler, euler_sampler

SR_OPTS = dict(qk_norm=True, norm="rmsnorm", rope=True, value_residual=True, routing="sprint")


def tiny_sprint(seed=0, **kw):
    torch.manual_seed(seed)
    m = SiT(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=6, num_heads=2, z_dims=[16],
            encoder_depth=2, projector_dim=16, num_classes=10, **{**SR_OPTS, **kw})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # non-zero everywhere (adaLN-zero and the zero read-outs would hide bugs)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def inputs(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 8, 4, 4, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 10, (n,), generator=g), torch.randn(n, 16, generator=g))


# ---------------------------------------------------------------------------------------- layout

def test_speedrundit_layout_keys_and_settings():
    m = tiny_sprint()
    sd = sr.to_speedrundit_state_dict(m)
    assert list(sd)[:4] == ["mask_token", "pos_embed", "fusion_proj.weight", "fusion_proj.bias"]
    assert {"feat_rope.freqs_cos", "feat_rope.freqs_sin"} <= sd.keys() and not any(k.startswith("sprint.") for k in sd)
    assert sd["feat_rope.freqs_cos"].shape == (16, 16)                 # (grid^2, head dim)
    assert sr.speedrundit_config(sd, {"num_classes": 10}) == m.config


def test_speedrundit_checkpoint_loads_strictly_samples_and_resumes(tmp_path):
    m = tiny_sprint()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, t, y, c = inputs()
    m.train()
    (m(x, t, y, c, route=m.draw_route(3, torch.Generator().manual_seed(0)))[0] ** 2).mean().backward()
    opt.step()
    m.eval()
    ours = opt.state_dict()
    our_names = [n for n, _ in m.named_parameters()]
    theirs_sd = sr.to_speedrundit_state_dict(m)
    their_names = [k for k in theirs_sd if k not in sr.ROPE_BUFFERS]
    back = {v: k for k, v in sr.RENAMES.items()}
    # The Adam state as SpeedrunDiT's train.py saves it: indexed by ITS parameter order.
    idx = [our_names.index(sr.RENAMES.get(n, n)) for n in their_names]
    their_opt = {"state": {j: ours["state"][i] for j, i in enumerate(idx) if i in ours["state"]},  # pos_embed: none
                 "param_groups": [{**ours["param_groups"][0], "params": list(range(len(their_names)))}]}
    assert [back.get(n, n) for n in our_names] != their_names          # the orders do differ
    path = tmp_path / "0000001.pt"
    torch.save({"model": theirs_sd, "ema": theirs_sd, "opt": their_opt, "steps": 1,
                "args": argparse.Namespace(num_classes=10, time_shifting=True, shift_base=4096,
                                           cfm_weighting="linear", vae_name="REPA-E/e2e-invae")}, path)

    ckpt = load_checkpoint(str(path))
    assert ckpt["layout"] == "speedrundit" and ckpt["model_config"] == m.config
    loaded = model_from_checkpoint(ckpt).eval()                       # strict=True inside
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, c)[0], m(x, t, y, c)[0])
    z, cz = torch.randn(2, 8, 4, 4), torch.randn(2, 16)
    runs = []
    for model in (m, loaded):
        torch.manual_seed(7)
        runs.append(euler_maruyama_sampler(model, z, y[:2], num_steps=4, cfg_scale=2.0, cls_latents=cz,
                                           cls_cfg_scale=2.0, time_shift=2 ** 0.5, path_drop_guidance=True))
    assert torch.equal(*runs)
    # resume: the Adam state lands on the same tensors
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state_dict()["state"].keys() == ours["state"].keys()
    for i in ours["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2.state_dict()["state"][i][key], ours["state"][i][key]), our_names[i]


def test_only_speedrundit_settings_export():
    with pytest.raises(ValueError, match="only a REG model with SpeedrunDiT's settings"):
        sr.to_speedrundit_state_dict(tiny_sprint(value_residual=False))


def test_speedrundit_bad_rope_table_is_refused():
    sd = sr.to_speedrundit_state_dict(tiny_sprint())
    sd["feat_rope.freqs_cos"] = sd["feat_rope.freqs_cos"] * 0.5
    with pytest.raises(ValueError, match="feat_rope.freqs_cos .* not the EVA-02"):
        sr.adapt_checkpoint({"ema": sd, "args": {"num_classes": 10}})


def test_other_checkpoints_pass_unchanged():
    ckpt = {"ema": tiny_sprint(routing="none").state_dict()}
    assert sr.adapt_checkpoint(ckpt) is ckpt


# ------------------------------------------------------------------------------ path-drop guidance

def test_drop_sparse_path_is_the_training_path_drop():
    """SpeedrunDiT computes the sparse path and replaces it by the mask token (g * 0 + mask); ours
    skips it. Our training step's path drop on a route that keeps every token is that computation."""
    m = tiny_sprint()
    x, t, y, c = inputs()
    every = Route(torch.arange(16).expand(3, 16).contiguous(), drop_path=True)
    with torch.no_grad():
        ref = m(x, t, y, c, route=every)
        got = m(x, t, y, c, drop_sparse_path=True)
        dense = m(x, t, y, c)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=1e-6)
    assert (got[0] - dense[0]).abs().max() > 1e-2                    # the sparse path matters


def test_path_drop_guidance_velocity():
    """One guided ODE step from t=1 to 0 is x - (u + s (c - u)), u from the path-dropped null branch."""
    m = tiny_sprint()
    x, _, y, c = inputs()
    t1 = torch.ones(3)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        v_c, _, cls_c = m(x, t1, y, c)
        v_u, _, cls_u = m(x, t1, null, c, drop_sparse_path=True)
        v_plain, _, cls_plain = m(x, t1, null, c)
    for pdg, v_uncond, cls_uncond in ((True, v_u, cls_u), (False, v_plain, cls_plain)):
        got, got_cls = euler_sampler(m, x, y, num_steps=1, cfg_scale=3.0, cls_latents=c, cls_cfg_scale=2.0,
                                     return_cls=True, path_drop_guidance=pdg)
        torch.testing.assert_close(got, x.double() - (v_uncond + 3.0 * (v_c - v_uncond)).double(), rtol=0, atol=1e-5)
        torch.testing.assert_close(got_cls, c.double() - (cls_uncond + 2.0 * (cls_c - cls_uncond)).double(),
                                   rtol=0, atol=1e-5)
    assert (v_u - v_plain).abs().max() > 1e-2


def test_path_drop_guidance_refused_without_sprint():
    m = tiny_sprint(routing="none")
    x, t, y, c = inputs()
    with pytest.raises(ValueError, match="path-drop guidance needs a model trained with --routing sprint"):
        euler_maruyama_sampler(m, x, y, num_steps=2, cfg_scale=2.0, cls_latents=c, path_drop_guidance=True)
    with pytest.raises(ValueError, match="drop_sparse_path"):
        m(x, t, y, c, drop_sparse_path=True)
