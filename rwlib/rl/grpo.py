"""GRPO on a verifiable task, built on the book's one training loop (:func:`rwlib.train.loop`).

Each call of the loop's step function performs one optimizer update on one mini-batch. A fresh rollout batch
(``prompts_per_step`` problems x ``group_size`` completions) is drawn whenever the previous one has been used
for ``ppo_epochs`` passes of ``minibatches`` mini-batches, so with more than one update per rollout the
policy moves away from the sampling policy and the clipping matters.

Hooks used by the chapters:

- ``token_weight_fn(adv, entropy, logp, logp_old, mask) -> (N, T)`` per-token weights (STEER). ``entropy`` is
  the sampling policy's, recorded at rollout time, as in the official STEER code (verl computes it with the
  old log-probs and recomputes only the log-probs at update time); ``weight_entropy="current"`` passes the
  entropy of the policy being updated instead;
- ``on_rollout(rollout) -> dict`` called after each rollout is scored (ReLIFT buffers the all-fail questions
  and takes its fine-tuning steps there); its returned metrics are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..train import History, loop
from .losses import clipped_pg_loss, group_advantages
from .rollout import Rollout, sample_completions, score, sequence_logprobs


WEIGHT_ENTROPY = ("rollout", "current")


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip: bool = True
    clip_c: float | None = None
    agg: str = "token-mean"
    scale: str = "group"            # advantage scaling: group | batch | none
    ppo_epochs: int = 1
    minibatches: int = 1
    entropy_coef: float = 0.0       # entropy bonus: loss -= coef * mean token entropy
    grad_clip: float | None = 1.0
    weight_entropy: str = "rollout"  # entropy given to token_weight_fn: rollout (old policy) | current

    def __post_init__(self):
        if self.weight_entropy not in WEIGHT_ENTROPY:
            raise ValueError(f"unknown weight_entropy {self.weight_entropy!r}; valid: {', '.join(WEIGHT_ENTROPY)}")

    def but(self, **kw) -> "GRPOConfig":
        return replace(self, **kw)


def train_grpo(model, optimizer, task, cfg: GRPOConfig, updates: int, generator: torch.Generator, *,
               token_weight_fn: Callable | None = None, on_rollout: Callable | None = None,
               eval_fn: Callable | None = None, eval_every: int = 0, history: History | None = None,
               problem_fn: Callable | None = None, desc: str = "grpo") -> History:
    """Run ``updates`` GRPO updates. Metrics per update: loss, entropy, clip fractions; per rollout: reward,
    accuracy, format errors, completion length, and the fraction of groups with zero advantage."""
    state: dict = {"queue": [], "rollout": None}
    N = cfg.prompts_per_step * cfg.group_size
    if N % cfg.minibatches:
        raise ValueError(f"minibatches={cfg.minibatches} must divide prompts_per_step*group_size={N}")

    def new_rollout() -> dict:
        problems = problem_fn(cfg.prompts_per_step, generator) if problem_fn else task.sample(cfg.prompts_per_step,
                                                                                              generator)
        ro = sample_completions(model, problems, cfg.group_size, cfg.max_new_tokens, generator, cfg.temperature)
        r = score(task, ro)
        ro.advantages = group_advantages(r, cfg.group_size, cfg.scale).to(ro.tokens.device)
        state["rollout"] = ro
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(N, generator=generator)
            state["queue"] += list(perm.chunk(cfg.minibatches))
        rg = r.reshape(-1, cfg.group_size)
        metrics = {"reward": r.mean(), "accuracy": (r == 1).float().mean(), "format_errors": (r < 0).float().mean(),
                   "length": ro.mask.sum(1).mean(), "zero_adv_groups": (rg.std(1) == 0).float().mean()}
        if on_rollout is not None:
            metrics.update(on_rollout(ro) or {})
        return metrics

    def step_fn(t):
        metrics = new_rollout() if not state["queue"] else {}
        idx = state["queue"].pop(0)
        ro: Rollout = state["rollout"]
        tokens, mask = ro.tokens[idx], ro.mask[idx]
        logp, ent = sequence_logprobs(model, tokens, ro.prompt_len)
        adv = ro.advantages[idx]
        w = None
        if token_weight_fn is not None:
            with torch.no_grad():
                h = ro.entropy_old[idx] if cfg.weight_entropy == "rollout" else ent.detach()
                w = token_weight_fn(adv, h, logp.detach(), ro.logp_old[idx], mask)
        loss, info = clipped_pg_loss(logp, ro.logp_old[idx], adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                     clip=cfg.clip, clip_c=cfg.clip_c, token_weights=w, agg=cfg.agg,
                                     max_len=cfg.max_new_tokens)
        mean_ent = (ent * mask).sum() / mask.sum().clamp(min=1.0)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * mean_ent
        return {"loss": loss, "entropy": mean_ent.detach(), **info, **metrics}

    return loop(step_fn, steps=updates, optimizer=optimizer, eval_fn=eval_fn, eval_every=eval_every, desc=desc,
                history=history, clip=cfg.grad_clip)
