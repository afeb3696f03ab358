r"""STEER: Stabilizing Token-level Entropy-changE via Reweighting.

Reference
---------
Zhezheng Hao, Hong Wang, Haoyang Liu, Jian Luo, Jiarui Yu, Hande Dong, Qiang Lin, Can Wang, Jiawei Chen.
"Rethinking Entropy Interventions in RLVR: An Entropy Change Perspective." arXiv:2510.10150 (2025).
Official code: github.com/zz-haooo/STEER (a verl fork; ``verl/trainer/ppo/core_algos.py``, functions
``compute_token_weights`` and ``compute_policy_loss_with_entropy``, loss mode ``"entropy_control"``; scripts
``run/run_exp.sh`` and ``run/run_linear.sh``). This module is written for the book from the paper and a reading
of that code; it reproduces the code's arithmetic without reusing its source.

Equations (numbers are referred to in the comments of the code below)
---------------------------------------------------------------------
Notation for one sampled token ``a`` at one position of a completion: ``pi = pi_theta(a)`` the current policy's
probability, ``pi_old`` the rollout policy's, ``H`` the full-vocabulary entropy there, ``A`` the sequence's
advantage, ``r = pi / pi_old`` the importance ratio. In (S3) the official code takes ``H`` from the rollout
policy (verl records it with ``old_log_probs`` and recomputes only the log-probs at each update), so only ``pi``
is the current policy's; :func:`rwlib.rl.train_grpo` does the same by default (``weight_entropy="rollout"``).

(S1) Entropy gradient of a softmax over logits ``z``: ``dH/dz_j = -pi_j (log pi_j + H)``.

(S2) Exact first-order entropy change of one policy-gradient step on the logits of one position. Ascending
     ``A r`` by ``eta`` moves the logits by ``dz = eta A r (e_a - pi)``, so
     ``dH ~= -eta A r [ pi_a (log pi_a + H) - sum_j pi_j^2 (log pi_j + H) ]``.

(S3) STEER's per-token estimate (the code's ``metric``), computed without gradient:
     ``Omega = (A / pi_old) * pi (1 - pi) (log pi + H)``, with ``pi`` clamped to ``[1e-8, 1 - 1e-8]`` and
     ``pi_old`` to ``[1e-8, 1]``; non-finite values are set to 0; STEER uses ``|Omega|``.
     Keeping only the sampled logit's own term of the sum in (S2) (``sum_j pi_j^2 (...) ~= pi_a^2 (...)``) gives
     ``dH ~= -eta pi Omega``, so ``-Omega`` has the sign of the predicted entropy change: a positive advantage on
     a token more likely than typical (``log pi + H > 0``) sharpens the distribution, one on an unlikely token
     flattens it, and a negative advantage does the reverse (the paper's four quadrants).

(S4) Exponential mapping (the paper's default, ``run_exp.sh``), over the valid tokens of one micro-batch of 8
     responses (verl computes the loss per micro-batch, ``ppo_micro_batch_size_per_gpu=8`` in the scripts):
     ``k = -ln(lambda_min) / max(max_t |Omega_t|, floor)`` with ``floor = 0.02``,
     ``w_t = clamp(exp(-k |Omega_t|), lambda_min, 1)``: the token with the largest ``|Omega|`` gets
     ``lambda_min`` (when that maximum exceeds the floor) and ``Omega = 0`` keeps weight 1.

(S5) Linear mapping (``run_linear.sh``):
     ``w_t = lambda_max - (|Omega_t| - min|Omega|) (lambda_max - lambda_min) / (max|Omega| - min|Omega|)``,
     clamped to ``[lambda_min, lambda_max]``; ``(lambda_min + lambda_max) / 2`` when all ``|Omega|`` are equal.

(S6) Loss: the clipped (dual-clip) PPO surrogate per token, multiplied by ``w_t`` before the token-mean
     aggregation (:func:`rwlib.rl.clipped_pg_loss` with ``token_weights``); masked tokens get weight 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..rl import clipped_pg_loss, sequence_logprobs
from ..train import History

PI_MIN = 1e-8


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
def _check_inputs(adv, entropy, logp, logp_old) -> None:
    for name, t in (("adv", adv), ("entropy", entropy), ("logp", logp), ("logp_old", logp_old)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    shape = tuple(logp.shape)
    for name, t in (("entropy", entropy), ("logp_old", logp_old)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; valid: {shape}, the shape of logp")
    per_seq = len(shape) == 2 and tuple(adv.shape) == (shape[0],)
    if not per_seq and tuple(adv.shape) != shape:
        valid = f"{shape} or ({shape[0]},) (one advantage per sequence)" if len(shape) == 2 else f"{shape}"
        raise ValueError(f"adv has shape {tuple(adv.shape)}; valid: {valid}")


def omega(adv: torch.Tensor, entropy: torch.Tensor, logp: torch.Tensor, logp_old: torch.Tensor, *,
          signed: bool = False) -> torch.Tensor:
    """STEER's estimated entropy change of each token, (S3): ``|A / pi_old * pi (1 - pi) (log pi + H)|``.

    ``adv`` is (N,) per sequence or (N, T) per token; ``entropy``, ``logp`` (current policy) and ``logp_old``
    (rollout policy) are (N, T). ``signed=True`` keeps the sign (the official code always takes the absolute
    value); ``-Omega`` then has the sign of the predicted entropy change.
    """
    _check_inputs(adv, entropy, logp, logp_old)
    with torch.no_grad():
        adv = adv.float()
        if adv.dim() == 1 and logp.dim() == 2:
            adv = adv[:, None]
        pi = torch.clamp(torch.exp(logp.float()), min=PI_MIN, max=1.0 - PI_MIN)     # (S3) current pi, clamped
        f = pi * (1.0 - pi) * (torch.log(pi) + entropy.float())                      # (S3) pi (1 - pi)(log pi + H)
        pi_old = torch.clamp(torch.exp(logp_old.float()), min=PI_MIN, max=1.0)      # (S3) rollout pi_old, clamped
        om = adv / pi_old * f                                                         # (S3) Omega
        om = torch.where(torch.isfinite(om), om, torch.zeros_like(om))                # (S3) non-finite -> 0
        return om if signed else om.abs()                                             # (S3) |Omega|


def _check_micro_batch(micro_batch) -> None:
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                    or micro_batch < 1):
        raise ValueError(f"bad micro_batch={micro_batch!r}: valid a whole number >= 1 (responses per "
                         f"micro-batch; the official scripts use 8) or None (the whole batch at once)")


def _weights_of(metric, m, w_min, w_max, linear, floor):
    """(S4)/(S5) on one group of tokens: ``metric`` holds |Omega|, ``m`` marks the valid ones."""
    out = torch.zeros_like(metric)
    if not m.any():
        return out
    v = metric[m]
    lo, hi = v.min(), v.max()
    if linear:
        if hi > lo:
            w = w_max - (v - lo) * (w_max - w_min) / (hi - lo)                       # (S5)
        else:
            w = torch.full_like(v, (w_min + w_max) / 2)                               # (S5) all |Omega| equal
        w = w.clamp(w_min, w_max)                                                     # (S5) clamp
    else:
        k = -math.log(w_min) / torch.clamp(hi, min=floor)                             # (S4) k
        w = torch.exp(-k * v).clamp(w_min, 1.0)                                       # (S4) w_t
    out[m] = w
    return out


def token_weights(omega: torch.Tensor, mask: torch.Tensor, w_min: float = 0.8, w_max: float = 1.0,
                  linear: bool = False, floor: float = 0.02, micro_batch: int | None = 8) -> torch.Tensor:
    """STEER's token weights from ``|Omega|``: the exponential mapping (S4, default; ``w_max`` is not used there,
    the code caps at 1) or the linear one (S5). Masked tokens get 0.

    The min/max of (S4)/(S5) are taken over the valid tokens of each **micro-batch** of ``micro_batch`` rows
    (responses), in row order, as in the official code: verl calls the loss once per micro-batch of
    ``ppo_micro_batch_size_per_gpu = 8`` responses and the weights are normalised inside that call.
    ``micro_batch=None`` normalises over the whole batch at once."""
    if not (0.0 < w_min <= w_max):
        raise ValueError(f"bad w_min={w_min}, w_max={w_max}: valid 0 < w_min <= w_max")
    if not linear and w_min > 1.0:
        raise ValueError(f"bad w_min={w_min} for the exponential mapping: valid 0 < w_min <= 1")
    if not floor > 0:
        raise ValueError(f"bad floor={floor}: valid floor > 0 (the official code uses 0.02)")
    _check_micro_batch(micro_batch)
    if tuple(omega.shape) != tuple(mask.shape):
        raise ValueError(f"omega has shape {tuple(omega.shape)}, mask {tuple(mask.shape)}; valid: equal shapes")
    with torch.no_grad():
        m = mask.bool()
        metric = omega.detach().float().abs()
        if micro_batch is None or metric.dim() == 0:
            out = _weights_of(metric, m, w_min, w_max, linear, floor)
        else:
            out = torch.cat([_weights_of(a, b, w_min, w_max, linear, floor)           # one call per micro-batch
                             for a, b in zip(metric.split(micro_batch), m.split(micro_batch))])
        return out * mask.float()                                                     # (S6) masked tokens -> 0


def token_weight_fn(w_min: float = 0.8, w_max: float = 1.0, linear: bool = False, floor: float = 0.02,
                    micro_batch: int | None = 8):
    """A ``token_weight_fn`` for :func:`rwlib.rl.train_grpo`: ``fn(adv, entropy, logp, logp_old, mask)`` returns
    the (N, T) STEER weights of the mini-batch, (S3)-(S5), normalised per micro-batch of ``micro_batch`` rows."""
    token_weights(torch.zeros(1, 1), torch.ones(1, 1), w_min, w_max, linear, floor, micro_batch)  # fail now

    def fn(adv, entropy, logp, logp_old, mask):
        return token_weights(omega(adv, entropy, logp, logp_old), mask, w_min, w_max, linear, floor, micro_batch)

    return fn


def steer_loss(logp, logp_old, adv, mask, entropy, *, w_min: float = 0.8, w_max: float = 1.0,
               linear: bool = False, floor: float = 0.02, micro_batch: int | None = 8, eps_low: float = 0.2,
               eps_high: float = 0.28, clip_c: float | None = 10.0, agg: str = "token-mean"):
    """The STEER policy loss (S6): :func:`rwlib.rl.clipped_pg_loss` with the no-grad weights of (S3)-(S5).
    ``entropy`` is the sampling policy's (recorded at rollout, as in the official code). Returns
    ``(loss, info)``; ``info["weights"]`` holds the weights."""
    w = token_weights(omega(adv, entropy.detach(), logp.detach(), logp_old), mask, w_min, w_max, linear, floor,
                      micro_batch)
    loss, info = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=eps_low, eps_high=eps_high, clip_c=clip_c,
                                 token_weights=w, agg=agg)
    info["weights"] = w
    return loss, info


# ---------------------------------------------------------------------------------------------------------------
# The entropy change of one step on one softmax: first order (S2) and the real thing
# ---------------------------------------------------------------------------------------------------------------
def first_order_entropy_change(logits: torch.Tensor, a: torch.Tensor, adv, eta: float,
                               logp_old: torch.Tensor | None = None) -> torch.Tensor:
    """Exact first-order entropy change (S2) of a softmax whose logits take one gradient-ascent step of size
    ``eta`` on ``A * pi_a / pi_old``. ``logits`` (..., V); ``a`` (...) sampled indices; ``adv`` a number or (...);
    ``logp_old`` (...), default on-policy (``pi_old = pi``, ratio 1). Float64."""
    if not torch.is_tensor(a) or tuple(a.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"a has shape {tuple(getattr(a, 'shape', ()))}; valid: logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    logp_all = torch.log_softmax(logits.detach().double(), -1)
    p = logp_all.exp()
    H = -(p * logp_all).sum(-1, keepdim=True)
    g = -p * (logp_all + H)                                                           # (S1) dH/dz_j
    lpa = logp_all.gather(-1, a[..., None].long()).squeeze(-1)
    ratio = torch.ones_like(lpa) if logp_old is None else torch.exp(lpa - logp_old.double())
    adv = torch.as_tensor(adv, dtype=torch.float64)
    # (S2) dH = eta A r <dH/dz, e_a - pi> = -eta A r [pi_a(log pi_a + H) - sum_j pi_j^2 (log pi_j + H)]
    return eta * adv * ratio * (g.gather(-1, a[..., None].long()).squeeze(-1) - (p * g).sum(-1))


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of a softmax in float64 (:func:`rwlib.rl.token_entropy` works in float32, too coarse for the tiny
    changes of a finite-difference check)."""
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * lp).sum(-1)


