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
