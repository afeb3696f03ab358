r"""DONE: doubly robust instance-reweighted adversarial training, and the reweighting rules it is compared with.

Reference
---------
Daouda A. Sow, Sen Lin, Zhangyang Wang, Yingbin Liang. "Doubly Robust Instance-Reweighted Adversarial
Training." ICLR 2024, arXiv:2308.00311 (OpenReview ``OF5x1dzWSS``). No official code is public (the arXiv
abstract says "codes will be available soon"); this module is written for this book from the paper's
formulation. Baselines: GAIRAT (Zhang et al., ICLR 2021; official code ``zjfheart/Geometry-aware-Instance-
reweighted-Adversarial-Training``, ``GAIR.py``) and MAIL (Wang et al., NeurIPS 2021; official code
``QizhouWang/MAIL``, ``mail_loss.py``), re-implemented here from their published rules.

Key equations (the numbers are used in the comments of the code below)
-----------------------------------------------------------------------
(E1) Doubly robust problem. With ``l_i(theta) = CE(f_theta(x_i + delta_i*), y_i)`` the adversarial loss of
     sample i (``delta_i*`` the attack, the lower level of a bilevel problem) and ``u = 1/n`` uniform,

         min_theta  max_{w in simplex}  sum_i w_i l_i(theta) - r KL(w || u).

(E2) Closed-form weights. The inner maximum is attained at

         w_i* = exp(l_i / r) / sum_j exp(l_j / r)          (softmax of the losses at temperature r):

     r -> infinity gives uniform weights (plain PGD-AT), r -> 0 puts all weight on the largest loss.

(E3) Compositional objective. Substituting (E2) gives

         F(theta) = r log( (1/n) sum_i exp(l_i / r) ) = f(g(theta)),  f(z) = r log z,  g = mean_i exp(l_i / r),

     and grad F = sum_i w_i* grad l_i: the weights of (E2) times the per-sample gradients.

(E4) In-batch estimate (``normalizer="batch"``): the softmax (E2) over the mini-batch B, loss sum_B w_i l_i.

(E5) Compositional moving average (``normalizer="ema"``). A mini-batch estimate of f(g) is biased, so the
     inner value g is tracked across steps and the weights use the tracked value:

         u_t = (1 - beta) u_{t-1} + beta mean_{i in B} exp(l_i / r),      w_i = exp(l_i / r) / (|B| u_t),

     loss sum_B w_i l_i. With beta = 1 this is (E4); the weights need not sum to 1 in a batch (intended: the
     estimator of grad F is then less biased). Kept in log space: exp(l / r) overflows float32 for l / r > 88.

(E6) The theory adds a log-barrier to the attack and an implicit-differentiation term to the gradient (the CID
     algorithm). At an exact inner maximiser that term vanishes (Danskin), which is how adversarial training
     is run in practice with PGD; this module implements the weights with PGD attacks ("Danskin mode").

Baselines' weights (both normalised here to mean 1 over the batch, so every method has the same step size):

(G)  GAIRAT. kappa_i = number of PGD iterates (of K) at which sample i is still classified correctly;
     w_i ∝ (1 + tanh(lambda + 5 (1 - kappa_i / floor(K/2)))) / 2, lambda = -1; from half of training on.
(M)  MAIL. Probabilistic margin PM_i = p_(2nd)(x_i') - p_{y_i}(x_i') on the adversarial example (the largest
     wrong-class probability minus the true-class probability; MAIL's sign), w_i ∝ sigmoid(slope (PM_i + bias)),
     bias = -1.5, slope = 1; from a late stage of training on. (MAIL's code scales by 3 instead of normalising.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..adversarial import pgd_linf
from ..models import eval_mode

__all__ = ["kl_dro_weights", "kl_dro_objective", "kl_dro_value", "effective_sample_size", "CompositionalEMA",
           "DONEWeights", "gair_weights", "GAIRAT", "probabilistic_margin", "mail_weights", "MAIL"]


def _check_r(r: float) -> float:
    r = float(r)
    if not r > 0:
        raise ValueError(f"bad r {r!r}: the KL strength must be > 0 (math.inf gives uniform weights)")
    return r


# ---------------------------------------------------------------------------------------------- DONE
def kl_dro_weights(losses: torch.Tensor, r: float) -> torch.Tensor:
    """The maximiser of ``sum_i w_i l_i - r KL(w || uniform)`` over the simplex: ``softmax(l / r)`` (E2).

    ``r = math.inf`` gives uniform weights. The losses are detached: the weights are a closed-form maximiser,
    not a path for gradients."""
    r = _check_r(r)
    losses = losses.detach()
    if math.isinf(r):
        return torch.full_like(losses, 1.0 / losses.numel())
    return torch.softmax(losses / r, dim=0)  # (E2); softmax subtracts max(l)/r before exp


def kl_dro_objective(w: torch.Tensor, losses: torch.Tensor, r: float) -> torch.Tensor:
    """The inner objective of (E1) at weights ``w``: ``sum_i w_i l_i - r KL(w || uniform)`` (0 log 0 = 0)."""
    n = losses.numel()
    kl = torch.special.xlogy(w, w * n).sum()
    return (w * losses).sum() - r * kl  # (E1)


def kl_dro_value(losses: torch.Tensor, r: float) -> torch.Tensor:
    """The compositional objective ``r log mean_i exp(l_i / r)`` (E3) -- the value of (E1) at its maximiser;
    the mean of the losses for ``r = math.inf``. Differentiable: its gradient is ``sum_i w_i* grad l_i``."""
    r = _check_r(r)
    if math.isinf(r):
        return losses.mean()
    return r * (torch.logsumexp(losses / r, dim=0) - math.log(losses.numel()))  # (E3)


def effective_sample_size(w: torch.Tensor) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2``: n for uniform weights, 1 for one-hot."""
    w = w.detach().double()
    return float(w.sum() ** 2 / (w ** 2).sum())