def stepped_entropy_change(logits: torch.Tensor, a: torch.Tensor, adv, eta: float,
                           logp_old: torch.Tensor | None = None) -> torch.Tensor:
    """The true entropy change of the same step as (S2), by taking it: ``H(z + eta grad) - H(z)``, float64."""
    z = logits.detach().double().clone().requires_grad_(True)
    lpa = torch.log_softmax(z, -1).gather(-1, a[..., None].long()).squeeze(-1)
    lpo = lpa.detach() if logp_old is None else logp_old.double()
    obj = (torch.as_tensor(adv, dtype=torch.float64) * torch.exp(lpa - lpo)).sum()
    (grad,) = torch.autograd.grad(obj, z)
    return softmax_entropy(z.detach() + eta * grad) - softmax_entropy(z.detach())


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(np.corrcoef(pd.Series(np.asarray(x)).rank(), pd.Series(np.asarray(y)).rank())[0, 1])


def sign_agreement(pred, true) -> float:
    """Fraction of entries where ``pred`` and ``true`` have the same sign (entries with ``pred == 0`` skipped)."""
    pred, true = np.asarray(pred), np.asarray(true)
    keep = pred != 0
    return float((np.sign(pred[keep]) == np.sign(true[keep])).mean())


def agreement(df: pd.DataFrame) -> tuple[float, float]:
    """How well ``-Omega`` predicts the ``measured`` entropy change of the rows of ``df`` (from :func:`tabular_check`,
    :func:`isolated_token_steps` or :func:`batch_step`): ``(Spearman correlation, sign agreement)``."""
    return spearman(-df.omega, df.measured), sign_agreement(-df.omega, df.measured)


