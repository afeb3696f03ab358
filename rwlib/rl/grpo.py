"""GRPO on a verifiable task, built on the book's one training loop (:func:`rwlib.train.loop`).

Each call of the loop's step function performs one optimizer update on one mini-batch. A fresh rollout batch
(``prompts_per_step`` problems x ``group_size`` completions) is drawn whenever the previous one has been used
for ``ppo_epochs`` passes of ``minibatches`` mini-batches, so with more than one update per rollout the
policy moves away from the sampling policy and the clipping matters.

Hooks used by the chapters:

- ``token_weight_fn(adv, entropy, logp, logp_old, mask) -> (N, T)`` per-token weights (STEER);
- ``on_rollout(rollout) -> dict`` called after each rollout is scored (ReLIFT buffers the all-fail questions
  and takes its fine-tuning steps there); its returned metrics are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..data.tasks import sft_batch
from ..models import module_device
from ..train import History, loop
from .losses import clipped_pg_loss, group_advantages, pass_at_k, sft_loss, token_entropy
from .rollout import Rollout, sample_completions, score, sequence_logprobs


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
        ro.advantages = group_advantages(r, cfg.group_size, cfg.scale)
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
        logits = model(tokens[:, :-1])[:, ro.prompt_len - 1:]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, ro.prompt_len:, None]).squeeze(-1)
        ent = token_entropy(logits)
        adv = ro.advantages[idx]
        w = None
        if token_weight_fn is not None:
            with torch.no_grad():
                w = token_weight_fn(adv, ent.detach(), logp.detach(), ro.logp_old[idx], mask)
        loss, info = clipped_pg_loss(logp, ro.logp_old[idx], adv, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                     clip=cfg.clip, clip_c=cfg.clip_c, token_weights=w, agg=cfg.agg,
                                     max_len=cfg.max_new_tokens)
        mean_ent = (ent * mask).sum() / mask.sum().clamp(min=1.0)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * mean_ent
        return {"loss": loss, "entropy": mean_ent.detach(), **info, **metrics}

    return loop(step_fn, steps=updates, optimizer=optimizer, eval_fn=eval_fn, eval_every=eval_every, desc=desc,
                history=history, clip=cfg.grad_clip)


def sft_objective(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, entropy_coef: float = 0.0
                  ) -> torch.Tensor:
    """The fine-tuning loss on one :func:`rwlib.data.tasks.sft_batch`: mean negative log-likelihood of the
    completion tokens (minus ``entropy_coef`` times their mean entropy), differentiable."""
    logits = model(x)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    entropy = token_entropy(logits) if entropy_coef else torch.zeros_like(logp)
    return sft_loss(logp, entropy, mask, entropy_coef)


def sft_train(model, optimizer, task, steps: int, batch_size: int, generator: torch.Generator, *,
              problems: list | None = None, problem_fn: Callable | None = None, entropy_coef: float = 0.0,
              scheduler=None, clip: float | None = 1.0, history: History | None = None, desc: str = "sft") -> History:
    """Supervised fine-tuning on the reference completions (loss on completion tokens only), on the model's
    device. Batches come from ``problem_fn(batch_size, generator)``, or uniformly with replacement from a fixed
    pool ``problems`` (encoded once), or else from ``task.sample``."""
    if problems is not None and problem_fn is not None:
        raise ValueError("give sft_train either a fixed pool `problems` or a `problem_fn`, not both")
    device = module_device(model)
    if problems is not None:
        pool = [t.to(device) for t in sft_batch(problems)]  # padding beyond an example is masked out

    def step_fn(t):
        if problems is not None:
            idx = torch.randint(len(problems), (batch_size,), generator=generator).to(device)
            x, y, mask = (t[idx] for t in pool)
        else:
            batch = problem_fn(batch_size, generator) if problem_fn else task.sample(batch_size, generator)
            x, y, mask = (t.to(device) for t in sft_batch(batch))
        return {"loss": sft_objective(model, x, y, mask, entropy_coef)}

    return loop(step_fn, steps=steps, optimizer=optimizer, scheduler=scheduler, desc=desc, history=history,
                clip=clip)


@torch.no_grad()
def answer_loss(model, problems: list) -> float:
    """Teacher-forced cross-entropy per answer token on ``problems`` (a smooth companion of exact match),
    computed in eval mode on the model's device."""
    was = model.training
    model.eval()
    try:
        x, y, mask = (t.to(module_device(model)) for t in sft_batch(problems))
        return float(sft_objective(model, x, y, mask))
    finally:
        model.train(was)


def exact_match(model, task, problems: list, max_new_tokens: int = 8) -> float:
    """Greedy (temperature 0) exact-match accuracy on ``problems``."""
    return evaluate_task(model, task, problems, temperature=0, max_new_tokens=max_new_tokens)["pass@1"]


@torch.no_grad()
def evaluate_task(model, task, problems, *, n_samples: int = 1, ks=(1,), temperature: float = 1.0,
                  max_new_tokens: int = 8, generator: torch.Generator | None = None) -> dict:
    """Sample ``n_samples`` completions per problem and return pass@k (unbiased) for each k in ``ks``, greedy
    accuracy when ``temperature == 0``, format-error rate, mean completion length, and pass@1 per difficulty."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ro = sample_completions(model, problems, n_samples, max_new_tokens, g, temperature)
    r = score(task, ro).reshape(len(problems), n_samples)
    correct = (r == 1).sum(1)
    out = {f"pass@{k}": float(pass_at_k(n_samples, correct, k).mean()) for k in ks}
    out["format_errors"] = float((r < 0).float().mean())
    out["length"] = float(ro.mask.sum(1).mean())
    diffs = torch.tensor([p.difficulty for p in problems])
    for d in sorted(set(diffs.tolist())):
        out[f"acc_d{d}"] = float((r[diffs == d] == 1).float().mean())
    out["rollout"] = ro
    return out
