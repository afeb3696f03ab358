"""Small models shared by the chapters.

- :class:`MLP` -- fully connected, optional BatchNorm after each hidden linear layer.
- :class:`SmallCNN` -- two convolutions and a hidden linear layer, for 8x8 images (``dim=2``) or 1-D signals
  (``dim=1``); with ``bn=True`` every conv/linear weight before the head is followed by BatchNorm and is
  therefore *scale-invariant* (the loss does not change when the weight is multiplied by c > 0).

Both expose ``features(x)`` (the representation before the head) and ``head`` (the last linear layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
