"""SRAT: Separable Reweighted Adversarial Training (chapter 03).

Wentao Wang, Han Xu, Xiaorui Liu, Yaxin Li, Bhavani Thuraisingham, Jiliang Tang. *Imbalanced Adversarial
Training with Reweighting.* arXiv:2107.13639 (2021).

Adversarial training (AT) on imbalanced data: the attack is the standard, unweighted PGD of Madry et al.
(:func:`rwlib.adversarial.pgd_perturb`); the paper's method changes only the outer loss, which reweights the
classes and adds a term that makes the features of the adversarial examples more separable:

- (1) class weights, inverse frequency ``w_k ∝ 1 / n_k`` or the "effective number" of Cui et al. (2019)
  ``w_k ∝ (1 - β) / (1 - β^{n_k})``, normalised so that ``Σ_k n_k w_k = n`` (the mean sample weight is 1);
- (2) deferred reweighting: uniform weights before step ``start``, the class weights after it;
- (3) the feature-separation loss, supervised-contrastive over the batch on L2-normalised features ``z``:
  ``L_sep = (1/|A|) Σ_{i∈A} -(1/|P(i)|) Σ_{p∈P(i)} log[ exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ]``
  with ``P(i)`` the other samples of class ``y_i`` and ``A`` the anchors with at least one positive;
- (4) the SRAT objective on the adversarial batch ``x'``:
  ``L = (1/|B|) Σ_i w_{y_i}(t) ℓ(f(x'_i), y_i) + λ L_sep(z(x'), y)``, with ``ℓ`` the cross-entropy
  (SRAT-RW) or the focal loss (5) (SRAT-Focal);
- (5) the focal loss of Lin et al. (2017), a baseline and an alternative base loss:
  ``ℓ_focal = -(1 - p_y)^γ log p_y``.

The details of (2)-(4) follow the chapter brief's reading of the paper (only the abstract could be checked);
the chapter says so. :func:`fisher_ratio` is the separability measure the chapter reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts, scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class weights (1) from the class counts ``n_k``, normalised so that ``Σ_k n_k w_k = Σ_k n_k``.

    ``scheme="inverse"``: ``w_k ∝ 1 / n_k``; ``"effective"``: ``w_k ∝ (1 - β) / (1 - β^{n_k})`` (β → 0 gives
    uniform weights, β → 1 inverse frequency)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n <= 0).any():
        raise ValueError(f"bad class counts {n.tolist()}: every class needs at least one sample")
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "effective":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"bad beta {beta!r}: expected 0 <= beta < 1")
        w = (1.0 - beta) / (1.0 - beta ** n)                      # (1) effective number 1 / E_n
    else:
        raise ValueError(f"unknown scheme {scheme!r}; valid: inverse, effective")
    return (w * n.sum() / (w * n).sum()).float()                  # (1) Σ_k n_k w_k = n


def class_weight_fn(y_train: torch.Tensor, weights: torch.Tensor, start: int = 0):
    """The ``weight_fn(losses, idx, step)`` of :func:`rwlib.train.fit` for class weights ``weights``, deferred
    (2) until step ``start`` (uniform before)."""
    weights = torch.as_tensor(weights, dtype=torch.float32)

    def weight_fn(losses, idx, step):
        if step < start:                                          # (2) deferred: uniform first
            return torch.ones_like(losses)
        return weights.to(losses.device)[y_train[idx].to(losses.device)]

    return weight_fn


def supcon_per_anchor(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The separation loss (3) of each anchor, scaled so that the batch mean is ``L_sep``: anchors without a
    positive get 0, the others ``|B| / |A|`` times their SupCon term. ``z`` is normalised here."""
    z = F.normalize(z, dim=1)
    sim = z @ z.T / tau
    self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))               # the denominator runs over a != i
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    anchor = n_pos > 0
    per = -(log_prob.masked_fill(~pos, 0.0).sum(1)) / n_pos.clamp_min(1)   # (3) mean over P(i)
    scale = len(y) / anchor.to(per.dtype).sum().clamp_min(1)
    return torch.where(anchor, per * scale, torch.zeros_like(per))


def supcon_loss(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The feature-separation loss ``L_sep`` (3) of a batch (0 when no anchor has a positive)."""
    return supcon_per_anchor(z, y, tau).mean()


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-sample focal loss (5): ``-(1 - p_y)^γ log p_y`` (γ = 0 is the cross-entropy)."""
    logp = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return -((1.0 - logp.exp()) ** gamma) * logp                  # (5)


def srat_loss(logits_adv: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, class_w: torch.Tensor | None,
              lam: float, tau: float, base: str = "ce", gamma: float = 2.0) -> torch.Tensor:
    """The SRAT objective (4) on an adversarial batch, per sample (its mean is the loss):
    ``w_{y_i} ℓ_i + λ s_i`` with ``s`` from :func:`supcon_per_anchor`; ``class_w=None`` means uniform."""
    ell = F.cross_entropy(logits_adv, y, reduction="none") if base == "ce" else focal_loss(logits_adv, y, gamma)
    w = torch.ones_like(ell) if class_w is None else class_w.to(ell.device)[y]
    return w * ell + lam * supcon_per_anchor(z_adv, y, tau)       # (4)


class SRATObjective:
    """The ``loss_fn(logits, y)`` of :func:`rwlib.train.fit` for SRAT (4), with the deferred weights (2).

    ``attach(model)`` registers a forward hook on ``model.head`` that keeps the penultimate features ``z`` of
    the latest forward pass -- in :func:`rwlib.train.fit` that is the adversarial batch, right before the loss.
    ``fit`` calls the loss once per step, so the objective counts its calls as the step ``t``."""

    def __init__(self, class_w: torch.Tensor | None, *, lam: float, tau: float, start: int = 0,
                 base: str = "ce", gamma: float = 2.0):
        if lam < 0 or tau <= 0:
            raise ValueError(f"bad SRAT settings lam={lam!r}, tau={tau!r}: expected lam >= 0, tau > 0")
        self.class_w, self.lam, self.tau, self.start, self.base, self.gamma = class_w, lam, tau, start, base, gamma
        self.t, self.z = 0, None

    def attach(self, model: nn.Module) -> "SRATObjective":
        def keep(module, inputs, output):
            self.z = inputs[0]

        model.head.register_forward_hook(keep)
        return self

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.z is None or len(self.z) != len(y):
            raise RuntimeError("SRATObjective: no features of this batch; call attach(model) before training")
        w = self.class_w if self.t >= self.start else None         # (2) deferred reweighting
        self.t += 1
        return srat_loss(logits, self.z, y, w, self.lam, self.tau, self.base, self.gamma)


def fisher_ratio(z: torch.Tensor, y: torch.Tensor) -> float:
    """Separability of features ``z``: trace of the between-class scatter over trace of the within-class
    scatter, each class counted equally (so a minority class weighs as much as a majority class)."""
    z, y = z.double(), torch.as_tensor(y)
    classes = torch.unique(y)
    means = torch.stack([z[y == c].mean(0) for c in classes])
    between = ((means - means.mean(0)) ** 2).sum(1).mean()
    within = torch.stack([((z[y == c] - m) ** 2).sum(1).mean() for c, m in zip(classes, means)]).mean()
    return float(between / within)