def tabular_check(generator: torch.Generator, n: int = 3000, vocab: int = 50, eta: float = 1e-3) -> pd.DataFrame:
    """Random softmaxes (logit scales from flat to peaked), a sampled token, a random advantage and a slightly
    stale ``pi_old``, all drawn from ``generator``: STEER's signed Omega, the first-order change (S2) and the
    measured change of the step."""
    g = generator
    scale = torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(math.log(0.3), math.log(6.0), generator=g))
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    a = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lpa = torch.log_softmax(z, -1).gather(1, a[:, None]).squeeze(1)
    logp_old = lpa + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    H = softmax_entropy(z)
    om = omega(adv, H, lpa, logp_old, signed=True).double()
    return pd.DataFrame({
        "pi": lpa.exp().numpy(), "entropy": H.numpy(), "adv": adv.numpy(), "omega": om.numpy(),
        "first_order": first_order_entropy_change(z, a, adv, eta, logp_old).numpy(),
        "measured": stepped_entropy_change(z, a, adv, eta, logp_old).numpy()})


# ---------------------------------------------------------------------------------------------------------------
# Watching the method during training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """A ``token_weight_fn`` wrapper that records, at every update, the mean of the entropy it is handed (the
    sampling policy's, ``entropy_old``, under :class:`rwlib.rl.GRPOConfig`'s default ``weight_entropy="rollout"``)
    and of |Omega| over the mini-batch and, when ``weight_fn`` is given, STEER's weights (without it the loss is
    untouched). Give ``probe.on_rollout`` to :func:`rwlib.rl.train_grpo` too, so that updates are grouped by
    rollout batch. The entropy of the policy being updated is in the history :func:`rwlib.rl.train_grpo`
    returns (see :func:`entropy_changes`)."""

    weight_fn: object = None
    rows: list = field(default_factory=list)
    rollout: int = -1

    def on_rollout(self, ro) -> dict:
        self.rollout += 1
        return {}

    def __call__(self, adv, entropy, logp, logp_old, mask):
        w = self.weight_fn(adv, entropy, logp, logp_old, mask) if self.weight_fn is not None else None
        m = mask.bool()
        if not m.any():
            return w
        om = omega(adv, entropy, logp, logp_old)
        row = {"rollout": self.rollout, "entropy_old": float(entropy[m].mean()), "abs_omega": float(om[m].mean())}
        if w is not None:
            v = w[m]
            row.update(w_min=float(v.min()), w_mean=float(v.mean()), w_max=float(v.max()),
                       w_damped=float((v < 0.99).float().mean()))
        self.rows.append(row)
        return w

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        df.insert(0, "update", np.arange(len(df)))
        return df

    def history(self) -> History:
        """The recorded rows as a :class:`rwlib.train.History` (step = update, from 1), e.g. for
        :func:`rwlib.sweep.sweep`'s curves."""
        hist = History()
        for t, row in enumerate(self.rows):
            hist.log(t + 1, **row)
        return hist


