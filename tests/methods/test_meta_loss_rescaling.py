"""Tests for rwlib.methods.meta_loss_rescaling (chapter 02: STORM).

The look-ahead meta-gradient itself is cross-checked in tests/test_meta.py (analytic identity, ``higher``); these
tests cover STORM's own pieces: the features of Table 1 (against plain-Python statistics), the rescaler of eq. (6)
and its batch normalisation, the constant-rescaler identity with plain training, and the outer objective of
eq. (5) by finite differences, including its direct path.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from rwlib.methods import meta_loss_rescaling as storm
from rwlib.models import MLP
from rwlib.train import fit


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- features
def test_normal_overlap_matches_statistics_normaldist():
    g = _gen(1)
    mu1, mu2 = torch.randn(200, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)
    sd1 = torch.rand(200, generator=g, dtype=torch.float64) + 0.05
    sd2 = torch.rand(200, generator=g, dtype=torch.float64) + 0.05
    sd2[:20] = sd1[:20]  # equal deviations take the closed form 2 Phi(-|dm| / 2 sd)
    ours = storm.normal_overlap(mu1, sd1, mu2, sd2)
    ref = [statistics.NormalDist(a, b).overlap(statistics.NormalDist(c, d))
           for a, b, c, d in zip(mu1.tolist(), sd1.tolist(), mu2.tolist(), sd2.tolist())]
    assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(ours, storm.normal_overlap(mu2, sd2, mu1, sd1))  # symmetric


def test_gaussian_kl_matches_torch_distributions_and_is_zero_for_zero_deviation():
    g = _gen(2)
    mu1, mu2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    sd1, sd2 = torch.rand(50, generator=g) + 0.1, torch.rand(50, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu1, sd1), torch.distributions.Normal(mu2, sd2))
    assert torch.allclose(storm.gaussian_kl(mu1, sd1, mu2, sd2), ref, atol=1e-5)
    assert storm.gaussian_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0)) == 0


def test_sample_statistics_means_stds_and_majority_agreement():
    losses = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    probs = torch.tensor([[0.5, 0.9], [0.7, 0.9], [0.9, 0.9]])
    y = torch.tensor([1, 0])
    preds = torch.tensor([[1, 1], [0, 1], [1, 0]])  # sample 0: 2 of 3 agree; sample 1: 1 of 3
    s = storm.sample_statistics(losses, probs, preds, y)
    assert torch.allclose(s[:, 0], torch.tensor([3.0, 2.0])) and torch.allclose(s[:, 1], torch.tensor([2.0, 0.0]))
    assert torch.allclose(s[:, 2], torch.tensor([0.7, 0.9])) and torch.allclose(s[:, 3], torch.tensor([0.2, 0.0]))
    assert s[:, 4].tolist() == [1.0, 0.0]
    tie = storm.sample_statistics(losses[:2], probs[:2], torch.tensor([[0, 0], [1, 0]]), y)
    assert tie[:, 4].tolist() == [0.0, 1.0]  # a 1-1 tie goes to pass 0


def test_memory_keeps_the_newest_msize_samples_of_each_class_in_order():
    mem = storm.FeatureMemory(n_classes=3, size=2)
    for step in range(3):
        labels = torch.tensor([0, 1, 0, 2])
        mem.push(torch.full((4, 5), float(step)) + torch.arange(4.0)[:, None] / 10, labels)
    # class 0: the two newest of the six pushed; classes 1 and 2: the last two pushed of each
    assert mem.labels.tolist() == [1, 2, 0, 1, 0, 2]
    assert torch.allclose(mem.stats[:, 0], torch.tensor([1.1, 1.3, 2.0, 2.1, 2.2, 2.3]))


def test_rescaler_features_against_plain_python():
    g = _gen(3)
    n_classes, size = 3, 6
    mem = storm.FeatureMemory(n_classes, size)
    batches = []
    for _ in range(3):
        y = torch.randint(0, n_classes, (8,), generator=g)
        st = torch.rand(8, 5, generator=g, dtype=torch.float64)
        st[:, 4] = (torch.rand(8, generator=g) < 0.6).double()
        batches.append((st, y))
        f = storm.rescaler_features(st, y, mem)
    assert f.shape == (8, storm.N_FEATURES)
    # rebuild the memory by hand: the newest `size` entries of each class, in order
    rows = [(s.tolist(), int(c)) for st, y in batches for s, c in zip(st, y)]
    kept = [r for k, r in enumerate(rows) if sum(1 for r2 in rows[k:] if r2[1] == r[1]) <= size]
    st, y = batches[-1]

    def group(c, a):
        return [r[0] for r in kept if r[1] == c and r[0][4] == a]

    def sd(v):
        return statistics.stdev(v) if len(v) > 1 else storm.EPS

    for i in range(8):
        grp = group(int(y[i]), st[i, 4].item())
        want = []
        for k in range(4):
            col = [r[k] for r in grp]
            want += [st[i, k].item(), statistics.fmean(col), sd(col)]
        mu, sigma = statistics.fmean([r[0] for r in grp]), statistics.fmean([r[1] for r in grp])
        kls = [storm.gaussian_kl(torch.tensor(r[0]), torch.tensor(r[1]), torch.tensor(mu), torch.tensor(sigma)).item()
               for r in grp]
        ovls = [statistics.NormalDist(r[0], max(r[1], storm.EPS)).overlap(statistics.NormalDist(mu, sigma))
                for r in grp]
        me = [r[0] for r in grp].index(st[i, 0].item())
        want += [kls[me], statistics.fmean(kls), sd(kls), ovls[me], statistics.fmean(ovls), sd(ovls), st[i, 4].item()]
        assert torch.allclose(f[i], torch.tensor(want, dtype=torch.float64), atol=1e-7), i


def test_forward_passes_pass_zero_is_the_plain_model_and_dropout_varies_the_rest():
    torch.manual_seed(0)
    model = MLP(6, (8,), 3)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    losses, probs, preds = storm.forward_passes(model, x, y, passes=4, dropout=0.5, generator=_gen())
    assert losses.shape == probs.shape == preds.shape == (4, 5)
    assert torch.allclose(losses[0], F.cross_entropy(model(x), y, reduction="none"))
    assert not torch.allclose(losses[1], losses[0]) and not torch.allclose(losses[1], losses[2])
    same, _, _ = storm.forward_passes(model, x, y, passes=3, dropout=0.0, generator=_gen())
    assert torch.allclose(same[0], same[2])


# ---------------------------------------------------------------------------------------------- rescaler
def test_rescaler_starts_uniform_and_batch_norm_prevents_collapse():
    g = _gen(4)
    f, y = torch.randn(32, storm.N_FEATURES, generator=g), torch.randint(0, 4, (32,), generator=g)
    for sep in (True, False):
        r = storm.Rescaler(4, class_separation=sep, generator=_gen(5))
        assert torch.allclose(r(f, y), torch.full((32,), 0.5))  # eq. (6) initialised to "no rescaling"
        with torch.no_grad():
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 3 - 5)  # any parameters at all
        w = r(f, y)
        assert ((w > 0) & (w < 1)).all() and w.std() > 0.01


def test_rescaler_without_class_separation_never_weights_the_whole_batch_below_one_half():
    g = _gen(6)
    r = storm.Rescaler(3, class_separation=False, generator=g)
    for _ in range(20):
        with torch.no_grad():
            for p in r.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 5)
        w = r(torch.randn(16, storm.N_FEATURES, generator=g), torch.randint(0, 3, (16,), generator=g))
        assert w.max() >= 0.5 - 1e-6 and w.min() <= 0.5 + 1e-6  # BN2: z0 - z1 sums to zero over the batch


def test_class_separated_heads_are_independent():
    g = _gen(7)
    r = storm.Rescaler(3, generator=g)
    with torch.no_grad():
        r.w2.add_(torch.randn(r.w2.shape, generator=g))
    f, y = torch.randn(24, storm.N_FEATURES, generator=g), torch.arange(24) % 3
    w = r(f, y)
    with torch.no_grad():
        r.w1[1].add_(1.0)
    w2 = r(f, y)
    assert torch.equal(w[y != 1], w2[y != 1]) and not torch.allclose(w[y == 1], w2[y == 1])


# ---------------------------------------------------------------------------------------------- the method
def _data(n=96, seed=0):
    g = _gen(seed)
    X = torch.randn(n, 1, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return X, y


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return MLP(8, (16,), 3).to(dtype)


def test_constant_rescaler_reproduces_plain_training():
    """Omega frozen at its initial constant 1/2: the weighted run equals plain CE with half the learning rate
    (SGD), step for step -- the features, memories and meta steps draw from STORM's own generator and never
    touch the model or the batch order."""
    X, y = _data()
    a, b = _model(), _model()
    method = storm.STORM(a, X, y, 3, generator=_gen(11), meta_lr=0.0, msize=16, val_batch=16)
    common = dict(steps=30, batch_size=16)
    fit(a, X, y, optimizer=torch.optim.SGD(a.parameters(), lr=0.2), generator=_gen(9), weight_fn=method, **common)
    fit(b, X, y, optimizer=torch.optim.SGD(b.parameters(), lr=0.1), generator=_gen(9), **common)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    _, _, w = method.weights_by_step()
    assert torch.equal(w, torch.full_like(w, 0.5)) and len(w) == 30 * 16


def _objective_setup(rescale_val=True, sep=True):
    X, y = _data(64, seed=1)
    model = _model(torch.float64)
    X = X.double()
    method = storm.STORM(model, X, y, 3, generator=_gen(12), lookahead_lr=0.5, rescale_val=rescale_val,
                         class_separation=sep)
    method.rescaler.double()
    with torch.no_grad():  # leave the uniform start so that both paths have a gradient
        for p in method.rescaler.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=_gen(13), dtype=torch.float64))
    x, yb, xv, yv = X[:32], y[:32], X[32:], y[32:]
    f = method.features(x, yb, method.memory)
    fv = method.features(xv, yv, method.val_memory)
    return method, (x, yb, xv, yv, f, fv)


@pytest.mark.parametrize("rescale_val", [True, False], ids=["meta-loss-rescaling", "plain-val"])
@pytest.mark.parametrize("sep", [True, False], ids=["class-separated", "one-head"])
def test_outer_objective_gradient_matches_finite_differences(rescale_val, sep):
    method, args = _objective_setup(rescale_val, sep)
    params = list(method.rescaler.parameters())
    grads = torch.autograd.grad(method.meta_objective(*args), params)
    g = _gen(14)
    for p, gp in zip(params, grads):
        for _ in range(3):
            k = int(torch.randint(p.numel(), (1,), generator=g))
            h = 1e-6
            with torch.no_grad():
                p.view(-1)[k] += h
            up = method.meta_objective(*args).item()
            with torch.no_grad():
                p.view(-1)[k] -= 2 * h
            down = method.meta_objective(*args).item()
            with torch.no_grad():
                p.view(-1)[k] += h
            fd = (up - down) / (2 * h)
            assert math.isclose(gp.view(-1)[k].item(), fd, rel_tol=1e-5, abs_tol=1e-9)


def test_outer_objective_gradient_is_the_sum_of_the_meta_and_the_direct_path():
    """grad = grad_meta (through theta'(w), Omega(f_val) held fixed) + grad_outer (through Omega(f_val),
    theta' held fixed); the direct path is not zero."""
    method, (x, yb, xv, yv, f, fv) = _objective_setup()
    params = list(method.rescaler.parameters())
    total = torch.autograd.grad(method.meta_objective(x, yb, xv, yv, f, fv), params)
    from rwlib.meta import functional_losses, lookahead

    new = lookahead(method.model, x, yb, method.rescaler(f, yb), method.lr)
    lv = functional_losses(method.model, new, xv, yv)
    meta = torch.autograd.grad((method.rescaler(fv, yv).detach() * lv).mean(), params, allow_unused=True)
    outer = torch.autograd.grad((method.rescaler(fv, yv) * lv.detach()).mean(), params)
    for t, m, o in zip(total, meta, outer):
        m = torch.zeros_like(t) if m is None else m
        assert torch.allclose(t, m + o, atol=1e-12)
    assert sum(o.abs().sum() for o in outer) > 0 and sum(m.abs().sum() for m in meta if m is not None) > 0


def test_storm_step_updates_only_the_rescaler_and_logs_weights():
    X, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    method = storm.STORM(model, X, y, 3, generator=_gen(15), msize=16, val_batch=16)
    r_before = [p.detach().clone() for p in method.rescaler.parameters()]
    idx = torch.arange(16)
    w = method(torch.zeros(16), idx, 0)
    assert w.shape == (16,) and not w.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(r_before, method.rescaler.parameters()))
    steps, i, ww = method.weights_by_step()
    assert steps.tolist() == [0] * 16 and torch.equal(i, idx) and torch.equal(ww, w)
