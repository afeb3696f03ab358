"""Chapter 13: STEER's entropy-change estimate and token weights."""

import math

import pytest
import torch

from rwlib.methods import steer
from rwlib.rl import clipped_pg_loss


def _batch(seed=0, N=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 4
    return (torch.randn(N, generator=g), torch.rand(N, T, generator=g) * 3, logp,
            logp + 0.1 * torch.randn(N, T, generator=g), (torch.rand(N, T, generator=g) > 0.2).float())


def test_exponential_weights_range_and_endpoints():
    adv, H, logp, old, mask = _batch()
    om = steer.omega(adv, H, logp, old)
    w = steer.token_weights(om, mask, 0.8)
    v = w[mask.bool()]
    assert (v >= 0.8 - 1e-7).all() and (v <= 1.0).all() and (w[~mask.bool()] == 0).all()
    big = om[mask.bool()].argmax()
    if om[mask.bool()].max() >= 0.02:
        assert math.isclose(float(v[big]), 0.8, rel_tol=1e-5)  # the largest |Omega| gets w_min
    zero = steer.token_weights(torch.zeros_like(om), mask)
    assert torch.allclose(zero[mask.bool()], torch.ones(int(mask.sum())))  # Omega = 0 keeps weight 1


def test_linear_mapping_endpoints_and_equal_case():
    om = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = steer.token_weights(om, mask, 0.8, 1.2, linear=True)
    assert torch.allclose(w, torch.tensor([[1.2, 1.0, 0.8, 0.0]]))  # the masked 5.0 plays no part
    same = steer.token_weights(torch.ones(1, 3), torch.ones(1, 3), 0.8, 1.2, linear=True)
    assert torch.allclose(same, torch.full((1, 3), 1.0))


def test_omega_zero_cases_and_nonfinite():
    H = torch.tensor([[0.0]])
    assert steer.omega(torch.tensor([0.0]), H, torch.tensor([[-1.0]]), torch.tensor([[-1.0]])) == 0   # A = 0
    lp = torch.tensor([[math.log(0.5)]])
    # log pi + H = 0 exactly when H = -log pi
    assert steer.omega(torch.tensor([1.0]), -lp, lp, lp).abs().item() < 1e-7
    assert torch.isfinite(steer.omega(torch.tensor([1.0]), torch.tensor([[float("nan")]]), lp, lp)).all()


def test_unit_weights_leave_the_loss_unchanged():
    adv, H, logp, old, mask = _batch(1)
    a, _ = clipped_pg_loss(logp, old, adv, mask)
    b, _ = clipped_pg_loss(logp, old, adv, mask, token_weights=torch.ones_like(mask))
    assert torch.allclose(a, b)


@pytest.mark.parametrize("seed", range(3))
def test_first_order_entropy_change_matches_finite_difference(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(200, 7, generator=g, dtype=torch.float64) * 2
    a = torch.randint(0, 7, (200,), generator=g)
    A = torch.randn(200, generator=g, dtype=torch.float64)
    eta = 1e-4
    zz = z.clone().requires_grad_()
    p = torch.softmax(zz, -1)
    (A * p.gather(1, a[:, None]).squeeze(1) / p.detach().gather(1, a[:, None]).squeeze(1)).sum().backward()
    measured = steer.softmax_entropy(z + eta * zz.grad) - steer.softmax_entropy(z)
    pred = steer.first_order_entropy_change(z, a, A, eta)
    assert torch.allclose(pred, measured, rtol=1e-2, atol=1e-8)


def test_bad_weights():
    with pytest.raises(ValueError, match="w_min=1.5"):
        steer.token_weights(torch.zeros(1, 1), torch.ones(1, 1), w_min=1.5)
