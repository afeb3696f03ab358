"""Chapter 10: the loss-based sample weights (normalisation, strategies, KL-regularised softmax, loss)."""

import numpy as np
import pytest
import torch

from rwlib.methods import loss_reweighting_pretraining as lr


def _losses(seed=0, n=32):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_normalisation_maps_extremes_to_plus_minus_delta():
    ell = _losses()
    h = lr.normalize_losses(ell, delta=2.0)
    assert torch.isclose(h.min(), torch.tensor(-2.0)) and torch.isclose(h.max(), torch.tensor(2.0))
    assert torch.isfinite(lr.normalize_losses(torch.ones(5))).all()  # equal losses: guarded denominator


def test_uniform_and_large_r_give_the_token_weighted_mean():
    ell, n = _losses(1), torch.randint(5, 30, (32,)).float()
    w = lr.sample_weights(ell, "uniform")
    assert torch.allclose(w, torch.full((32,), 1 / 32))
    base = (n / n.sum() * ell).sum()
    assert torch.allclose(lr.reweighted_loss(ell, n, w), base, atol=1e-6)
    w_big = lr.sample_weights(ell, "linupper", r=1e9)
    assert torch.allclose(lr.reweighted_loss(ell, n, w_big), base, atol=1e-5)


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "upper"])
@pytest.mark.parametrize("r", [0.3, 1.0, 4.0])
def test_kkt_identity_and_simplex(strategy, r):
    ell = _losses(2)
    w = lr.sample_weights(ell, strategy, r=r)
    f = lr.apply_strategy(lr.normalize_losses(ell), strategy)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w > 0).all()
    assert float((w.log() - f / r).std()) < 1e-5  # log w_i - f_i / r is the same for every i


def test_weights_maximise_the_regularised_objective():
    scipy_opt = pytest.importorskip("scipy.optimize")
    ell = _losses(3, n=8).double()
    r = 0.7
    f = lr.apply_strategy(lr.normalize_losses(ell), "linupper").numpy()
    N = len(f)

    def neg(w):
        w = np.clip(w, 1e-12, None)
        return -(w @ f - r * np.sum(w * np.log(w * N)))

    res = scipy_opt.minimize(neg, np.full(N, 1 / N), method="SLSQP", bounds=[(0, 1)] * N,
                             constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}], options={"ftol": 1e-12})
    assert np.allclose(res.x, lr.sample_weights(ell, "linupper", r=r).numpy(), atol=1e-4)


def test_strategy_shapes_on_sorted_losses():
    ell = torch.linspace(1, 4, 41)
    lin = lr.sample_weights(ell, "linupper")
    assert (lin.diff() >= -1e-9).all() and torch.allclose(lin[20:], lin[-1].expand(21))  # rises, then flat
    quad = lr.sample_weights(ell, "quadratic")
    assert int(quad.argmax()) == 20                                                     # peaks at mid-range
    ext = lr.sample_weights(ell, "extremes")
    assert int(ext.argmin()) == 20 and ext[0] > ext[10] and ext[-1] > ext[30]           # U-shaped


def test_weights_carry_no_gradient_and_hook_warm_up():
    ell = _losses(4).requires_grad_()
    n = torch.full((32,), 10.0)
    hook = lr.LossReweighter("linupper", burnout_steps=5, domains=["a", "b"])
    dom = torch.arange(32) % 2
    loss_w, _ = hook(3, ell, n, dom)  # warm-up: uniform
    assert torch.allclose(loss_w, ell.mean())
    loss, m = hook(5, ell, n, dom)
    loss.backward()
    w = lr.sample_weights(ell, "linupper")
    assert torch.allclose(ell.grad, 32 * w * n / n.sum(), atol=1e-6)  # the weights act as constants
    assert set(m) == {"wshare_a", "wshare_b"}


def test_bad_input():
    with pytest.raises(ValueError, match="'mean'.*uniform, linupper"):
        lr.sample_weights(_losses(), "mean")
    with pytest.raises(ValueError, match="r=0"):
        lr.sample_weights(_losses(), "linupper", r=0)


def test_toy_data_has_three_kinds():
    X, y, kind, Xt, yt, w = lr.redundant_outlier_regression(n=1000, seed=1)
    assert torch.bincount(kind).tolist() == [700, 250, 50]
    red = X[kind == 0]
    assert torch.linalg.matrix_rank(red) == 3 and torch.allclose(Xt @ w, yt)


def test_toy_data_without_outliers():
    X, y, kind, Xt, yt, w = lr.redundant_outlier_regression(n=1000, fracs=(0.7, 0.3, 0.0), seed=2)
    assert torch.bincount(kind, minlength=3).tolist() == [700, 300, 0]
    assert (y - X @ w).abs().max() < 3.0  # no row carries the outliers' huge label noise
