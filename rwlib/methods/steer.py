r"""STEER: Stabilizing Token-level Entropy-changE via Reweighting.

Reference
---------
Zhezheng Hao, Hong Wang, Haoyang Liu, Jian Luo, Jiarui Yu, Hande Dong, Qiang Lin, Can Wang, Jiawei Chen.
"Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective." arXiv:2510.10150 (2025).
Official code: github.com/zz-haooo/STEER (a verl fork; ``verl/trainer/ppo/core_algos.py``, functions
``compute_token_weights`` and ``compute_policy_loss_with_entropy``, loss mode ``"entropy_control"``). This module
is written for the book from the paper and a reading of that code; it reproduces the code's arithmetic.

Equations (numbers are referred to in the comments of the code below)
---------------------------------------------------------------------
Notation for one sampled token ``a`` at position ``t`` of a completion: ``pi = pi_theta(a)`` the current
policy's probability, ``pi_old`` the rollout policy's, ``H`` the current policy's full-vocabulary entropy at
``t``, ``A`` the sequence's advantage, ``r = pi / pi_old`` the importance ratio.

(S1) Entropy gradient of a softmax over logits ``z``: ``dH/dz_j = -pi_j (log pi_j + H)``.

(S2) Exact first-order entropy change of one policy-gradient step on the logits of one position.
     Ascending ``A r`` by ``eta``: ``dz = eta A r (e_a - pi)``, so
     ``dH ~= -eta A r [ pi_a (log pi_a + H) - sum_j pi_j^2 (log pi_j + H) ]``.

(S3) STEER's per-token estimate (the code's ``metric``), computed without gradient:
     ``Omega = (A / pi_old) * pi (1 - pi) (log pi + H)`` with ``pi`` clamped to ``[1e-8, 1 - 1e-8]`` and
     ``pi_old`` to ``[1e-8, 1]``; non-finite values are set to 0; STEER uses ``|Omega|``.
     Keeping only the sampled logit's own term of (S2) (``sum_j pi_j^2 (...) ~= pi_a^2 (...)``) gives
     ``dH ~= -eta pi Omega``: the sign of ``-Omega`` is the predicted sign of the entropy change. A positive
     advantage on a likely token (``log pi + H > 0``) sharpens the distribution; on an unlikely token it
     flattens it; a negative advantage does the reverse (the paper's four quadrants).

(S4) Exponential mapping (the paper's default, ``run_exp.sh``), over the valid tokens of the batch:
     ``k = -ln(lambda_min) / max(max_t |Omega_t|, floor)`` with ``floor = 0.02``,
     ``w_t = clamp(exp(-k |Omega_t|), lambda_min, 1)``: the token with the largest ``|Omega|`` gets
     ``lambda_min`` (when that maximum exceeds the floor) and ``Omega = 0`` keeps weight 1.

(S5) Linear mapping (``run_linear.sh``):
     ``w_t = lambda_max - (|Omega_t| - min|Omega|) (lambda_max - lambda_min) / (max|Omega| - min|Omega|)``,
     clamped to ``[lambda_min, lambda_max]``; ``(lambda_min + lambda_max) / 2`` when all ``|Omega|`` are equal.

(S6) Loss: the clipped (dual-clip) PPO surrogate per token, multiplied by ``w_t`` before a token-mean
     aggregation (:func:`rwlib.rl.clipped_pg_loss` with ``token_weights``). Masked tokens get weight 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.tasks import AdditionTask, Problem
from ..data.text import TOKENIZER
from ..models import TinyGPT
from ..rl import GRPOConfig, clipped_pg_loss, group_advantages, sample_completions, sequence_logprobs, sft_train
from ..rl import evaluate_task, token_entropy, train_grpo
from ..rl.rollout import score

PI_MIN = 1e-8


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
def _check_shapes(**tensors) -> tuple[int, ...]:
    shape = None
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    ref = tensors["logp"].shape
    for name, t in tensors.items():
        if name == "adv" and t.dim() == 1 and len(ref) == 2 and t.shape[0] == ref[0]:
            continue
        if t.shape != ref:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; valid: {tuple(ref)} like logp"
                             + (f" or ({ref[0]},) for a per-sequence advantage" if name == "adv" else ""))
        shape = ref
    return shape or ref


def omega(adv: torch.Tensor, entropy: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor, *,
          signed: bool = False) -> torch.Tensor:
    """STEER's estimated entropy change per token, (S3): ``|A / pi_old * pi (1 - pi) (log pi + H)|``.

    ``adv`` is (N,) per sequence or (N, T) per token; the others are (N, T). With ``signed=True`` the sign is
    kept (the code always takes the absolute value; ``-Omega`` has the sign of the predicted entropy change).
    """
    _check_shapes(adv=adv, entropy=entropy, logp=logp, logp_old=logp_old)
    with torch.no_grad():
        adv = adv.float()
        if adv.dim() == 1 and logp.dim() == 2:
            adv = adv[:, None]
        pi = torch.clamp(torch.exp(logp.float()), min=PI_MIN, max=1.0 - PI_MIN)          # (S3) current pi, clamped
        f = pi * (1.0 - pi) * (torch.log(pi) + entropy.float())                           # (S3) pi(1-pi)(log pi + H)
        pi_old = torch.clamp(torch.exp(logp_old.float()), min=PI_MIN, max=1.0)           # (S3) rollout pi_old
        om = (adv / pi_old) * f                                                            # (S3) Omega
        om = torch.where(torch.isfinite(om), om, torch.zeros_like(om))                     # (S3) non-finite -> 0
        return om if signed else om.abs()                                                  # (S3) |Omega|


def token_weights(omega: torch.Tensor, mask: torch.Tensor, w_min: float = 0.8, w_max: float = 1.0,
                  linear: bool = False, floor: float = 0.02) -> torch.Tensor:
    """STEER's token weights from ``|Omega|`` over the valid tokens of the batch: exponential (S4) or linear (S5)
    mapping. Masked tokens get 0; weights are never differentiated."""
    if not 0.0 < w_min <= w_max:
        raise ValueError(f"bad w_min={w_min}, w_max={w_max}: need 0 < w_min <= w_max")
    if not linear and w_min > 1.0:
        raise ValueError(f"bad w_min={w_min} for the exponential mapping: valid 0 < w_min <= 1")
    if not floor > 0:
        raise ValueError(f"bad floor={floor}: valid floor > 0 (the code uses 0.02)")
    if omega.shape != mask.shape:
        raise ValueError(f"omega has shape {tuple(omega.shape)} but mask {tuple(mask.shape)}; valid: equal shapes")
    with torch.no_grad():
        m = mask.bool()
        metric = omega.detach().float().abs()
        out = torch.zeros_like(metric)
        if not m.any():
            return out
        v = metric[m]
        lo, hi = v.min(), v.max()
        if linear:
            if hi > lo:
                w = w_max - (v - lo) * (w_max - w_min) / (hi - lo)                        # (S5)
            else:
                w = torch.full_like(v, (w_min + w_max) / 2)                                # (S5) all equal
            w = w.clamp(w_min, w_max)                                                      # (S5)
        else:
            k = -math.log(w_min) / torch.clamp(hi, min=floor)                              # (S4) k
            w = torch.exp(-k * v).clamp(w_min, 1.0)                                        # (S4) w_t
        out[m] = w
        return out * mask.float()                                                          # (S6) masked -> 0


def token_weight_fn(w_min: float = 0.8, w_max: float = 1.0, linear: bool = False, floor: float = 0.02,
                    log: list | None = None):
    """A ``token_weight_fn`` for :func:`rwlib.rl.train_grpo`: ``fn(adv, entropy, logp, logp_old, mask) -> (N, T)``
    STEER weights. With a list as ``log``, each call appends the valid tokens' (min, mean, max) weight."""
    token_weights(torch.zeros(1, 1), torch.ones(1, 1), w_min, w_max, linear, floor)  # validate now, not mid-run

    def fn(adv, entropy, logp, logp_old, mask):
        w = token_weights(omega(adv, entropy, logp, logp_old), mask, w_min, w_max, linear, floor)
        if log is not None and mask.bool().any():
            v = w[mask.bool()]
            log.append((float(v.min()), float(v.mean()), float(v.max())))
        return w

    return fn


