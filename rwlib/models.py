"""Small models shared by the chapters.

- :class:`MLP` -- fully connected, optional BatchNorm after each hidden linear layer.
- :class:`SmallCNN` -- two convolutions and a hidden linear layer, for 8x8 images (``dim=2``) or 1-D signals
  (``dim=1``); with ``bn=True`` every conv/linear weight before the head is followed by BatchNorm and is
  therefore *scale-invariant* (the loss does not change when the weight is multiplied by c > 0).

Both expose ``features(x)`` (the representation before the head) and ``head`` (the last linear layer).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for a block and restore its previous mode afterwards, even on an exception."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (``cpu`` for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...] | list[int], out_features: int,
                 bn: bool = False, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers.append(nn.Linear(d, h, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation())
            d = h
        self.body = nn.Sequential(nn.Flatten(), *layers)
        self.head = nn.Linear(d, out_features)
        self.feat_dim = d

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """conv(c->w1) -> [BN] -> ReLU -> conv(w1->w2) -> [BN] -> ReLU -> maxpool(2) -> linear(->feat_dim) -> [BN]
    -> ReLU, then the head linear(feat_dim -> n_classes).

    ``in_shape`` is (C, H, W) for images or (C, L) for signals; it fixes the flattened size.
    """

    def __init__(self, in_shape: tuple[int, ...], n_classes: int, widths: tuple[int, int] = (32, 64),
                 feat_dim: int = 128, bn: bool = True):
        super().__init__()
        dim = len(in_shape) - 1
        if dim not in (1, 2):
            raise ValueError(f"bad in_shape {in_shape}: expected (C, L) or (C, H, W)")
        Conv = nn.Conv1d if dim == 1 else nn.Conv2d
        Norm = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        Pool = nn.MaxPool1d if dim == 1 else nn.MaxPool2d
        c, w1, w2 = in_shape[0], widths[0], widths[1]

        def block(cin, cout):
            return [Conv(cin, cout, 3, padding=1, bias=not bn)] + ([Norm(cout)] if bn else []) + [nn.ReLU()]

        flat = w2 * math.prod(s // 2 for s in in_shape[1:])
        self.body = nn.Sequential(
            *block(c, w1), *block(w1, w2), Pool(2), nn.Flatten(),
            nn.Linear(flat, feat_dim, bias=not bn), *([nn.BatchNorm1d(feat_dim)] if bn else []), nn.ReLU(),
        )
        self.head = nn.Linear(feat_dim, n_classes)
        self.feat_dim = feat_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- TinyGPT
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small causal transformer (pre-LayerNorm, learned positions, tied input/output embeddings) that trains on
    a CPU in seconds.

    - ``forward(idx)`` -> logits (B, T, vocab).
    - ``per_sample_loss(idx, targets, mask=None)`` -> ``(ell, n)``: each sequence's mean token cross-entropy over
      its unmasked targets, and that token count. This is what sample-reweighting chapters weight.
    - ``generate(idx, max_new_tokens, temperature, top_k, generator)`` samples a batch of continuations.
    """

    def __init__(self, vocab_size: int, block_size: int = 64, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                 dropout: float = 0.0, tie_weights: bool = True):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_embd=n_embd,
                           n_head=n_head, dropout=dropout, tie_weights=tie_weights)
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every target token, shape (B, T)."""
        logits = self(idx)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"
                                                 ).view(targets.shape)

    def per_sample_loss(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
        """``(ell, n)``: mean token loss of each sequence over ``mask`` (all tokens by default) and token counts."""
        tok = self.token_losses(idx, targets)
        if mask is None:
            n = torch.full((tok.shape[0],), tok.shape[1], dtype=tok.dtype, device=tok.device)
            return tok.mean(1), n
        mask = mask.to(tok.dtype)
        n = mask.sum(1)
        return (tok * mask).sum(1) / n.clamp_min(1.0), n

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after each row of ``idx`` (batched); ``temperature=0`` is greedy."""
        if temperature < 0:
            raise ValueError(f"bad temperature {temperature}: expected >= 0")
        with eval_mode(self):
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.block_size:])[:, -1, :]
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, -1)
                    if generator is not None and generator.device != probs.device:
                        probs = probs.to(generator.device)  # a CPU generator keeps GPU sampling reproducible
                    nxt = torch.multinomial(probs, 1, generator=generator).to(idx.device)
                idx = torch.cat([idx, nxt], dim=1)
        return idx
