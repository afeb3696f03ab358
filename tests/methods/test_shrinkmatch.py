"""Tests for rwlib.methods.shrinkmatch (chapter 01: ShrinkMatch)."""

import math

import pytest
import torch
from torch import nn

from rwlib.methods.shrinkmatch import (
    AuxHead,
    CertainRatioEMA,
    ShrinkResult,
    shrink_class_space,
    shrink_loss,
    shrunk_confidences,
    utilisation,
)

TAU = 0.95


# --------------------------------------------------------------------------------------------
# Slow reference: a direct per-sample transcription of the algorithm (chapter 01, section 2,
# steps 5-7), on plain Python floats. Ties are ordered by the smaller class index first.
# --------------------------------------------------------------------------------------------
def reference_shrink(p_row, z_row, tau, certain):
    """Return (weighted term, weight, valid, n_removed, kept classes) for one sample."""
    C = len(p_row)
    order = sorted(range(C), key=lambda k: -p_row[k])  # Python's sort is stable
    sp = [p_row[k] for k in order]
    chosen, ok = None, False
    for c in range(2, C):  # 0-indexed candidates c = 2 .. C-1
        sub_conf = sp[0] / (sp[0] + math.fsum(sp[c:]))
        if sub_conf >= tau:
            chosen, ok = c, True
            break
    if chosen is None:
        chosen = C - 1  # nothing qualifies: last candidate, weight 0
    kept = [order[0]] + order[chosen:]
    n_removed = chosen - 1
    if certain or not ok:
        return 0.0, 0.0, False, n_removed, kept
    zs = [z_row[k] for k in kept]
    m = max(zs)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in zs))
    ell = lse - z_row[order[0]]  # -log softmax over kept logits, target = top-1 class
    w = max(p_row)
    return w * ell, w, True, n_removed, kept


def reference_loss(probs, logits, tau, certain_mask=None):
    P = probs.tolist()
    Z = logits.tolist()
    if certain_mask is None:
        certain = [max(r) >= tau for r in P]
    else:
        certain = certain_mask.tolist()
    rows = [reference_shrink(p, z, tau, cm) for p, z, cm in zip(P, Z, certain)]
    total = math.fsum(r[0] for r in rows) / len(P)
    return total, rows


def _dirichlet(n, C, alpha, seed):
    """n probability vectors ~ Dirichlet(alpha 1_C) and matching N(0, 3^2) logits, float64."""
    conc = torch.full((C,), float(alpha), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):  # Dirichlet has no generator argument
        torch.manual_seed(seed)
        p = torch.distributions.Dirichlet(conc).sample((n,))
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, C, dtype=torch.float64, generator=g)
    return p, z


def _compare_with_reference(probs, logits, tau, certain_mask=None):
    loss, per, info = shrink_loss(probs, logits, tau, certain_mask)
    ref_total, rows = reference_loss(probs, logits, tau, certain_mask)
    assert loss.item() == pytest.approx(ref_total, abs=1e-6, rel=1e-6)
    ref_per = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    ref_w = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    ref_valid = torch.tensor([r[2] for r in rows])
    ref_nrem = torch.tensor([r[3] for r in rows])
    torch.testing.assert_close(per, ref_per, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(info["weight"], ref_w, atol=1e-12, rtol=0)
    assert torch.equal(info["valid"], ref_valid)
    # n_removed must agree on every row (certain rows included)
    assert torch.equal(info["n_removed"], ref_nrem)
    keep = shrink_class_space(probs, tau).keep_mask()
    for b, r in enumerate(rows):
        assert sorted(torch.nonzero(keep[b]).flatten().tolist()) == sorted(r[4])
    return loss, per, info


# --------------------------------------------------------------------------------------------
# 1. Vectorised == reference loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [TAU, 0.6])
@pytest.mark.parametrize("C", [3, 10, 100])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_matches_reference_loop_dirichlet(alpha, C, tau):
    probs, logits = _dirichlet(1000, C, alpha, seed=C + int(10 * alpha))
    loss, per, info = _compare_with_reference(probs, logits, tau)
    # the comparison is not vacuous: there are uncertain, validly shrunk samples
    assert info["valid"].sum() > 0
    assert loss.item() > 0


def test_reference_with_explicit_certain_mask():
    probs, logits = _dirichlet(300, 10, 0.1, seed=7)
    cm = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.3
    _, _, info = _compare_with_reference(probs, logits, TAU, cm)
    assert not (info["valid"] & cm).any()
    # with the mask all False, certain-by-probability samples are shrunk too (c = 2, valid)
    _, _, info0 = _compare_with_reference(probs, logits, TAU, torch.zeros(300, dtype=torch.bool))
    high = probs.max(1).values >= TAU
    assert high.any() and info0["valid"][high].all()


def test_edge_all_certain_gives_zero_loss():
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.01, 0.96, 0.03], [0.0, 0.0, 1.0]], dtype=torch.float64)
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    loss, per, info = _compare_with_reference(probs, logits.detach(), TAU)
    loss, per, info = shrink_loss(probs, logits, TAU)
    assert loss.item() == 0.0
    assert torch.all(per == 0) and torch.all(info["weight"] == 0)
    assert not info["valid"].any() and info["certain"].all()


