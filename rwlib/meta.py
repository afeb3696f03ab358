"""Meta-gradients for learned sample weights: a differentiable one-step look-ahead (``torch.func``).

Learning-to-reweight (Ren et al., 2018), Meta-Weight-Net (Shu et al., 2019) and STORM (chapter 02) all ask how a
validation loss would change if the training batch were weighted differently. With per-sample weights ``w`` and
per-sample losses ``l_i(theta)``, one SGD step of the weighted loss is

    theta'(w) = theta - lr * grad_theta (1/|B|) sum_i w_i l_i(theta)                          (look-ahead)

and the validation loss after it, ``L_val(theta'(w))``, is differentiable in ``w`` -- and in the parameters of any
network that produced ``w``. Its gradient has a closed form (the tests check it to 1e-8 in float64):

    dL_val / dw_i = -(lr / |B|) * grad L_val(theta')^T grad l_i(theta)                         (Ren et al., eq. 12)

- :func:`lookahead` returns ``theta'(w)`` as a dict of tensors (graph kept);
- :func:`functional_losses` evaluates per-sample losses of the model at any such parameters;
- :func:`weight_gradient` is the whole chain for per-sample weights: ``dL_val/dw``.

The model's buffers (BatchNorm statistics) are used as they are and not updated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .train import per_sample_ce

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by name (the tensors themselves, so gradients flow to them)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def functional_losses(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      loss_fn: LossFn = per_sample_ce) -> torch.Tensor:
    """Per-sample losses of ``model`` evaluated at ``params`` (missing names keep the module's own tensors)."""
    return loss_fn(functional_call(model, params, (x,)), y)


def lookahead(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, lr: float, *,
              params: dict[str, torch.Tensor] | None = None, loss_fn: LossFn = per_sample_ce
              ) -> dict[str, torch.Tensor]:
    """``theta'(w) = theta - lr * grad (1/|B|) sum_i w_i l_i(theta)`` with the graph kept (differentiable in
    ``weights`` and ``params``)."""
    if weights.shape != y.shape[:1]:
        raise ValueError(f"weights must have one entry per sample: got shape {tuple(weights.shape)} for "
                         f"{len(y)} samples")
    params = parameters_of(model) if params is None else params
    loss = (weights * functional_losses(model, params, x, y, loss_fn)).mean()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return {n: p - lr * g for (n, p), g in zip(params.items(), grads)}


def weight_gradient(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                    val: tuple[torch.Tensor, torch.Tensor], lr: float, *, weights: torch.Tensor | None = None,
                    loss_fn: LossFn = per_sample_ce) -> torch.Tensor:
    """``dL_val(theta'(w)) / dw`` at ``weights`` (default all ones), ``L_val`` the mean validation loss."""
    x, y = train
    w = torch.ones(len(y), dtype=x.dtype, device=x.device) if weights is None else weights.detach().clone()
    w.requires_grad_(True)
    new = lookahead(model, x, y, w, lr, loss_fn=loss_fn)
    val_loss = functional_losses(model, new, *val, loss_fn).mean()
    (g,) = torch.autograd.grad(val_loss, w)
    return g
