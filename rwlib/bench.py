"""Benchmarks (not tests): ``python -m rwlib.bench`` measures TinyGPT's training throughput against the same
architecture written plainly with ``torch.nn.TransformerEncoderLayer`` and writes the result, with its
provenance, to ``data/results/tinygpt_throughput.json``.

Speed targets live here and in recorded figures, never in timed unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import write_json_atomic
from .models import TinyGPT


class PlainGPT(nn.Module):
    """The TinyGPT architecture from stock parts: ``nn.TransformerEncoderLayer`` (pre-norm, GELU, 4x MLP) with a
    causal mask, learned positions and tied embeddings. Same parameter count as :class:`rwlib.models.TinyGPT`."""

    def __init__(self, vocab_size: int, block_size: int = 64, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        T = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T))
        return self.lm_head(self.ln_f(self.encoder(x, mask=mask, is_causal=True)))


def train_throughput(model: nn.Module, batch: int, block: int, steps: int = 30, warmup: int = 5,
                     vocab: int = 97) -> float:
    """Tokens per second of full training steps (forward, backward, AdamW step) on random tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=g)
    y = torch.randint(0, vocab, (batch, block), generator=g)

    def step():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * block * steps / (time.perf_counter() - t0)


def tinygpt_benchmark(configs=((16, 32, 2, 64), (32, 64, 2, 64), (32, 128, 4, 128)), threads: int = 1,
                      repeats: int = 3) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for batch, block, layers, width in configs:
        res = {}
        for name, cls in (("TinyGPT", TinyGPT), ("TransformerEncoderLayer", PlainGPT)):
            torch.manual_seed(0)
            m = cls(97, block, layers, width, 4)
            res[name] = max(train_throughput(m, batch, block) for _ in range(repeats))
        rows.append({"batch": batch, "block": block, "n_layer": layers, "n_embd": width,
                     "tinygpt_tok_s": round(res["TinyGPT"]), "plain_tok_s": round(res["TransformerEncoderLayer"]),
                     "speedup": round(res["TinyGPT"] / res["TransformerEncoderLayer"], 3)})
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = ""
    return {"benchmark": "TinyGPT training throughput vs nn.TransformerEncoderLayer", "threads": threads,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "git": rev, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwlib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data/results/tinygpt_throughput.json"))
    args = p.parse_args(argv)
    result = tinygpt_benchmark(threads=args.threads)
    for r in result["rows"]:
        print(f"B={r['batch']:<3} T={r['block']:<4} layers={r['n_layer']} d={r['n_embd']:<4} "
              f"TinyGPT {r['tinygpt_tok_s']:>8} tok/s   TransformerEncoderLayer {r['plain_tok_s']:>8} tok/s   "
              f"x{r['speedup']}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
