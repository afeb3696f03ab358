r"""Bone: block affine adaptation of a frozen weight, with and without the "Weight Guide".

Reference
---------
Jiale Kang. "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language
Models." arXiv:2409.15371 (v1-v3, Sep-Oct 2024; later versions of the same id are retitled "Bone: Block-Affine
Adaptation of Large Language Models", "DiSHA" and "MiSS"). Official code: github.com/JL-er/Bone
(``llama-demo/boneLinear.py``, class ``BoneLinear`` "Bone-col"); also in Hugging Face ``peft`` as
``MissConfig(init_weights="bat")`` (the v1-v3 method) and ``MissConfig(init_weights=True)`` (the later,
weight-free Bone). This module re-implements both for this book; it does not reuse the official source.

Notation: a frozen linear layer ``y = W x + b`` with ``W`` of shape (out, in) (PyTorch layout), a block size
``r``, and ``W_{a,c} = W[a r:(a+1) r, c r:(c+1) r]``, the r x r block in output row-block ``a`` and input
column-block ``c``. Every trainable tensor starts at zero, so the adapted layer equals the base layer at step 0.

Key equations (numbers are referred to in the comments of the code below)
-------------------------------------------------------------------------
(B1) Bat = Bone of v1-v3 (W-guided block affine). Needs ``r | out`` and ``r | in``. One trainable r x r matrix
     ``D_a`` per output row-block, shared by every column-block (``block`` of shape (out/r, r, r)):
         ``Delta W_{a,c} = W_{a,c} D_a + D_a = (W_{a,c} + I) D_a``,
         ``y = (W + Delta W) x + b``.
(B2) Bat gradient ("Weight Guide": W shapes the update): with ``G = dL/dW_eff`` (r x r blocks ``G_{a,c}``),
         ``dL/dD_a = sum_c (W_{a,c} + I)^T G_{a,c}``.
(B3) Bat merge ``W' = W + Delta W`` is exactly invertible when every ``I + D_a`` is:
         ``W_{a,c} = (W'_{a,c} - D_a)(I + D_a)^{-1}``.
(B4) Bone = the later, weight-free "shard sharing" (peft's default MiSS). Trainable ``D`` of shape (r, out).
     Zero-pad ``x`` to a multiple of ``r`` and cut it into chunks ``x_c`` of length r:
         ``y = W x + b + D^T sum_c x_c``,
     i.e. ``Delta W = [D^T | D^T | ... | D^T]`` (in/r copies; a last partial copy keeps the first ``in mod r``
     columns), so ``rank(Delta W) <= r``.
(B5) Bone gradient: ``dL/dD[j, o] = sum_c G[o, c r + j]`` -- every entry of D is the sum of in/r weights'
     gradients, so at equal Adam learning rate its function-space step is about in/r times a single weight's.

Bat with W = 0 is Bone: (B1) reduces to ``Delta W_{a,c} = D_a``, the same block in every column shard
(``block_bone[j, a r + i] = block_bat[a, i, j]``); the ``W_{a,c} D_a`` term is what the paper calls the Weight
Guide, and Bone-vs-Bat is the ablation of it.

Bat and Bone register with the fine-tuning kit (:func:`rwlib.finetune.register`, names ``"Bat"`` and ``"Bone"``),
which trains and compares them against LoRA, PiSSA and full fine-tuning at matched trainable parameters
(:func:`rwlib.finetune.compare`). The mechanism measures of chapter 19 stay here: :func:`init_gradients`
(the paper's gradient norm at initialisation), :func:`effective_weights` and :func:`update_structure` (rank,
shared fraction and W-correlation of the learned update), :func:`block_norms`.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from rwlib import finetune
from rwlib.adapters import AdapterLinear, adapter_parameters, adapters, block_linears, merge_all, wrap_linears

__all__ = [
    "MODES", "BoneLinear", "apply_bone", "blocks", "block_norms", "bat_delta", "bone_delta", "bat_block_grad", "bone_block_grad",
    "lora_rank_for", "block_size_for", "bat_builder", "bone_builder", "init_gradients", "effective_weights",
    "update_structure",
]

MODES = ("bat", "bone")


# ----------------------------------------------------------------------------------------------------------
# the maths, as functions of plain tensors
# ----------------------------------------------------------------------------------------------------------
def blocks(W: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r x r`` blocks of ``W`` (out, in) as a tensor indexed ``[a, c, i, j]``: row-block ``a`` (outputs),
    column-block ``c`` (inputs), and the entry ``(i, j)`` inside the block."""
    out, inp = W.shape
    return W.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)


