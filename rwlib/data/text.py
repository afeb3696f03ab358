"""Text for the language-model chapters, made or found offline.

- :class:`CharTokenizer` -- a fixed character vocabulary (printable ASCII, newline, and an "unknown" symbol),
  so every corpus maps to the same 97 token ids and a model trained on one domain can read another.
- Domain generators, each a deterministic function of ``(n_chars, seed)`` returning a string:

  ============  =====================================================================================
  ``code``      Python source of standard-library modules (real text every Python install ships)
  ``prose``     docstrings of those modules (English-like real text)
  ``grammar``   a probabilistic grammar of bracketed arithmetic expressions: ``(3*(4+1))-2;``
  ``addition``  verifiable multi-digit additions: ``123+45=168;``
  ``multiply``  multiplication-table facts: ``7*8=56;``
  ``repeat``    a handful of short phrases repeated over and over (redundant, learned in a few steps)
  ``noise``     uniformly random characters (unlearnable: its loss stays near log 97)
  ============  =====================================================================================

- :func:`multidomain_corpus` builds several domains with per-domain train/validation splits (as token
  tensors); :class:`DomainSampler` draws training windows with settable mixture weights.
"""

from __future__ import annotations

import ast
import functools
import random
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

STDLIB_MODULES = (
    "argparse", "ast", "bisect", "calendar", "collections/__init__", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fractions", "functools", "glob", "gzip", "heapq", "inspect", "json/__init__",
    "json/decoder", "logging/__init__", "operator", "pathlib", "pprint", "queue", "random", "shutil", "statistics",
    "string", "tarfile", "textwrap", "threading", "tokenize", "typing", "uuid", "zipfile",
)


