r"""LIFT: sparse fine-tuning of the *principal weights*, the largest entries of a low-rank approximation.

Reference
---------
Zihang Liu, Tianyu Pang, Oleg Balabanov, Chaoqun Yang, Tianjin Huang, Lu Yin, Yaoqing Yang, Shiwei Liu.
"LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction for Reasoning-Focused Supervised
Fine-Tuning." ICML 2025, arXiv:2506.00772. Official code: github.com/zihanghliu/LIFT (``src/sparseAdam.py``,
class ``SparseAdamW``). This module re-implements the method for this book; it does not reuse the official
source.

Key equations (numbers are referred to in the comments of the code below)
-------------------------------------------------------------------------
(E1) Budget. A weight matrix ``W`` (m x n) gets as many trainable entries as a rank-``rho`` LoRA on it has
     parameters: ``k = min((m + n) rho, m n)`` (``rho`` = ``lora_rank``).

(E2) Rank reduction. ``W = U S V^T`` (SVD); ``W_r = U[:, :r] diag(S[:r]) V[:, :r]^T`` with ``r`` =
     ``filter_rank``.

(E3) Principal weights. ``M = top-k indices of |W_r|`` (the ``k`` largest absolute entries of the rank-r
     approximation). ``r = min(m, n)`` (full rank) gives ``W_r = W``: plain magnitude selection.

(E4) Sparse Adam. The gradient ``G`` is computed densely; only its masked entries are used: ``g = G[M]`` (a
     vector of length k), ``t <- t + 1``,
     ``m <- beta1 m + (1 - beta1) g``,  ``v <- beta2 v + (1 - beta2) g^2``  (m, v of length k),
     ``W[M] <- W[M] - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``  (``eps_mode="hf"``, the
     official placement: eps outside the bias-corrected root), or
     ``W[M] <- W[M] - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`` (``eps_mode="torch"``,
     as ``torch.optim.Adam``). ``W[~M]`` never changes.

(E5) Mask refresh. After every optimizer step a global counter ``s`` is incremented; when
     ``(s + 1) % T == 0`` (``T`` = ``update_interval``) every mask is recomputed by (E2-E3) from the *current*
     weights, so refreshes happen after steps T-1, 2T-1, 3T-1, ... . Moments are carried over entry by entry:
     ``m_new = scatter(m_old, M_old)[M_new]`` (same for v): an entry kept in the mask keeps its moments, a newly
     selected one starts at 0. The per-parameter step count ``t`` is not reset.

Baselines that share the optimizer: ``mask="magnitude"`` (top-k of |W|, the paper's "magnitude-based sparse
FT") and ``mask="random"`` (k random entries, redrawn at each refresh as in the official code).
``select="smallest"`` picks the k *smallest* entries instead: the official July-2025 configs
(``mask_type="lift_sparse"``) do this, unlike the paper; it is offered only as a labelled ablation.

LIFT and its two sparse baselines register with the fine-tuning kit (:func:`rwlib.finetune.register`, names
``"LIFT"``, ``"Magnitude"``, ``"Random"``): each builder hands the kit a :class:`LIFTAdam` factory and its budget,
and :func:`rwlib.finetune.compare` runs them against full fine-tuning and LoRA. :func:`mask_overlap` (Jaccard of
the LIFT and magnitude masks) and :func:`minilm_linears` (the real MiniLM's weights) serve chapter 20's overlap
figure.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from rwlib import finetune

__all__ = [
    "lift_budget", "lowrank_approx", "principal_mask", "brute_force_mask", "magnitude_mask", "random_mask", "jaccard", "LIFTAdam",
    "lift_builder", "magnitude_builder", "random_builder", "mask_overlap", "model_linears", "minilm_linears",
]

SELECTS = ("largest", "smallest")
MASKS = ("lift", "magnitude", "random")
EPS_MODES = ("hf", "torch")


# ----------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------
def _check_matrix(W: torch.Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(W.shape)}")


def lift_budget(shape, lora_rank: int) -> int:
    """(E1) The number of trainable entries of an m x n matrix: ``min((m + n) * lora_rank, m * n)``."""
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D shape (m, n), got {tuple(shape)}")
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
        raise ValueError(f"bad lora_rank {lora_rank!r}: expected an integer >= 1")
    m, n = int(shape[0]), int(shape[1])
    return min((m + n) * lora_rank, m * n)  # (E1)


def lowrank_approx(W: torch.Tensor, rank: int | None) -> torch.Tensor:
    """(E2) The best rank-``rank`` approximation of ``W`` (``None``, or a rank of at least ``min(m, n)``: ``W``
    itself), computed in float64 and returned in ``W``'s precision (at least float32).

    The rank-r approximation is ``W`` projected on its top-r right (or left) singular vectors, which are the top-r
    eigenvectors of the smaller Gram matrix ``W^T W`` (or ``W W^T``): one float64 ``eigh`` of a min(m, n)-square
    matrix instead of the SVD of ``W``, the same cost for a square matrix and several times less for the 1:4
    MLP matrices. It selects the same masks as the SVD route (:func:`brute_force_mask`, tested). A randomized
    SVD does not: trained and random weights have almost no gap between the r-th and (r+1)-th singular values,
    and its subspace, hence the mask, then differs (README, peer timings)."""
    _check_matrix(W)
    full = min(W.shape)
    if rank is None:
        rank = full
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"bad filter_rank {rank!r}: expected an integer >= 1 or None (full rank)")
    out = torch.promote_types(W.dtype, torch.float32)
    if rank >= full:
        return W.detach().to(out)
    A = W.detach().to(torch.float64)
    if A.shape[1] <= A.shape[0]:
        V = torch.linalg.eigh(A.T @ A).eigenvectors[:, -rank:]       # (E2) top-r right singular vectors
        Wr = (A @ V) @ V.T                                            # (E2) U_r S_r V_r^T = W V_r V_r^T
    else:
        U = torch.linalg.eigh(A @ A.T).eigenvectors[:, -rank:]       # (E2) top-r left singular vectors
        Wr = U @ (U.T @ A)                                            # (E2) U_r U_r^T W
    return Wr.to(out)


def _topk_mask(score: torch.Tensor, k: int, select: str) -> torch.Tensor:
    if select not in SELECTS:
        raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECTS)}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= score.numel():
        raise ValueError(f"bad k {k!r}: expected an integer in 1..{score.numel()}")
    idx = torch.topk(score.flatten(), k, largest=(select == "largest"), sorted=False).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[idx] = True
    return mask.view(score.shape)


def principal_mask(W: torch.Tensor, filter_rank: int | None, k: int, select: str = "largest") -> torch.Tensor:
    """(E2-E3) Boolean mask of the ``k`` largest (or smallest) entries of ``|W_r|``, the rank-``filter_rank``
    approximation of ``W`` (``filter_rank=None``: full rank, i.e. the magnitude mask)."""
    return _topk_mask(lowrank_approx(W, filter_rank).abs(), k, select)  # (E3) top-k |W_r|


def brute_force_mask(W: torch.Tensor, filter_rank: int | None, k: int, select: str = "largest") -> np.ndarray:
    """The reference for :func:`principal_mask`, by a separate route: numpy's float64 SVD, the rank-``filter_rank``
    reconstruction, and a stable argsort of its absolute values (so ties, absent from random matrices, would go
    to the lower flat index). Used by the tests and by chapter 20's check."""
    A = W.detach().cpu().double().numpy()
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    r = len(S) if filter_rank is None else filter_rank
    score = np.abs((U[:, :r] * S[:r]) @ Vt[:r]).ravel()
    order = np.argsort(-score if select == "largest" else score, kind="stable")
    mask = np.zeros(score.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(A.shape)


def magnitude_mask(W: torch.Tensor, k: int, select: str = "largest") -> torch.Tensor:
    """Top-k entries of ``|W|`` (the magnitude-sparse baseline)."""
    _check_matrix(W)
    return _topk_mask(W.detach().abs(), k, select)


def random_mask(W: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` entries of ``W`` drawn uniformly without replacement."""
    _check_matrix(W)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= W.numel():
        raise ValueError(f"bad k {k!r}: expected an integer in 1..{W.numel()}")
    idx = torch.randperm(W.numel(), generator=generator)[:k].to(W.device)
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    mask[idx] = True
    return mask.view(W.shape)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a and b| / |a or b| of two boolean masks of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


# ----------------------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------------------
class LIFTAdam(torch.optim.Optimizer):
    """Adam on a sparse subset of each matrix, with state only for that subset (E4) and periodic refresh (E5).

    ``params``: 2-D weights (or param groups of them; ``lora_rank`` and ``filter_rank`` may differ per group).
    ``mask``: ``"lift"`` (E2-E3), ``"magnitude"``, ``"random"``, or a callable ``(W, k) -> bool mask``.
    ``update_interval``: T of (E5); ``None`` keeps the masks fixed. ``select``: ``"largest"`` (the paper) or
    ``"smallest"`` (the released configs). ``eps_mode``: where eps goes (E4). Weight decay is 0 (as in the
    released configs). State per weight: ``mask`` (bool, full shape), ``exp_avg`` and ``exp_avg_sq`` (length k),
    ``step``; plus ``ever_masked`` (entries selected at least once, for checks). ``refreshes`` lists the global
    steps after which the masks were recomputed.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-6, *, lora_rank: int, filter_rank: int | None = None,
                 update_interval: int | None = None, mask: str | Callable = "lift", select: str = "largest",
                 eps_mode: str = "hf", generator: torch.Generator | None = None):
        if not lr >= 0.0:
            raise ValueError(f"bad lr {lr!r}: expected >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"bad betas {betas!r}: expected each in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"bad eps {eps!r}: expected >= 0")
        if not callable(mask) and mask not in MASKS:
            raise ValueError(f"unknown mask {mask!r}; valid: {', '.join(MASKS)} or a callable (W, k) -> mask")
        if select not in SELECTS:
            raise ValueError(f"unknown select {select!r}; valid: {', '.join(SELECTS)}")
        if eps_mode not in EPS_MODES:
            raise ValueError(f"unknown eps_mode {eps_mode!r}; valid: {', '.join(EPS_MODES)}")
        if update_interval is not None and (not isinstance(update_interval, int) or update_interval < 1):
            raise ValueError(f"bad update_interval {update_interval!r}: expected an integer >= 1 or None (fixed)")
        defaults = dict(lr=lr, betas=betas, eps=eps, lora_rank=lora_rank, filter_rank=filter_rank)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                _check_matrix(p)
                lift_budget(p.shape, group["lora_rank"])  # validates lora_rank
        self.mask_kind, self.select, self.eps_mode = mask, select, eps_mode
        self.update_interval = update_interval
        self.generator = generator
        self.global_step = 0
        self.refreshes: list[int] = []  # global steps after which masks were refreshed
        self.refresh_masks()

    def _new_mask(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        k = lift_budget(p.shape, group["lora_rank"])                    # (E1)
        if callable(self.mask_kind):
            mask = self.mask_kind(p.detach(), k).to(torch.bool)
        elif self.mask_kind == "lift":
            mask = principal_mask(p.detach(), group["filter_rank"], k, self.select)  # (E2-E3)
        elif self.mask_kind == "magnitude":
            mask = magnitude_mask(p.detach(), k, self.select)
        else:
            mask = random_mask(p.detach(), k, self.generator)
        if mask.shape != p.shape or int(mask.sum()) != k:
            raise ValueError(f"a mask must have shape {tuple(p.shape)} and {k} entries")
        return mask.to(p.device)

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Recompute every mask from the current weights and carry the moments over (E5)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                new = self._new_mask(p, group)
                if "mask" in state:
                    old = state["mask"]
                    for key in ("exp_avg", "exp_avg_sq"):
                        dense = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                        dense[old] = state[key]                       # (E5) scatter with the old mask
                        state[key] = dense[new]                       # (E5) gather with the new mask
                else:
                    k = int(new.sum())
                    state["exp_avg"] = torch.zeros(k, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(k, dtype=p.dtype, device=p.device)
                    state["step"] = 0
                state["mask"] = new
                state["ever_masked"] = new | state.get("ever_masked", new)  # entries selected at least once
                state["index"] = new.flatten().nonzero().squeeze(1)  # flat indices, same order as p[mask]

    def state_floats(self) -> int:
        """Number of floats of Adam state held (2k per matrix)."""
        return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in self.state.values())

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                idx = state["index"]
                flat = p.view(-1)
                g = p.grad.reshape(-1)[idx]                                  # (E4) g = G[M]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1                                           # (E4) t <- t + 1
                t = state["step"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)                       # (E4) first moment
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)                # (E4) second moment
                bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
                if self.eps_mode == "hf":
                    denom = v.sqrt().add_(group["eps"])                      # (E4) sqrt(v) + eps
                    step_size = group["lr"] * math.sqrt(bc2) / bc1
                else:
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])   # (E4) sqrt(v / bc2) + eps
                    step_size = group["lr"] / bc1
                flat.index_add_(0, idx, m / denom, alpha=-step_size)        # (E4) W[M] update; W[~M] untouched
        self.global_step += 1                                                # (E5) counter s
        if self.update_interval is not None and (self.global_step + 1) % self.update_interval == 0:
            self.refresh_masks()                                             # (E5) after steps T-1, 2T-1, ...
            self.refreshes.append(self.global_step)
        return loss


# ----------------------------------------------------------------------------------------------------------
# registered with the fine-tuning kit
# ----------------------------------------------------------------------------------------------------------
def model_linears(model: nn.Module, target: Callable[[str, nn.Module], bool] | None = None) -> dict:
    """``name -> weight`` of the ``nn.Linear`` modules selected by ``target`` (default: TinyGPT's block
    linears)."""
    from rwlib.adapters import block_linears

    target = target or block_linears
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(n, m)}


def _builder(kind: str):
    def build(base: nn.Module, *, rank: int, seed: int, filter_rank: int | None = 4,
              update_interval: int | None = 50, select: str = "largest", target=None):
        from rwlib.finetune import Prepared

        model = copy.deepcopy(base).train()
        for p in model.parameters():  # embeddings, head, norms, biases frozen
            p.requires_grad_(False)
        weights = list(model_linears(model, target).values())
        for w in weights:
            w.requires_grad_(True)
        make = lambda recipe: LIFTAdam(  # noqa: E731 -- the kit's recipe gives lr and betas
            weights, lr=recipe.lr, betas=recipe.betas, lora_rank=rank, filter_rank=filter_rank,
            update_interval=update_interval, mask=kind, select=select, generator=torch.Generator().manual_seed(seed))
        return Prepared(model, weights, make_optimizer=make,
                        trainable=sum(lift_budget(w.shape, rank) for w in weights))   # (E1) the budget
    build.__doc__ = (f"Fine-tuning kit builder: a deep copy of ``base`` whose block linears train through "
                     f":class:`LIFTAdam` with ``mask={kind!r}``, k = (m + n) ``rank`` entries per matrix (E1).")
    return build


lift_builder = finetune.register("LIFT")(_builder("lift"))
magnitude_builder = finetune.register("Magnitude")(_builder("magnitude"))
random_builder = finetune.register("Random")(_builder("random"))


def mask_overlap(weights: dict, ranks, lora_rank: int, select: str = "largest"):
    """Jaccard overlap between the LIFT mask (rank r, E3) and the magnitude mask of every matrix, for each r in
    ``ranks`` (``None`` = full rank). Returns a tidy frame (matrix, shape, rank, rank fraction, jaccard)."""
    import pandas as pd

    rows = []
    for name, W in weights.items():
        W = W.detach()
        k = lift_budget(W.shape, lora_rank)                                 # (E1)
        mag = magnitude_mask(W, k, select)
        U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)  # one SVD per matrix (E2)
        for r in ranks:
            rr = min(W.shape) if r is None else min(r, min(W.shape))
            Wr = ((U[:, :rr] * S[:rr]) @ Vh[:rr]).to(torch.promote_types(W.dtype, torch.float32))
            lift = _topk_mask(Wr.abs(), k, select)                          # (E3)
            rows.append({"matrix": name, "shape": tuple(W.shape), "rank": rr, "full": rr == min(W.shape),
                         "rank fraction": rr / min(W.shape), "jaccard": jaccard(lift, mag)})
    return pd.DataFrame(rows)


def minilm_linears(layers=None) -> dict:
    """``name -> weight`` of the encoder linears (query, key, value, attention output, intermediate, output) of
    the real all-MiniLM-L6-v2, optionally only the encoder layers in ``layers``. Loading is silent."""
    import warnings

    from rwlib.pretrained import load_minilm

    with warnings.catch_warnings():  # transformers imports tqdm.auto, which warns when ipywidgets is missing
        warnings.filterwarnings("ignore", message="IProgress not found")
        import transformers

        bar, verbosity = transformers.logging.is_progress_bar_enabled(), transformers.logging.get_verbosity()
        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        try:
            hf, _ = load_minilm()
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bar:
                transformers.logging.enable_progress_bar()
    out = {}
    for name, mod in hf.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("encoder.layer."):
            layer = int(name.split(".")[2])
            if layers is None or layer in layers:
                out[name.removeprefix("encoder.")] = mod.weight.detach()
    return out
