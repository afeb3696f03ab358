"""Adapters for fine-tuning pretrained weights: wrap selected linear layers of any model (rwlib's or a
Hugging Face one) with a trainable adapter, merge it into the base weight and take it out again.

- :class:`LoRALinear` -- ``y = W x + b + (alpha / r) B A x`` with ``A`` (r x in) and ``B`` (out x r)
  (Hu et al., 2021). ``init="lora"``: A Kaiming-uniform, B = 0 (as ``peft``); ``init="pissa"``: A and B from the
  top-r singular triplets of W, ``B A = U_r S_r V_r^T`` scaled by ``r / alpha``, and the residual
  ``W_res = W - (alpha / r) B A`` replaces the frozen weight (Meng et al., 2024, PiSSA).
- Bone and its Bat variant (chapter 19) live in :mod:`rwlib.methods.bone` and use the same protocol.

Every adapter layer has ``delta_weight()``, ``merge()``, ``unmerge()`` and ``trainable_parameters()``.
:func:`wrap_linears` replaces matching ``nn.Linear`` modules in place and freezes everything else.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn


class AdapterLinear(nn.Module):
    """Base class: holds the frozen ``base`` linear layer; subclasses define ``delta_weight()``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"can only adapt nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output (default: through the dense delta weight)."""
        return nn.functional.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.merged else y + self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("adapter is already merged")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]


class LoRALinear(AdapterLinear):
    INITS = ("lora", "pissa", "zeros")

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, init: str = "lora"):
        super().__init__(base)
        if init not in self.INITS:
            raise ValueError(f"unknown LoRA init {init!r}; valid: {', '.join(self.INITS)}")
        if not 1 <= r <= min(base.in_features, base.out_features):
            raise ValueError(f"bad rank r={r}: need 1 <= r <= {min(base.in_features, base.out_features)}")
        self.r, self.alpha = r, float(alpha if alpha is not None else r)
        self.scaling = self.alpha / r
        w = base.weight
        self.A = nn.Parameter(torch.zeros(r, base.in_features, dtype=w.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        if init == "lora":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        elif init == "pissa":
            with torch.no_grad():
                U, S, Vh = torch.linalg.svd(w.detach(), full_matrices=False)
                s = S[:r].sqrt() / math.sqrt(self.scaling)
                self.A.copy_(s[:, None] * Vh[:r])          # A = sqrt(S_r) V_r^T / sqrt(scaling)
                self.B.copy_(U[:, :r] * s[None, :])        # B = U_r sqrt(S_r) / sqrt(scaling)
                base.weight -= self.scaling * self.B @ self.A  # W_res = W - scaling * B A

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.B @ self.A

    def adapter_forward(self, x):
        return self.scaling * nn.functional.linear(nn.functional.linear(x, self.A), self.B)


def wrap_linears(model: nn.Module, factory: Callable[[nn.Linear], AdapterLinear],
                 target: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, AdapterLinear]:
    """Freeze ``model`` and replace every ``nn.Linear`` for which ``target(name, module)`` is true (default: all)
    by ``factory(module)``. Returns the adapters by qualified name. Tied weights are never wrapped twice."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, AdapterLinear)
              and (target is None or target(n, m))]
    if not chosen:
        raise ValueError("no nn.Linear matched the target")
    out = {}
    for name, mod in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = factory(mod)
        setattr(parent, attr, adapter)
        out[name] = adapter
    return out


def adapters(model: nn.Module) -> dict[str, AdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def merge_all(model: nn.Module) -> None:
    for a in adapters(model).values():
        a.merge()


def unmerge_all(model: nn.Module) -> None:
    for a in adapters(model).values():
        a.unmerge()


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every adapter in ``model`` (what an optimizer of a PEFT run receives)."""
    return [p for a in adapters(model).values() for p in a.trainable_parameters()]


def trainable_copy(base: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """Full fine-tuning's starting point: a deep copy of ``base`` in train mode with every parameter trainable,
    and the list of those parameters. ``base`` itself is left untouched."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, list(model.parameters())


def lora_copy(base: nn.Module, rank: int, *, init: str = "lora", alpha: float | None = None, seed: int = 0,
              target: Callable[[str, nn.Linear], bool] | None = None) -> tuple[nn.Module, list[nn.Parameter]]:
    """A deep copy of ``base`` in train mode with ``LoRALinear(rank, alpha, init)`` on the linears selected by
    ``target`` (default: :func:`block_linears`); ``alpha`` defaults to ``2 * rank``. LoRA's random ``A`` is drawn
    under ``seed`` without touching the global random state. Returns the model and the adapters' parameters."""
    model = copy.deepcopy(base).train()
    alpha = 2 * rank if alpha is None else alpha
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wrap_linears(model, lambda m: LoRALinear(m, rank, alpha=alpha, init=init), target or block_linears)
    return model, adapter_parameters(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def block_linears(name: str, module: nn.Linear) -> bool:
    """Target for TinyGPT: the attention and MLP linears of the transformer blocks (not the tied head)."""
    return name.startswith("blocks.")