def test_edge_threshold_unreachable_weight_zero():
    C = 10
    probs = torch.full((4, C), 1.0 / C, dtype=torch.float64)  # best possible conf = 0.5
    logits = torch.randn(4, C, dtype=torch.float64)
    _compare_with_reference(probs, logits, TAU)
    res = shrink_class_space(probs, TAU)
    assert not res.valid.any()
    assert torch.all(res.c == C - 1) and torch.all(res.n_removed == C - 2)
    torch.testing.assert_close(res.conf, torch.full((4,), 0.5, dtype=torch.float64))
    loss, per, info = shrink_loss(probs, logits, TAU)
    assert loss.item() == 0.0 and torch.all(info["weight"] == 0) and torch.all(per == 0)
    # tau = 1 is unreachable whenever the tail has positive mass
    probs2, logits2 = _dirichlet(50, 5, 1.0, seed=3)
    _compare_with_reference(probs2, logits2, 1.0)
    assert not shrink_class_space(probs2, 1.0).valid.any()


def test_edge_ties():
    # ties at the top: the smaller class index is the top-1 (the target)
    probs = torch.tensor([[0.45, 0.45, 0.09, 0.01]], dtype=torch.float64)  # c=2: .818, c=3: .978
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]], dtype=torch.float64)
    _compare_with_reference(probs, logits, TAU)
    res = shrink_class_space(probs, TAU)
    assert res.valid.item() and res.c.item() == 3
    assert res.keep_mask()[0].tolist() == [True, False, False, True]
    # ties in the confusion classes: equal 0.03s, the smaller indices are removed first
    probs = torch.tensor([[0.03, 0.9, 0.03, 0.01, 0.03]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]], dtype=torch.float64)
    _compare_with_reference(probs, logits, TAU)
    res = shrink_class_space(probs, TAU)
    # sorted: class 1 (0.9), 0, 2, 4 (0.03 each), 3 (0.01); c=2: 0.9/0.97, c=3: 0.9/0.94 >= .95
    assert res.c.item() == 3
    assert res.keep_mask()[0].tolist() == [False, True, False, True, True]
    # conf_c exactly equal to tau qualifies (>=): 0.4 / (0.4 + 0.2 + 0.2) == 0.5 in floating point
    probs = torch.tensor([[0.2, 0.4, 0.2, 0.2]], dtype=torch.float64)
    _compare_with_reference(probs, torch.tensor([[0.1, 1.0, -0.5, 0.7]], dtype=torch.float64), 0.5)
    res = shrink_class_space(probs, 0.5)
    assert res.conf.item() == 0.5 and res.c.item() == 2 and res.valid.item()
    # all equal: unreachable
    probs = torch.full((1, 4), 0.25, dtype=torch.float64)
    _compare_with_reference(probs, torch.zeros(1, 4, dtype=torch.float64), TAU)
    # many random ties: probabilities n_k / N with small integers n_k. tau is chosen so that no
    # ratio n_1 / (n_1 + n_tail) with N <= 200 can equal it exactly (its reduced denominator is
    # 10^5), otherwise round-off in the tail sum would decide the comparison.
    g = torch.Generator().manual_seed(5)
    for C in (3, 10, 30):
        counts = torch.randint(0, 6, (400, C), generator=g).to(torch.float64)
        counts[:, 0] += torch.randint(0, 60, (400,), generator=g).to(torch.float64)
        counts = counts[:, torch.randperm(C, generator=g)]
        probs = counts / counts.sum(1, keepdim=True)
        logits = torch.randn(400, C, dtype=torch.float64, generator=g)
        for tau in (0.93017, 0.61033):
            _compare_with_reference(probs, logits, tau)


