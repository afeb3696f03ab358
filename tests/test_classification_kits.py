"""Substrate for the sample-reweighting chapters on classifiers (02, 03, 04, 09): label noise and imbalance,
adversarial training (cross-checked against torchattacks and the exact linear solution), the meta-gradient
look-ahead (the analytic identity in float64, and `higher`), and the distillation losses (torchdistill's KD and
DIST, Plackett-Luce against brute-force enumeration)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwlib import adversarial, distill, meta, train
from rwlib.data import noise


# ------------------------------------------------------------------------------------------------ noise
def test_symmetric_noise_flips_to_another_class_at_the_rate():
    y = torch.arange(10).repeat(2000)
    out = noise.noisy_labels(y, 10, rate=0.4, generator=torch.Generator().manual_seed(0))
    assert abs(out.realised_rate - 0.4) < 0.02
    assert torch.equal(out.is_noisy, out.y != y) and torch.equal(out.clean, y)
    again = noise.noisy_labels(y, 10, rate=0.4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.y, out.y)
    counts = torch.bincount(out.y[out.is_noisy & (y == 3)], minlength=10).float()
    assert counts[3] == 0 and (counts[counts > 0].std() / counts[counts > 0].mean()) < 0.2  # uniform elsewhere


def test_pair_noise_and_bad_input():
    y = torch.arange(5).repeat(100)
    out = noise.noisy_labels(y, 5, rate=0.3, kind="pair", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.y[out.is_noisy], (y[out.is_noisy] + 1) % 5)
    with pytest.raises(ValueError, match="valid: symmetric, pair"):
        noise.noisy_labels(y, 5, rate=0.3, kind="open-set", generator=torch.Generator())
    with pytest.raises(ValueError, match="0 <= rate < 1"):
        noise.noisy_labels(y, 5, rate=1.2, generator=torch.Generator())


def test_imbalance_splits():
    y = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    idx = noise.step_imbalance(y, 10, ratio=10, n_minority=5, generator=g)
    counts = noise.class_counts(y[idx], 10)
    assert counts[:5].tolist() == [100] * 5 and counts[5:].tolist() == [10] * 5
    lt = noise.class_counts(y[noise.long_tail(y, 10, ratio=100, generator=g)], 10)
    assert lt[0] == 100 and lt[-1] == 1 and (lt[:-1] >= lt[1:]).all()
    with pytest.raises(ValueError, match="n_minority"):
        noise.step_imbalance(y, 10, ratio=10, n_minority=10, generator=g)


# ------------------------------------------------------------------------------------------------ adversarial
def _mlp(seed=0, d=12, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, c)).eval()


def test_pgd_matches_torchattacks_without_random_start():
    torchattacks = pytest.importorskip("torchattacks")
    model = _mlp()
    x = torch.rand(32, 12, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    ours = adversarial.pgd_linf(model, x, y, eps=0.1, alpha=0.02, steps=7, random_start=False)
    peer = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False)(x, y)
    assert torch.allclose(ours, peer, atol=1e-6)
    assert (ours - x).abs().max() <= 0.1 + 1e-7 and ours.min() >= 0 and ours.max() <= 1


def test_pgd_reaches_the_exact_worst_case_of_a_linear_model():
    torch.manual_seed(0)
    lin = nn.Linear(8, 1).double()
    X = torch.randn(50, 8, dtype=torch.float64)
    y = torch.where(torch.rand(50) < 0.5, -1.0, 1.0).double()
    loss = lambda out, t: F.softplus(-t * out.squeeze(-1)).mean()  # noqa: E731
    x_adv = adversarial.pgd_linf(lin, X, y, eps=0.3, alpha=0.2, steps=3, random_start=False, clamp=None,
                                 loss_fn=loss)
    w, b = lin.weight[0].detach(), lin.bias.detach()
    assert torch.allclose(x_adv, X - 0.3 * y[:, None] * w.sign()[None], atol=1e-12)
    exact = adversarial.linear_adv_logistic_loss(w, b, X, y, 0.3)
    with torch.no_grad():
        assert torch.allclose(F.softplus(-y * lin(x_adv).squeeze(-1)), exact, atol=1e-10)


def test_pgd_leaves_mode_and_parameter_gradients_alone_and_refuses_bad_settings():
    model = _mlp().train()
    x, y = torch.rand(4, 12), torch.tensor([0, 1, 2, 0])
    adversarial.pgd_linf(model, x, y, eps=0.1, alpha=0.05, steps=2, generator=torch.Generator().manual_seed(0))
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="alpha > 0"):
        adversarial.pgd_linf(model, x, y, eps=0.1, alpha=0.0, steps=2)


def test_adversarial_training_through_fit_and_per_class_robust_accuracy():
    torch.manual_seed(0)
    X = torch.rand(200, 12)
    y = (X[:, 0] > 0.5).long() + (X[:, 1] > 0.5).long()
    model = _mlp().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    hist = train.fit(model, X, y, steps=30, batch_size=32, optimizer=opt, generator=torch.Generator().manual_seed(0),
                     perturb=adversarial.pgd_perturb(eps=0.05, alpha=0.02, steps=3),
                     weight_fn=lambda losses, idx, t: seen.append(len(losses)) or torch.ones_like(losses))
    assert len(hist["loss"]) == 30 and seen == [32] * 30
    nat = adversarial.robust_accuracy(model, X, y, 3, eps=0.0, alpha=0.01, steps=1)
    rob = adversarial.robust_accuracy(model, X, y, 3, eps=0.1, alpha=0.02, steps=10, random_start=False)
    assert rob["acc"] <= nat["acc"] and rob["per_class"].shape == (3,)
    assert rob["worst_class_acc"] == pytest.approx(float(rob["per_class"].min()))


# ------------------------------------------------------------------------------------------------ meta-gradients
def _tiny(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def _batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=dtype)
    xv = torch.randn(9, 5, generator=g, dtype=dtype)
    return (x, torch.randint(0, 3, (6,), generator=g)), (xv, torch.randint(0, 3, (9,), generator=g))


def test_meta_weight_gradient_equals_the_analytic_identity():
    model = _tiny()
    (x, y), (xv, yv) = _batches()
    lr = 0.3
    g = meta.weight_gradient(model, (x, y), (xv, yv), lr)
    new = meta.lookahead(model, x, y, torch.ones(6, dtype=torch.float64), lr)
    new = {k: v.detach().requires_grad_(True) for k, v in new.items()}
    val = meta.functional_losses(model, new, xv, yv).mean()
    g_val = torch.autograd.grad(val, list(new.values()))
    for i in range(6):
        li = train.per_sample_ce(model(x[i:i + 1]), y[i:i + 1]).sum()
        g_i = torch.autograd.grad(li, list(model.parameters()))
        expected = -lr / 6 * sum((a * b).sum() for a, b in zip(g_val, g_i))
        assert float(g[i]) == pytest.approx(float(expected), abs=1e-8)


def test_meta_weight_gradient_matches_higher():
    higher = pytest.importorskip("higher")
    model = _tiny()
    (x, y), (xv, yv) = _batches()
    w = torch.ones(6, dtype=torch.float64, requires_grad=True)
    with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.3)) as (fmodel, diffopt):
        diffopt.step((w * F.cross_entropy(fmodel(x), y, reduction="none")).mean())
        val = F.cross_entropy(fmodel(xv), yv)
        (peer,) = torch.autograd.grad(val, w)
    assert torch.allclose(meta.weight_gradient(model, (x, y), (xv, yv), 0.3), peer, atol=1e-10)
    with pytest.raises(ValueError, match="one entry per sample"):
        meta.lookahead(model, x, y, torch.ones(5, dtype=torch.float64), 0.3)


# ------------------------------------------------------------------------------------------------ distillation
def _logits(n=16, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


def test_kd_and_dist_match_torchdistill():
    mid = pytest.importorskip("torchdistill.losses.mid_level")
    s, t, y = _logits()
    io_s, io_t = {".": {"output": s}}, {".": {"output": t}}
    peer_kd = mid.KDLoss(".", "output", ".", "output", temperature=4.0, alpha=0.1)(io_s, io_t, y)
    assert distill.kd_loss(s, t, y, T=4.0, lam=0.9) == pytest.approx(float(peer_kd), abs=1e-6)
    peer_dist = mid.DISTLoss(".", "output", ".", "output", beta=1.0, gamma=2.0, tau=2.0)(io_s, io_t)
    assert distill.dist_loss(s, t, beta=1.0, gamma=2.0, tau=2.0) == pytest.approx(float(peer_dist), abs=1e-6)


def test_plackett_luce_likelihood_against_enumeration():
    C = 4
    s = torch.randn(1, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    total = 0.0
    for perm in itertools.permutations(range(C)):
        p = torch.tensor([perm])
        nll = float(distill.plackett_luce_nll(s, p))
        prob = 1.0
        rest = list(perm)
        for k in perm:                      # brute force: pick k among the remaining with prob exp(s_k)/sum
            prob *= math.exp(s[0, k]) / sum(math.exp(s[0, j]) for j in rest)
            rest.remove(k)
        assert nll == pytest.approx(-math.log(prob), abs=1e-12)
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)


def test_plackett_luce_identities():
    s, t, y = _logits(c=5)
    perm = t.argsort(1, descending=True)
    base = distill.plackett_luce_nll(s, perm, reduction="none")
    assert torch.allclose(distill.plackett_luce_nll(s + 3.0, perm, reduction="none"), base, atol=1e-5)
    w = torch.zeros_like(s)
    w[:, 0] = 1.0                          # only rank 1 weighted: cross-entropy of the top class
    assert torch.allclose(distill.plackett_luce_nll(s, perm, w, reduction="none"),
                          F.cross_entropy(s, perm[:, 0], reduction="none"), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        distill.plackett_luce_nll(s, perm[:, :3])


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b, _ = _logits(n=5, c=7, seed=4)
    ours = distill.kendall_tau(a, b)
    for i in range(5):
        assert float(ours[i]) == pytest.approx(stats.kendalltau(a[i].numpy(), b[i].numpy()).statistic, abs=1e-6)
    assert torch.allclose(distill.kendall_tau(a, a), torch.ones(5))


def test_fit_hands_per_sample_side_data_to_the_loss():
    torch.manual_seed(0)
    X, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    teacher = torch.randn(40, 3)
    seen = []

    def loss_fn(logits, yb, t):
        seen.append(t.shape)
        return distill.kd_loss(logits, t, yb, T=2.0, lam=0.5, reduction="none")

    model = _mlp().train()
    train.fit(model, X, y, steps=3, batch_size=8, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              generator=torch.Generator().manual_seed(0), loss_fn=loss_fn, side=teacher)
    assert seen == [torch.Size([8, 3])] * 3