class CompositionalEMA:
    """The moving average ``u_t`` of ``g = mean exp(l / r)`` (E5), kept as ``log u_t``."""

    def __init__(self, beta: float = 0.5):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"bad beta {beta!r}: expected 0 < beta <= 1")
        self.beta = beta
        self.log_u: torch.Tensor | None = None

    def update(self, losses: torch.Tensor, r: float) -> torch.Tensor:
        """Fold in one batch of losses and return ``log u_t``."""
        z = losses.detach() / r
        log_batch = torch.logsumexp(z, 0) - math.log(z.numel())              # log mean_B exp(l / r)
        if self.log_u is None or self.beta == 1.0:
            self.log_u = log_batch
        else:                                                               # (E5), in log space
            self.log_u = torch.logaddexp(math.log1p(-self.beta) + self.log_u, math.log(self.beta) + log_batch)
        return self.log_u


class DONEWeights:
    """DONE's per-sample weights as the ``weight_fn(losses, idx, step)`` of :func:`rwlib.train.fit`.

    ``fit`` minimises ``mean(w * losses)``; the weights returned are ``|B|`` times those of (E4)/(E5), so the
    minimised loss is ``sum_B w_i l_i`` exactly as in the paper, and ``r = math.inf`` is plain PGD-AT.
    Each call appends ``{"step", "ess", "sum_w", "loss"}`` (effective sample size as a fraction of the batch,
    ``sum_B w_i`` of (E4)/(E5), mean adversarial loss) to :attr:`trace`; :attr:`last` keeps the last weights
    of (E4)/(E5)."""

    def __init__(self, r: float, normalizer: str = "batch", beta: float = 0.5):
        if normalizer not in ("batch", "ema"):
            raise ValueError(f"unknown normalizer {normalizer!r}; valid: batch, ema")
        self.r, self.normalizer = _check_r(r), normalizer
        self.ema = CompositionalEMA(beta) if normalizer == "ema" else None
        self.trace: list[dict] = []
        self.last: torch.Tensor | None = None

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """The weights of (E4) or (E5) for one batch of adversarial losses (detached)."""
        losses = losses.detach()
        if self.ema is None or math.isinf(self.r):
            return kl_dro_weights(losses, self.r)                            # (E4)
        log_u = self.ema.update(losses, self.r)
        return torch.exp(losses / self.r - log_u) / losses.numel()           # (E5)

    def __call__(self, losses: torch.Tensor, idx=None, step: int = 0) -> torch.Tensor:
        w = self.weights(losses)
        self.last = w
        self.trace.append({"step": int(step), "ess": effective_sample_size(w) / w.numel(),
                           "sum_w": float(w.sum()), "loss": float(losses.mean())})
        return w * w.numel()


