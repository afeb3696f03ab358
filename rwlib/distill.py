"""Knowledge-distillation losses: the baselines (KD, DIST) and the Plackett-Luce list likelihood.

With student logits ``s`` and teacher logits ``t`` of shape (N, C):

- :func:`kd_loss` -- Hinton, Vinyals and Dean (2015): ``(1 - lam) CE(s, y) + lam T^2 KL(p_t^T || p_s^T)``, the KL
  averaged over the batch, ``p^T = softmax(logits / T)``. (``torchdistill``'s KDLoss writes the same loss with
  ``alpha = 1 - lam`` on the CE term; the tests check the two agree.)
- :func:`dist_loss` -- DIST (Huang et al., NeurIPS 2022): ``tau^2 [beta (1 - mean_i rho(p_s,i, p_t,i)) + gamma
  (1 - mean_c rho(p_s,:c, p_t,:c))]``, rho the Pearson correlation of the softened probabilities across classes
  (inter-class relation, per sample) and across the batch (intra-class relation, per class). No CE term: a
  chapter adds it.
- :func:`plackett_luce_nll` -- the negative log-likelihood of a ranking ``perm`` (rank 1 first) under the
  Plackett-Luce model with worths ``exp(s)``, optionally with a weight per rank:
  ``sum_k w_k [log sum_{j >= k} exp(s_perm_j) - s_perm_k]``; with ``weights=None`` it is ListMLE. Chapter 09's PLD
  chooses the ranking and the weights from the teacher.
- :func:`kendall_tau` -- rank agreement between two score vectors per row (no ties assumed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "none", "sum")


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, T: float = 4.0, lam: float = 0.9,
            reduction: str = "mean") -> torch.Tensor:
    """``(1 - lam) CE(s, y) + lam T^2 KL(softmax(t/T) || softmax(s/T))`` per sample, then reduced."""
    if T <= 0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"bad KD settings T={T!r}, lam={lam!r}: expected T > 0 and 0 <= lam <= 1")
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    per = (1 - lam) * F.cross_entropy(s, y, reduction="none") + lam * T**2 * kl
    return _reduce(per, reduction)


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Pearson correlation between the rows of ``a`` and ``b``."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1, eps=eps)


def dist_loss(s: torch.Tensor, t: torch.Tensor, *, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
              eps: float = 1e-8) -> torch.Tensor:
    """DIST's relation loss on the batch (a scalar: the intra-class term couples the samples)."""
    if tau <= 0:
        raise ValueError(f"bad tau {tau!r}: expected > 0")
    ps, pt = (s / tau).softmax(1), (t / tau).softmax(1)
    inter = 1 - _pearson(ps, pt, eps).mean()
    intra = 1 - _pearson(ps.T, pt.T, eps).mean()
    return tau**2 * (beta * inter + gamma * intra)


def plackett_luce_nll(s: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor | None = None, *,
                      reduction: str = "mean") -> torch.Tensor:
    """``sum_k w_k [log sum_{j>=k} exp(s[perm_j]) - s[perm_k]]`` per row (``perm``: class indices, rank 1 first;
    ``weights``: one per rank, default 1 = ListMLE), then reduced. The last rank's term is 0."""
    if perm.shape != s.shape:
        raise ValueError(f"perm must have the logits' shape {tuple(s.shape)}; got {tuple(perm.shape)}")
    s_pi = s.gather(1, perm)
    suffix = torch.logcumsumexp(s_pi.flip(1), 1).flip(1)     # log sum_{j >= k} exp(s_pi_j)
    terms = suffix - s_pi
    if weights is not None:
        terms = weights * terms
    return _reduce(terms.sum(1), reduction)


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau between the rows of ``a`` and ``b`` (N, C): concordant minus discordant pairs over C(C-1)/2."""
    da = torch.sign(a[:, :, None] - a[:, None, :])
    db = torch.sign(b[:, :, None] - b[:, None, :])
    C = a.shape[1]
    return (da * db).sum((1, 2)) / (C * (C - 1))
