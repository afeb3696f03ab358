r"""ReLIFT: Reinforcement Learning Interleaved with online Fine-Tuning on the hardest questions.

Reference
---------
Lu Ma, Hao Liang, Meiyi Qiang, Lexiang Tang, Xiaochen Ma, Zhen Hao Wong, Junbo Niu, Chengyu Shen, Runming He,
Yanhao Li, Bin Cui, Wentao Zhang. "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning
for Hardest Questions." arXiv:2506.07527 (2025). Official code: github.com/TheRoadQaQ/ReLIFT (a verl fork;
``relift/verl/verl/relift/trainer.py`` for the buffer and the interleaving, ``actor.py`` for
``update_policy``/``sft_update_policy``, ``core_algos.py`` for the two losses, ``examples/math-7b/train.sh`` for
the settings). This module was written for the book from the paper and a reading of that code.

Equations (numbers are referred to in the comments of the code below)
---------------------------------------------------------------------
A question ``q`` gets ``G`` sampled responses ``o_1..o_G`` with verifiable rewards ``r_i``.

(R1) Reward (``reward_impl_version=3``): the verifier's ``is_correct``, so ``r = 1`` for a correct answer and
     ``r = 0`` otherwise -- a format error also scores 0 (the trainer names a format value of -1, but version 3
     never produces it). :class:`BinaryReward` wraps a task's verifier (1 / 0 / -1) into this reward.
(R2) Group advantage without std scaling (``grpo_use_std=False``): ``A_i = r_i - mean_j r_j``.
(R3) Policy loss without clipping (``loss_remove_clip=True``) and without the token mean
     (``loss_remove_token_mean=True``): ``L_RL = sum_{i,t} -A_i rho_{i,t} / T_max - c_H mean_{i,t} H_{i,t}``
     with ``rho = pi_theta / pi_old``, ``T_max`` the maximal response length and ``c_H = 1e-3``
     (``actor.entropy_coeff``); no KL term. In :mod:`rwlib.rl` this is ``clip=False``,
     ``agg="seq-sum-const"`` (which also divides by the number of responses, a constant factor) and
     ``scale="none"`` -- :data:`RL_CONFIG`.
(R4) Hardest question: every reward of its group is a failure, ``r_i = 0`` for all ``i`` (the code compares with
     the fail value 0; under (R1) that includes format errors). Its advantages (R2) are all 0: RL gets no signal
     from it, except the entropy term.
(R5) Buffer: each hardest question enters once per rollout batch (the row of its first response, whose response
     is replaced by the demonstration and a stop token), new items are put in front of the buffer.
(R6) Interleaving: after an RL step, when the buffer holds at least ``M`` items, one fine-tuning step on the
     first (newest) ``M`` items with a separate optimizer (``actor_sft_optimizer``, gradient clip
     ``sft_grad_clip``, ``sft_epochs`` passes over the batch, 1 in ``train.sh``); they leave the buffer.
     Fine-tuning loss with an entropy bonus:
     ``L_FT = mean_t(-log pi_theta(s_t | q, s_<t)) - alpha mean_t H_t``.

The chapter's miniature (column-addition scratchpads as demonstrations, a fixed question pool, the drivers for
RL-only, SFT-only and ReLIFT) follows below the method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..data.tasks import CORRECT, WRONG, AdditionTask, Problem, sft_batch
from ..data.text import TOKENIZER
from ..models import TinyGPT, eval_mode
from ..rl import GRPOConfig, evaluate_task, sequence_logprobs, sft_loss, token_entropy, train_grpo
from ..train import History, cosine_lr, loop

__all__ = ["RL_CONFIG", "BinaryReward", "all_fail", "HardestBuffer", "difficulty_buckets", "BUCKETS",
           "finetune_step", "relift_hook", "compact_scratchpad", "PoolSampler", "make_pool", "train_base",
           "run_rl", "run_sft", "pool_eval", "sampled_accuracy", "bucket_table", "MiniConfig", "experiment", "METHODS"]

# (R2)+(R3): the official RL settings expressed with the shared loss. grad_clip 0.7 as in train.sh.
RL_CONFIG = GRPOConfig(clip=False, agg="seq-sum-const", scale="none", entropy_coef=1e-3, grad_clip=0.7,
                       group_size=8, temperature=1.0)


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
class BinaryReward:
    """(R1) A task whose verifier scores 1 (correct) or 0 (anything else, format errors included), as the
    official ``reward_impl_version=3``; sampling and everything else is delegated to the wrapped task."""

    def __init__(self, task):
        self.task = task

    def verify(self, problem: Problem, completion: str) -> float:
        return CORRECT if self.task.verify(problem, completion) == CORRECT else WRONG   # (R1)

    def __getattr__(self, name):
        if name == "task":
            raise AttributeError(name)
        return getattr(self.task, name)


def all_fail(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """(R4) Which questions failed in every response: a (P,) bool tensor from rewards of shape (P, G), or flat
    (P * G,) rewards with ``group_size``. A reward counts as a success only when it equals 1, so a format error
    (-1 in :mod:`rwlib.data.tasks`, 0 under (R1)) is a failure, as in the official code."""
    if not torch.is_tensor(rewards):
        raise ValueError(f"rewards must be a torch tensor, got {type(rewards).__name__}")
    if rewards.dim() == 1:
        if group_size is None or group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"flat rewards of length {rewards.numel()} need a group_size that divides it, "
                             f"got {group_size}")
        rewards = rewards.reshape(-1, group_size)
    elif rewards.dim() != 2 or (group_size is not None and rewards.shape[1] != group_size):
        raise ValueError(f"rewards have shape {tuple(rewards.shape)}; valid: (P, G) or (P * G,) with group_size")
    return (rewards != CORRECT).all(dim=1)                                                 # (R4)


class HardestBuffer:
    """(R5) The buffer of hardest questions with their demonstrations, newest first; (R6) ``pop_batch`` hands
    out the first ``M`` once there are at least ``M``. ``used`` counts the demonstrations handed out so far."""

    def __init__(self, M: int):
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"bad M={M!r}: the fine-tuning batch size must be an int >= 1")
        self.M = M
        self.items: list[tuple[Problem, str]] = []
        self.used = 0
        self.added = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, problems: Sequence[Problem], rewards: torch.Tensor, demo: Callable[[Problem], str]) -> int:
        """Add each all-fail question (R4) once, with its demonstration ``demo(problem)``; rewards are (P, G),
        one row per problem. The batch's new items go in front, in the batch's order (R5). Returns how many."""
        if not torch.is_tensor(rewards) or rewards.dim() != 2 or rewards.shape[0] != len(problems):
            shape = tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
            raise ValueError(f"rewards must be a (P, G) tensor with P = {len(problems)} problems, got {shape}")
        fail = all_fail(rewards)
        new = [(p, demo(p)) for p, f in zip(problems, fail.tolist()) if f]               # one row per question
        self.items = new + self.items                                                      # (R5) newest first
        self.added += len(new)
        return len(new)

    def ready(self) -> bool:
        return len(self.items) >= self.M

    def pop_batch(self) -> list[tuple[Problem, str]]:
        """(R6) The first (newest) ``M`` items, removed from the buffer."""
        if not self.ready():
            raise RuntimeError(f"the buffer holds {len(self.items)} items, fewer than M={self.M}")
        batch, self.items = self.items[: self.M], self.items[self.M:]
        self.used += len(batch)
        return batch


BUCKETS = ("easy", "medium", "hard", "hardest")


def difficulty_buckets(acc_per_question) -> list[str]:
    """The paper's difficulty buckets from each question's accuracy over its sampled responses: easy
    (acc >= 0.75), medium (0.375 <= acc < 0.75), hard (0 < acc < 0.375), hardest (acc = 0). With n = 8 samples
    these are the paper's ranges (easy >= 6/8, medium 3/8..5/8, hard 1/8..2/8, hardest 0/8)."""
    acc = torch.as_tensor(acc_per_question, dtype=torch.float64)
    if acc.dim() != 1:
        raise ValueError(f"acc_per_question must be one-dimensional, got shape {tuple(acc.shape)}")
    if acc.numel() and (torch.isnan(acc).any() or acc.min() < 0 or acc.max() > 1):
        raise ValueError("accuracies must lie in [0, 1]")
    return ["easy" if a >= 0.75 else "medium" if a >= 0.375 else "hard" if a > 0 else "hardest"
            for a in acc.tolist()]


