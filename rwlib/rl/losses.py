"""Losses and estimators of policy-gradient RL with verifiable rewards.

Notation: ``logp`` and ``logp_old`` are (N, T) log-probabilities of the sampled completion tokens under the
current and the rollout policy, ``mask`` (N, T) marks real completion tokens, ``adv`` holds one advantage per
sequence (N,) or per token (N, T).

Clipped surrogate per token (PPO; GRPO uses it with group advantages)::

    r_t   = exp(logp_t - logp_old_t)
    l_t   = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))        (asymmetric: "clip-higher")
    l_t   = min(l_t, -A c)          where A < 0, with dual clip c          (verl's clip_ratio_c)
    l_t  *= w_t                     optional per-token weights (e.g. STEER)

Aggregation over tokens (the names of TRL's ``loss_type`` in brackets):

- ``"seq-mean-token-mean"`` [grpo]: mean over each sequence's tokens, then over sequences;
- ``"token-mean"`` [bnpo; dapo when ``normalizer`` = tokens of the whole generation batch]: sum / token count;
- ``"seq-sum-const"`` [dr_grpo]: sum / (N * max_len), a constant normaliser;
- ``"seq-sum"``: sum over tokens, mean over sequences.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-sum-const", "seq-sum")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` at every position, from ``logits`` (..., V) and integer ``targets`` (...), in float32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, in float32: logsumexp(z) - sum softmax(z) z."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
                     ) -> torch.Tensor:
    """GRPO advantages of a flat reward vector ordered group by group: ``A_i = r_i - mean_group(r)``, divided by
    ``std + eps`` with ``scale="group"`` (per-group std, Bessel-corrected, as TRL) or ``"batch"`` (one std over
    the batch), not divided with ``"none"`` (Dr. GRPO)."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}; valid: group, batch, none")
    r = rewards.reshape(-1, group_size).to(torch.float32)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, unbiased=True, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std(unbiased=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i} r_j`` within each group."""
    r = rewards.reshape(-1, group_size).to(torch.float32)
    G = r.shape[1]
    return (r - (r.sum(1, keepdim=True) - r) / (G - 1)).reshape(-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", max_len: int | None = None,
              normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce (N, T) per-token losses over ``mask`` with one of :data:`AGGREGATIONS`."""
    if mask.dtype != per_token.dtype:
        mask = mask.to(per_token.dtype)
    if agg == "token-mean":
        denom = mask.sum().clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer).clamp(min=1.0)
        return (per_token * mask).sum() / denom
    if agg == "seq-mean-token-mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if agg == "seq-sum-const":
        if max_len is None:
            raise ValueError("agg 'seq-sum-const' needs max_len (the maximal completion length)")
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    if agg == "seq-sum":
        return (per_token * mask).sum(-1).mean()
    raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def clipped_pg_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                    eps_low: float = 0.2, eps_high: float | None = None, clip: bool = True,
                    clip_c: float | None = None, delta: float | None = None,
                    token_weights: torch.Tensor | None = None, agg: str = "token-mean", max_len: int | None = None,
                    normalizer=None, with_metrics: bool = True, log_ratio_clamp: float | None = 20.0
                    ) -> tuple[torch.Tensor, dict]:
    """The clipped policy-gradient loss (module docstring). Returns ``(loss, info)`` with the clip fractions.

    ``clip=False`` gives the plain importance-weighted policy gradient ``-A r`` (ReLIFT's setting);
    ``delta`` caps the unclipped ratio from above (TRL's two-sided clipping); ``clip_c`` is the dual clip.
    ``with_metrics=False`` skips the clip fractions (``info`` is then empty). ``log_ratio_clamp`` bounds
    ``logp - logp_old`` before the exponential, as verl does (±20: no overflow, no gradient from such tokens);
    ``None`` leaves it out, as TRL does. The two agree wherever ``|logp - logp_old| < 20``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if adv.dim() == 1:
        adv = adv[:, None]
    log_ratio = logp - logp_old
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp_(-log_ratio_clamp, log_ratio_clamp)   # in place on the temporary
    ratio = torch.exp(log_ratio)
    if clip:  # max(-A r, -A clip(r)) = -min(A r, A clip(r)): one negation instead of two
        r1 = torch.clamp(ratio, max=delta) if delta is not None else ratio
        per = -torch.minimum(adv * r1, adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    else:
        per = -adv * ratio
    if clip_c is not None:
        if clip_c <= 1:
            raise ValueError(f"bad clip_c {clip_c}: the dual clip needs c > 1")
        per = torch.where(adv < 0, torch.minimum(per, -adv * clip_c), per)
    if token_weights is not None:
        per = per * token_weights
    loss = aggregate(per, mask, agg, max_len, normalizer)
    if not with_metrics:
        return loss, {}
    with torch.no_grad():  # clip fractions over the masked tokens, as tensors: no host sync per call
        m = mask.to(ratio.dtype)
        n = m.sum().clamp(min=1.0)
        low = (((ratio < 1 - eps_low) & (adv < 0)).to(m.dtype) * m).sum() / n
        high = (((ratio > 1 + eps_high) & (adv > 0)).to(m.dtype) * m).sum() / n
    return loss, {"clip_low": low, "clip_high": high}


def sft_loss(token_logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, entropy_coef: float = 0.0
             ) -> torch.Tensor:
    """Supervised fine-tuning loss over masked tokens, with an optional entropy bonus:
    ``mean_t(-log pi(s_t)) - entropy_coef * mean_t(H_t)`` (ReLIFT's fine-tuning loss)."""
    mask = mask.to(token_logp.dtype)
    n = mask.sum().clamp(min=1.0)
    return -(token_logp * mask).sum() / n - entropy_coef * (entropy * mask).sum() / n


def pass_at_k(n: int, c, k: int):
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``
    (Chen et al., 2021). ``c`` may be an int or a tensor/array of counts."""
    if not 1 <= k <= n:
        raise ValueError(f"bad k={k}: need 1 <= k <= n={n}")
    if torch.is_tensor(c) or hasattr(c, "__len__"):
        c = torch.as_tensor(c)
        return torch.tensor([pass_at_k(n, int(ci), k) for ci in c.flatten()], dtype=torch.float64).reshape(c.shape)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
