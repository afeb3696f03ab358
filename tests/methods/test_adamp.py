"""Tests for rwlib.methods.adamp (chapter 24: AdamP / SGDP)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwlib.methods.adamp import (
    SGDP,
    AdamP,
    effective_step_size,
    projection,
    radial_component,
    scale_invariant_params,
    weight_norms,
)

N_STEPS = 100


def _model(seed: int = 0) -> nn.Sequential:
    """Conv+BN2d and Linear+BN1d (scale-invariant weights) and a plain Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),  # 0: scale-invariant (BN follows)
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),  # 2
        nn.AdaptiveAvgPool2d(2),  # 3
        nn.Flatten(),  # 4
        nn.Linear(16, 8),  # 5: scale-invariant weight, bias with ~0 gradient
        nn.BatchNorm1d(8),  # 6
        nn.ReLU(),  # 7
        nn.Linear(8, 3),  # 8: head, not scale-invariant, with bias
    ).to(torch.float64)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def _loss(model, step):
    x, y = _batch(step)
    return F.cross_entropy(model(x), y)


HYPER = [
    pytest.param({}, id="default-delta-wdratio"),
    pytest.param({"delta": 0.2, "wd_ratio": 0.5}, id="delta0.2-wdratio0.5"),
]


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_matches_reference_package(name, nesterov, weight_decay, hyper):
    adamp = pytest.importorskip("adamp")
    ours_cls, ref_cls = {"AdamP": (AdamP, adamp.AdamP), "SGDP": (SGDP, adamp.SGDP)}[name]
    if name == "AdamP":
        kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay, nesterov=nesterov, **hyper)
    else:
        kw = dict(lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, **hyper)

    m_ours = _model()
    m_ref = copy.deepcopy(m_ours)
    opt_ours = ours_cls(m_ours.parameters(), **kw)
    opt_ref = ref_cls(m_ref.parameters(), **kw)
    w0 = [p.detach().clone() for p in m_ours.parameters()]

    for t in range(N_STEPS):
        for m, opt in ((m_ours, opt_ours), (m_ref, opt_ref)):
            opt.zero_grad()
            _loss(m, t).backward()
            opt.step()

    max_diff = max(
        (a - b).abs().max().item() for a, b in zip(m_ours.parameters(), m_ref.parameters())
    )
    assert max_diff <= 1e-10, f"max |diff| = {max_diff:.3e}"
    # non-vacuous: the parameters actually moved
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(m_ours.parameters(), w0))
    assert moved > 1e-3
    # state layout matches the reference
    for p_o, p_r in zip(m_ours.parameters(), m_ref.parameters()):
        so, sr = opt_ours.state[p_o], opt_ref.state[p_r]
        assert set(so) == set(sr)
        for k in so:
            if isinstance(so[k], torch.Tensor):
                assert (so[k] - sr[k]).abs().max().item() <= 1e-10
            else:
                assert so[k] == sr[k]


def test_sgdp_dampening_matches_reference():
    adamp = pytest.importorskip("adamp")
    kw = dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3)
    m_ours = _model(1)
    m_ref = copy.deepcopy(m_ours)
    opt_ours, opt_ref = SGDP(m_ours.parameters(), **kw), adamp.SGDP(m_ref.parameters(), **kw)
    for t in range(N_STEPS):
        for m, opt in ((m_ours, opt_ours), (m_ref, opt_ref)):
            opt.zero_grad()
            _loss(m, t).backward()
            opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(m_ours.parameters(), m_ref.parameters()))
    assert diff <= 1e-10


