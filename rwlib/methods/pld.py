"""PLD -- Plackett-Luce Distillation (Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation", arXiv:2506.12542).

The teacher's logits ``t`` are read as Plackett-Luce *worths*; the student (logits ``s``, C classes, true label
``y``) is trained to make one ranking of the classes likely, each rank weighted by the teacher's confidence:

(1) the teacher-optimal permutation: ``pi*_1 = y``, then the other classes by descending teacher logit;
(2) the rank weights ``alpha_k = softmax(t / T)[pi*_k]`` (they sum to 1; no gradient flows to the teacher);
(3) the loss, the weighted Plackett-Luce negative log-likelihood of ``pi*``::

        L_PLD(s; t, y) = sum_{k=1}^{C} alpha_k [ log sum_{j=k}^{C} exp(s[pi*_j]) - s[pi*_k] ]

    (the k = C term is 0). It replaces "CE + lambda KD": its k = 1 term *is* ``alpha_1 CE(s, y)``, so there is no
    separate cross-entropy term and no mixing weight. It is convex in ``s`` (log-sum-exp minus a linear function,
    non-negative weights) and invariant to ``s + c 1``; with all ``alpha_k = 1`` it is ListMLE on ``pi*``, with a
    one-hot teacher on ``y`` it is CE;
(4) its gradient in closed form::

        dL/ds_c = sum_k alpha_k [ 1{c in pi*_{k:}} softmax(s[pi*_{k:}])_c - 1{pi*_k = c} ].

The generic weighted list likelihood is :func:`rwlib.distill.plackett_luce_nll` (shared with the baselines KD
and DIST in :mod:`rwlib.distill`); this module chooses PLD's ranking and weights.
"""

from __future__ import annotations

import torch

from rwlib.distill import plackett_luce_nll

__all__ = ["teacher_optimal_perm", "rank_weights", "pld_loss", "pld_grad"]


def teacher_optimal_perm(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pi* (N, C) of Eq. (1): the true label first -- even where the teacher is wrong -- then the other classes
    by descending teacher logit."""
    forced = t.detach().scatter(1, y[:, None], float("inf"))   # (1) y outranks every class
    return forced.sort(dim=1, descending=True, stable=True).indices


def rank_weights(t: torch.Tensor, perm: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """alpha (N, C) of Eq. (2): the teacher's softmax mass (temperature ``T``) of the class at each rank."""
    if T <= 0:
        raise ValueError(f"bad temperature T={T!r}: expected > 0")
    return (t.detach() / T).softmax(1).gather(1, perm)          # (2) alpha_k = p_T(pi*_k)


def pld_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float = 1.0,
             reduction: str = "mean") -> torch.Tensor:
    """L_PLD of Eq. (3), per sample then reduced (``"mean"``, ``"sum"`` or ``"none"``)."""
    perm = teacher_optimal_perm(t, y)
    return plackett_luce_nll(s, perm, rank_weights(t, perm, T), reduction=reduction)   # (3)


@torch.no_grad()
def pld_grad(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """dL_PLD/ds (N, C) of Eq. (4) per sample, without autograd (the gradient of ``reduction="sum"``)."""
    perm = teacher_optimal_perm(t, y)
    alpha = rank_weights(t, perm, T)
    s_pi = s.gather(1, perm)
    lse = torch.logcumsumexp(s_pi.flip(1), 1).flip(1)          # log sum_{j >= k} exp(s_pi_j)
    # sum_{k <= j} alpha_k softmax(s_pi[k:])_j = exp(s_pi_j + log sum_{k <= j} alpha_k exp(-lse_k))
    acc = torch.logcumsumexp(alpha.log() - lse, 1)
    g_pi = (s_pi + acc).exp() - alpha                           # (4), in rank order
    return torch.zeros_like(s).scatter(1, perm, g_pi)