def finetune_step(model, optimizer: torch.optim.Optimizer, batch: Sequence[tuple[Problem, str]], alpha: float,
                  grad_clip: float | None = 1.0) -> float:
    """(R6) One fine-tuning step on ``(problem, demonstration)`` pairs: the prompt is kept and the response
    replaced by the demonstration (which ends with the stop symbol); loss on the demonstration's tokens only."""
    x, y, mask = sft_batch([p for p, _ in batch], [d for _, d in batch])
    logits = model(x)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    loss = sft_loss(logp, token_entropy(logits), mask, alpha)                            # (R6) L_FT
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def relift_hook(model, optimizer: torch.optim.Optimizer, buffer: HardestBuffer, demo: Callable[[Problem], str],
                alpha: float = 1e-4, grad_clip: float | None = 1.0, epochs: int = 1) -> Callable:
    """An ``on_rollout`` hook for :func:`rwlib.rl.train_grpo` that makes it ReLIFT.

    For each scored rollout: buffer its hardest questions (R4, R5); when the buffer holds ``M`` or more, take
    one fine-tuning step on the newest ``M`` with ``optimizer`` (separate from the RL optimizer) (R6). The hook
    runs before the RL update of the same rollout, so after a fine-tuning step it recomputes the rollout's old
    log-probabilities with the updated model, as verl does before every update; the RL ratio then starts at 1.
    Returns metrics: ``demos_used`` (so far), ``buffer`` (size), ``hardest`` (this rollout), ``sft_steps``."""
    state = {"steps": 0}

    def hook(rollout) -> dict:
        rewards = rollout.rewards.reshape(-1, rollout.group_size)
        n_new = buffer.add(rollout.problems, rewards, demo)                                # (R4), (R5)
        out = {"hardest": float(n_new)}
        if buffer.ready():                                                                 # (R6) N >= M
            batch = buffer.pop_batch()
            for _ in range(epochs):                                                        # sft_epochs
                out["sft_loss"] = finetune_step(model, optimizer, batch, alpha, grad_clip)
                state["steps"] += 1
            with eval_mode(model), torch.no_grad():
                rollout.logp_old, _ = sequence_logprobs(model, rollout.tokens, rollout.prompt_len, False)
        out.update(demos_used=float(buffer.used), buffer=float(len(buffer)), sft_steps=float(state["steps"]))
        return out

    return hook