def _grads(model):
    model.zero_grad()
    _loss(model, 0).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_projected_update_is_orthogonal_to_weight():
    model = _model()
    grads = _grads(model)
    w = model[0].weight.detach()
    g = grads["0.weight"]
    # (E1): gradient of a BN-followed weight is orthogonal to it (row-wise), up to the
    # BatchNorm eps (1e-5 in the variance), which breaks exact scale invariance slightly
    cos_g = radial_component(g, w).abs().max().item()
    assert cos_g < 1e-4
    assert cos_g < 0.1 / math.sqrt(27)  # so (E6) detects it in the channel view
    model[1].eps = 1e-300  # torch refuses eps = 0 in training mode
    g_exact = _grads(model)["0.weight"]
    assert radial_component(g_exact, w).abs().max().item() < 1e-12
    # an update with a radial part as large as its tangential part, row by row
    rows = lambda x: x.reshape(4, -1)  # noqa: E731
    g_unit = (rows(g) / rows(g).norm(dim=1, keepdim=True)).reshape(w.shape)
    w_unit = (rows(w) / rows(w).norm(dim=1, keepdim=True)).reshape(w.shape)
    update = g_unit + w_unit
    assert radial_component(update, w).abs().min().item() > 0.7  # cos = 1/sqrt(2)
    projected, r = projection(model[0].weight, g, update)
    assert r == 0.1
    cos = radial_component(projected, w)
    assert cos.shape == (4,)
    # w_hat = w / (||w|| + eps) leaves a radial residue of order eps / ||w_row||
    assert cos.abs().max().item() < 1e-6
    # the tangential part is kept: projected ~ g_unit, up to g's own tiny radial part (cos_g)
    assert (projected - g_unit).abs().max().item() < cos_g + 1e-6
    # with eps = 0 the projection is exact to round-off
    projected0, _ = projection(model[0].weight, g, update, eps=0.0)
    assert radial_component(projected0, w).abs().max().item() < 1e-12


def test_projection_wd_ratio_is_passed_through():
    model = _model()
    g = _grads(model)["0.weight"]
    w = model[0].weight
    _, r = projection(w, g, g.clone(), delta=0.1, wd_ratio=0.37)
    assert r == 0.37


def test_one_dimensional_params_are_never_projected():
    model = _model()
    grads = _grads(model)
    for name in ("1.weight", "1.bias", "5.bias", "6.weight", "8.bias"):
        p = dict(model.named_parameters())[name]
        # even an update that is parallel to p and a gradient orthogonal to it
        update = p.detach() * 3.0 + 1.0
        out, r = projection(p, grads[name], update, delta=1e6)
        assert out is update
        assert torch.equal(out, p.detach() * 3.0 + 1.0)
        assert r == 1.0


def test_non_scale_invariant_weight_is_not_projected():
    model = _model()
    grads = _grads(model)
    head = model[8].weight
    g = grads["8.weight"]
    # the head's gradient is far from orthogonal to the weight in both views
    cos_c = radial_component(g, head, "channel").abs().max().item()
    cos_l = radial_component(g, head, "layer").abs().max().item()
    assert cos_c > 0.1 / math.sqrt(8) or cos_l > 0.1 / math.sqrt(24)
    update = g + 0.5 * head.detach()
    out, r = projection(head, g, update)
    assert r == 1.0
    assert torch.equal(out, update)


def test_layer_view_fallback():
    # a gradient orthogonal to w as a whole but not row by row -> layer view is used
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 7, dtype=torch.float64)
    g = g - w * (w * g).sum() / (w * w).sum()  # orthogonal in the layer view only
    assert radial_component(g, w, "channel").abs().max().item() > 0.1 / math.sqrt(7)
    update = g + w
    out, r = projection(w, g, update)
    assert r == 0.1
    assert abs(radial_component(out, w, "layer").item()) < 1e-6
    out0, _ = projection(w, g, update, eps=0.0)
    assert abs(radial_component(out0, w, "layer").item()) < 1e-12
    assert radial_component(out, w, "channel").abs().max().item() > 1e-3  # rows not projected


def test_scale_invariant_params_finds_bn_followed_weights():
    model = _model()
    found = scale_invariant_params(model)
    assert [n for n, _ in found] == ["0.weight", "5.weight"]
    assert found[0][1] is model[0].weight and found[1][1] is model[5].weight

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
            self.mid = nn.Conv2d(2, 2, 1)  # followed by ReLU: not reported
            self.act = nn.ReLU()
            self.proj = nn.Linear(4, 4, bias=False)
            self.ln = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)  # last layer: not reported

    names = [n for n, _ in scale_invariant_params(Net())]
    assert names == ["stem.0.weight", "proj.weight"]


def test_weight_norms_and_effective_step_size():
    a = torch.tensor([[3.0, 4.0]])
    b = torch.tensor([1.0, 2.0, 2.0])
    norms = weight_norms([a, ("b", b)])
    assert norms.dtype == torch.float64
    assert torch.allclose(norms, torch.tensor([5.0, 3.0], dtype=torch.float64))
    ess = effective_step_size(0.9, norms)
    assert torch.allclose(ess, torch.tensor([0.9 / 25, 0.9 / 9], dtype=torch.float64))
    assert weight_norms([]).numel() == 0


