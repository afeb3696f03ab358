"""Tests for rwlib.methods.doubly_robust_at (chapter 04: DONE) and the baselines' weighting rules."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwlib import adversarial, repro, train
from rwlib.methods.doubly_robust_at import (
    GAIRAT,
    MAIL,
    CompositionalEMA,
    DONEWeights,
    effective_sample_size,
    gair_weights,
    kl_dro_objective,
    kl_dro_value,
    kl_dro_weights,
    mail_weights,
    probabilistic_margin,
)

LOSSES = torch.tensor([0.3, 2.5, 0.1, 1.2, 4.0, 0.7], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- closed form
def test_weights_are_a_softmax_on_the_simplex():
    w = kl_dro_weights(LOSSES, 1.0)
    assert torch.allclose(w, torch.softmax(LOSSES, 0))
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12) and bool((w > 0).all())


def test_r_to_infinity_gives_uniform_weights():
    n = len(LOSSES)
    assert torch.allclose(kl_dro_weights(LOSSES, math.inf), torch.full((n,), 1 / n, dtype=torch.float64))
    assert torch.allclose(kl_dro_weights(LOSSES, 1e8), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-8)
    assert torch.isclose(kl_dro_value(LOSSES, math.inf), LOSSES.mean())
    assert torch.isclose(kl_dro_value(LOSSES, 1e7), LOSSES.mean(), atol=1e-6)


def test_r_to_zero_gives_one_hot_on_the_max_loss():
    w = kl_dro_weights(LOSSES, 1e-3)
    assert int(w.argmax()) == int(LOSSES.argmax()) and float(w.max()) > 1 - 1e-12
    assert torch.isclose(kl_dro_value(LOSSES, 1e-3), LOSSES.max(), atol=1e-2)  # r log(1/n) -> 0


def test_large_adversarial_losses_do_not_overflow():
    big = torch.tensor([50.0, 80.0, 120.0])  # exp(120 / 0.5) overflows float32 without the max shift
    w = kl_dro_weights(big, 0.5)
    assert torch.isfinite(w).all() and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    ema = DONEWeights(0.5, "ema")
    assert torch.isfinite(ema(big, None, 0)).all()


def test_bad_r_and_normalizer_are_refused():
    with pytest.raises(ValueError, match="r"):
        kl_dro_weights(LOSSES, 0.0)
    with pytest.raises(ValueError, match="normalizer"):
        DONEWeights(1.0, "global")
    with pytest.raises(ValueError, match="beta"):
        CompositionalEMA(0.0)


@pytest.mark.parametrize("r", [0.3, 1.0, 3.0])
def test_weights_solve_the_kl_regularised_problem(r):
    """The closed form equals the optimum that a generic solver (SLSQP on the simplex) finds, and its value is
    r log mean exp(l / r)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    ell = LOSSES.numpy()
    n = len(ell)

    def neg(w):
        w = np.clip(w, 1e-300, None)
        return -(w @ ell - r * np.sum(w * np.log(w * n)))

    res = scipy_opt.minimize(neg, np.full(n, 1 / n), method="SLSQP", bounds=[(0, 1)] * n,
                             constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                             options={"ftol": 1e-14, "maxiter": 500})
    w = kl_dro_weights(LOSSES, r)
    assert np.allclose(res.x, w.numpy(), atol=1e-5)
    best = kl_dro_objective(w, LOSSES, r)
    assert float(best) >= -res.fun - 1e-10
    assert torch.isclose(best, kl_dro_value(LOSSES, r), atol=1e-12)
    # and no random point of the simplex does better
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = -torch.log(torch.rand(n, generator=g, dtype=torch.float64))  # uniform on the simplex
        v = v / v.sum()
        assert float(kl_dro_objective(v, LOSSES, r)) <= float(best) + 1e-12


