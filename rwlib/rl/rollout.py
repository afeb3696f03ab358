"""Group sampling: G completions per prompt from a TinyGPT, with the log-probabilities the policy gave them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tasks import STOP, Problem, encode_prompts
from ..data.text import TOKENIZER
from ..models import eval_mode, module_device
from .losses import pass_at_k, token_entropy, token_logprobs

STOP_ID = int(TOKENIZER.encode(STOP)[0])


@dataclass
class Rollout:
    """One batch of rollouts, ``N = P * G`` rows ordered prompt by prompt (rows i*G .. i*G+G-1 share a prompt)."""

    problems: list[Problem]          # P problems
    group_size: int
    tokens: torch.Tensor             # (N, prompt_len + T) prompt and sampled completion
    prompt_len: int
    mask: torch.Tensor               # (N, T) 1 up to and including the first stop symbol
    logp_old: torch.Tensor           # (N, T) log-prob of each sampled token under the sampling policy
    texts: list[str]                 # N completions, cut after the stop symbol
    entropy_old: torch.Tensor | None = None        # (N, T) the sampling policy's entropy at each position
    rewards: torch.Tensor | None = None            # (N,)
    advantages: torch.Tensor | None = None         # (N,)

    @property
    def completion(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]

    def rewards_by_prompt(self) -> torch.Tensor:
        return self.rewards.reshape(-1, self.group_size)


def sequence_logprobs(model, tokens: torch.Tensor, prompt_len: int, with_entropy: bool = True):
    """Log-prob of every completion token (positions ``prompt_len..``) and the entropy there: ``(logp, H)``, (N, T)."""
    logits = model(tokens[:, :-1])[:, prompt_len - 1:]
    target = tokens[:, prompt_len:]
    logp = token_logprobs(logits, target)
    return logp, (token_entropy(logits) if with_entropy else None)


def completion_mask(completion: torch.Tensor, stop_id: int = STOP_ID) -> torch.Tensor:
    """1 on tokens up to and including the first stop symbol of each row (all tokens when there is none)."""
    is_stop = (completion == stop_id).int()
    before = torch.cumsum(is_stop, 1) - is_stop  # stops strictly before this position
    return (before == 0).float()


@torch.no_grad()
def sample_completions(model, problems: list[Problem], group_size: int, max_new_tokens: int,
                       generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None) -> Rollout:
    """Sample ``group_size`` completions for each problem (batched) and record their log-probs and the
    sampling policy's entropy at each position (verl records it at rollout time too)."""
    prompts = encode_prompts(problems).repeat_interleave(group_size, 0).to(module_device(model))
    tokens = model.generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    P = prompts.shape[1]
    mask = completion_mask(tokens[:, P:])
    with eval_mode(model):
        logp_old, entropy_old = sequence_logprobs(model, tokens, P)
    texts = []
    for row, m in zip(tokens[:, P:].tolist(), mask.sum(1).int().tolist()):
        texts.append(TOKENIZER.decode(row[:m]))
    return Rollout(problems, group_size, tokens, P, mask, logp_old, texts, entropy_old=entropy_old)


def score(task, rollout: Rollout) -> torch.Tensor:
    """Rewards from the task's verifier (1 correct, 0 wrong, -1 format error), stored on the rollout."""
    G = rollout.group_size
    r = torch.tensor([task.verify(rollout.problems[i // G], t) for i, t in enumerate(rollout.texts)])
    rollout.rewards = r
    return r


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