def entropy_changes(hist: History) -> np.ndarray:
    """Change of the mean token entropy made by one update, measured on the *same* tokens, from the history of
    :func:`rwlib.rl.train_grpo`: the entropy the current policy has on a rollout batch at the next pass minus at
    this one (needs ``ppo_epochs >= 2`` and ``minibatches == 1``; a row with ``reward`` starts a new batch)."""
    out, group = [], []
    for row in hist.rows:
        if "reward" in row and group:
            out.extend(np.diff(group).tolist())
            group = []
        if "entropy" in row:
            group.append(row["entropy"])
    out.extend(np.diff(group).tolist())
    return np.asarray(out, dtype=float)


def mean_abs_change(hist: History) -> float:
    """Mean |entropy change of one update| (:func:`entropy_changes`); nan when there is none."""
    d = entropy_changes(hist)
    return float(np.abs(d).mean()) if len(d) else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# The mechanism in the network: one small SGD step on a frozen rollout batch
# ---------------------------------------------------------------------------------------------------------------
def _token_stats(model, ro):
    """Logits, log-prob of the sampled token and entropy at every completion position, in the model's dtype
    (float64 for the mechanism checks, so that tiny steps are not lost to rounding)."""
    logits = model(ro.tokens[:, :-1])[:, ro.prompt_len - 1:]
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, ro.completion[..., None]).squeeze(-1)
    return logits, lp, -(logp_all.exp() * logp_all).sum(-1)


