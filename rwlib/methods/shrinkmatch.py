r"""ShrinkMatch: learn from uncertain unlabeled samples by shrinking their class space.

Reference
---------
Lihe Yang, Zhen Zhao, Lei Qi, Yu Qiao, Yinghuan Shi, Hengshuang Zhao. "Shrinking Class Space
for Enhanced Certainty in Semi-Supervised Learning." ICCV 2023, arXiv:2308.06777.
Official code: github.com/LiheYoung/ShrinkMatch (``CIFAR/shrinkmatch.py``: ``shrink_loss`` and
``train``; ``CIFAR/network/shrinkmatch.py``: the auxiliary head). The official loss is a Python
loop over the samples of the batch; this module is a vectorised re-implementation written for
this book (it does not reuse the official source) and gives the same numbers.

Setting
-------
FixMatch keeps an unlabeled sample ``u_b`` only when its weak-view pseudo-label is certain,
``m_b = 1[max_k p_bk >= tau]``. ShrinkMatch adds a loss on the *uncertain* samples
(``m_b = 0``): it removes the few "confusion classes" that compete with the top-1 class until the
top-1 class is certain again inside the remaining (shrunk) class space.

Key equations (the numbers are used in the comments of the code below)
-----------------------------------------------------------------------
(E1) Sort. ``p_b = softmax(f(alpha(u_b)))``, detached (optionally distribution-aligned).
     Sorted descending: ``p_(1) >= p_(2) >= ... >= p_(C)`` with class indices ``k_(1..C)``.
     Ties are broken by the smaller class index first (stable sort).

(E2) Shrunk confidence. For ``c = 3, ..., C`` (1-indexed; ``c = 2, ..., C-1`` 0-indexed, which is
     the convention of the code below and of :class:`ShrinkResult`)

         conf_c = p_(1) / (p_(1) + sum_{j >= c} p_(j)),

     the top-1 probability renormalised after removing the confusion classes
     ``k_(2), ..., k_(c-1)``. ``conf_c`` is non-decreasing in ``c``.

(E3) Minimal shrink. ``c* = min { c : conf_c >= tau }``. If no ``c`` qualifies, ``c* = C`` (the
     last candidate: the kept set is {top-1, least likely class}) and the sample is *invalid*.

(E4) Shrunk class space. ``S_b = {k_(1)} ∪ {k_(c*), ..., k_(C)}``. The top-1 class is always kept
     and ``k_(2)`` is always removed; ``c* - 2`` (1-indexed) = ``c* - 1`` (0-indexed) classes are
     removed.

(E5) Shrunk consistency loss, on the *auxiliary head* g and the *strong* view:

         ell_b = -log softmax_{S_b}(g(A(u_b)))[k_(1)]
               = logsumexp_{k in S_b} g_k - g_{k_(1)},

     i.e. cross-entropy restricted to the logits of ``S_b`` with the hard target ``k_(1)``.

(E6) Reweighting principle 1 (per-sample reliability):
     ``omega_b = max_k p_bk * 1[valid_b]`` -- the *original* top-1 probability, not ``conf_c*``.

(E7) Reweighting principle 2 (training progress): ``lambda_t`` is an EMA of the certain ratio,
     ``lambda_t = 0.999 lambda_{t-1} + 0.001 mean_b(m_b)``, initialised with the first batch's
     ratio (:class:`CertainRatioEMA`).

(E8) Total loss, with ``mu B`` the full unlabeled batch size:

         L = L_x + L_u + lambda_t * (1 / (mu B)) * sum_{b : m_b = 0} omega_b ell_b .

     :func:`shrink_loss` returns the last sum already divided by ``mu B`` (not by the number of
     uncertain samples); the caller multiplies it by ``lambda_t``.

Auxiliary head (official ``CIFAR/network/shrinkmatch.py``): ``Linear(d, d/4) -> BN1d ->
LeakyReLU(0.1) -> Linear(d/4, d/4) -> BN1d -> LeakyReLU(0.1) -> Linear(d/4, C)``, applied only to
the strong-view unlabeled features (:class:`AuxHead`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "ShrinkResult",
    "shrunk_confidences",
    "shrink_class_space",
    "shrink_loss",
    "AuxHead",
    "CertainRatioEMA",
    "utilisation",
    "ShrinkMatchLoss",
    "ABLATIONS",
]


class ShrinkResult(NamedTuple):
    """Output of :func:`shrink_class_space`; all indices are 0-indexed, all masks in sorted order.

    Attributes
    ----------
    keep_sorted : (B, C) bool
        ``keep_sorted[b, j]`` is True when the class at sorted position ``j`` (class
        ``sort_idx[b, j]``) belongs to the shrunk space S_b (E4).
    sort_idx : (B, C) long
        Class indices sorted by descending probability (E1).
    c : (B,) long
        First kept confusion position ``c*`` (E3), in ``[2, C-1]``; ``C-1`` when invalid.
    conf : (B,) float
        Shrunk confidence ``conf_{c*}`` (E2) at the chosen position.
    valid : (B,) bool
        A qualifying ``c`` exists, ``conf_{c*} >= tau`` (E3). Computed for every row, certain or not.
    n_removed : (B,) long
        Number of removed classes, ``c* - 1`` (positions 1 .. c*-1).
    """

    keep_sorted: Tensor
    sort_idx: Tensor
    c: Tensor
    conf: Tensor
    valid: Tensor
    n_removed: Tensor

    def keep_mask(self) -> Tensor:
        """The shrunk space as a (B, C) bool mask in the *original* class order."""
        out = torch.zeros_like(self.keep_sorted)
        return out.scatter(1, self.sort_idx, self.keep_sorted)


def _check_tau(tau: float) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}") from None
    if not (0.0 < t <= 1.0):  # also rejects NaN
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    return t


def _check_probs(probs: Tensor) -> Tensor:
    if not isinstance(probs, Tensor):
        raise ValueError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"probs must be 2-D (B, C), got shape {tuple(probs.shape)}")
    if probs.shape[1] < 3:
        raise ValueError(
            f"probs needs C >= 3 classes to shrink (k_(2) is always removed and k_(1) kept), "
            f"got C = {probs.shape[1]} (shape {tuple(probs.shape)})"
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor, got dtype {probs.dtype}")
    if probs.numel() > 0:
        lo, hi = float(probs.detach().min()), float(probs.detach().max())
        if not math.isfinite(lo) or not math.isfinite(hi) or lo < 0:
            raise ValueError(f"probs must be finite and non-negative, got min {lo!r}")
    return probs


def shrunk_confidences(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All shrunk confidences ``conf_c`` (E2) for ``c = 2, ..., C-1`` (0-indexed).

    Returns ``(conf, sorted_probs, sort_idx)`` with ``conf`` of shape (B, C-2), column ``j``
    holding ``conf_{j+2}``. ``probs`` is detached.
    """
    probs = _check_probs(probs).detach()
    # (E1) descending sort; stable so that ties keep the smaller class index first
    sorted_p, sort_idx = torch.sort(probs, dim=1, descending=True, stable=True)
    # tail[:, j] = sum_{i >= j} p_(i), summed from the smallest term up (accurate for tiny tails)
    tail = sorted_p.flip(1).cumsum(1).flip(1)
    top = sorted_p[:, :1]
    # (E2) conf_c = p_(1) / (p_(1) + sum_{j >= c} p_(j)), c = 2 .. C-1
    conf = top / (top + tail[:, 2:])
    return conf, sorted_p, sort_idx


