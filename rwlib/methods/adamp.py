r"""AdamP and SGDP: momentum optimizers that do not inflate scale-invariant weights.

Reference
---------
Byeongho Heo, Sanghyuk Chun, Seong Joon Oh, Dongyoon Han, Sangdoo Yun, Gyuwan Kim,
Youngjung Uh, Jung-Woo Ha. "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights." ICLR 2021, arXiv:2006.08217.
Official code: github.com/clovaai/AdamP (PyPI package ``adamp`` 0.3.0, files
``adamp/adamp.py`` and ``adamp/sgdp.py``). This module re-implements the same algorithm with
the same arithmetic (so trajectories agree to round-off in float64); it is written for this
book and does not reuse the official source.

Key equations (numbers are referred to in the comments of the code below)
-------------------------------------------------------------------------
(E1) Scale invariance. A weight ``w`` is scale-invariant when ``L(c w) = L(w)`` for all
     ``c > 0`` (e.g. a conv/linear weight whose output is normalised by BatchNorm). Taking
     d/dc at c = 1 gives ``<grad L(w), w> = 0``: the gradient is orthogonal to the weight,
     and ``grad L(c w) = grad L(w) / c``.

(E2) Norm growth under plain GD. With ``w_{t+1} = w_t - eta g_t`` and ``g_t ⟂ w_t``,
     ``||w_{t+1}||^2 = ||w_t||^2 + eta^2 ||g_t||^2``: the norm can only grow.

(E3) Norm growth under heavy-ball momentum, ``p_t = beta p_{t-1} + g_t``,
     ``w_{t+1} = w_t - eta p_t``. Because ``g_t ⟂ w_t`` but ``p_{t-1}`` is not ⟂ ``w_t``,
     ``<w_t, p_t> = -eta sum_{k<t} beta^{t-k} ||p_k||^2`` and therefore
     ``||w_{t+1}||^2 = ||w_t||^2 + eta^2 ||p_t||^2 + 2 eta^2 sum_{k<t} beta^{t-k} ||p_k||^2``
     (derived here from the two recursions; the paper states this growth as a lemma): the
     accumulated momentum adds a radial (norm-increasing) term on top of (E2).

(E4) Effective step size. For a scale-invariant loss only ``w_hat = w / ||w||`` matters and a
     step ``-eta g`` moves ``w_hat`` by about ``-eta g / ||w||``, while ``g`` itself scales as
     ``1 / ||w||`` (E1); the step on the unit sphere is therefore ``eta / ||w||^2``. Norm
     growth (E2, E3) shrinks this effective step size prematurely.

(E5) Projection. Remove the radial component of the optimizer's update ``p``:
     ``Pi_w(p) = p - w_hat (w_hat · p)``, with ``w_hat = w / (||w|| + eps)``, row by row in
     the view used for detection.

(E6) Detection. For each view ``V`` in (channel view ``w.reshape(out, -1)``,
     layer view ``w.reshape(1, -1)``): compute the per-row ``|cos(grad_row, w_row)|``; if
     ``max_rows |cos| < delta / sqrt(row length of V)`` the weight is treated as
     scale-invariant in that view, (E5) is applied in that view and the search stops. The
     channel view is tried first. Tensors with ``ndim <= 1`` are never projected.

(E7) Weight decay (decoupled, multiplicative, applied before the step):
     AdamP: ``w <- w (1 - lr * weight_decay * r)``;
     SGDP:  ``w <- w (1 - lr * weight_decay * r / (1 - momentum))``;
     with ``r = wd_ratio`` when the tensor was projected in this step and ``r = 1``
     otherwise. Decay is skipped when ``weight_decay == 0``.

(E8) AdamP update (bias-corrected Adam with optional Nesterov look-ahead):
     ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
     ``denom = sqrt(v) / sqrt(1 - b2^t) + eps``, step size ``lr / (1 - b1^t)``,
     ``p = m / denom``  or, with nesterov, ``p = (b1 m + (1 - b1) g) / denom``;
     ``w <- w - lr / (1 - b1^t) * Pi(p)``.

(E9) SGDP update: ``buf <- momentum buf + (1 - dampening) g`` (buffer starts at zero, so
     dampening also scales the first step, unlike ``torch.optim.SGD``);
     ``p = buf`` or, with nesterov, ``p = g + momentum buf``; ``w <- w - lr Pi(p)``.
     Without nesterov the official code projects ``buf`` *in place*, so the stored momentum
     loses its radial component too; we reproduce this (see ``SGDP.step``).

Helpers for later chapters: :func:`scale_invariant_params`, :func:`weight_norms`,
:func:`effective_step_size`, :func:`radial_component`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import Optimizer, required

__all__ = [
    "projection",
    "AdamP",
    "SGDP",
    "scale_invariant_params",
    "weight_norms",
    "effective_step_size",
    "radial_component",
    "OPTIMIZERS",
    "make_optimizer",
    "toy_loss",
    "norm_monitor",
]


# --------------------------------------------------------------------------------------
# Projection (E5, E6)
# --------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, view: str) -> torch.Tensor:
    """Channel view: one row per output channel; layer view: the whole tensor as one row."""
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def projection(
    p: torch.Tensor,
    grad: torch.Tensor,
    update: torch.Tensor,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, float]:
    """Remove the radial part of ``update`` if ``p`` looks scale-invariant.

    Detection compares the *gradient* with the weight (E6); the projection acts on the
    *update* (E5). Views are tried in the order channel (``reshape(out, -1)``) then layer
    (``reshape(1, -1)``); the first view whose largest ``|cos|`` is below
    ``delta / sqrt(row length)`` is used.

    Returns ``(update, wd_ratio_used)``: the projected update (a new tensor) and ``wd_ratio``
    when projected; the *same* ``update`` object and ``1.0`` otherwise. Parameters with
    ``ndim <= 1`` (biases, norm affine parameters) are never projected.
    """
    if p.dim() <= 1:
        return update, 1.0
    w = p.detach()
    bcast = (-1,) + (1,) * (w.dim() - 1)  # per-row scalar -> broadcast over the tensor
    for view in ("channel", "layer"):
        w_rows = _rows(w, view)
        cos = F.cosine_similarity(_rows(grad, view), w_rows, dim=1, eps=eps).abs()  # (E6) |cos(g, w)| per row
        if cos.max() < delta / math.sqrt(w_rows.shape[1]):  # (E6) threshold delta / sqrt(dim)
            w_hat = w / w_rows.norm(dim=1).reshape(bcast).add(eps)  # (E5) w_hat = w / (||w|| + eps)
            radial = _rows(w_hat * update, view).sum(dim=1).reshape(bcast)  # (E5) w_hat · p per row
            return update - w_hat * radial, wd_ratio  # (E5) Pi_w(p) = p - w_hat (w_hat · p)
    return update, 1.0


# --------------------------------------------------------------------------------------
# Argument checks (the official package does not validate; these only reject nonsense)
# --------------------------------------------------------------------------------------
def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _check_common(group: dict) -> None:
    lr = group.get("lr", required)
    if lr is not required and _as_float(lr) < 0.0:
        raise ValueError(f"Invalid learning rate: lr={lr} (must be >= 0)")
    if group["eps"] < 0.0:
        raise ValueError(f"Invalid epsilon: eps={group['eps']} (must be >= 0)")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"Invalid weight_decay: weight_decay={group['weight_decay']} (must be >= 0)")
    if group["delta"] < 0.0:
        raise ValueError(f"Invalid delta: delta={group['delta']} (must be >= 0)")
    if group["wd_ratio"] < 0.0:
        raise ValueError(f"Invalid wd_ratio: wd_ratio={group['wd_ratio']} (must be >= 0)")


def _check_adamp(group: dict) -> None:
    _check_common(group)
    beta1, beta2 = group["betas"]
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1: betas[0]={beta1} (must be in [0, 1))")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: betas[1]={beta2} (must be in [0, 1))")


def _check_sgdp(group: dict) -> None:
    _check_common(group)
    if group["momentum"] < 0.0:
        raise ValueError(f"Invalid momentum: momentum={group['momentum']} (must be >= 0)")
    if group["weight_decay"] > 0 and group["momentum"] >= 1.0:
        # (E7) divides by (1 - momentum)
        raise ValueError(
            f"Invalid momentum: momentum={group['momentum']} with weight_decay > 0 "
            "(SGDP weight decay divides by 1 - momentum)"
        )


# --------------------------------------------------------------------------------------
# The step both optimizers share: closure, loop over parameters with a gradient, lazy state
# --------------------------------------------------------------------------------------
class _Projected(Optimizer):
    """Common skeleton of :class:`AdamP` and :class:`SGDP`: argument checks on every param group and a
    ``step`` that visits each parameter with a gradient and hands it to :meth:`_update`."""

    _name = "projected optimizer"

    def _check(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check(self.param_groups[-1])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._name} does not support sparse gradients")
                self._update(p, p.grad, self.state[p], group)
        return loss


# --------------------------------------------------------------------------------------
# AdamP (E8 + E5/E6 + E7)
# --------------------------------------------------------------------------------------
class AdamP(_Projected):
    """Adam with decoupled weight decay and projection for scale-invariant weights.

    Constructor and defaults are those of ``adamp.AdamP``. State per parameter:
    ``step`` (int), ``exp_avg``, ``exp_avg_sq``. Order per parameter: moments, update
    direction, projection, weight decay, step.
    """

    _name = "AdamP"
    _check = staticmethod(_check_adamp)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio,
                        nesterov=nesterov)
        _check_adamp(defaults)
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group):
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        state["step"] += 1
        t = state["step"]
        bias_correction1 = 1 - beta1 ** t  # (E8) 1 - b1^t
        bias_correction2 = 1 - beta2 ** t  # (E8) 1 - b2^t

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # (E8) m <- b1 m + (1-b1) g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # (E8) v <- b2 v + (1-b2) g^2

        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])  # (E8) sqrt(v_hat) + eps
        step_size = lr / bias_correction1  # (E8) lr / (1 - b1^t)

        if group["nesterov"]:
            update = (beta1 * exp_avg + (1 - beta1) * grad) / denom  # (E8) Nesterov look-ahead
        else:
            update = exp_avg / denom  # (E8) m / denom

        update, r = projection(p, grad, update, group["delta"], group["wd_ratio"], group["eps"])  # (E5, E6)

        if group["weight_decay"] > 0:
            p.mul_(1 - lr * group["weight_decay"] * r)  # (E7) AdamP decoupled decay

        p.add_(update, alpha=-step_size)  # (E8) w <- w - step_size * Pi(p)


# --------------------------------------------------------------------------------------
# SGDP (E9 + E5/E6 + E7)
# --------------------------------------------------------------------------------------
class SGDP(_Projected):
    """SGD with momentum, decoupled weight decay and projection for scale-invariant weights.

    Constructor and defaults are those of ``adamp.SGDP`` (``lr`` is required). State per
    parameter: ``momentum`` (the buffer). Order per parameter: buffer, update direction,
    projection, weight decay, step.
    """

    _name = "SGDP"
    _check = staticmethod(_check_sgdp)

    def __init__(self, params, lr: float = required, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
        _check_sgdp(defaults)
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group):
        lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
        if len(state) == 0:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state["momentum"]
        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])  # (E9) buf <- mu buf + (1-d) g

        if nesterov:
            update = grad + momentum * buf  # (E9) Nesterov: g + mu buf
        else:
            update = buf  # (E9) heavy ball: buf

        projected, r = projection(p, grad, update, group["delta"], group["wd_ratio"], group["eps"])  # (E5, E6)
        if not nesterov and projected is not update:
            # (E9) official behaviour: the buffer itself is projected in place
            buf.copy_(projected)
            projected = buf

        if group["weight_decay"] > 0:
            p.mul_(1 - lr * group["weight_decay"] * r / (1 - momentum))  # (E7) SGDP decay

        p.add_(projected, alpha=-lr)  # (E9) w <- w - lr Pi(p)


# --------------------------------------------------------------------------------------
# Helpers shared with later chapters
# --------------------------------------------------------------------------------------
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def scale_invariant_params(
    model: nn.Module,
    weight_types: Sequence[type] = _WEIGHT_LAYERS,
    norm_types: Sequence[type] = _NORM_LAYERS,
) -> list[tuple[str, nn.Parameter]]:
    """List ``(qualified_name, weight)`` of weights that are (heuristically) scale-invariant.

    Heuristic: walk the *leaf* modules of ``model`` in registration order
    (``model.named_modules()``); a weight of a Conv/Linear layer (``weight.ndim > 1``) counts
    when the very next leaf module is a normalisation layer (BatchNorm*, LayerNorm,
    GroupNorm, InstanceNorm). Any leaf in between breaks the pair, so ``Conv -> ReLU -> BN``
    is *not* reported although that weight is scale-invariant too (ReLU is positively
    homogeneous): the heuristic is conservative.

    Caveats: registration order is not forward order (a model that registers its layers in
    a different order than it calls them, or uses residual branches around the norm, can
    fool the heuristic). Invariance is exact for BatchNorm in training mode (the per-channel
    mean removes a preceding bias); for LayerNorm/GroupNorm it is exact only for the layer as
    a whole and only when the preceding layer has no bias. The optimizers themselves do not
    use this function: they detect scale invariance from the gradient (E6).
    Shared parameters are listed once.
    """
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for (name, mod), (_, nxt) in zip(leaves, leaves[1:]):
        if not isinstance(mod, tuple(weight_types)) or not isinstance(nxt, tuple(norm_types)):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() > 1 and id(w) not in seen:
            seen.add(id(w))
            found.append((f"{name}.weight" if name else "weight", w))
    return found


def weight_norms(params: Iterable[Union[torch.Tensor, tuple[str, torch.Tensor]]]) -> torch.Tensor:
    """Per-tensor L2 norms ``||w||_2`` (float64, 1-D, one entry per tensor, detached).

    Accepts tensors or ``(name, tensor)`` pairs (the output of
    :func:`scale_invariant_params`).
    """
    tensors = [x[1] if isinstance(x, tuple) else x for x in params]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([t.detach().to(torch.float64).norm() for t in tensors])  # ||w||_2


def effective_step_size(lr: Union[float, torch.Tensor], norms: Union[float, torch.Tensor]) -> torch.Tensor:
    """Effective step size ``lr / ||w||^2`` of a scale-invariant weight (E4).

    For a scale-invariant loss only the direction ``w / ||w||`` matters; a gradient step of
    size ``lr`` moves that direction by ``lr / ||w||^2`` times the gradient taken on the unit
    sphere. ``norms`` may be a scalar or a tensor (e.g. from :func:`weight_norms`).
    """
    norms_t = torch.as_tensor(norms, dtype=torch.float64)
    return torch.as_tensor(lr, dtype=torch.float64) / norms_t.pow(2)  # (E4) lr / ||w||^2


def radial_component(update: torch.Tensor, w: torch.Tensor, view: str = "channel",
                     eps: float = 1e-8) -> torch.Tensor:
    """Per-row cosine between ``update`` and ``w`` (signed), in the channel or layer view.

    ``cos = 0`` means the update has no radial part (it cannot change ``||w_row||`` to first
    order); after the projection (E5) of a detected weight this is ~0 in the view that was
    used. 0-D/1-D tensors are treated as one row.
    """
    if view not in ("channel", "layer"):
        raise ValueError(f"Invalid view: view={view!r} (expected 'channel' or 'layer')")
    if w.dim() <= 1:
        view = "layer"
    return F.cosine_similarity(_rows(update.detach(), view), _rows(w.detach(), view), dim=1, eps=eps)


# ------------------------------------------------------------------------------------------------
# The optimizer pairs the chapter compares, and the mechanism measures the paper plots (chapter 24)
# ------------------------------------------------------------------------------------------------
OPTIMIZERS = ("SGD", "SGDP", "AdamW", "AdamP")


def make_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                   nesterov: bool = True) -> Optimizer:
    """One of :data:`OPTIMIZERS` with the same hyperparameters, so only the projection differs in a pair.

    SGD and AdamW are torch's; SGDP and AdamP are this module's. SGD pairs use ``momentum`` and
    ``nesterov``; Adam pairs use betas (0.9, 0.999) and decoupled weight decay.
    """
    params = list(params)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "SGDP":
        return SGDP(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "AdamP":
        return AdamP(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def toy_loss(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The paper's 2-D scale-invariant toy (E1): ``L(w) = 1 - <w / ||w||, e>`` with ``e = (cos theta, sin theta)``.

    ``w`` is a 1x2 matrix (one row, so SGDP's detection sees a single channel); only its direction matters,
    so the gradient is orthogonal to ``w`` and every step can only lengthen it (E2, E3)."""
    return 1 - (w[0] / w.norm()) @ torch.stack([torch.cos(theta), torch.sin(theta)])


def norm_monitor(model: nn.Module, optimizer: Optimizer) -> Callable[[int, nn.Module], dict]:
    """The mechanism measures of the paper's weight-norm figures, as an ``on_step`` hook for
    :func:`rwlib.train.fit`: the mean relative norm ``||w_t|| / ||w_0||`` of the model's scale-invariant weights
    (:func:`scale_invariant_params`, ``w_0`` taken now) and their mean effective step size ``lr_t / ||w_t||^2``
    (E4), with ``lr_t`` the first param group's current learning rate."""
    inv = [p for _, p in scale_invariant_params(model)]
    norm0 = weight_norms(inv)

    def on_step(t, m):
        norms = weight_norms(inv)
        lr_t = optimizer.param_groups[0]["lr"]
        return {"rel_norm": (norms / norm0).mean(), "eff_step": effective_step_size(lr_t, norms).mean()}

    return on_step