# ---------------------------------------------------------------------------------------------------------------
# The chapter's miniature
# ---------------------------------------------------------------------------------------------------------------
def compact_scratchpad(problem: Problem) -> str:
    """The demonstration of an addition problem: :class:`AdditionTask`'s scratchpad (``style="scratchpad"``),
    least significant column first, with each column written as its sum only (``"7+8+0=15"`` -> ``"15"``), then
    the answer: ``"57+68="`` -> ``"15,12|125;"``. The base model never sees this pattern."""
    a, b = (int(s) for s in problem.prompt.rstrip("=").split("+"))
    width = (len(problem.prompt) - 2) // 2
    target = AdditionTask(1, width, style="scratchpad", width=width).make(a, b).target
    body, answer = target.split("|")
    return ",".join(step.split("=")[1] for step in body.split(",")) + "|" + answer


class PoolSampler:
    """A ``problem_fn`` that walks through a fixed question pool epoch by epoch in a shuffled order (like the
    official data loader with ``shuffle=True`` and several epochs)."""

    def __init__(self, pool: Sequence[Problem]):
        if not pool:
            raise ValueError("the pool is empty")
        self.pool, self.order = list(pool), []
        self.seen = 0

    def __call__(self, n: int, generator: torch.Generator) -> list[Problem]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.pool), generator=generator).tolist()
            out.append(self.pool[self.order.pop()])
        self.seen += n
        return out