def test_gradient_identity_logsumexp_equals_weighted_gradient():
    """grad_theta r log mean exp(l_i(theta) / r) = sum_i softmax(l / r)_i grad_theta l_i(theta) (E3)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    lin = nn.Linear(5, 3).double()
    r = 0.7
    ell = F.cross_entropy(lin(X), y, reduction="none")
    g1 = torch.autograd.grad(kl_dro_value(ell, r), list(lin.parameters()))
    ell = F.cross_entropy(lin(X), y, reduction="none")
    w = DONEWeights(r, "batch")(ell.detach(), None, 0)           # |B| softmax, fit minimises mean(w l)
    g2 = torch.autograd.grad((w * ell).mean(), list(lin.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)


def test_effective_sample_size_increases_with_r_and_weights_keep_the_loss_order():
    rs = [0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
    ess = [effective_sample_size(kl_dro_weights(LOSSES, r)) for r in rs]
    assert all(a < b for a, b in zip(ess, ess[1:]))
    assert 1.0 <= ess[0] and ess[-1] <= len(LOSSES)
    assert math.isclose(effective_sample_size(torch.ones(7)), 7.0)
    w = kl_dro_weights(LOSSES, 0.8)
    assert torch.equal(torch.argsort(w), torch.argsort(LOSSES))


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_with_beta_one_is_the_batch_normaliser():
    g = torch.Generator().manual_seed(2)
    a, b = DONEWeights(0.8, "batch"), DONEWeights(0.8, "ema", beta=1.0)
    for t in range(5):
        ell = 3 * torch.rand(32, generator=g)
        assert torch.allclose(a(ell, None, t), b(ell, None, t), atol=1e-6)


def test_ema_converges_to_the_batch_weights_on_a_constant_loss_vector():
    ema = DONEWeights(0.5, "ema", beta=0.3)
    ema(torch.full((6,), 9.0), None, 0)  # a very different first batch
    for t in range(1, 80):
        w = ema(LOSSES.float(), None, t)
    assert torch.allclose(w, len(LOSSES) * kl_dro_weights(LOSSES.float(), 0.5), atol=1e-5)
    assert math.isclose(ema.trace[-1]["sum_w"], 1.0, rel_tol=1e-5)


def test_ema_tracks_the_mean_of_exp_losses():
    ema = CompositionalEMA(beta=0.25)
    batches = [torch.tensor([0.5, 1.5]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])]
    u = None
    for ell in batches:
        m = float(torch.exp(ell / 2.0).mean())
        u = m if u is None else 0.75 * u + 0.25 * m
        log_u = ema.update(ell, 2.0)
    assert math.isclose(float(log_u), math.log(u), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------- training
def _train(weight_fn, steps=5):
    g = torch.Generator().manual_seed(3)
    X = torch.rand(64, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    with repro.seeded(0):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train.fit(model, X, y, steps=steps, batch_size=16, optimizer=opt, generator=torch.Generator().manual_seed(4),
              perturb=adversarial.pgd_perturb(eps=0.1, alpha=0.05, steps=3), weight_fn=weight_fn)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("normalizer", ["batch", "ema"])
def test_done_with_huge_r_is_pgd_at(normalizer):
    at = _train(None)
    assert torch.allclose(_train(DONEWeights(1e6, normalizer)), at, atol=1e-5)
    assert torch.equal(_train(DONEWeights(math.inf, normalizer)), at)
    assert not torch.allclose(_train(DONEWeights(0.3, normalizer)), at, atol=1e-3)


# ---------------------------------------------------------------------------------------------- baselines
def test_gair_weights_follow_the_tanh_rule():
    kappa = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0])
    raw = (torch.tanh(-1.0 + 5 * (2 - kappa) / 2) + 1) / 2  # K = 5: floor(K / 2) = 2
    w = gair_weights(kappa, 5, -1.0)
    assert torch.allclose(w, raw * 5 / raw.sum())
    assert all(a > b for a, b in zip(w, w[1:]))  # fewer steps to flip = closer to the boundary = more weight


def test_gairat_counts_the_iterates_still_correct():
    """kappa counts the PGD iterates (before each step) at which the model still classifies correctly."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    X, y = torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    gat = GAIRAT(eps=0.3, alpha=0.1, steps=4, begin_step=2)
    gen_a, gen_b = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    x_adv = gat.perturb(model, X, y, gen_a)
    assert torch.equal(x_adv, adversarial.pgd_linf(model, X, y, eps=0.3, alpha=0.1, steps=4, generator=gen_b))
    # recount by hand along the same iterates
    gen = torch.Generator().manual_seed(6)
    kappa = torch.zeros(40)
    for k in range(4):
        xk = adversarial.pgd_linf(model, X, y, eps=0.3, alpha=0.1, steps=k, generator=gen) if k else None
        if k == 0:
            xk = (X + (2 * torch.rand(X.shape, generator=gen) - 1) * 0.3).clamp(0, 1)
        gen = torch.Generator().manual_seed(6)
        kappa += (model(xk).argmax(1) == y).float()
    assert torch.equal(gat.kappa, kappa)
    assert torch.equal(gat(torch.ones(40), None, 1), torch.ones(40))      # before begin_step: plain AT
    assert torch.allclose(gat(torch.ones(40), None, 2), gair_weights(kappa, 4))


def test_probabilistic_margin_and_mail_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    p = torch.softmax(logits, 1)
    pm = probabilistic_margin(logits, y)
    assert torch.allclose(pm, torch.stack([p[0, 1] - p[0, 0], p[1, 1] - p[1, 0]]))
    w = mail_weights(pm)
    raw = torch.sigmoid(pm - 1.5)
    assert torch.allclose(w, raw * 2 / raw.sum()) and w[1] > w[0]  # misclassified gets more weight
    mail = MAIL(begin_step=1)
    ce = mail.loss_fn(logits, y)
    assert torch.allclose(ce, F.cross_entropy(logits, y, reduction="none"))
    assert torch.equal(mail(ce, None, 0), torch.ones(2)) and torch.allclose(mail(ce, None, 1), w)
