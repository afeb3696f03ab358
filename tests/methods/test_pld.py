"""Tests for rwlib.methods.pld (chapter 09: Plackett-Luce Distillation): the analytic identities of the brief
(translation invariance, C = 2 gives alpha_1 CE, one-hot teacher gives CE, autograd = closed-form gradient,
convexity), a direct loop over the ranks, and allRank's ListMLE where it installs."""

import pytest
import torch
import torch.nn.functional as F

from rwlib.methods.pld import pld_grad, pld_loss, rank_weights, teacher_optimal_perm


def _inputs(n=16, C=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(n, C, generator=g, dtype=dtype)
    t = 3 * torch.randn(n, C, generator=g, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    return s, t, y


def test_perm_puts_the_true_label_first_even_when_the_teacher_is_wrong():
    t = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([3, 0])
    perm = teacher_optimal_perm(t, y)
    assert perm.tolist() == [[3, 1, 2, 0], [0, 2, 1, 3]]
    s, t, y = _inputs()
    perm = teacher_optimal_perm(t, y)
    assert torch.equal(perm[:, 0], y)
    rest = t.gather(1, perm[:, 1:])
    assert bool((rest[:, :-1] >= rest[:, 1:]).all())
    assert torch.equal(perm.sort(1).values, torch.arange(t.shape[1]).expand_as(perm))


def test_rank_weights_are_the_teachers_mass_and_carry_no_gradient():
    s, t, y = _inputs()
    t.requires_grad_(True)
    perm = teacher_optimal_perm(t, y)
    for T in (0.5, 1.0, 4.0):
        a = rank_weights(t, perm, T)
        assert not a.requires_grad
        assert torch.allclose(a.sum(1), torch.ones(len(y), dtype=a.dtype))
        assert torch.allclose(a[:, 0], (t / T).softmax(1).gather(1, y[:, None])[:, 0])
    s.requires_grad_(True)
    pld_loss(s, t, y).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        rank_weights(t, perm, 0.0)


def test_loss_equals_a_loop_over_the_ranks():
    s, t, y = _inputs(n=5, C=5, seed=1)
    T = 2.0
    per = pld_loss(s, t, y, T=T, reduction="none")
    for i in range(len(y)):
        others = sorted((c for c in range(5) if c != y[i]), key=lambda c: -float(t[i, c]))
        order = [int(y[i])] + others
        p_t = (t[i] / T).softmax(0)
        ref = sum(float(p_t[c]) * -float(F.log_softmax(s[i, order[k:]], 0)[0]) for k, c in enumerate(order))
        assert float(per[i]) == pytest.approx(ref, abs=1e-10)
    assert float(pld_loss(s, t, y, T=T)) == pytest.approx(float(per.mean()), abs=1e-12)
    assert float(pld_loss(s, t, y, T=T, reduction="sum")) == pytest.approx(float(per.sum()), abs=1e-12)


def test_translation_invariance():
    s, t, y = _inputs(dtype=torch.float32)
    base = pld_loss(s, t, y, reduction="none")
    for c in (-5.0, 3.0, 100.0):
        assert torch.allclose(pld_loss(s + c, t, y, reduction="none"), base, atol=1e-5)
    shift = torch.randn(len(y), 1)  # a different constant per sample
    assert torch.allclose(pld_loss(s + shift, t, y, reduction="none"), base, atol=1e-5)


def test_two_classes_give_alpha1_times_ce():
    s, t, y = _inputs(n=32, C=2, seed=2)
    alpha1 = t.softmax(1).gather(1, y[:, None])[:, 0]
    ce = F.cross_entropy(s, y, reduction="none")
    assert torch.allclose(pld_loss(s, t, y, reduction="none"), alpha1 * ce, atol=1e-12)


def test_one_hot_teacher_gives_ce_exactly():
    s, _, y = _inputs(n=32, C=10, seed=3)
    t = 1e4 * F.one_hot(y, 10).to(s.dtype)              # softmax is exactly one-hot in floating point
    # the same number up to rounding (two summation orders of the same log-sum-exp)
    assert torch.allclose(pld_loss(s, t, y, reduction="none"), F.cross_entropy(s, y, reduction="none"),
                          atol=1e-13, rtol=0)
    assert bool((rank_weights(t, teacher_optimal_perm(t, y))[:, 1:] == 0).all())
    # and T -> 0 with a correct teacher
    s, t, y = _inputs(n=32, C=10, seed=4)
    t = t.scatter(1, y[:, None], t.max(1, keepdim=True).values + 1.0)
    assert torch.allclose(pld_loss(s, t, y, T=1e-4, reduction="none"), F.cross_entropy(s, y, reduction="none"),
                          atol=1e-12)


def test_uniform_weights_give_listmle_on_pi_star():
    from rwlib.distill import plackett_luce_nll

    s, t, y = _inputs(C=6, seed=5)
    perm = teacher_optimal_perm(t, y)
    # T -> infinity makes the teacher's softmax uniform: alpha_k = 1/C, i.e. ListMLE / C
    assert torch.allclose(pld_loss(s, t, y, T=1e12, reduction="none"),
                          plackett_luce_nll(s, perm, reduction="none") / 6, atol=1e-10)


def test_autograd_gradient_equals_closed_form():
    for seed, T in ((0, 1.0), (1, 0.5), (2, 4.0)):
        s, t, y = _inputs(n=8, C=10, seed=seed)
        s.requires_grad_(True)
        pld_loss(s, t, y, T=T, reduction="sum").backward()
        assert torch.allclose(s.grad, pld_grad(s.detach(), t, y, T=T), atol=1e-10)
        assert torch.allclose(s.grad.sum(1), torch.zeros(8, dtype=s.dtype), atol=1e-10)  # translation invariance


def test_closed_form_gradient_with_a_one_hot_teacher_is_ces():
    s, _, y = _inputs(n=8, C=5, seed=6)
    t = 1e4 * F.one_hot(y, 5).to(s.dtype)
    assert torch.allclose(pld_grad(s, t, y), s.softmax(1) - F.one_hot(y, 5).to(s.dtype), atol=1e-12)


def test_convexity_hessian_and_midpoints():
    s, t, y = _inputs(n=6, C=6, seed=7)
    for i in range(len(y)):
        H = torch.autograd.functional.hessian(lambda v: pld_loss(v[None], t[i:i + 1], y[i:i + 1]), s[i])
        assert torch.allclose(H, H.T, atol=1e-12)
        assert float(torch.linalg.eigvalsh(H).min()) >= -1e-7
        assert torch.allclose(H.sum(1), torch.zeros(6, dtype=H.dtype), atol=1e-10)  # flat along 1
    g = torch.Generator().manual_seed(8)
    n, C = 1000, 8
    a, b = 3 * torch.randn(n, C, generator=g, dtype=torch.float64), 3 * torch.randn(n, C, generator=g,
                                                                                    dtype=torch.float64)
    t, y = torch.randn(n, C, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)
    mid = pld_loss((a + b) / 2, t, y, reduction="none")
    ends = (pld_loss(a, t, y, reduction="none") + pld_loss(b, t, y, reduction="none")) / 2
    assert bool((mid <= ends + 1e-12).all())


def test_matches_allrank_listmle():
    losses = pytest.importorskip("allrank.models.losses")
    s, t, y = _inputs(n=12, C=6, seed=9, dtype=torch.float32)
    perm = teacher_optimal_perm(t, y)
    # y_true encodes pi* as distinct descending scores: y_true[pi*_k] = C - k
    y_true = torch.zeros_like(s).scatter(1, perm, torch.arange(6, 0, -1, dtype=s.dtype).expand_as(s))
    from rwlib.distill import plackett_luce_nll

    assert float(losses.listMLE(s, y_true)) == pytest.approx(float(plackett_luce_nll(s, perm)), abs=1e-5)