def block_norms(model: nn.Module, r: int) -> torch.Tensor:
    """Spectral norms of every ``r x r`` block of the frozen weights under ``model``'s adapters (flattened)."""
    return torch.cat([torch.linalg.matrix_norm(blocks(a.base.weight.detach(), r), ord=2).flatten()
                      for a in adapters(model).values()])


def bat_delta(W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """(B1) ``Delta W`` of Bat: ``Delta W_{a,c} = W_{a,c} D_a + D_a`` for ``W`` (out, in), ``D`` (out/r, r, r)."""
    A, r, _ = D.shape
    out, inp = W.shape
    rows = W.reshape(A, r * (inp // r), r)                     # row-block a as rows (i, c) of its r x r blocks
    dW = torch.bmm(rows, D).view(A, r, inp // r, r) + D[:, :, None, :]   # (B1) W_{a,c} D_a + D_a, all c at once
    return dW.reshape(out, inp)


def bone_delta(D: torch.Tensor, in_features: int) -> torch.Tensor:
    """(B4) ``Delta W`` of Bone: ``D^T`` (out, r) tiled along the input dimension, cut to ``in_features``."""
    r = D.shape[0]
    return D.t().repeat(1, math.ceil(in_features / r))[:, :in_features]   # (B4) [D^T | D^T | ...]


def bat_block_grad(W: torch.Tensor, G: torch.Tensor, r: int) -> torch.Tensor:
    """(B2) ``dL/dD_a = sum_c (W_{a,c} + I)^T G_{a,c}`` for ``G = dL/dW_eff`` (out, in). Returns (out/r, r, r)."""
    out, inp = W.shape
    W4 = W.reshape(out // r, r, inp // r, r)                               # [a, i, c, j]
    G4 = G.reshape(out // r, r, inp // r, r)                               # [a, i, c, k]
    return torch.einsum("aicj,aick->ajk", W4, G4) + G4.sum(2)              # (B2) sum_c W^T G + sum_c G


def bone_block_grad(G: torch.Tensor, r: int) -> torch.Tensor:
    """(B5) ``dL/dD[j, o] = sum_c G[o, c r + j]`` (the padded columns contribute nothing). Returns (r, out)."""
    out, inp = G.shape
    Gp = nn.functional.pad(G, (0, (-inp) % r))                             # zero-pad the input dimension
    return Gp.reshape(out, -1, r).sum(1).t()                               # (B5)


# ----------------------------------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------------------------------
class BoneLinear(AdapterLinear):
    """A frozen ``nn.Linear`` plus a Bone (``mode="bone"``, B4) or Bat (``mode="bat"``, B1) adapter.

    The trainable ``block`` has peft's layout: (out/r, r, r) for "bat" (``miss_block`` with
    ``init_weights="bat"``), (r, out) for "bone" (``init_weights=True``), zeros at init. ``merge()`` adds
    ``Delta W`` to the frozen weight; ``unmerge()`` is exact for both modes (B3 for Bat)."""

    def __init__(self, base: nn.Linear, r: int, mode: str = "bat"):
        super().__init__(base)
        if mode not in MODES:
            raise ValueError(f"unknown Bone mode {mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"bad block size r={r!r}: expected an integer >= 1")
        out, inp = base.out_features, base.in_features
        if mode == "bat" and (out % r or inp % r):
            raise ValueError(f"bad block size r={r} for mode 'bat': it must divide out_features={out} and "
                             f"in_features={inp}")
        if mode == "bone" and r > inp:
            raise ValueError(f"bad block size r={r} for mode 'bone': must be <= in_features={inp}")
        self.r, self.mode = r, mode
        w = base.weight
        shape = (out // r, r, r) if mode == "bat" else (r, out)
        self.block = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))

    def extra_repr(self) -> str:
        return f"r={self.r}, mode={self.mode!r}"

    def _frozen_weight(self) -> torch.Tensor:
        """The original ``W`` (recovered by B3 while a Bat adapter is merged)."""
        W = self.base.weight
        if self.merged and self.mode == "bat":
            return self._bat_inverse(W)
        return W

    def _bat_inverse(self, Wm: torch.Tensor) -> torch.Tensor:
        """(B3) ``W_{a,c} = (W'_{a,c} - D_a)(I + D_a)^{-1}``, solved blockwise in float64."""
        D = self.block.detach().to(torch.float64)
        A, r, _ = D.shape
        Wm4 = blocks(Wm.detach().to(torch.float64), r)                                      # [a, c, i, j]
        eye = torch.eye(r, dtype=torch.float64, device=D.device)
        W4 = torch.linalg.solve((eye + D)[:, None], Wm4 - D[:, None], left=False)          # (B3) X (I+D_a) = W'-D_a
        return W4.permute(0, 2, 1, 3).reshape(Wm.shape).to(Wm.dtype)

    def delta_weight(self) -> torch.Tensor:
        if self.mode == "bat":
            return bat_delta(self._frozen_weight().detach(), self.block)    # (B1); no gradient into W
        return bone_delta(self.block, self.in_features)                     # (B4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat" and not self.merged:  # (B1) one product with W + Delta W, as the official code:
            W = self.base.weight                     # ~1.6x faster than W x + Delta W x at 1024 x 1024, r = 8
            return nn.functional.linear(x, W + bat_delta(W.detach(), self.block), self.base.bias)
        return super().forward(x)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat":
            return nn.functional.linear(x, self.delta_weight())              # (B1) dense Delta W x
        r = self.r
        xp = nn.functional.pad(x, (0, (-x.shape[-1]) % r))                  # (B4) zero-pad to a multiple of r
        return xp.reshape(*x.shape[:-1], -1, r).sum(-2) @ self.block         # (B4) (sum_c x_c)^T D

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        if self.mode == "bat":
            eye = torch.eye(self.r, dtype=torch.float64, device=self.block.device)
            if torch.linalg.matrix_rank(eye + self.block.double()).min() < self.r:
                raise RuntimeError("cannot unmerge Bat: some I + D_a is singular")
            self.base.weight.copy_(self._bat_inverse(self.base.weight))      # (B3), exact
        else:
            self.base.weight -= self.delta_weight()
        self.merged = False


def apply_bone(model: nn.Module, r: int, mode: str = "bat",
               target: Callable[[str, nn.Linear], bool] | None = block_linears) -> dict[str, BoneLinear]:
    """Freeze ``model`` and wrap every ``nn.Linear`` selected by ``target`` with ``BoneLinear(r, mode)``.
    Returns the adapters by name (their ``block`` parameters are the only trainable ones)."""
    return wrap_linears(model, lambda m: BoneLinear(m, r, mode), target)


# ----------------------------------------------------------------------------------------------------------
# registered with the fine-tuning kit, and the paper's mechanism measures
# ----------------------------------------------------------------------------------------------------------
def lora_rank_for(model: nn.Module, r: int, target=block_linears) -> float:
    """The LoRA rank whose parameter count equals Bone's/Bat's at block size ``r`` over the targeted linears:
    ``sum(out) r / sum(in + out)`` (may be fractional: round it yourself)."""
    lin = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(n, m)]
    return r * sum(m.out_features for m in lin) / sum(m.in_features + m.out_features for m in lin)


def block_size_for(model: nn.Module, rank: int, target=block_linears) -> int:
    """The block size ``r`` at which Bone/Bat train exactly as many numbers as LoRA at ``rank``: the inverse of
    :func:`lora_rank_for`; raises when no integer block size matches exactly (pass ``r=`` to the builder)."""
    lin = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(n, m)]
    num, den = rank * sum(m.in_features + m.out_features for m in lin), sum(m.out_features for m in lin)
    if num % den:
        raise ValueError(f"no block size matches LoRA rank {rank} exactly ({num}/{den}); pass r= explicitly")
    return num // den


def _builder(mode: str):
    def build(base: nn.Module, *, rank: int, seed: int, r: int | None = None, target=block_linears, merge=False):
        from rwlib.finetune import Prepared

        model = copy.deepcopy(base).train()
        apply_bone(model, r or block_size_for(base, rank, target), mode, target)
        return Prepared(model, adapter_parameters(model), finalize=merge_all if merge else None)
    build.__doc__ = (f"Fine-tuning kit builder: a deep copy of ``base`` with every block linear wrapped by "
                     f"``BoneLinear(r, {mode!r})``; ``r`` defaults to the block size matching LoRA at ``rank``.")
    return build


bat_builder = finetune.register("Bat")(_builder("bat"))      # (B1), the paper's v1-v3 "Bone"
bone_builder = finetune.register("Bone")(_builder("bone"))   # (B4), v4+ "Bone", the Weight Guide off


def init_gradients(base: nn.Module, method: str, problems: list, *, r: int, seed: int) -> dict:
    """The paper's gradient-at-initialisation measure (``assets/grad.png``) at block size ``r``: one
    forward/backward of the fine-tuning loss on ``problems`` for ``method`` prepared by
    :func:`rwlib.finetune.prepare` -- Bat and Bone at block size ``r``, the other methods at the LoRA rank with
    the same count (:func:`lora_rank_for`, rounded, at least 1). Returns the largest |logit change| against
    ``base``, the gradient norm over the trainable parameters (for full fine-tuning: over the block linears'
    weights, the matrices the adapters wrap) and, for LoRA-type adapters, the norms of dL/dA and dL/dB."""
    from rwlib.data.tasks import sft_batch
    from rwlib.models import module_device

    rank = max(1, round(lora_rank_for(base, r)))
    options = {"r": r} if method in ("Bat", "Bone") else {}
    prep = finetune.prepare(base, method, rank=rank, seed=seed, **options)
    model, params = prep.model, prep.params
    x, y, mask = (t.to(module_device(base)) for t in sft_batch(problems))
    with torch.no_grad():
        change = float((model(x) - base(x)).abs().max())
    finetune.sft_objective(model, x, y, mask).backward()
    if not adapters(model):
        params = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and block_linears(n, m)]
    out = {"lora rank": rank, "output change": change,
           "grad norm": float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))}
    ads = [a for a in adapters(model).values() if hasattr(a, "A")]
    if ads:
        out["grad A"] = float(torch.sqrt(sum(a.A.grad.pow(2).sum() for a in ads)))
        out["grad B"] = float(torch.sqrt(sum(a.B.grad.pow(2).sum() for a in ads)))
    return out


def effective_weights(model: nn.Module, target=block_linears) -> dict[str, torch.Tensor]:
    """``name -> W_eff`` of the targeted linears: the frozen weight plus the adapter's ``Delta W`` (for PiSSA
    the residual plus ``B A``), or the plain weight where no adapter sits."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AdapterLinear):
            out[name] = (m.base.weight + (0 if m.merged else m.delta_weight())).detach()
        elif isinstance(m, nn.Linear) and target(name, m) and not name.endswith(".base"):
            out[name] = m.weight.detach()
    return out


@torch.no_grad()
def update_structure(model: nn.Module, base: nn.Module, r: int, rel_tol: float = 1e-3):
    """Structure of the learned update ``U = W_eff(model) - W(base)`` of every targeted layer: its numerical
    rank (singular values above ``rel_tol`` times the largest), its stable rank ``||U||_F^2 / ||U||_2^2``, the
    fraction of its energy shared by all column shards of width ``r`` (exactly 1 for Bone, B4), and the
    correlation over entries of ``|U|`` with ``|W|``. Returns a tidy frame, one row per layer."""
    import pandas as pd

    rows = []
    before = effective_weights(base)
    for name, Weff in effective_weights(model).items():
        W = before[name].double()
        U = Weff.double() - W
        S = torch.linalg.svdvals(U)
        out, inp = U.shape
        shards = U[:, :inp // r * r].reshape(out, inp // r, r)                 # [o, c, j]
        shared = float(shards.mean(1, keepdim=True).expand_as(shards).pow(2).sum() / shards.pow(2).sum())
        corr = float(torch.corrcoef(torch.stack([U.abs().flatten(), W.abs().flatten()]))[0, 1])
        rows.append({"layer": name, "shape": f"{out}x{inp}", "rank": int((S > rel_tol * S[0]).sum()),
                     "stable rank": float(S.pow(2).sum() / S[0] ** 2), "shared fraction": shared,
                     "corr |U|,|W|": corr, "norm": float(U.norm())})
    return pd.DataFrame(rows)
