"""Tests for rwlib.methods.srat (chapter 03: SRAT, imbalanced adversarial training with reweighting).

The PGD attack itself is substrate (rwlib.adversarial) and is checked against torchattacks and the exact linear
solution in tests/test_classification_kits.py; here: the class weights, the deferred schedule, the separation loss
(brute force and pytorch-metric-learning), the focal loss, the SRAT objective inside rwlib.train.fit, and the
Fisher ratio."""

import math

import pytest
import torch
import torch.nn.functional as F

from rwlib import adversarial, models, train
from rwlib.methods import srat


# ---------------------------------------------------------------------------------------------- class weights
def test_inverse_weights_are_normalised_inverse_frequencies():
    counts = torch.tensor([100, 50, 10, 1])
    w = srat.class_weights(counts, "inverse").double()
    assert torch.allclose((w * counts).sum(), counts.sum().double(), rtol=1e-6)
    assert torch.allclose(w * counts, (w * counts)[0].expand(4), rtol=1e-6)   # w_k n_k constant


def test_effective_number_limits():
    counts = torch.tensor([500, 120, 13, 2])
    assert torch.allclose(srat.class_weights(counts, "effective", beta=0.0), torch.ones(4))
    near_one = srat.class_weights(counts, "effective", beta=1 - 1e-9)
    assert torch.allclose(near_one, srat.class_weights(counts, "inverse"), rtol=1e-4)
    mid = srat.class_weights(counts, "effective", beta=0.99)
    assert (mid.diff() > 0).all()            # rarer classes weigh more
    assert mid[-1] / mid[0] < counts[0] / counts[-1]   # but less than inverse frequency


@pytest.mark.parametrize("kwargs", [dict(counts=[3, 0]), dict(counts=[3, 1], scheme="sqrt"),
                                    dict(counts=[3, 1], scheme="effective", beta=1.0)])
def test_class_weights_reject_bad_input(kwargs):
    counts = kwargs.pop("counts")
    with pytest.raises(ValueError):
        srat.class_weights(counts, **kwargs)


def test_deferred_class_weight_fn():
    y_train = torch.tensor([0, 1, 2, 1, 0])
    fn = srat.class_weight_fn(y_train, torch.tensor([1.0, 2.0, 5.0]), start=3)
    idx = torch.tensor([4, 2, 1])
    losses = torch.rand(3)
    assert torch.equal(fn(losses, idx, 2), torch.ones(3))
    assert torch.equal(fn(losses, idx, 3), torch.tensor([1.0, 5.0, 2.0]))


# ---------------------------------------------------------------------------------------------- separation loss
def supcon_brute_force(z, y, tau):
    """The SupCon loss (3) written as plain loops over anchors, positives and the denominator."""
    z = z / z.norm(dim=1, keepdim=True)
    terms = []
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(y)) if a != i)
        terms.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("case", range(3))
def test_supcon_matches_brute_force(tau, case):
    g = torch.Generator().manual_seed(case)
    z = torch.randn(17, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (17,), generator=g)
    y[-1] = 9                                             # a class with a single sample: no positive
    assert srat.supcon_loss(z, y, tau).item() == pytest.approx(supcon_brute_force(z, y, tau), rel=1e-10)


def test_supcon_per_anchor_zero_without_positives_and_mean_is_the_loss():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(srat.supcon_per_anchor(z, torch.arange(5), 0.1), torch.zeros(5))
    y = torch.tensor([0, 0, 1, 2, 2])
    per = srat.supcon_per_anchor(z, y, 0.1)
    assert per[2] == 0 and (per[[0, 1, 3, 4]] > 0).all()
    assert per.mean() == pytest.approx(srat.supcon_loss(z, y, 0.1).item())