class CharTokenizer:
    """Characters <-> ids over a fixed vocabulary: ``\\n`` and the 95 printable ASCII characters, plus ``UNK``
    (id 96, decoded as ``"?"``) for anything else (tabs become four spaces first)."""

    def __init__(self):
        self.chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.unk = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        text = text.replace("\t", "    ")
        return torch.tensor([self.stoi.get(c, self.unk) for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return "".join(self.chars[i] if 0 <= i < self.unk else "?" for i in ids)


TOKENIZER = CharTokenizer()


# ---------------------------------------------------------------------------------------------- generators
def _stdlib_sources() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if path.exists():
            out.append((name, path.read_text(encoding="utf-8", errors="replace")))
    if not out:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return out


def _take(chunks: list[str], n_chars: int, seed: int) -> str:
    """Concatenate ``chunks`` in a seeded order until ``n_chars`` characters, cycling when needed."""
    rng = random.Random(seed)
    order = list(range(len(chunks)))
    out, total = [], 0
    while total < n_chars:
        rng.shuffle(order)
        for i in order:
            out.append(chunks[i])
            total += len(chunks[i])
            if total >= n_chars:
                break
    return "".join(out)[:n_chars]


def gen_code(n_chars: int, seed: int = 0) -> str:
    """Standard-library source, cut into top-level definitions, shuffled with ``seed``."""
    return _take(list(_code_chunks()), n_chars, seed)


@functools.lru_cache(maxsize=None)
def _code_chunks() -> tuple[str, ...]:
    chunks = []
    for _, src in _stdlib_sources():
        lines = src.splitlines(keepends=True)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.end_lineno:
                chunks.append("".join(lines[node.lineno - 1:node.end_lineno]) + "\n")
    return tuple(chunks)


def gen_prose(n_chars: int, seed: int = 0) -> str:
    """Docstrings of standard-library modules, classes and functions (English-like text)."""
    return _take(list(_prose_chunks()), n_chars, seed)


@functools.lru_cache(maxsize=None)
def _prose_chunks() -> tuple[str, ...]:
    chunks = []
    for _, src in _stdlib_sources():
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    chunks.append(doc.strip() + "\n\n")
    return tuple(chunks)


def _expr(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.3:
        return str(rng.randint(0, 9))
    op = rng.choice("+-*")
    left, right = _expr(rng, depth - 1), _expr(rng, depth - 1)
    return f"({left}{op}{right})" if rng.random() < 0.6 else f"{left}{op}{right}"


def gen_grammar(n_chars: int, seed: int = 0) -> str:
    """Bracketed arithmetic expressions from a small probabilistic grammar, one per ``;``."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        s = _expr(rng, 4) + ";"
        out.append(s)
        total += len(s)
    return "".join(out)[:n_chars]


def gen_addition(n_chars: int, seed: int = 0, max_digits: int = 3) -> str:
    """Correct additions ``a+b=c;`` with 1..max_digits-digit operands."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        a = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        s = f"{a}+{b}={a + b};"
        out.append(s)
        total += len(s)
    return "".join(out)[:n_chars]


def gen_multiply(n_chars: int, seed: int = 0) -> str:
    """Multiplication-table facts ``a*b=c;`` with a, b in 0..12."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        s = f"{a}*{b}={a * b};"
        out.append(s)
        total += len(s)
    return "".join(out)[:n_chars]


PHRASES = ("the cat sat on the mat. ", "hello world! ", "to be or not to be. ", "one two three four. ",
           "a b c d e f g. ")


def gen_repeat(n_chars: int, seed: int = 0) -> str:
    """A few short phrases repeated in a seeded order: redundant text, learned almost at once."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n_chars:
        s = rng.choice(PHRASES)
        out.append(s)
        total += len(s)
    return "".join(out)[:n_chars]


def gen_noise(n_chars: int, seed: int = 0) -> str:
    """Uniformly random printable characters: nothing to learn."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    return "".join(rng.choice(alphabet) for _ in range(n_chars))


GENERATORS = {"code": gen_code, "prose": gen_prose, "grammar": gen_grammar, "addition": gen_addition,
              "multiply": gen_multiply, "repeat": gen_repeat, "noise": gen_noise}


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Per-domain token tensors: ``train[name]`` and ``val[name]`` (1-D long tensors)."""

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]

    @property
    def domains(self) -> list[str]:
        return list(self.train)

    def to(self, device) -> "Corpus":
        """The same corpus with its token tensors on ``device`` (so a GPU run draws its batches there)."""
        return Corpus({k: v.to(device) for k, v in self.train.items()}, {k: v.to(device) for k, v in self.val.items()})


def multidomain_corpus(domains, n_chars: int = 50_000, val_frac: float = 0.1, seed: int = 0) -> Corpus:
    """Build ``domains`` (names from :data:`GENERATORS`, or a dict name -> n_chars) and split each into a
    leading training part and a trailing validation part (``val_frac``). Deterministic for ``seed``."""
    sizes = dict(domains) if isinstance(domains, dict) else {d: n_chars for d in domains}
    unknown = [d for d in sizes if d not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; valid: {', '.join(GENERATORS)}")
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"bad val_frac {val_frac}: expected 0 < val_frac < 1")
    train, val = {}, {}
    for i, (name, n) in enumerate(sizes.items()):
        ids = TOKENIZER.encode(GENERATORS[name](int(n), seed * 1009 + i))
        cut = int(len(ids) * (1 - val_frac))
        train[name], val[name] = ids[:cut], ids[cut:]
    return Corpus(train, val)


class DomainSampler:
    """Random training windows from several domains with settable mixture weights.

    ``batch(batch_size, block)`` returns ``(x, y, domain)``: inputs (B, block), next-token targets (B, block)
    and the domain index of each row. The number of rows per domain is multinomial in the weights.
    """

    def __init__(self, tokens: dict[str, torch.Tensor], weights=None, generator: torch.Generator | None = None):
        self.names = list(tokens)
        self.tokens = [tokens[n] for n in self.names]
        self.g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.set_weights(weights if weights is not None else [1.0] * len(self.names))

    def set_weights(self, weights) -> None:
        if isinstance(weights, dict):
            missing = set(weights) - set(self.names)
            if missing:
                raise ValueError(f"unknown domain(s) {sorted(missing)}; valid: {', '.join(self.names)}")
            weights = [weights.get(n, 0.0) for n in self.names]
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (len(self.names),) or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"bad mixture weights {list(map(float, w.flatten()))}: need {len(self.names)} "
                             f"non-negative numbers with a positive sum, one per domain {self.names}")
        self.weights = w / w.sum()

    def batch(self, batch_size: int, block: int):
        dom = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.g)
        xs, ys = [], []
        for d in range(len(self.names)):
            k = int((dom == d).sum())
            if k == 0:
                continue
            t = self.tokens[d]
            if len(t) <= block + 1:
                raise ValueError(f"domain {self.names[d]!r} has {len(t)} tokens, too few for block {block}")
            start = torch.randint(0, len(t) - block - 1, (k,), generator=self.g)
            win = t[start[:, None] + torch.arange(block + 1)]
            xs.append(win[:, :-1])
            ys.append(win[:, 1:])
        order = torch.argsort(dom, stable=True)
        x, y = torch.cat(xs), torch.cat(ys)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        return x[inv], y[inv], dom


def eval_windows(tokens: torch.Tensor, block: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced, fixed validation windows (inputs, targets) of a domain: the same every call."""
    if len(tokens) <= block + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for block {block}")
    starts = torch.linspace(0, len(tokens) - block - 1, n).long()
    win = tokens[starts[:, None] + torch.arange(block + 1)]
    return win[:, :-1], win[:, 1:]