def steer_loss(logp, logp_old, adv, mask, entropy, *, w_min: float = 0.8, w_max: float = 1.0, linear: bool = False,
               floor: float = 0.02, eps_low: float = 0.2, eps_high: float = 0.28, clip_c: float | None = 10.0,
               agg: str = "token-mean"):
    """The STEER policy loss (S6): ``clipped_pg_loss`` with the (no-grad) weights of (S3)-(S5).
    Returns ``(loss, info)``; ``info["weights"]`` holds the weights."""
    w = token_weights(omega(adv, entropy.detach(), logp.detach(), logp_old), mask, w_min, w_max, linear, floor)
    loss, info = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c,
                                 token_weights=w, agg=agg)
    info["weights"] = w
    return loss, info


def first_order_entropy_change(logits: torch.Tensor, a: torch.Tensor, adv, eta: float,
                               logp_old: torch.Tensor | None = None) -> torch.Tensor:
    """Exact first-order entropy change (S2) of a softmax when its logits take one gradient-ascent step of size
    ``eta`` on ``A * pi_a / pi_old``. ``logits`` (..., V), ``a`` (...) sampled indices, ``adv`` scalar or (...),
    ``logp_old`` (...) (default: on-policy, ``pi_old = pi``)."""
    if logits.dim() < 1 or a.shape != logits.shape[:-1]:
        raise ValueError(f"a has shape {tuple(a.shape)}; valid: logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    z = logits.double()
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    H = -(p * logp_all).sum(-1)                                                       # entropy at the position
    g = -p * (logp_all + H[..., None])                                                # (S1) dH/dz_j
    lpa = logp_all.gather(-1, a[..., None].long()).squeeze(-1)
    ratio = torch.ones_like(lpa) if logp_old is None else torch.exp(lpa - logp_old.double())
    adv = torch.as_tensor(adv, dtype=torch.float64)
    # (S2): dH = -eta A r [pi_a (log pi_a + H) - sum_j pi_j^2 (log pi_j + H)] = eta A r (g_a - sum_j pi_j g_j)
    return eta * adv * ratio * (g.gather(-1, a[..., None].long()).squeeze(-1) - (p * g).sum(-1))


def stepped_entropy_change(logits: torch.Tensor, a: torch.Tensor, adv, eta: float,
                           logp_old: torch.Tensor | None = None) -> torch.Tensor:
    """The true entropy change of the same step (S2), by taking it: ``H(z + dz) - H(z)`` in float64."""
    z = logits.detach().double().clone().requires_grad_(True)
    logp_all = torch.log_softmax(z, -1)
    lpa = logp_all.gather(-1, a[..., None].long()).squeeze(-1)
    lpo = lpa.detach() if logp_old is None else logp_old.double()
    obj = (torch.as_tensor(adv, dtype=torch.float64) * torch.exp(lpa - lpo)).sum()
    (grad,) = torch.autograd.grad(obj, z)
    with torch.no_grad():
        return token_entropy(z + eta * grad) - token_entropy(z)