def test_supcon_gradient_is_finite_and_pulls_classes_apart():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 4, generator=g, requires_grad=True)
    y = torch.arange(12) % 3
    opt = torch.optim.SGD([z], lr=0.5)
    before = srat.supcon_loss(z, y, 0.5).item()
    for _ in range(50):
        opt.zero_grad()
        loss = srat.supcon_loss(z, y, 0.5)
        loss.backward()
        assert torch.isfinite(z.grad).all()
        opt.step()
    assert srat.supcon_loss(z, y, 0.5).item() < before
    assert srat.fisher_ratio(F.normalize(z.detach(), dim=1), y) > 10


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_pytorch_metric_learning(tau):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(3)
    z = torch.randn(32, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    y[:2] = torch.tensor([7, 8])                          # two anchors without positives
    ours = srat.supcon_loss(z, y, tau)
    theirs = pml.SupConLoss(temperature=tau)(z, y)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- losses
def test_focal_loss():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(20, 5, generator=g), torch.randint(0, 5, (20,), generator=g)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(srat.focal_loss(logits, y, gamma=0.0), ce)
    p = torch.softmax(logits, 1)[torch.arange(20), y]
    assert torch.allclose(srat.focal_loss(logits, y, gamma=2.0), (1 - p) ** 2 * ce, atol=1e-6)


def test_srat_loss_is_weighted_ce_plus_lambda_supcon():
    g = torch.Generator().manual_seed(0)
    logits, z, y = torch.randn(16, 4, generator=g), torch.randn(16, 8, generator=g), torch.arange(16) % 4
    w = torch.tensor([1.0, 2.0, 3.0, 10.0])
    per = srat.srat_loss(logits, z, y, w, lam=0.7, tau=0.2)
    ce = F.cross_entropy(logits, y, reduction="none")
    assert per.mean().item() == pytest.approx((w[y] * ce).mean().item() + 0.7 * srat.supcon_loss(z, y, 0.2).item(),
                                              rel=1e-6)
    assert torch.allclose(srat.srat_loss(logits, z, y, None, lam=0.0, tau=0.2), ce)


# ---------------------------------------------------------------------------------------------- inside fit
def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(96, 1, 4, 4, generator=g)
    y = torch.cat([torch.zeros(60), torch.ones(24), 2 * torch.ones(12)]).long()
    return X, y


def _fit(loss_fn=None, weight_fn=None, attach=None, steps=12):
    X, y = _data()
    torch.manual_seed(0)
    model = models.MLP(16, (16, 8), 3).double()
    if attach is not None:
        attach.attach(model)
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    train.fit(model, X.double(), y, steps=steps, batch_size=32, optimizer=torch.optim.SGD(model.parameters(), 0.1),
              generator=torch.Generator().manual_seed(1), weight_fn=weight_fn,
              perturb=adversarial.pgd_perturb(eps=0.1, alpha=0.05, steps=2), **kw)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_objective_without_separation_equals_deferred_weight_fn():
    """SRAT with lam = 0 in fit follows the trajectory of fit's own weight_fn with the same deferred weights."""
    _, y = _data()
    w = torch.tensor([1.0, 2.5, 5.0])
    obj = srat.SRATObjective(w, lam=0.0, tau=0.1, start=5)
    ours = _fit(loss_fn=obj, attach=obj)
    ref = _fit(weight_fn=srat.class_weight_fn(y, w, start=5))
    assert obj.t == 12
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


def test_objective_sees_features_of_the_adversarial_batch():
    X, y = _data()
    torch.manual_seed(0)
    model = models.MLP(16, (16, 8), 3)
    seen = []

    class Spy(srat.SRATObjective):
        def __call__(self, logits, yb):
            seen.append((self.z.detach().clone(), logits.detach().clone()))
            return super().__call__(logits, yb)

    obj = Spy(None, lam=0.5, tau=0.1).attach(model)
    train.fit(model, X, y, steps=1, batch_size=32, optimizer=torch.optim.SGD(model.parameters(), 0.0),
              generator=torch.Generator().manual_seed(1), loss_fn=obj,
              perturb=adversarial.pgd_perturb(eps=0.1, alpha=0.05, steps=2))
    z, logits = seen[0]
    assert torch.allclose(model.head(z), logits, atol=1e-6)      # z is the input of the head for these logits
    assert not torch.allclose(model(X[:32]), logits)              # ... and the batch was perturbed


def test_objective_needs_attach_and_valid_settings():
    with pytest.raises(RuntimeError):
        srat.SRATObjective(None, lam=0.5, tau=0.1)(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        srat.SRATObjective(None, lam=0.5, tau=0.0)


# ---------------------------------------------------------------------------------------------- Fisher ratio
def test_fisher_ratio_by_hand():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0], [10.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    # means (1, 0) and (10, 2); between = mean squared distance to (5.5, 1) = 20.25 + 1 = 21.25
    # within: class 0 -> 1, class 1 -> 8/3; mean over classes = 11/6
    assert srat.fisher_ratio(z, y) == pytest.approx(21.25 / (11 / 6))
    assert srat.fisher_ratio(3 * z + 7, y) == pytest.approx(srat.fisher_ratio(z, y))   # scale/shift invariant