def make_pool(n_easy: int, n_hard: int, seed: int) -> list[Problem]:
    """The training questions (operands zero-padded to two digits): ``n_easy`` distinct one-digit additions (the
    base model's range) and ``n_hard`` distinct two-digit additions whose sum has three digits (an answer length
    the base never produces)."""
    if not (0 <= n_easy <= 100 and 0 <= n_hard <= 1000):
        raise ValueError(f"bad pool sizes n_easy={n_easy} (0..100), n_hard={n_hard} (0..1000)")
    task = AdditionTask(1, 2, width=2)
    g = torch.Generator().manual_seed(seed)
    easy = [task.make(a, b) for a, b in (divmod(int(i), 10) for i in torch.randperm(100, generator=g)[:n_easy])]
    hard, seen = [], set()
    while len(hard) < n_hard:
        a, b = (int(v) for v in torch.randint(10, 100, (2,), generator=g))
        if a + b >= 100 and (a, b) not in seen:
            seen.add((a, b))
            hard.append(task.make(a, b))
    return easy + hard


@dataclass(frozen=True)
class MiniConfig:
    """Sizes and settings of the miniature: the base model (``n_layer``, ``n_embd``, ``n_head``, trained
    ``base_steps`` at ``base_lr``), the pool (``n_easy`` + ``n_hard`` questions), RL (``rollouts`` batches of
    ``prompts`` questions x ``group_size`` answers of at most ``max_new_tokens`` tokens, ``minibatches`` updates
    per batch at ``rl_lr``), ReLIFT's fine-tuning (batch ``M``, ``sft_epochs`` passes per batch at ``sft_lr``,
    entropy coefficient ``alpha``), SFT-only's learning rate ``sft_only_lr``, and greedy evaluation every
    ``eval_every`` batches."""

    n_layer: int = 1
    n_embd: int = 64
    n_head: int = 4
    base_steps: int = 250
    base_lr: float = 6e-3
    n_easy: int = 16
    n_hard: int = 8
    rollouts: int = 100
    minibatches: int = 1
    prompts: int = 8
    group_size: int = 8
    max_new_tokens: int = 10
    rl_lr: float = 1e-3
    sft_lr: float = 1e-3
    sft_only_lr: float = 3e-3
    M: int = 8
    sft_epochs: int = 8
    alpha: float = 1e-4
    eval_every: int = 10


def train_base(cfg: MiniConfig, seed: int) -> TinyGPT:
    """The "zero-RL" base: a TinyGPT fine-tuned on direct answers (``"07+08="`` -> ``"15;"``) of one-digit
    additions only."""
    torch.manual_seed(seed)
    width = 2
    model = TinyGPT(TOKENIZER.vocab_size, 2 * width + 2 + cfg.max_new_tokens + 2, cfg.n_layer, cfg.n_embd,
                    cfg.n_head)
    task = AdditionTask(1, 1, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr)
    sched = cosine_lr(opt, cfg.base_steps, 0.5)
    g = torch.Generator().manual_seed(seed)

    def step(t):
        x, y, mask = sft_batch(task.sample(32, g))
        logits = model(x)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
        return {"loss": sft_loss(logp, token_entropy(logits), mask)}

    loop(step, steps=cfg.base_steps, optimizer=opt, scheduler=sched, clip=1.0, desc="base")
    return model.eval()


def pool_eval(model, task, pool, max_new_tokens) -> dict:
    """Greedy accuracy on the pool overall and per number of digits, and the mean response length."""
    e = evaluate_task(model, task, pool, temperature=0, max_new_tokens=max_new_tokens)
    out = {"eval_acc": e["pass@1"], "eval_length": e["length"]}
    out.update({f"eval_{k}": v for k, v in e.items() if k.startswith("acc_d")})
    return out


def run_rl(base, pool, cfg: MiniConfig, seed: int, relift: bool) -> tuple[History, torch.nn.Module]:
    """RL-only (``relift=False``) or ReLIFT from a copy of ``base`` on the question pool."""
    model = copy.deepcopy(base).train()
    task = BinaryReward(AdditionTask(1, 2, width=2))                                         # (R1)
    rl_cfg = RL_CONFIG.but(prompts_per_step=cfg.prompts, group_size=cfg.group_size,
                           max_new_tokens=cfg.max_new_tokens, minibatches=cfg.minibatches)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr)
    hook = None
    if relift:
        sft_opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)                     # (R6) separate
        hook = relift_hook(model, sft_opt, HardestBuffer(cfg.M), compact_scratchpad, cfg.alpha,
                           epochs=cfg.sft_epochs)
    g = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(1000 + seed)
    hist = train_grpo(model, opt, task, rl_cfg, cfg.rollouts * cfg.minibatches, g, on_rollout=hook,
                      problem_fn=PoolSampler(pool), eval_every=cfg.eval_every * cfg.minibatches,
                      eval_fn=lambda: pool_eval(model, task.task, pool, cfg.max_new_tokens),
                      desc="ReLIFT" if relift else "RL")
    return hist, model


