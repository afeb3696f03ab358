"""Verifiable text tasks for supervised fine-tuning and RL with verifiable rewards (chapters 12-18).

Every task makes :class:`Problem` s with a prompt, one reference completion, a difficulty bucket, and a strict
verifier that tells a correct answer (reward 1), a wrong answer (0) and a format error (-1) apart.
Completions end with ``;`` (the stop symbol). Prompts of one task all have the same length (operands are
zero-padded to the task's widest number), so a batch of prompts needs no padding and TinyGPT's learned
positions mean the same thing in every row.

- :class:`AdditionTask` -- ``"00057+00068="`` -> ``"125;"`` (``style="direct"``) or a carry scratchpad,
  least significant digit first, then the answer: ``"7+8+0=15,5+6+1=12,0+0+1=1|125;"``
  (``style="scratchpad"``).
- :class:`SumToTask` -- many correct answers: ``"S037="`` -> any ``"a+b;"`` with a + b = 37 and a, b >= 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .text import TOKENIZER

CORRECT, WRONG, FORMAT_ERROR = 1.0, 0.0, -1.0
STOP = ";"


@dataclass(frozen=True)
class Problem:
    prompt: str
    target: str      # one correct completion, stop symbol included
    answer: int
    difficulty: int  # bucket, e.g. the number of digits of the larger operand


def _answer_text(completion: str) -> str | None:
    """The answer part of a completion: the text before the first stop symbol, after the last ``|``."""
    if STOP not in completion:
        return None
    body = completion.split(STOP, 1)[0]
    return body.rsplit("|", 1)[-1]


def _verify_number(problem: Problem, completion: str) -> float:
    """A completion whose answer part is the problem's number (1), another number (0), or no number (-1)."""
    ans = _answer_text(completion)
    if ans is None or not re.fullmatch(r"\d+", ans):
        return FORMAT_ERROR
    return CORRECT if int(ans) == problem.answer else WRONG


class AdditionTask:
    """a + b with ``min_digits``..``max_digits``-digit operands; difficulty = digits of the larger operand."""

    STYLES = ("direct", "scratchpad")

    def __init__(self, min_digits: int = 1, max_digits: int = 3, style: str = "direct", width: int | None = None):
        if style not in self.STYLES:
            raise ValueError(f"unknown style {style!r}; valid: {', '.join(self.STYLES)}")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"bad digits {min_digits}..{max_digits}: need 1 <= min_digits <= max_digits")
        self.min_digits, self.max_digits, self.style = min_digits, max_digits, style
        self.width = width or max_digits
        if self.width < max_digits:
            raise ValueError(f"width {self.width} < max_digits {max_digits}")
        self.prompt_len = 2 * self.width + 2

    def make(self, a: int, b: int) -> Problem:
        prompt = f"{a:0{self.width}d}+{b:0{self.width}d}="
        s = a + b
        if self.style == "direct":
            target = f"{s}{STOP}"
        else:
            da, db = str(a)[::-1], str(b)[::-1]
            n = max(len(da), len(db))
            steps, carry = [], 0
            for i in range(n):
                x = int(da[i]) if i < len(da) else 0
                y = int(db[i]) if i < len(db) else 0
                t = x + y + carry
                steps.append(f"{x}+{y}+{carry}={t}")
                carry = t // 10
            target = ",".join(steps) + f"|{s}{STOP}"
        return Problem(prompt, target, s, max(len(str(a)), len(str(b))))

    def sample(self, n: int, generator: torch.Generator, digits: int | None = None) -> list[Problem]:
        """``n`` problems; the digit count of the larger operand is uniform over the task's range (or ``digits``)."""
        lo, hi = (digits, digits) if digits is not None else (self.min_digits, self.max_digits)
        nd = torch.randint(lo, hi + 1, (n,), generator=generator)
        out = []
        for d in nd.tolist():
            top = 10 ** d - 1
            bottom = 10 ** (d - 1) if d > 1 else 0
            a = int(torch.randint(bottom, top + 1, (1,), generator=generator))
            b = int(torch.randint(0, top + 1, (1,), generator=generator))
            if torch.rand((), generator=generator) < 0.5:
                a, b = b, a
            out.append(self.make(a, b))
        return out

    def verify(self, problem: Problem, completion: str) -> float:
        return _verify_number(problem, completion)


