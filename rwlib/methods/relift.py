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

The paper's mechanism ablations are one-line switches of the same two pieces:

- ``HardestBuffer(M, select="random", generator=g)``: the buffer takes as many *random* questions of each batch
  as that batch had all-fail ones (the same fine-tuning budget, spent on questions chosen without regard to
  difficulty) instead of the all-fail questions themselves;
- ``relift_hook(..., trigger="every-step")``: fine-tune after every RL step on whatever the buffer holds (at
  most the newest ``M``), instead of waiting until it holds ``M`` (R6);
- SFT then RL (the paper's strongest hybrid baseline) needs no switch: fine-tune on every demonstration, then
  run RL-only from that model.

Below the method: the chapter's demonstrations (column-addition scratchpads), its question pool with a held-out
split, and the per-bucket summaries. The experiment itself (the arms) is a sweep in the chapter's notebook.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch

from ..data.tasks import CORRECT, WRONG, AdditionTask, Problem, sft_batch
from ..data.text import TOKENIZER
from ..finetune import sft_objective, sft_train
from ..models import TinyGPT, eval_mode, module_device
from ..repro import seeded, stream, stream_seed
from ..train import cosine_lr
from ..rl import GRPOConfig, evaluate_task, sequence_logprobs

__all__ = ["RL_CONFIG", "BinaryReward", "all_fail", "HardestBuffer", "SELECT", "TRIGGERS", "difficulty_buckets",
           "BUCKETS", "question_accuracy", "finetune_step", "relift_hook", "compact_scratchpad", "PoolSampler",
           "make_pool", "make_split", "zero_rl_base", "bucket_means", "bucket_table", "ABLATIONS", "arm_hook", "measure"]

SELECT = ("hardest", "random")        # what enters the buffer: the all-fail questions (R4), or random ones
TRIGGERS = ("buffer", "every-step")   # when to fine-tune: at N >= M (R6), or after every RL step

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
    out the first ``M`` once there are at least ``M``. ``used`` counts the demonstrations handed out so far.

    ``select="random"`` is the paper's random-buffer ablation: from each batch it takes as many questions as
    the batch had all-fail ones, but drawn uniformly at random from the batch (with ``generator``)."""

    def __init__(self, M: int, select: str = "hardest", generator: torch.Generator | None = None):
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"bad M={M!r}: the fine-tuning batch size must be an int >= 1")
        if select not in SELECT:
            raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECT)}")
        if select == "random" and generator is None:
            raise ValueError("select='random' needs a generator")
        self.M, self.select, self.generator = M, select, generator
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
        if self.select == "random":                                                        # the ablation
            pick = torch.randperm(len(problems), generator=self.generator)[: int(fail.sum())]
            fail = torch.zeros_like(fail).index_fill_(0, pick, True)
        new = [(p, demo(p)) for p, f in zip(problems, fail.tolist()) if f]               # one row per question
        self.items = new + self.items                                                      # (R5) newest first
        self.added += len(new)
        return len(new)

    def ready(self) -> bool:
        return len(self.items) >= self.M

    def pop_batch(self, partial: bool = False) -> list[tuple[Problem, str]]:
        """(R6) The first (newest) ``M`` items, removed from the buffer; with ``partial``, up to ``M`` (the
        every-step ablation), so any non-empty buffer can hand out a batch."""
        if not (self.ready() or (partial and self.items)):
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


def question_accuracy(model, task, problems: Sequence[Problem], generator: torch.Generator, n: int = 8,
                      max_new_tokens: int = 8) -> torch.Tensor:
    """The paper's difficulty measure ``acc(q)``: each question's accuracy over ``n`` responses sampled at
    temperature 1 (the input of :func:`difficulty_buckets`), a (P,) tensor."""
    ro = evaluate_task(model, task, list(problems), n_samples=n, max_new_tokens=max_new_tokens,
                       generator=generator)["rollout"]
    return (ro.rewards.reshape(len(problems), n) == CORRECT).float().mean(1)


def finetune_step(model, optimizer: torch.optim.Optimizer, batch: Sequence[tuple[Problem, str]], alpha: float,
                  grad_clip: float | None = 1.0) -> float:
    """(R6) One fine-tuning step on ``(problem, demonstration)`` pairs: the prompt is kept and the response
    replaced by the demonstration (which ends with the stop symbol); loss on the demonstration's tokens only."""
    device = module_device(model)
    x, y, mask = (t.to(device) for t in sft_batch([p for p, _ in batch], [d for _, d in batch]))
    loss = sft_objective(model, x, y, mask, alpha)                                         # (R6) L_FT
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def relift_hook(model, optimizer: torch.optim.Optimizer, buffer: HardestBuffer, demo: Callable[[Problem], str],
                alpha: float = 1e-4, grad_clip: float | None = 1.0, epochs: int = 1,
                trigger: str = "buffer") -> Callable:
    """An ``on_rollout`` hook for :func:`rwlib.rl.train_grpo` that makes it ReLIFT.

    For each scored rollout: buffer its hardest questions (R4, R5); when the buffer holds ``M`` or more, take
    one fine-tuning step on the newest ``M`` with ``optimizer`` (separate from the RL optimizer) (R6). The hook
    runs before the RL update of the same rollout, so after a fine-tuning step it recomputes the rollout's old
    log-probabilities with the updated model, as verl does before every update; the RL ratio then starts at 1.
    ``trigger="every-step"`` is the paper's ablation that fine-tunes after every RL step on whatever the buffer
    holds (up to the newest ``M``). Returns metrics: ``demos_used`` (so far), ``buffer`` (size), ``hardest`` (this rollout), ``sft_steps``."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; valid: {', '.join(TRIGGERS)}")
    every = trigger == "every-step"
    state = {"steps": 0}

    def hook(rollout) -> dict:
        rewards = rollout.rewards.reshape(-1, rollout.group_size)
        n_new = buffer.add(rollout.problems, rewards, demo)                                # (R4), (R5)
        out = {"hardest": float(n_new)}
        if buffer.ready() or (every and len(buffer)):                                      # (R6) N >= M
            batch = buffer.pop_batch(partial=every)
            for _ in range(epochs):                                                        # sft_epochs
                out["sft_loss"] = finetune_step(model, optimizer, batch, alpha, grad_clip)
                state["steps"] += 1
            with eval_mode(model), torch.no_grad():
                rollout.logp_old, _ = sequence_logprobs(model, rollout.tokens, rollout.prompt_len, False)
        out.update(demos_used=float(buffer.used), buffer=float(len(buffer)), sft_steps=float(state["steps"]))
        return out

    return hook


ABLATIONS = {"ReLIFT": {}, "random buffer": {"select": "random"}, "SFT every step": {"trigger": "every-step"}}


def arm_hook(arm: str, model, M: int, epochs: int, generator: torch.Generator, lr: float = 1e-3,
             alpha: float = 1e-4) -> tuple[HardestBuffer, Callable | None]:
    """The buffer and the ``on_rollout`` hook of ReLIFT or one of its ablations (a key of :data:`ABLATIONS`),
    with its own AdamW fine-tuning optimizer (R6); any other arm name gets an empty buffer and no hook (RL
    alone). ``generator`` draws the random buffer's questions."""
    sw = ABLATIONS.get(arm)
    buffer = HardestBuffer(M, (sw or {}).get("select", "hardest"), generator)
    if sw is None:
        return buffer, None
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return buffer, relift_hook(model, opt, buffer, compact_scratchpad, alpha=alpha, epochs=epochs,
                               trigger=sw.get("trigger", "buffer"))


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


def zero_rl_base(seed: int, steps: int, tokens: int, device=None) -> torch.nn.Module:
    """The chapter's "zero-RL" base (eval mode): a one-layer TinyGPT trained for ``steps`` on direct answers of
    one-digit sums only, with room for answers of ``tokens`` tokens; initialised and batched from the named
    streams of ``seed``."""
    with seeded(stream_seed(seed, "init")):
        model = TinyGPT(TOKENIZER.vocab_size, 6 + tokens + 2, n_layer=1, n_embd=64, n_head=4)
    opt = torch.optim.AdamW(model.to(device).parameters(), lr=6e-3)
    sft_train(model, opt, AdditionTask(1, 1, width=2), steps, 32, stream(seed, "base"),
              scheduler=cosine_lr(opt, steps, 0.5))
    return model.eval()


def make_pool(n_easy: int, n_hard: int, generator: torch.Generator) -> list[Problem]:
    """The training questions (operands zero-padded to two digits): ``n_easy`` distinct one-digit additions (the
    base model's range) and ``n_hard`` distinct two-digit additions whose sum has three digits (an answer length
    the base never produces), drawn with ``generator``."""
    if not (0 <= n_easy <= 100 and 0 <= n_hard <= 1000):
        raise ValueError(f"bad pool sizes n_easy={n_easy} (0..100), n_hard={n_hard} (0..1000)")
    task = AdditionTask(1, 2, width=2)
    g = generator
    easy = [task.make(a, b) for a, b in (divmod(int(i), 10) for i in torch.randperm(100, generator=g)[:n_easy])]
    hard, seen = [], set()
    while len(hard) < n_hard:
        a, b = (int(v) for v in torch.randint(10, 100, (2,), generator=g))
        if a + b >= 100 and (a, b) not in seen:
            seen.add((a, b))
            hard.append(task.make(a, b))
    return easy + hard


def make_split(n_easy: int, n_hard: int, test_easy: int, test_hard: int, generator: torch.Generator
               ) -> tuple[list[Problem], list[Problem]]:
    """A training pool as :func:`make_pool` and a held-out pool of questions never seen in training, of the
    same two kinds (``test_easy`` one-digit additions, ``test_hard`` two-digit ones with three-digit sums)."""
    allq = make_pool(n_easy + test_easy, n_hard + test_hard, generator)
    easy, hard = allq[: n_easy + test_easy], allq[n_easy + test_easy:]
    return easy[:n_easy] + hard[:n_hard], easy[n_easy:] + hard[n_hard:]


def bucket_table(acc, base: str = "base") -> pd.DataFrame:
    """Per-question accuracies ``{(arm, seed): (P,) tensor}`` of every arm on one question set, each question
    put in the bucket of the ``base`` arm's accuracy at the same seed: a frame (arm, seed, bucket, accuracy)."""
    if not any(a == base for a, _ in acc):
        raise ValueError(f"no arm {base!r} among {sorted({a for a, _ in acc})}")
    names = {s: difficulty_buckets(v) for (a, s), v in acc.items() if a == base}
    return pd.concat([pd.DataFrame({"arm": a, "seed": s, "bucket": names[s], "accuracy": v.numpy()})
                      for (a, s), v in acc.items()], ignore_index=True)


def bucket_means(table: pd.DataFrame, arm: str, keep: Sequence[str] = BUCKETS) -> list[float]:
    """Per seed (in order): the mean accuracy of ``arm`` over the questions of the ``keep`` buckets (nan for a
    seed without such questions)."""
    bad = [b for b in keep if b not in BUCKETS]
    if bad or arm not in set(table.arm):
        raise ValueError(f"bad arm {arm!r} or buckets {bad}; valid arms: {sorted(set(table.arm))}, "
                         f"buckets: {', '.join(BUCKETS)}")
    t = table[(table.arm == arm) & table.bucket.isin(list(keep))]
    return [float(t.accuracy[t.seed == s].mean()) for s in sorted(set(table.seed))]


def measure(model, task, sets: dict, generator: Callable[[str], torch.Generator] | None, max_new_tokens: int
            ) -> dict:
    """For each question set ``{prefix: problems}``: greedy ``accuracy``, greedy accuracy on the one-digit
    (``easy``) and on the two-digit questions (``hardest``), mean greedy ``length``, and, unless ``generator`` is
    None, each question's accuracy over 8 sampled answers (``acc``, a tensor, with ``generator(prefix)``), the
    keys prefixed."""
    out = {}
    for pre, qs in sets.items():
        e = evaluate_task(model, task, qs, temperature=0, max_new_tokens=max_new_tokens)
        out.update({pre + "accuracy": e["pass@1"], pre + "easy": e.get("acc_d1", float("nan")),
                    pre + "hardest": e.get("acc_d2", float("nan")),
                    pre + "length": e["length"]})
        if generator is not None:
            out[pre + "acc"] = question_accuracy(model, task, qs, generator(pre), max_new_tokens=max_new_tokens)
    return out
