"""Adversarial training pieces: the L-infinity PGD attack, the perturbation hook of :func:`rwlib.train.fit`, and
robust accuracy per class.

- :func:`pgd_linf` -- projected gradient ascent on the cross-entropy (Madry et al., 2018): an optional uniform
  random start in the eps-ball, ``steps`` signed-gradient steps of size ``alpha``, each followed by the projection
  onto the ball and the clamp to the valid input range. ``steps=1, alpha=eps, random_start=False`` is FGSM.
- :func:`pgd_perturb` -- the hook that turns :func:`rwlib.train.fit` into adversarial training: each batch is
  replaced by its PGD examples, generated with the model in eval mode (BatchNorm statistics unchanged), and the
  per-sample losses on them are what ``weight_fn`` reweights (chapters 03 and 04).
- :func:`robust_accuracy` -- accuracy on PGD examples, overall, per class and for the worst class.
- :func:`linear_adv_logistic_loss` -- the exact worst-case logistic loss of a linear model, the reference the
  tests check PGD against.

The tests cross-check :func:`pgd_linf` against ``torchattacks.PGD(random_start=False)``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import eval_mode, module_device


def _check(eps: float, alpha: float, steps: int) -> None:
    if eps < 0 or alpha <= 0 or steps < 1:
        raise ValueError(f"bad PGD settings eps={eps!r}, alpha={alpha!r}, steps={steps!r}: expected eps >= 0, "
                         f"alpha > 0, steps >= 1")


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
             random_start: bool = True, clamp: tuple[float, float] | None = (0.0, 1.0),
             generator: torch.Generator | None = None,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """L-infinity PGD examples for ``(x, y)`` (detached, same device as ``x``).

    Maximises ``loss_fn(model(x'), y)`` (default: mean cross-entropy) over ``||x' - x||_inf <= eps``. The model's
    mode is left as it is (call it under :func:`rwlib.models.eval_mode` for eval-mode attacks); its parameter
    gradients are not touched. ``clamp=None`` leaves the input range unbounded."""
    _check(eps, alpha, steps)
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t))
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        x_adv = x_adv + (2 * noise - 1) * eps
        if clamp is not None:
            x_adv = x_adv.clamp(*clamp)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)            # project onto the eps-ball
        if clamp is not None:
            x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()


def pgd_perturb(*, eps: float, alpha: float, steps: int, random_start: bool = True,
                clamp: tuple[float, float] | None = (0.0, 1.0)):
    """The ``perturb(model, x, y, generator) -> x_adv`` hook of :func:`rwlib.train.fit` for adversarial training."""
    _check(eps, alpha, steps)

    def perturb(model, x, y, generator):
        with eval_mode(model):
            return pgd_linf(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                            clamp=clamp, generator=generator)

    return perturb


def robust_accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int, *, eps: float,
                    alpha: float, steps: int, random_start: bool = True, clamp=(0.0, 1.0),
                    generator: torch.Generator | None = None, batch_size: int = 1024) -> dict:
    """Accuracy under PGD (``eps=0`` gives natural accuracy) in eval mode: ``{"acc", "per_class" (tensor),
    "worst_class", "worst_class_acc"}``."""
    device = module_device(model)
    correct = []
    with eval_mode(model):
        for i in range(0, len(X), batch_size):
            xb, yb = X[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            if eps > 0:
                xb = pgd_linf(model, xb, yb, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                              clamp=clamp, generator=generator)
            with torch.no_grad():
                correct.append((model(xb).argmax(1) == yb).cpu())
    correct = torch.cat(correct).float()
    y = y.cpu()
    per_class = torch.stack([correct[y == c].mean() if (y == c).any() else torch.tensor(float("nan"))
                             for c in range(n_classes)])
    worst = int(torch.nan_to_num(per_class, nan=float("inf")).argmin())
    return {"acc": float(correct.mean()), "per_class": per_class, "worst_class": worst,
            "worst_class_acc": float(per_class[worst])}


def linear_adv_logistic_loss(w: torch.Tensor, b: torch.Tensor | float, X: torch.Tensor, y: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """Exact worst-case logistic loss of ``f(x) = w.x + b`` under an L-infinity budget ``eps``, per sample, for
    labels ``y`` in {-1, +1}: ``log(1 + exp(-y (w.x + b) + eps ||w||_1))`` (the attack is ``x - y eps sign(w)``)."""
    margin = y * (X @ w + b)
    return F.softplus(-margin + eps * w.abs().sum())