class SumToTask:
    """"Write two positive numbers that sum to N": many correct completions, so diversity is measurable."""

    def __init__(self, low: int = 10, high: int = 99):
        if not 2 <= low <= high:
            raise ValueError(f"bad range {low}..{high}: need 2 <= low <= high")
        self.low, self.high = low, high
        self.width = len(str(high))
        self.prompt_len = self.width + 2

    def make(self, n: int, a: int | None = None) -> Problem:
        a = a if a is not None else n // 2
        return Problem(f"S{n:0{self.width}d}=", f"{a}+{n - a}{STOP}", n, len(str(n)))

    def sample(self, n: int, generator: torch.Generator) -> list[Problem]:
        ns = torch.randint(self.low, self.high + 1, (n,), generator=generator).tolist()
        return [self.make(k, int(torch.randint(1, k, (1,), generator=generator))) for k in ns]

    def verify(self, problem: Problem, completion: str) -> float:
        ans = _answer_text(completion)
        if ans is None:
            return FORMAT_ERROR
        m = re.fullmatch(r"(\d+)\+(\d+)", ans)
        if not m:
            return FORMAT_ERROR
        a, b = int(m.group(1)), int(m.group(2))
        return CORRECT if a >= 1 and b >= 1 and a + b == problem.answer else WRONG


def noisy_answers(task, noise: float):
    """A ``problem_fn`` (``fn(n, generator) -> problems``) drawing from an integer-answer ``task`` whose reference
    answer gets a wrong last digit with probability ``noise``: fine-tuned on it, a policy stays uncertain (a
    warm start with entropy left for RL to remove). The verifier still checks the true ``answer``."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"bad noise={noise}: valid 0 <= noise < 1")

    def fn(n: int, generator: torch.Generator) -> list[Problem]:
        out = []
        for p in task.sample(n, generator):
            if float(torch.rand((), generator=generator)) < noise:
                ans = str(p.answer)
                wrong = (int(ans[-1]) + int(torch.randint(1, 10, (1,), generator=generator))) % 10
                p = Problem(p.prompt, ans[:-1] + str(wrong) + STOP, p.answer, p.difficulty)
            out.append(p)
        return out

    return fn


def encode_prompts(problems: list[Problem]) -> torch.Tensor:
    """(P, prompt_len) token ids; all prompts of a task have the same length."""
    lens = {len(p.prompt) for p in problems}
    if len(lens) != 1:
        raise ValueError(f"prompts of different lengths {sorted(lens)}: build them from one task")
    return torch.stack([TOKENIZER.encode(p.prompt) for p in problems])


def split_problems(problems: list[Problem], n_train: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """``problems`` shuffled with ``seed`` and split into ``n_train`` training problems and the held-out rest."""
    if not 1 <= n_train < len(problems):
        raise ValueError(f"bad n_train {n_train}: expected 1..{len(problems) - 1} ({len(problems)} problems)")
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    return [problems[i] for i in order[:n_train]], [problems[i] for i in order[n_train:]]


def sft_batch(problems: list[Problem], completions: list[str] | None = None, block: int | None = None):
    """Token windows for supervised fine-tuning on ``prompt + completion`` (the reference by default).

    Returns ``(x, y, mask)``: inputs, next-token targets and a mask that is 1 on completion tokens only, all
    right-padded with the stop symbol to the longest example (or ``block``)."""
    completions = completions if completions is not None else [p.target for p in problems]
    seqs = [TOKENIZER.encode(p.prompt + c) for p, c in zip(problems, completions)]
    L = max(len(s) for s in seqs)
    if block is not None:
        if L > block + 1:
            raise ValueError(f"an example has {L} tokens, more than block + 1 = {block + 1}")
        L = block + 1
    pad = int(TOKENIZER.encode(STOP)[0])
    toks = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    for i, (s, p) in enumerate(zip(seqs, problems)):
        toks[i, :len(s)] = s
        mask[i, len(p.prompt) - 1:len(s) - 1] = 1.0
    return toks[:, :-1], toks[:, 1:], mask


class MultiplyTask:
    """``"m37x8="`` -> ``"296;"``: a two-digit by one-digit product in a prompt format the source domains never
    show (a new skill for fine-tuning chapters 19-27). Difficulty = digits of the product."""

    def __init__(self, low: int = 10, high: int = 99):
        if not 1 <= low <= high:
            raise ValueError(f"bad range {low}..{high}: need 1 <= low <= high")
        self.low, self.high = low, high
        self.width = len(str(high))
        self.prompt_len = self.width + 4

    def make(self, a: int, b: int) -> Problem:
        return Problem(f"m{a:0{self.width}d}x{b}=", f"{a * b}{STOP}", a * b, len(str(a * b)))

    def all_problems(self) -> list[Problem]:
        """Every distinct problem: operands ``low..high`` times ``2..9``, in that order."""
        return [self.make(a, b) for a in range(self.low, self.high + 1) for b in range(2, 10)]

    def sample(self, n: int, generator: torch.Generator) -> list[Problem]:
        a = torch.randint(self.low, self.high + 1, (n,), generator=generator).tolist()
        b = torch.randint(2, 10, (n,), generator=generator).tolist()
        return [self.make(x, y) for x, y in zip(a, b)]

    def verify(self, problem: Problem, completion: str) -> float:
        return _verify_number(problem, completion)