def rollout_weights(model, ro, w_min: float = 0.8, **kw) -> torch.Tensor:
    """STEER's weights (S3)-(S5) for a rollout batch under ``model`` (the current policy), (N, T)."""
    with torch.no_grad():
        _, lp, ent = _token_stats(model, ro)
    return token_weights(omega(ro.advantages, ent, lp, ro.logp_old), ro.mask, w_min, **kw)


def weight_entropy_choice(model, ro, *, lr: float, w_min: float = 0.8, micro_batch: int | None = 8,
                          eps_low: float = 0.2, eps_high: float = 0.28, clip_c: float | None = 10.0):
    """How much the choice of entropy in (S3) matters at the second PPO epoch on rollout ``ro`` (which must carry
    ``entropy_old`` and ``advantages``): one Adam step (learning rate ``lr``) on the STEER loss of the whole batch
    (the first epoch), then, per valid token, the weights computed with the entropy recorded at rollout (the
    official code) and with the entropy of the updated policy. ``model`` is not changed."""
    if ro.entropy_old is None or ro.advantages is None:
        raise ValueError("ro needs entropy_old and advantages (rwlib.rl.sample_completions, then advantages)")
    work = copy.deepcopy(model)
    work.train(False)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    lp, _ = sequence_logprobs(work, ro.tokens, ro.prompt_len, with_entropy=False)
    kw = dict(w_min=w_min, micro_batch=micro_batch)
    loss, _ = steer_loss(lp, ro.logp_old, ro.advantages, ro.mask, ro.entropy_old, eps_low=eps_low,
                         eps_high=eps_high, clip_c=clip_c, **kw)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp, ent = sequence_logprobs(work, ro.tokens, ro.prompt_len)
        w_ro = token_weights(omega(ro.advantages, ro.entropy_old, lp, ro.logp_old), ro.mask, **kw)
        w_cur = token_weights(omega(ro.advantages, ent, lp, ro.logp_old), ro.mask, **kw)
    m = ro.mask.bool()
    return pd.DataFrame({"w_rollout": w_ro[m].cpu().numpy(), "w_current": w_cur[m].cpu().numpy(),
                         "entropy_old": ro.entropy_old[m].cpu().numpy(), "entropy_now": ent[m].cpu().numpy()})


