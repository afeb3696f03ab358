"""Weak and strong views of small images (N, C, H, W) and 1-D signals (N, C, L), batched on tensors.

Weak view: a random shift by at most ``shift`` pixels (zero padding, then a random crop back).
Strong view: the weak shift, a random erased patch, Gaussian noise, a random intensity scale, and a
second shift -- a CPU-sized stand-in for RandAugment on 8x8 digits and length-40 signals.

Everything draws from the ``torch.Generator`` passed in, so a seed fixes the augmentation stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    if shift <= 0:
        return x
    n = x.shape[0]
    spatial = x.shape[2:]
    pad = [shift, shift] * len(spatial)
    xp = F.pad(x, pad)
    # one random offset in [0, 2*shift] per sample and spatial axis; gather the crop with index arithmetic
    off = torch.randint(0, 2 * shift + 1, (n, len(spatial)), generator=g)
    if len(spatial) == 1:
        (L,) = spatial
        cols = off[:, 0:1] + torch.arange(L)  # (n, L)
        return torch.gather(xp, 2, cols[:, None, :].expand(-1, x.shape[1], -1))
    H, W = spatial
    rows = (off[:, 0:1] + torch.arange(H))[:, :, None]  # (n, H, 1)
    cols = (off[:, 1:2] + torch.arange(W))[:, None, :]  # (n, 1, W)
    out = xp[torch.arange(n)[:, None, None], :, rows, cols]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _erase(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    if size <= 0:
        return x
    n = x.shape[0]
    spatial = x.shape[2:]
    mask = torch.ones((n, 1) + tuple(spatial))
    starts = [torch.randint(0, s - size + 1, (n,), generator=g) for s in spatial]
    grids = [torch.arange(s) for s in spatial]
    inside = torch.ones((n,) + tuple(spatial), dtype=torch.bool)
    for axis, (st, gr) in enumerate(zip(starts, grids)):
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = len(gr)
        sel = (gr[None, :] >= st[:, None]) & (gr[None, :] < st[:, None] + size)
        inside = inside & sel.reshape(shape)
    mask[:, 0][inside] = 0.0
    return x * mask


def weak_view(x: torch.Tensor, g: torch.Generator, shift: int = 1) -> torch.Tensor:
    """Random shift by up to ``shift`` pixels/steps."""
    return _shift(x, shift, g)


def strong_view(x: torch.Tensor, g: torch.Generator, *, shift: int = 1, erase: int = 3, noise: float = 0.1,
                scale: tuple[float, float] = (0.7, 1.3)) -> torch.Tensor:
    """Shift, erase an ``erase``-sized patch, add N(0, noise^2) noise, scale intensity in ``scale``, shift."""
    x = _shift(x, shift, g)
    x = _erase(x, erase, g)
    x = x + noise * torch.randn(x.shape, generator=g)
    lo, hi = scale
    s = lo + (hi - lo) * torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=g)
    x = x * s
    return _shift(x, shift, g)