def shrink_class_space(probs: Tensor, tau: float) -> ShrinkResult:
    """Shrink each row's class space minimally so that its top-1 class reaches ``tau`` (E1-E4).

    ``probs``: (B, C) probabilities (weak view, possibly distribution-aligned); detached here.
    ``tau``: confidence threshold in (0, 1].
    """
    tau = _check_tau(tau)
    conf_all, _, sort_idx = shrunk_confidences(probs)
    B, C = sort_idx.shape
    # (E3) qualifying candidates and the smallest qualifying c
    ok = conf_all >= tau  # (B, C-2)
    valid = ok.any(dim=1)
    first = ok.to(torch.uint8).argmax(dim=1)  # index of the first True (0 when none)
    # (E3) no qualifying c -> stop at the last candidate c = C-1 (0-indexed), sample invalid
    c = 2 + torch.where(valid, first, torch.full_like(first, C - 3))
    conf = conf_all.gather(1, (c - 2).unsqueeze(1)).squeeze(1)
    # (E4) S_b = {k_(1)} ∪ {k_(c), ..., k_(C)} in sorted positions: 0 and c..C-1
    pos = torch.arange(C, device=sort_idx.device).unsqueeze(0)
    keep_sorted = (pos == 0) | (pos >= c.unsqueeze(1))
    # (E4) removed classes are positions 1 .. c-1
    n_removed = c - 1
    return ShrinkResult(keep_sorted, sort_idx, c, conf, valid, n_removed)


