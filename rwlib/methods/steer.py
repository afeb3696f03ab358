r"""STEER: per-token reweighting of the policy-gradient loss by each token's predicted entropy change.

Reference
---------
Zhezheng Hao, Hong Wang, Haoyang Liu, Jian Luo, Jiarui Yu, Hande Dong, Qiang Lin, Can Wang, Jiawei Chen.
"Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective." arXiv:2510.10150 (2025).
Official code: github.com/zz-haooo/STEER (a verl fork; ``compute_token_weights`` in
``verl/trainer/ppo/core_algos.py``), read for understanding; written anew here.

Equations
---------
(E1) First-order entropy change of one softmax with logits z after a gradient step of size eta on
     ``A * pi_a / pi_old,a`` (the sampled token a):
     ``dH ~= -eta (A / pi_old,a) pi_a [ pi_a (log pi_a + H) - sum_j pi_j^2 (log pi_j + H) ]``.
(E2) STEER's per-token estimate keeps the sampled-token factor:
     ``Omega_t = (A_t / pi_old,t) * pi_t (1 - pi_t) (log pi_t + H_t)``, with pi clamped to [1e-8, 1 - 1e-8],
     pi_old to [1e-8, 1]; non-finite values are set to 0; STEER uses ``|Omega_t|``.
(E3) Weights over the batch's valid tokens, exponential mapping (the default):
     ``k = -ln(w_min) / max(max_t |Omega_t|, 0.02)``, ``w_t = clamp(exp(-k |Omega_t|), w_min, 1)``;
     linear mapping: ``w_t = w_max - (|Omega_t| - min) (w_max - w_min) / (max - min)``, clamped; all equal ->
     ``(w_min + w_max) / 2``. Masked tokens get weight 0.
(E4) The loss is the clipped policy-gradient loss with these per-token weights (``rwlib.rl.clipped_pg_loss``).
"""

from __future__ import annotations

import torch

__all__ = ["omega", "token_weights", "weight_fn", "first_order_entropy_change", "softmax_entropy"]


@torch.no_grad()
def omega(adv: torch.Tensor, entropy: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """(E2) |Omega| per token; ``adv`` is (N,) or (N, T)."""
    if adv.dim() == 1:
        adv = adv[:, None]
    p = torch.exp(logp).clamp(1e-8, 1 - 1e-8)
    p_old = torch.exp(logp_old).clamp(1e-8, 1.0)
    m = (adv / p_old) * p * (1 - p) * (torch.log(p) + entropy)  # (E2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.abs()


@torch.no_grad()
def token_weights(om: torch.Tensor, mask: torch.Tensor, w_min: float = 0.8, w_max: float = 1.0,
                  linear: bool = False, floor: float = 0.02) -> torch.Tensor:
    """(E3) token weights in [w_min, 1] (exponential) or [w_min, w_max] (linear); 0 on masked tokens."""
    if not 0 < w_min <= w_max:
        raise ValueError(f"bad weights w_min={w_min}, w_max={w_max}: need 0 < w_min <= w_max")
    valid = mask.bool()
    out = torch.zeros_like(om, dtype=torch.float32)
    if not valid.any():
        return out
    v = om[valid].float()
    if linear:
        lo, hi = v.min(), v.max()
        w = (w_max - (v - lo) * (w_max - w_min) / (hi - lo)) if hi > lo else torch.full_like(v, (w_min + w_max) / 2)
        w = w.clamp(w_min, w_max)
    else:
        k = -torch.log(torch.tensor(w_min)) / torch.clamp(v.max(), min=floor)  # (E3)
        w = torch.exp(-k * v).clamp(w_min, 1.0)  # (E3)
    out[valid] = w
    return out


def weight_fn(w_min: float = 0.8, w_max: float = 1.0, linear: bool = False):
    """STEER as ``token_weight_fn`` of :func:`rwlib.rl.train_grpo` (called on each mini-batch)."""

    def fn(adv, entropy, logp, logp_old, mask):
        return token_weights(omega(adv, entropy, logp, logp_old), mask, w_min, w_max, linear)

    return fn


def softmax_entropy(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z, -1)
    return -(p * torch.log_softmax(z, -1)).sum(-1)


def first_order_entropy_change(logits: torch.Tensor, a: torch.Tensor, adv: torch.Tensor, eta: float) -> torch.Tensor:
    """(E1) the predicted entropy change of each row's softmax (on-policy: pi_old = pi) after the step
    ``z <- z + eta * grad_z (A pi_a / pi_old,a)``."""
    p = torch.softmax(logits, -1)
    logp = torch.log_softmax(logits, -1)
    H = -(p * logp).sum(-1)
    pa = p.gather(-1, a[..., None]).squeeze(-1)
    inner = pa * (logp.gather(-1, a[..., None]).squeeze(-1) + H) - (p ** 2 * (logp + H[..., None])).sum(-1)
    return -eta * adv * inner  # (E1) with pi_a / pi_old,a = 1
