r"""Dynamic loss-based sample reweighting for language-model pre-training.

Reference
---------
Daouda Sow, Herbert Woisetschläger, Saikiran Bulusu, Shiqiang Wang, Hans-Arno Jacobsen, Yingbin Liang.
"Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining." ICLR 2025,
arXiv:2502.06733. Official code: github.com/sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025
(``src/trainer.py``: ``h_func``, ``f_func_*``, the reweighting in the training step). Written for this book from
the paper and a reading of that code; no code is copied.

Equations (numbers referred to in the code)
-------------------------------------------
For a mini-batch of N sequences with mean token losses ``l_i`` and token counts ``n_i``:

(E1) normalise to [-delta, delta] with the batch's extreme (detached) losses:
     ``h_i = 2 delta l_i / (l_max - l_min) - delta (l_max + l_min) / (l_max - l_min)``,
     the denominator guarded by ``max(l_max - l_min, 1e-6)``.
(E2) a strategy ``f`` scores each normalised loss:
     LinUpper ``f(h) = min(h + delta, delta)``; Quadratic (code name "mid") ``f(h) = 1 - h^2 / delta^2``;
     Extremes ``f(h) = |h|``; Upper (code only) ``f(h) = h / 2 + delta / 2``; Uniform: no reweighting.
(E3) KL-regularised weights, the maximiser of ``sum_i w_i f_i - r KL(w || uniform)`` on the simplex:
     ``w_i = exp((f_i - max_j f_j) / r) / sum_k exp((f_k - max_j f_j) / r)``.
(E4) the loss, with token shares ``p_i = n_i / sum_j n_j``: ``L = N sum_i w_i p_i l_i``; with ``w_i = 1/N`` this is
     the usual token-weighted mean ``sum_i p_i l_i``. Weights carry no gradient.
(E5) warm-up ("burnout"): uniform weights for the first ``burnout_steps`` steps.
"""

from __future__ import annotations

import torch

from rwlib.train import token_weighted_mean

__all__ = ["STRATEGIES", "normalize_losses", "apply_strategy", "sample_weights", "reweighted_loss",
           "LossReweighter", "redundant_outlier_regression", "regression_weight_fn"]

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes", "upper")


def _check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def normalize_losses(ell: torch.Tensor, delta: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """(E1) map the batch's losses linearly onto [-delta, delta] (min -> -delta, max -> +delta)."""
    lo, hi = ell.min(), ell.max()
    span = torch.clamp(hi - lo, min=eps)
    return 2 * delta * ell / span - delta * (hi + lo) / span  # (E1)


def apply_strategy(h: torch.Tensor, name: str, delta: float = 1.0) -> torch.Tensor:
    """(E2) the strategy's score of each normalised loss."""
    _check_strategy(name)
    if name == "linupper":
        return torch.minimum(h + delta, torch.full_like(h, delta))  # (E2) LinUpper
    if name == "quadratic":
        return 1 - h ** 2 / delta ** 2  # (E2) Quadratic ("mid")
    if name == "extremes":
        return h.abs()  # (E2) Extremes
    if name == "upper":
        return 0.5 * h + 0.5 * delta  # (E2) Upper
    return torch.zeros_like(h)  # uniform: equal scores give equal weights


@torch.no_grad()
def sample_weights(ell: torch.Tensor, strategy: str, r: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """(E1-E3) weights on the simplex from detached per-sample losses; uniform for ``strategy="uniform"``."""
    if r <= 0:
        raise ValueError(f"bad r={r}: the KL coefficient must be > 0")
    f = apply_strategy(normalize_losses(ell.detach().float(), delta), strategy, delta)
    z = (f - f.max()) / r  # (E3) subtract the max for stability
    return torch.softmax(z, 0)  # (E3)


def reweighted_loss(ell: torch.Tensor, n: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(E4) ``N * sum_i w_i p_i l_i`` with ``p_i = n_i / sum n``."""
    p = n / n.sum()
    return len(ell) * (w.detach() * p * ell).sum()  # (E4)


class LossReweighter:
    """The method as a ``loss_hook`` for :func:`rwlib.train.fit_lm`: ``hook(step, ell, n, domain)``.

    Returns the loss (E4) and, as metrics, the share of the total weight that each domain received in the
    batch relative to its share of rows (``wshare_<name>``: 1 = what uniform weights give).
    """

    def __init__(self, strategy: str, r: float = 1.0, delta: float = 1.0, burnout_steps: int = 0,
                 domains: list[str] | None = None):
        self.strategy, self.r, self.delta = _check_strategy(strategy), r, delta
        self.burnout_steps, self.domains = burnout_steps, domains

    def weights(self, step: int, ell: torch.Tensor) -> torch.Tensor:
        if self.strategy == "uniform" or step < self.burnout_steps:  # (E5)
            return torch.full_like(ell, 1.0 / len(ell)).detach()
        return sample_weights(ell, self.strategy, self.r, self.delta)

    def __call__(self, step: int, ell: torch.Tensor, n: torch.Tensor, domain: torch.Tensor):
        w = self.weights(step, ell)
        metrics = {}
        if self.domains is not None:
            for d, name in enumerate(self.domains):
                rows = domain == d
                if rows.any():
                    metrics[f"wshare_{name}"] = float(w[rows].sum() / (rows.float().mean()))
        if self.strategy == "uniform":
            return token_weighted_mean(ell, n), metrics
        return reweighted_loss(ell, n, w), metrics


# ---------------------------------------------------------------------------------------------- the toy
def redundant_outlier_regression(n: int = 4000, d: int = 20, fracs=(0.70, 0.25, 0.05), noise=(0.01, 0.3, 5.0),
                                 subspace: int = 3, n_test: int = 1000, seed: int = 0):
    """The paper's linear-regression illustration in our own parameters: rows are *redundant* (from a
    ``subspace``-dimensional subspace, tiny noise), *informative* (full rank, moderate noise) or *outliers*
    (huge label noise). Returns ``(X, y, kind, X_test, y_test, w_star)``; ``kind`` is 0/1/2 per row."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g)
    counts = [int(round(f * n)) for f in fracs]
    counts[0] = n - sum(counts[1:])
    basis = torch.linalg.qr(torch.randn(d, subspace, generator=g))[0]
    Xr = torch.randn(counts[0], subspace, generator=g) @ basis.T * 2
    Xi = torch.randn(counts[1], d, generator=g)
    Xo = torch.randn(counts[2], d, generator=g)
    X = torch.cat([Xr, Xi, Xo])
    kind = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    y = X @ w_star + torch.tensor(noise)[kind] * torch.randn(n, generator=g)
    perm = torch.randperm(n, generator=g)
    Xt = torch.randn(n_test, d, generator=g)
    return X[perm], y[perm], kind[perm], Xt, Xt @ w_star, w_star


def regression_weight_fn(strategy: str, r: float = 1.0, burnout_steps: int = 0):
    """A ``weight_fn`` for :func:`rwlib.train.fit`, which minimises ``mean(w * losses)``: returning ``N * w_i``
    makes that exactly ``sum_i w_i l_i``, (E4) with equal token counts."""
    hook = LossReweighter(strategy, r, burnout_steps=burnout_steps)

    def weight_fn(losses, idx, step):
        return hook.weights(step, losses) * len(losses)

    return weight_fn