def shrink_loss(
    probs_w: Tensor,
    logits_aux_s: Tensor,
    tau: float,
    certain_mask: Tensor | None = None,
    sample_weight: bool = True,
    soft: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Reweighted shrunk consistency loss over one unlabeled batch (E5, E6, and the 1/(mu B) of E8).

    Parameters
    ----------
    probs_w : (B, C) weak-view probabilities (pseudo-labels); detached inside.
    logits_aux_s : (B, C) auxiliary-head logits of the strong view; gradients flow into these only.
    tau : threshold in (0, 1].
    certain_mask : (B,) bool, optional. Samples with True are handled by the FixMatch loss and
        excluded here. Defaults to ``probs_w.max(1) >= tau``.
    sample_weight : reweighting principle 1 (E6). False is the paper's ablation without it:
        ``omega_b = 1[valid_b]`` (the validity gate stays; it is part of the shrink, not a weight).
    soft : False (the paper's choice) uses the hard target ``k_(1)`` (E5); True is the paper's
        soft-label ablation: the target is ``p_b`` renormalised over ``S_b``,
        ``ell_b = -sum_{k in S_b} q_bk log softmax_{S_b}(g)_k`` with ``q_bk = p_bk / sum_{S_b} p``.

    Returns
    -------
    loss : scalar tensor, ``sum_b omega_b ell_b 1[uncertain_b & valid_b] / B`` (B = full batch).
        Multiply by ``lambda_t`` (:class:`CertainRatioEMA`) in the training step (E8).
    per_sample : (B,) the weighted terms ``omega_b ell_b`` (zero where excluded).
    info : dict with
        ``'valid'`` (B,) bool, uncertain and validly shrunk (these get a non-zero weight);
        ``'n_removed'`` (B,) long, removed classes per row (computed for every row);
        ``'weight'`` (B,) the effective weights ``omega_b`` (E6), zero where excluded;
        ``'certain'`` (B,) bool; ``'c'``, ``'conf'`` as in :class:`ShrinkResult`;
        ``'ell'`` (B,) the unweighted shrunk cross-entropy (E5) of every row.
    """
    probs = _check_probs(probs_w).detach()
    if not isinstance(logits_aux_s, Tensor) or logits_aux_s.shape != probs.shape:
        shape = tuple(logits_aux_s.shape) if isinstance(logits_aux_s, Tensor) else logits_aux_s
        raise ValueError(
            f"logits_aux_s must have the shape of probs_w {tuple(probs.shape)}, got {shape}"
        )
    res = shrink_class_space(probs, tau)
    B = probs.shape[0]
    max_p = probs.max(dim=1).values
    if certain_mask is None:
        certain = max_p >= _check_tau(tau)  # FixMatch mask m_b
    else:
        certain = torch.as_tensor(certain_mask, device=probs.device)
        if certain.shape != (B,):
            raise ValueError(
                f"certain_mask must have shape ({B},), got {tuple(certain.shape)}"
            )
        certain = certain.bool()
    use = res.valid & ~certain
    # (E5) strong-view aux logits in the same sorted order as the weak probabilities
    z = logits_aux_s.gather(1, res.sort_idx)
    z_kept = z.masked_fill(~res.keep_sorted, float("-inf"))
    # (E5) ell_b = logsumexp_{S_b} z - z_(1)   (CE over S_b with target k_(1))
    lse = torch.logsumexp(z_kept, dim=1)
    ell = lse - z[:, 0]
    if soft:
        # ablation: soft target q = p restricted to S_b and renormalised; CE over S_b
        p_sorted = probs.gather(1, res.sort_idx)
        q = torch.where(res.keep_sorted, p_sorted, torch.zeros_like(p_sorted))
        q = q / q.sum(1, keepdim=True)
        logq = torch.where(res.keep_sorted, z - lse.unsqueeze(1), torch.zeros_like(z))
        ell = -(q.to(z.dtype) * logq).sum(1)
    # (E6) omega_b = max_k p_bk * 1[valid_b], restricted to uncertain samples (1[valid_b] without principle 1)
    weight = torch.where(use, max_p if sample_weight else torch.ones_like(max_p), torch.zeros_like(max_p))
    # (E6) weighted per-sample terms; where() keeps excluded rows exactly 0 (and NaN-free)
    per_sample = torch.where(use, weight.to(ell.dtype) * ell, torch.zeros_like(ell))
    # (E8) normalise by the full unlabeled batch size, not by the number of uncertain samples
    loss = per_sample.sum() / max(B, 1)
    info = {
        "valid": use,
        "n_removed": res.n_removed,
        "weight": weight,
        "certain": certain,
        "c": res.c,
        "conf": res.conf,
        "ell": ell.detach(),
    }
    return loss, per_sample, info


class AuxHead(nn.Module):
    """Auxiliary classifier g for the shrunk loss (official ``head_aux``).

    ``Linear(d, h) -> BatchNorm1d(h) -> LeakyReLU(0.1) -> Linear(h, h) -> BatchNorm1d(h) ->
    LeakyReLU(0.1) -> Linear(h, num_classes)`` with ``h = hidden`` (default ``d // 4``).
    BatchNorm needs a training batch larger than one.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        if hidden is None:
            hidden = in_features // 4
        for name, v in (("in_features", in_features), ("num_classes", num_classes), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class CertainRatioEMA:
    """EMA of the certain (FixMatch mask) ratio, ``lambda_t`` of reweighting principle 2 (E7).

    The first :meth:`update` sets ``lambda`` to that batch's ratio; later ones blend
    ``momentum * lambda + (1 - momentum) * ratio``. The official CIFAR ``train()`` starts a new
    EMA at every epoch (call :meth:`reset` to reproduce that); TorchSSL never resets.
    """

    def __init__(self, momentum: float = 0.999) -> None:
        m = float(momentum)
        if not (0.0 <= m < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = m
        self._value: float | None = None

    @property
    def value(self) -> float | None:
        """Current ``lambda_t`` (None before the first update)."""
        return self._value

    def reset(self) -> None:
        self._value = None

    def update(self, mask: Tensor | float) -> float:
        """Feed one batch's certain mask (bool/float tensor) or its ratio; return ``lambda_t``."""
        if isinstance(mask, Tensor):
            if mask.numel() == 0:
                raise ValueError("mask must not be empty")
            ratio = float(mask.detach().float().mean())
        else:
            ratio = float(mask)
        if not (0.0 <= ratio <= 1.0):
            raise ValueError(f"certain ratio must be in [0, 1], got {ratio!r}")
        if self._value is None:
            # (E7) initialise with the first batch's ratio
            self._value = ratio
        else:
            # (E7) lambda_t = m lambda_{t-1} + (1 - m) ratio
            self._value = self.momentum * self._value + (1.0 - self.momentum) * ratio
        return self._value


def utilisation(certain_mask: Tensor, valid_shrunk: Tensor) -> float:
    """Fraction of the unlabeled batch with a non-zero unsupervised loss: certain OR valid shrunk."""
    cm = torch.as_tensor(certain_mask).bool()
    vs = torch.as_tensor(valid_shrunk).bool()
    if cm.shape != vs.shape or cm.dim() != 1 or cm.numel() == 0:
        raise ValueError(
            f"certain_mask and valid_shrunk must be equal non-empty 1-D shapes, "
            f"got {tuple(cm.shape)} and {tuple(vs.shape)}"
        )
    return float((cm | vs).float().mean())


class ShrinkMatchLoss(nn.Module):
    """ShrinkMatch's extra unlabeled loss as a module that plugs into :func:`rwlib.ssl.train_ssl`.

    Called with the strong-view features of the unlabeled batch, the (distribution-aligned) weak-view
    probabilities and FixMatch's certain mask, it returns ``lambda_t * shrink_loss`` (equations above) and
    the metrics the chapter plots. It owns the auxiliary head ``g`` (trained through this loss only, as in
    the official code) and the EMA of the certain ratio, ``lambda_t``, which is never reset (TorchSSL's
    choice; the official CIFAR loop restarts it every 1024-iteration epoch).

    The switches are the paper's ablations (:data:`ABLATIONS`): ``sample_weight`` (principle 1, E6),
    ``progress_weight`` (principle 2, E7; off means ``lambda_t = 1``), ``aux_head`` (off: the shrunk loss is
    computed on the main head's strong-view logits ``logits_s``) and ``soft`` (soft shrunk targets).
    """

    def __init__(self, feat_dim: int, num_classes: int, tau: float = 0.95, ema_momentum: float = 0.999,
                 hidden: Optional[int] = None, *, sample_weight: bool = True, progress_weight: bool = True,
                 aux_head: bool = True, soft: bool = False):
        super().__init__()
        self.aux = AuxHead(feat_dim, num_classes, hidden) if aux_head else None
        self.tau = tau
        self.lam = CertainRatioEMA(ema_momentum)
        self.sample_weight, self.progress_weight, self.soft = sample_weight, progress_weight, soft

    def forward(self, feats_s: torch.Tensor, probs_w: torch.Tensor, certain: torch.Tensor, step: int = 0,
                logits_s: torch.Tensor | None = None):
        lam = self.lam.update(certain)  # lambda_t: EMA of the certain ratio (principle 2, E7)
        if self.aux is not None:
            z = self.aux(feats_s)
        elif logits_s is None:
            raise ValueError("ShrinkMatchLoss(aux_head=False) needs the main head's strong-view logits_s")
        else:
            z = logits_s
        loss, _, info = shrink_loss(probs_w, z, self.tau, certain, self.sample_weight, self.soft)
        weight = lam if self.progress_weight else 1.0  # (E8) lambda_t * L_shrink; 1 without principle 2
        return weight * loss, {
            "utilisation": utilisation(certain, info["valid"]),
            "shrunk_valid": info["valid"].float().mean().item(),
            "lambda": lam,
            "n_removed": info["n_removed"][~certain].float().mean().item() if (~certain).any() else float("nan"),
        }


#: The paper's ablations of the shrunk loss (Table 8: the reweighting principles; Table 9: the auxiliary head
#: and soft labels), as :class:`ShrinkMatchLoss` switches; ShrinkMatch itself is ``{}``.
ABLATIONS = {
    "no reweighting": dict(sample_weight=False, progress_weight=False),
    "principle 1 only": dict(progress_weight=False),
    "principle 2 only": dict(sample_weight=False),
    "no aux head": dict(aux_head=False),
    "soft shrunk labels": dict(soft=True),
}