# --------------------------------------------------------------------------------------------
# 2. Minimality and validity; monotone conf_c; top-1 kept, k_(2) removed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [3, 10, 100])
def test_minimality_and_validity(C):
    probs, logits = _dirichlet(1000, C, 0.3, seed=11 + C)
    res = shrink_class_space(probs, TAU)
    sp = probs.gather(1, res.sort_idx)
    mass_kept = (sp * res.keep_sorted).sum(1)
    conf_direct = sp[:, 0] / mass_kept
    # conf returned equals the shrunk softmax of the weak probabilities p_(1) / sum_S p
    torch.testing.assert_close(res.conf, conf_direct, atol=1e-12, rtol=1e-12)
    v = res.valid
    assert v.any()
    assert torch.all(conf_direct[v] >= TAU)
    assert torch.all(conf_direct[~v] < TAU)
    # keeping one more confusion class (position c-1) falls below tau whenever c > 2
    more = v & (res.c > 2)
    assert more.sum() > 0 or C == 3
    extra = sp.gather(1, (res.c - 1).unsqueeze(1)).squeeze(1)
    conf_one_more = sp[:, 0] / (mass_kept + extra)
    assert torch.all(conf_one_more[more] < TAU)
    # invalid rows: c is the last candidate and the loss weight is 0
    assert torch.all(res.c[~v] == C - 1)
    uncertain = probs.max(1).values < TAU
    _, per, info = shrink_loss(probs, logits, TAU)
    assert torch.all(info["weight"][~v] == 0) and torch.all(per[~v] == 0)
    assert torch.all(info["weight"][v & uncertain] == probs.max(1).values[v & uncertain])
    assert torch.all(res.n_removed == res.c - 1)
    assert torch.all((res.c >= 2) & (res.c <= C - 1))


def test_conf_nondecreasing_in_c():
    for C, alpha in ((3, 1.0), (10, 0.1), (10, 1.0), (100, 1.0)):
        probs, _ = _dirichlet(500, C, alpha, seed=C)
        conf, sp, idx = shrunk_confidences(probs)
        assert conf.shape == (500, C - 2)
        assert torch.all(conf[:, 1:] >= conf[:, :-1])
        # analytic form against a direct sum for a few columns
        for c in (2, C - 1):
            direct = sp[:, 0] / (sp[:, 0] + sp[:, c:].sum(1))
            torch.testing.assert_close(conf[:, c - 2], direct, atol=1e-12, rtol=1e-12)
        # sorted descending, and sort_idx is a permutation consistent with the values
        assert torch.all(sp[:, :-1] >= sp[:, 1:])
        torch.testing.assert_close(probs.gather(1, idx), sp)


def test_top1_kept_and_second_removed():
    for C in (3, 10, 100):
        probs, _ = _dirichlet(500, C, 0.5, seed=100 + C)
        for tau in (0.3, 0.8, TAU, 1.0):
            res = shrink_class_space(probs, tau)
            assert isinstance(res, ShrinkResult)
            assert res.keep_sorted[:, 0].all()
            assert not res.keep_sorted[:, 1].any()
            keep = res.keep_mask()
            top1 = probs.argmax(1)  # same tie rule: the first maximal index
            assert keep.gather(1, top1.unsqueeze(1)).all()
            second = res.sort_idx[:, 1]
            assert not keep.gather(1, second.unsqueeze(1)).any()
            assert torch.all(keep.sum(1) == C - res.n_removed)
            assert torch.all(res.n_removed >= 1)


# --------------------------------------------------------------------------------------------
# 3. Gradients: only into the aux logits, with the restricted-softmax form
# --------------------------------------------------------------------------------------------
def test_gradient_only_into_aux_logits():
    C, B = 10, 200
    probs0, logits0 = _dirichlet(B, C, 0.3, seed=21)
    probs = probs0.clone().requires_grad_(True)
    logits = logits0.clone().requires_grad_(True)
    loss, per, info = shrink_loss(probs, logits, TAU)
    assert loss.requires_grad
    loss.backward()
    assert probs.grad is None  # probs are detached: no gradient path through omega or the sort
    g = logits.grad
    assert g is not None and torch.isfinite(g).all()
    use = info["valid"]
    assert use.any()
    assert torch.all(g[~use] == 0)
    # analytic: d loss / d z_k = omega / B * (softmax_S(z)_k - 1[k = k_(1)]) for k in S, 0 otherwise
    keep = shrink_class_space(probs0, TAU).keep_mask()
    z = logits0.masked_fill(~keep, float("-inf"))
    sm = torch.softmax(z, 1)
    onehot = torch.nn.functional.one_hot(probs0.argmax(1), C).to(torch.float64)
    expected = info["weight"].unsqueeze(1) / B * (sm - onehot)
    expected = torch.where(use.unsqueeze(1), expected, torch.zeros_like(expected))
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=1e-9)
    assert torch.all(g[~keep] == 0)


