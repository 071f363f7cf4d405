"""optim.py: the non-finite guard computes torch's AdamW update bitwise and skips a bad step
without touching weights or optimizer state; the EMA update keeps the release's arithmetic."""
import copy

import pytest
import torch

from optim import GuardedAdamW, _chunks, make_optimizer, update_ema


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))


def _grads(net, x):
    net(x).pow(2).mean().backward()


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "branch"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_guarded_steps_equal_torch_adamw_and_skip_bad_steps_exactly(impl, weight_decay, masked, monkeypatch):
    """Six steps, the 4th poisoned: the guarded run equals torch's AdamW run that simply leaves the
    4th step out, bit for bit, and after the poisoned step weights and state are what they were.
    masked: the accelerator path (no host read of the flag); branch: the CPU path."""
    import optim
    monkeypatch.setattr(optim, "_CHUNK_ELEMENTS", 300)   # several chunks per group: chunking changes nothing
    ref, net = _net(), _net()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    torch_opt = make_optimizer(ref.parameters(), impl, **kw)
    guarded = GuardedAdamW(make_optimizer(net.parameters(), impl, **kw), masked=masked)
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        x = torch.randn(4, 16, generator=g)
        _grads(net, x)
        if i == 3:
            net[0].weight.grad[0, 0] = float("nan")
            before_w = [p.clone() for p in net.parameters()]
            before_s = copy.deepcopy(guarded.optimizer.state_dict())
            guarded.step(torch.tensor(False))
            guarded.settle()
            assert guarded.skipped == 1 and guarded.consecutive == 1
            assert all(torch.equal(a, b) for a, b in zip(before_w, net.parameters()))
            after_s = guarded.state_dict()
            for k, st in before_s["state"].items():
                for key, value in st.items():
                    assert torch.equal(value, after_s["state"][k][key]), (k, key)
        else:
            _grads(ref, x)
            torch_opt.step()
            guarded.step(torch.tensor(True))
        torch_opt.zero_grad()
        guarded.zero_grad()
    guarded.settle()
    assert guarded.consecutive == 0 and guarded.skipped == 1
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.equal(a, b)
    for (ka, sa), (kb, sb) in zip(torch_opt.state_dict()["state"].items(), guarded.state_dict()["state"].items()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (ka, key)


def test_guard_refuses_optimizers_it_cannot_mirror():
    net = _net()
    with pytest.raises(ValueError, match="plain AdamW"):
        GuardedAdamW(torch.optim.AdamW(net.parameters(), amsgrad=True))


def test_chunks_cover_every_tensor_once_within_the_limit():
    sizes = [5, 1, 7, 3, 3, 10, 2]
    params = [torch.zeros(n) for n in sizes]
    ranges = list(_chunks(params, limit=8))
    covered = [i for lo, hi in ranges for i in range(lo, hi)]
    assert covered == list(range(len(sizes)))
    for lo, hi in ranges:
        assert sum(sizes[lo:hi]) <= 8 or hi - lo == 1       # a tensor larger than the limit goes alone


def test_ema_update_is_the_release_formula():
    ema, model = [torch.full((3,), 2.0)], [torch.full((3,), 4.0)]
    update_ema(ema, model, 0.75)
    assert torch.equal(ema[0], torch.full((3,), 2.0 * 0.75 + 4.0 * 0.25))


def test_make_optimizer_kernels_keep_the_adamw_update():
    torch.manual_seed(0)
    proto = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    finals = {}
    for impl in ("loop", "foreach", "fused", "auto"):
        net = copy.deepcopy(proto)
        opt = (torch.optim.AdamW(net.parameters(), foreach=False, **kw) if impl == "loop"
               else make_optimizer(net.parameters(), impl, **kw))
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            net(torch.randn(4, 16, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        finals[impl] = torch.cat([p.detach().flatten() for p in net.parameters()])
        if impl in ("fused", "auto"):
            assert opt.param_groups[0]["fused"]
    assert torch.equal(finals["foreach"], finals["loop"])                       # bitwise
    torch.testing.assert_close(finals["fused"], finals["loop"], rtol=0, atol=1e-6)
    assert not torch.equal(finals["loop"], torch.cat([p.detach().flatten() for p in proto.parameters()]))
    with pytest.raises(ValueError, match="unknown AdamW implementation"):
        make_optimizer(proto.parameters(), "sgd", **kw)


#################################################################################
#          The masked update: torch's foreach bits, exact skips, traffic          #
#################################################################################

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _masked_pair(weight_decay=0.0, start_step=None, device="cpu"):
    """(torch's foreach AdamW on one net, the masked guard on an identical net)."""
    ref, net = _net().to(device), _net().to(device)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    torch_opt = torch.optim.AdamW(ref.parameters(), foreach=True, **kw)
    guarded = GuardedAdamW(make_optimizer(net.parameters(), "foreach", **kw), masked=True)
    if start_step is not None:   # deep into a run: sqrt(1 - b2^t) == 1.0, the guard skips that division
        for opt in (torch_opt, guarded.optimizer):
            for p in opt.param_groups[0]["params"]:
                opt.state[p].update(step=torch.tensor(float(start_step)), exp_avg=torch.zeros_like(p),
                                    exp_avg_sq=torch.zeros_like(p))
    return ref, net, torch_opt, guarded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start_step", [None, 60_000], ids=["early", "late"])
def test_masked_update_is_torch_foreach_bitwise_and_skips_exactly(start_step, device):
    """Five steps against torch.optim.AdamW(foreach=True); a step poisoned with inf and NaN in
    between, with signed zeros planted in the moments, changes no bit of weights or state."""
    ref, net, torch_opt, guarded = _masked_pair(start_step=start_step, device=device)
    g = torch.Generator().manual_seed(3)
    for i in range(5):
        x = torch.randn(4, 16, generator=g).to(device)
        for m in (ref, net):
            _grads(m, x)
        torch_opt.step()
        guarded.step(torch.tensor(True, device=device))
        torch_opt.zero_grad()
        guarded.zero_grad()
        if i == 2:
            first = guarded.optimizer.state[net[0].weight]
            first["exp_avg"][0, :2] = torch.tensor([-0.0, 0.0])
            torch_opt.state[ref[0].weight]["exp_avg"][0, :2] = torch.tensor([-0.0, 0.0])   # (copied to the device)
            _grads(net, x)
            net[0].weight.grad[0, 0], net[2].bias.grad[1] = float("inf"), float("nan")
            before = [t.clone() for p in net.parameters()
                      for t in (p, guarded.optimizer.state[p]["exp_avg"], guarded.optimizer.state[p]["exp_avg_sq"])]
            guarded.step(torch.tensor(False, device=device))
            after = [t for p in net.parameters()
                     for t in (p, guarded.optimizer.state[p]["exp_avg"], guarded.optimizer.state[p]["exp_avg_sq"])]
            assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(before, after))
            guarded.zero_grad()
    guarded.settle()
    assert guarded.skipped == 1
    for a, b in zip(ref.parameters(), net.parameters()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for p, q in zip(ref.parameters(), net.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch_opt.state[p][key], guarded.optimizer.state[q][key]), key


@pytest.mark.parametrize("start_step", [None, 60_000], ids=["early", "late"])
def test_masked_update_moves_about_torch_foreach_bytes(start_step):
    """The benchmark's byte count (benchmarks/bench_optim.py): the masked update moves at most
    torch's foreach traffic plus one read and one write of the gradients (their zeroing), and no
    more than torch's once the bias correction of the second moment is exactly 1."""
    from benchmarks.bench_optim import count_bytes
    ref, net, torch_opt, guarded = _masked_pair(start_step=start_step)
    for m in (ref, net):
        _grads(m, torch.randn(4, 16))
    weights = 4 * sum(p.numel() for p in net.parameters())
    torch_opt.step(), guarded.step(torch.tensor(True))        # lazy state init, outside the count
    theirs = count_bytes(torch_opt.step)
    ours = count_bytes(lambda: guarded.step(torch.tensor(True)))
    assert theirs / weights == pytest.approx(19, abs=0.1)        # lerp 3, mul 2, addcmul 4, sqrt/div/add 6, addcdiv 4
    assert ours <= theirs + (2 if start_step is None else 0) * weights + 4096


def test_ema_foreach_is_the_release_per_tensor_form_bitwise():
    torch.manual_seed(0)
    model = [torch.randn(257), torch.randn(16, 33)]
    ema_a = [torch.randn_like(p) for p in model]
    ema_b = [t.clone() for t in ema_a]
    for _ in range(3):
        update_ema(ema_a, model, 0.9999)
        for e, p in zip(ema_b, model):
            e.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    assert all(torch.equal(a, b) for a, b in zip(ema_a, ema_b))
    lerped = [t.clone().lerp_(p, 1 - 0.9999) for t, p in zip(ema_b, model)]
    assert not all(torch.equal(a, b) for a, b in zip(lerped, ema_a))  # why the EMA is not a lerp_