def isolated_token_steps(model, ro, *, eta: float, n_tokens: int, generator: torch.Generator) -> pd.DataFrame:
    """For ``n_tokens`` random valid tokens with a non-zero advantage: take one SGD step of size ``eta`` on that
    token's own objective ``A pi / pi_old`` alone (all parameters move), measure the entropy change at its
    position, restore the parameters. Returns STEER's signed Omega, the tabular prediction (S2) from the
    network's logits, and the measured change."""
    work = copy.deepcopy(model).double()
    work.train(False)
    params = [p for p in work.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        logits, lp, ent = _token_stats(work, ro)
    adv = ro.advantages
    om = omega(adv, ent, lp, ro.logp_old, signed=True)
    tab = first_order_entropy_change(logits, ro.completion, adv[:, None].expand_as(lp), eta)
    valid = (ro.mask.bool() & (adv[:, None] != 0)).nonzero()
    pick = valid[torch.randperm(len(valid), generator=generator)[:n_tokens]]
    rows = []
    for i, t in pick.tolist():
        x = ro.tokens[i:i + 1, :-1]
        pos = ro.prompt_len - 1 + t
        lpi = torch.log_softmax(work(x)[0, pos], -1)[ro.tokens[i, ro.prompt_len + t]]
        obj = adv[i] * torch.exp(lpi - lp[i, t])                            # this token's surrogate A * r, r = 1
        grads = torch.autograd.grad(obj, params, allow_unused=True)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                if gr is not None:
                    p.add_(eta * gr)                                         # gradient ascent on A * ratio
            after = softmax_entropy(work(x)[0, pos])
            for p, s in zip(params, saved):
                p.copy_(s)
        rows.append({"omega": float(om[i, t]), "first_order": float(tab[i, t]), "pi": float(lp[i, t].exp()),
                     "entropy": float(ent[i, t]), "adv": float(adv[i]), "measured": float(after - ent[i, t])})
    return pd.DataFrame(rows)


def batch_step(model, ro, *, eta: float) -> pd.DataFrame:
    """One SGD step of size ``eta`` on the whole frozen batch (GRPO's surrogate, summed over tokens and averaged
    over sequences); per valid token: STEER's signed Omega and the measured entropy change at its position."""
    work = copy.deepcopy(model).double()
    work.train(False)
    logits, lp, ent = _token_stats(work, ro)
    loss, _ = clipped_pg_loss(lp, lp.detach(), ro.advantages.double(), ro.mask.double(), agg="seq-sum")
    work.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in work.parameters():
            if p.grad is not None:
                p.add_(-eta * p.grad)
        _, _, ent2 = _token_stats(work, ro)
    m = ro.mask.bool() & (ro.advantages[:, None] != 0)
    om = omega(ro.advantages, ent.detach(), lp.detach(), ro.logp_old, signed=True)
    return pd.DataFrame({"omega": om[m].numpy(), "measured": (ent2 - ent.detach())[m].numpy()})


def rollout_entropy(model, ro) -> float:
    """Mean token entropy of ``model`` over the valid completion tokens of rollout ``ro`` (e.g. its own samples on
    the held-out problems, from :func:`rwlib.rl.evaluate_task`)."""
    with torch.no_grad():
        _, ent = sequence_logprobs(model, ro.tokens, ro.prompt_len)
    m = ro.mask.bool()
    return float(ent[m].mean())