def test_closure_returns_loss_and_steps():
    model = _model()
    w0 = model[0].weight.detach().clone()
    opt = AdamP(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0.5
    assert (model[0].weight.detach() - w0).abs().max().item() > 1e-4
    opt2 = SGDP(model.parameters(), lr=0.1, momentum=0.9)
    assert opt2.step(closure).item() > 0.0


def test_projection_slows_norm_growth():
    # momentum SGD on a BN-followed weight grows ||w||; SGDP keeps it nearly flat (E2, E3)
    def run(cls):
        model = _model()
        opt = cls(model.parameters(), lr=0.5, momentum=0.9)
        n0 = model[0].weight.detach().norm().item()
        for t in range(30):
            opt.zero_grad()
            _loss(model, t).backward()
            opt.step()
        return model[0].weight.detach().norm().item() / n0

    growth_sgd = run(torch.optim.SGD)
    growth_sgdp = run(SGDP)
    assert growth_sgd > 1.05
    assert growth_sgdp - 1.0 < 0.5 * (growth_sgd - 1.0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: AdamP(ps, lr=-1e-3), "lr=-0.001"),
        (lambda ps: SGDP(ps, lr=-0.1), "lr=-0.1"),
        (lambda ps: AdamP(ps, delta=-0.5), "delta=-0.5"),
        (lambda ps: SGDP(ps, lr=0.1, delta=-0.2), "delta=-0.2"),
        (lambda ps: AdamP(ps, betas=(1.0, 0.999)), "betas\\[0\\]=1.0"),
        (lambda ps: SGDP(ps, lr=0.1, weight_decay=-1.0), "weight_decay=-1.0"),
    ],
)
def test_bad_input_raises(make, match):
    params = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match=match):
        make(params)


def test_bad_param_group_raises():
    opt = AdamP([nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="lr=-1"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": -1})


def test_toy_loss_is_scale_invariant_and_its_gradient_orthogonal():
    from rwlib.methods.adamp import toy_loss

    theta = torch.tensor(2.0, dtype=torch.float64)
    w = torch.tensor([[0.3, -1.2]], dtype=torch.float64, requires_grad=True)
    loss = toy_loss(w, theta)
    assert torch.allclose(loss, toy_loss(5.0 * w.detach(), theta))  # (E1) L(cw) = L(w)
    loss.backward()
    assert abs(float((w.grad * w.detach()).sum())) < 1e-12  # (E1) <grad, w> = 0


def test_toy_momentum_grows_the_norm_and_sgdp_holds_it():
    """The chapter's toy in miniature: SGD's norm grows, momentum grows it faster, SGDP's projection curbs it."""
    from rwlib.methods.adamp import make_optimizer, toy_loss

    def growth(name, momentum):
        g = torch.Generator().manual_seed(0)
        w = nn.Parameter(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        opt = make_optimizer(name, [w], lr=0.1, momentum=momentum, nesterov=False)
        for _ in range(200):
            opt.zero_grad()
            toy_loss(w, 2.0 + 0.5 * torch.randn((), generator=g, dtype=torch.float64)).backward()
            opt.step()
        return float(w.detach().norm()) - 1.0

    gd, mom, proj = growth("SGD", 0.0), growth("SGD", 0.9), growth("SGDP", 0.9)
    assert 0 < gd < mom and proj < mom


def test_norm_monitor_starts_at_one_and_reports_lr_over_norm_squared():
    from rwlib.methods.adamp import norm_monitor, scale_invariant_params

    m = _model()
    opt = SGDP(m.parameters(), lr=0.1, momentum=0.9)
    hook = norm_monitor(m, opt)
    out = hook(0, m)
    assert float(out["rel_norm"]) == pytest.approx(1.0)
    norms = weight_norms(scale_invariant_params(m))
    assert float(out["eff_step"]) == pytest.approx(float((0.1 / norms**2).mean()))
    with torch.no_grad():
        for _, p in scale_invariant_params(m):
            p.mul_(2.0)
    assert float(hook(1, m)["rel_norm"]) == pytest.approx(2.0)