# ---------------------------------------------------------------------------------------------- GAIRAT
def gair_weights(kappa: torch.Tensor, num_steps: int, lam: float = -1.0) -> torch.Tensor:
    """GAIRAT's tanh weights from the geometry value ``kappa`` (G), normalised to mean 1."""
    half = num_steps // 2
    if half < 1:
        raise ValueError(f"GAIRAT needs num_steps >= 2; got {num_steps}")
    w = (torch.tanh(lam + 5.0 * (half - kappa.float()) / half) + 1.0) / 2.0   # (G)
    return w * w.numel() / w.sum()


class GAIRAT:
    """GAIRAT as two hooks of :func:`rwlib.train.fit`: ``perturb`` (PGD that also counts ``kappa``) and the
    ``weight_fn`` (uniform before ``begin_step``, then (G))."""

    def __init__(self, *, eps: float, alpha: float, steps: int, lam: float = -1.0, begin_step: int = 0):
        self.eps, self.alpha, self.steps, self.lam, self.begin_step = eps, alpha, steps, lam, begin_step
        self.kappa: torch.Tensor | None = None

    def perturb(self, model, x, y, generator):
        kappa = torch.zeros(len(y), device=y.device)

        def loss_fn(logits, t):  # called at each PGD iterate before its step: count the correct ones
            kappa.add_((logits.detach().argmax(1) == t).float())
            return F.cross_entropy(logits, t)

        with eval_mode(model):
            x_adv = pgd_linf(model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps,
                             generator=generator, loss_fn=loss_fn)
        self.kappa = kappa
        return x_adv

    def __call__(self, losses, idx=None, step: int = 0):
        if step < self.begin_step:
            return torch.ones_like(losses)
        return gair_weights(self.kappa, self.steps, self.lam)


# ---------------------------------------------------------------------------------------------- MAIL
def probabilistic_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MAIL's margin ``max_{j != y} p_j - p_y`` (M) from the logits of the adversarial examples (detached)."""
    p = torch.softmax(logits.detach(), dim=1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    other = p.scatter(1, y[:, None], -1.0).max(1).values
    return other - p_y


def mail_weights(pm: torch.Tensor, bias: float = -1.5, slope: float = 1.0) -> torch.Tensor:
    """MAIL's sigmoid weights (M), normalised to mean 1."""
    w = torch.sigmoid(slope * (pm + bias))                                    # (M)
    return w * w.numel() / w.sum()


class MAIL:
    """MAIL's weighting (AT variant) as two hooks of :func:`rwlib.train.fit`: ``loss_fn`` (cross-entropy that
    also records the margin (M)) and the ``weight_fn`` (uniform before ``begin_step``, then (M))."""

    def __init__(self, bias: float = -1.5, slope: float = 1.0, begin_step: int = 0):
        self.bias, self.slope, self.begin_step = bias, slope, begin_step
        self.pm: torch.Tensor | None = None

    def loss_fn(self, logits, y):
        self.pm = probabilistic_margin(logits, y)
        return F.cross_entropy(logits, y, reduction="none")

    def __call__(self, losses, idx=None, step: int = 0):
        if step < self.begin_step:
            return torch.ones_like(losses)
        return mail_weights(self.pm, self.bias, self.slope)