def test_normalised_by_full_batch():
    probs, logits = _dirichlet(64, 10, 0.3, seed=4)
    loss, per, info = shrink_loss(probs, logits, TAU)
    torch.testing.assert_close(loss, per.sum() / 64)
    # appending 64 certain samples halves the loss (divide by mu B, not by #uncertain)
    certain_p = torch.zeros(64, 10, dtype=torch.float64)
    certain_p[:, 0] = 1.0
    loss2, _, _ = shrink_loss(torch.cat([probs, certain_p]), torch.cat([logits, logits]), TAU)
    torch.testing.assert_close(loss2, loss / 2)
    # float32 logits work and agree
    loss32, _, _ = shrink_loss(probs.float(), logits.float(), TAU)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(loss.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------
# 4. CertainRatioEMA, utilisation, AuxHead
# --------------------------------------------------------------------------------------------
def test_certain_ratio_ema_arithmetic():
    ema = CertainRatioEMA()
    assert ema.momentum == 0.999 and ema.value is None
    lam = ema.update(torch.tensor([True, True, False, False]))
    assert lam == pytest.approx(0.5, abs=1e-15) and ema.value == lam
    lam = ema.update(torch.ones(8))
    assert lam == pytest.approx(0.999 * 0.5 + 0.001 * 1.0, abs=1e-15)
    lam = ema.update(torch.zeros(8, dtype=torch.bool))
    assert lam == pytest.approx(0.999 * (0.999 * 0.5 + 0.001), abs=1e-15)
    lam = ema.update(0.25)
    expected = 0.999 * (0.999 * (0.999 * 0.5 + 0.001)) + 0.001 * 0.25
    assert lam == pytest.approx(expected, abs=1e-15)
    ema.reset()
    assert ema.value is None
    assert ema.update(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    ema2 = CertainRatioEMA(momentum=0.9)
    ema2.update(1.0)
    assert ema2.update(0.0) == pytest.approx(0.9)


def test_utilisation():
    cm = torch.tensor([True, False, False, False, True])
    vs = torch.tensor([False, True, False, False, False])
    assert utilisation(cm, vs) == pytest.approx(3 / 5)
    probs, logits = _dirichlet(500, 10, 0.3, seed=9)
    _, per, info = shrink_loss(probs, logits, TAU)
    u = utilisation(info["certain"], info["valid"])
    nonzero_unsup = info["certain"] | (per != 0)
    assert u == pytest.approx(nonzero_unsup.float().mean().item())
    assert u > info["certain"].float().mean().item()


def test_aux_head_structure():
    head = AuxHead(128, 10)
    layers = list(head.net)
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (128, 32)
    assert (layers[3].in_features, layers[3].out_features) == (32, 32)
    assert (layers[6].in_features, layers[6].out_features) == (32, 10)
    assert layers[1].num_features == 32 and layers[4].num_features == 32
    assert layers[2].negative_slope == 0.1 and layers[5].negative_slope == 0.1
    torch.manual_seed(0)
    out = head(torch.randn(16, 128))
    assert out.shape == (16, 10)
    h = AuxHead(64, 5, hidden=7)
    assert h.net[0].out_features == 7 and h.net[6].in_features == 7
    assert h(torch.randn(4, 64)).shape == (4, 5)


# --------------------------------------------------------------------------------------------
# 5. Bad input
# --------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error():
    good = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="1.5"):
        shrink_class_space(good, 1.5)
    with pytest.raises(ValueError, match="0.0"):
        shrink_class_space(good, 0.0)
    with pytest.raises(ValueError, match="-0.2"):
        shrink_loss(good, torch.zeros(2, 4), -0.2)
    with pytest.raises(ValueError, match="nan"):
        shrink_class_space(good, float("nan"))
    with pytest.raises(ValueError, match=r"C = 2"):
        shrink_class_space(torch.full((3, 2), 0.5), TAU)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        shrink_class_space(torch.full((4,), 0.25), TAU)
    with pytest.raises(ValueError, match="-0.1"):
        shrink_class_space(torch.tensor([[1.1, -0.1, 0.0]]), TAU)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        shrink_loss(good, torch.zeros(2, 5), TAU)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        shrink_loss(good, torch.zeros(2, 4), TAU, certain_mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1.0"):
        CertainRatioEMA(momentum=1.0)
    with pytest.raises(ValueError, match="1.2"):
        CertainRatioEMA().update(1.2)
    with pytest.raises(ValueError, match="hidden"):
        AuxHead(2, 3)  # d // 4 == 0
    with pytest.raises(ValueError, match=r"\(3,\)"):
        utilisation(torch.zeros(3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# The paper's ablations (Tables 8-9) as ShrinkMatchLoss switches, and distribution alignment
# --------------------------------------------------------------------------------------------
def _batch(B=64, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    z = torch.randn(B, C, generator=g, dtype=torch.float64)
    return p, z


def test_ablation_no_sample_weight_uses_the_validity_gate_only():
    p, z = _batch()
    _, per_w, info = shrink_loss(p, z, TAU)
    _, per_1, info_1 = shrink_loss(p, z, TAU, sample_weight=False)
    use = info["valid"]
    assert torch.equal(info_1["weight"], use.to(p.dtype))  # omega_b = 1[valid_b]
    assert torch.allclose(per_1[use] * p.max(1).values[use], per_w[use])
    assert torch.all(per_1[~use] == 0)


def test_ablation_soft_shrunk_labels_match_a_direct_computation():
    p, z = _batch(B=32, C=6, seed=1)
    loss, per, info = shrink_loss(p, z, TAU, soft=True)
    res = shrink_class_space(p, TAU)
    keep = res.keep_mask()
    for b in range(len(p)):
        if not info["valid"][b]:
            assert per[b] == 0
            continue
        q = p[b][keep[b]] / p[b][keep[b]].sum()
        expect = -(q * torch.log_softmax(z[b][keep[b]], 0)).sum() * p[b].max()
        assert torch.allclose(per[b], expect)
    assert torch.isclose(loss, per.sum() / len(p))


def test_shrinkmatch_loss_switches():
    from rwlib.methods.shrinkmatch import ABLATIONS, ShrinkMatchLoss

    p, z = _batch(B=16)
    certain = p.max(1).values >= TAU
    feats = torch.randn(16, 8, dtype=torch.float64)
    full = ShrinkMatchLoss(8, 10).double()
    no_lam = ShrinkMatchLoss(8, 10, progress_weight=False).double()
    no_lam.aux.load_state_dict(full.aux.state_dict())
    L, m = full(feats, p, certain)
    L1, _ = no_lam(feats, p, certain)
    assert torch.allclose(L, m["lambda"] * L1)  # principle 2 off: lambda_t = 1
    no_aux = ShrinkMatchLoss(8, 10, aux_head=False)
    assert no_aux.aux is None and not list(no_aux.parameters())
    L2, _ = no_aux(feats, p, certain, 0, z)
    assert torch.allclose(L2, m["lambda"] * shrink_loss(p, z, TAU, certain)[0])
    with pytest.raises(ValueError, match="logits_s"):
        no_aux(feats, p, certain)
    assert set(ABLATIONS) == {"no reweighting", "principle 1 only", "principle 2 only", "no aux head",
                              "soft shrunk labels"}


def test_distribution_alignment_starts_at_zeros_and_aligns_fully_from_the_first_step():
    """The official queue starts at zeros (CIFAR/network/shrinkmatch.py): the first batch is divided by its own
    mean prediction, not by a mix of it and the uniform 1/C."""
    from rwlib.ssl import DistributionAlignment

    da = DistributionAlignment(4, queue_len=32)
    assert torch.equal(da.queue, torch.zeros(32, 4))
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(torch.tensor([[2.0, 0.5, 0.1, -1.0]]).repeat(8, 1) + 0.3 * noise, 1)
    q = da(p)
    expect = p / p.mean(0)
    assert torch.allclose(q, expect / expect.sum(1, keepdim=True), atol=1e-6)
