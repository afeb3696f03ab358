r"""ReLIFT: reinforcement learning interleaved with fine-tuning on the hardest questions.

Reference
---------
Lu Ma et al. "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest
Questions." arXiv:2506.07527 (2025). Official code: github.com/TheRoadQaQ/ReLIFT (a verl fork), read for
understanding through the chapter brief; written anew here.

Method
------
(E1) RL as in the official code: rewards 1 (correct) / 0 (wrong) / -1 (format error); group advantages
     ``A_i = r_i - mean_group(r)`` without std scaling; the unclipped importance-weighted loss ``-A r_t``
     summed over tokens and divided by the maximal response length; an entropy bonus of 1e-3.
(E2) Hardest questions: a prompt none of whose G rollouts is correct (no positive reward). Its group has no
     learning signal in (E1) when all rewards are equal. ReLIFT stores the question once, with a high-quality
     demonstration, newest first.
(E3) When the buffer holds at least M items, one fine-tuning step is taken on the newest M of them with a
     separate optimizer: ``L_FT = mean_t(-log pi(s_t)) - alpha mean_t(H_t)``; they leave the buffer.
"""

from __future__ import annotations

from typing import Callable

import torch

from rwlib.data.tasks import CORRECT, Problem, sft_batch
from rwlib.rl import GRPOConfig, sft_loss, token_entropy

__all__ = ["HardestBuffer", "difficulty_buckets", "relift_hook", "RL_CONFIG"]

# (E1) the official RL settings expressed with the shared loss
RL_CONFIG = GRPOConfig(clip=False, agg="seq-sum-const", scale="none", entropy_coef=1e-3)


class HardestBuffer:
    """(E2) all-fail questions with their demonstrations, one per question, newest first."""

    def __init__(self, M: int):
        if M < 1:
            raise ValueError(f"bad M={M}: the fine-tuning batch must be >= 1")
        self.M = M
        self.items: list[tuple[Problem, str]] = []
        self.used = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, problems: list[Problem], rewards: torch.Tensor, demo: Callable[[Problem], str]) -> int:
        """Add every problem whose group of rewards (P, G) has no correct answer; return how many were added."""
        seen = {p.prompt for p, _ in self.items}
        new = []
        for p, r in zip(problems, rewards):
            if not (r == CORRECT).any() and p.prompt not in seen:
                new.append((p, demo(p)))
                seen.add(p.prompt)
        self.items = new[::-1] + self.items  # newest first
        return len(new)

    def ready(self) -> bool:
        return len(self.items) >= self.M

    def pop_batch(self) -> list[tuple[Problem, str]]:
        if not self.ready():
            raise RuntimeError(f"buffer holds {len(self.items)} items, fewer than M={self.M}")
        batch, self.items = self.items[: self.M], self.items[self.M:]
        self.used += len(batch)
        return batch


def difficulty_buckets(acc: torch.Tensor) -> list[str]:
    """Bucket questions by rollout accuracy: easy (> 2/3), medium (> 1/3), hard (> 0), hardest (0)."""
    return ["easy" if a > 2 / 3 else "medium" if a > 1 / 3 else "hard" if a > 0 else "hardest" for a in acc.tolist()]


def relift_hook(model, optimizer: torch.optim.Optimizer, buffer: HardestBuffer, demo: Callable[[Problem], str],
                alpha: float = 1e-4) -> Callable:
    """``on_rollout`` for :func:`rwlib.rl.train_grpo`: buffer the hardest questions (E2) and fine-tune on M of
    them whenever the buffer is full (E3). Returns metrics: demonstrations used so far, buffer size, SFT loss."""

    def hook(rollout) -> dict:
        buffer.add(rollout.problems, rollout.rewards_by_prompt(), demo)
        out = {"demos_used": float(buffer.used), "buffer": float(len(buffer))}
        while buffer.ready():
            batch = buffer.pop_batch()
            x, y, mask = sft_batch([p for p, _ in batch], [d for _, d in batch])
            logits = model(x)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
            loss = sft_loss(logp, token_entropy(logits), mask, alpha)  # (E3)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            out.update({"sft_loss": loss.item(), "demos_used": float(buffer.used), "buffer": float(len(buffer))})
        return out

    return hook