def run_sft(base, pool, cfg: MiniConfig, seed: int) -> tuple[History, torch.nn.Module]:
    """SFT-only: the same stream of pool questions, each step fine-tuned on all of its questions'
    demonstrations (batch ``prompts``), with the fine-tuning loss of (R6)."""
    model = copy.deepcopy(base).train()
    task = AdditionTask(1, 2, width=2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_only_lr)
    g = torch.Generator().manual_seed(1000 + seed)
    torch.manual_seed(1000 + seed)
    sampler = PoolSampler(pool)

    def step(t):
        batch = [(p, compact_scratchpad(p)) for p in sampler(cfg.prompts, g)]
        x, y, mask = sft_batch([p for p, _ in batch], [d for _, d in batch])
        logits = model(x)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
        return {"loss": sft_loss(logp, token_entropy(logits), mask, cfg.alpha), "demos_used": float(sampler.seen)}

    hist = loop(step, steps=cfg.rollouts, optimizer=opt, clip=1.0, desc="SFT",
                eval_fn=lambda: pool_eval(model, task, pool, cfg.max_new_tokens), eval_every=cfg.eval_every)
    return hist, model


@torch.no_grad()
def sampled_accuracy(model, pool, n: int, max_new_tokens: int, seed: int) -> torch.Tensor:
    """Each question's accuracy over ``n`` responses sampled at temperature 1 (the paper's bucketing)."""
    task = AdditionTask(1, 2, width=2)
    e = evaluate_task(model, task, pool, n_samples=n, temperature=1.0, max_new_tokens=max_new_tokens,
                      generator=torch.Generator().manual_seed(seed))
    r = e["rollout"].rewards.reshape(len(pool), n)
    return (r == CORRECT).float().mean(1)


def bucket_table(before: torch.Tensor, after: dict[str, torch.Tensor]) -> "pd.DataFrame":
    """Mean accuracy per difficulty bucket (defined by the base's accuracy ``before``) for the base and for each
    trained model in ``after`` (name -> per-question accuracy): a tidy frame bucket/model/accuracy/n."""
    import pandas as pd

    names = difficulty_buckets(before)
    rows = []
    for label, acc in [("base", before), *after.items()]:
        for b in BUCKETS:
            idx = [i for i, nm in enumerate(names) if nm == b]
            if idx:
                rows.append({"bucket": b, "model": label, "accuracy": float(acc[idx].mean()), "n": len(idx)})
    return pd.DataFrame(rows)


METHODS = ("RL-only", "SFT-only", "ReLIFT")


def experiment(cfg: MiniConfig, seed: int, n_samples: int = 8) -> dict:
    """The chapter's experiment for one seed: train the base, then RL-only, SFT-only and ReLIFT from it on the
    same question pool. Returns the base, the pool, each method's history and model,
    and each question's accuracy over ``n_samples`` sampled responses before (base) and after training."""
    base = train_base(cfg, seed)
    pool = make_pool(cfg.n_easy, cfg.n_hard, seed)
    out = {"base": base, "pool": pool, "history": {}, "model": {}, "after": {},
           "before": sampled_accuracy(base, pool, n_samples, cfg.max_new_tokens, seed)}
    for name in METHODS:
        if name == "SFT-only":
            hist, model = run_sft(base, pool, cfg, seed)
        else:
            hist, model = run_rl(base, pool, cfg, seed, relift=name == "ReLIFT")
        out["history"][name], out["model"][name] = hist, model
        out["after"][name] = sampled_accuracy(model, pool, n_samples, cfg.max_new_tokens, seed + 1)
    return out
