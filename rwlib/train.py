"""The book's one training loop, and the small pieces around it.

:func:`loop` drives any training: it calls a chapter's ``step_fn(t)`` (which returns the loss to minimise and
any metrics), steps the optimizer and the schedule, updates an EMA copy, evaluates every ``eval_every`` steps,
shows a ``tqdm.auto`` progress bar and records a :class:`History`.

:func:`fit` is the supervised case built on it. It computes **per-sample losses**, hands them to an
optional ``weight_fn(losses, idx, step) -> weights`` -- the hook every sample-reweighting chapter plugs into --
and minimises the mean of ``weights * losses``. Batches are whole tensors: no Python work per sample.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import eval_mode, module_device
from .repro import progress_enabled


# ---------------------------------------------------------------------------------------------- history
class History:
    """Metrics by step: ``hist.log(step, loss=..., acc=...)``; ``hist["loss"]`` -> (steps, values)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, step: int, **metrics) -> None:
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = v.item() if torch.is_tensor(v) else float(v)
        self.rows.append(row)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[key]) for r in self.rows if key in r]
        if not pts:
            raise KeyError(f"no metric {key!r} in history; recorded: {sorted(self.keys())}")
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v, dtype=float)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.series(key)[1]

    def keys(self) -> set[str]:
        return {k for r in self.rows for k in r} - {"step"}

    def last(self, key: str) -> float:
        return float(self[key][-1])

    def frame(self, **constants):
        """A long pandas frame (step, metric, value) with ``constants`` (e.g. method, seed) as columns."""
        import pandas as pd

        recs = [{"step": r["step"], "metric": k, "value": v, **constants}
                for r in self.rows for k, v in r.items() if k != "step"]
        return pd.DataFrame(recs)


# ---------------------------------------------------------------------------------------------- pieces
def per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample (no reduction)."""
    return F.cross_entropy(logits, y, reduction="none")


class ModelEMA:
    """An exponential moving average of a model's parameters (buffers are copied), for evaluation."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"bad EMA decay {decay!r}: expected 0 <= decay < 1")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on (X, y), in eval mode (training mode is restored)."""
    device = module_device(model)
    with eval_mode(model):
        logits = torch.cat([model(X[i:i + batch_size].to(device)) for i in range(0, len(X), batch_size)])
    y = y.to(device)
    return {"acc": (logits.argmax(1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item()}


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int, fraction: float = 7 / 16):
    """lr_t = lr_0 * cos(fraction * pi * t / total) -- FixMatch's schedule (fraction 7/16); 1/2 decays to 0."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: math.cos(fraction * math.pi * min(t, total_steps) / total_steps))


def decay_groups(params, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on matrices/filters only (no decay on biases and norm affines)."""
    named = list(params)
    return [{"params": [p for p in named if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in named if p.ndim <= 1], "weight_decay": 0.0}]


class Batches:
    """Endless random mini-batch indices over ``n`` items, reshuffled each epoch, drawn from ``generator``."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if batch_size <= 0:
            raise ValueError(f"bad batch_size {batch_size}: expected > 0")
        self.n, self.b, self.g = n, batch_size, generator
        self._perm = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self._perm) < self.b:
            reps = math.ceil((self.b - len(self._perm)) / self.n)
            fresh = torch.cat([torch.randperm(self.n, generator=self.g) for _ in range(reps)])
            self._perm = torch.cat([self._perm, fresh])
        idx, self._perm = self._perm[: self.b], self._perm[self.b:]
        return idx


# ---------------------------------------------------------------------------------------------- loops
def progress(steps: int, desc: str):
    """``range(steps)`` with a progress bar: a notebook widget when ipywidgets is there, else text; none when
    ``$RWLIB_PROGRESS=0`` (the runner's setting)."""
    if not progress_enabled():
        return range(steps)
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import trange
    except ImportError:
        from tqdm import trange
    return trange(steps, desc=desc, leave=False)


def loop(step_fn: Callable[[int], dict], *, steps: int, optimizer: torch.optim.Optimizer, scheduler=None,
         ema: tuple[ModelEMA, nn.Module] | None = None, eval_fn: Callable[[], dict] | None = None,
         eval_every: int = 0, desc: str = "train", history: History | None = None, clip: float | None = None,
         step_offset: int = 0) -> History:
    """Run ``steps`` optimisation steps.

    ``step_fn(t)`` returns a dict with ``"loss"`` (a scalar tensor to minimise) and any metrics (tensors or
    floats) to record at step ``t``. ``ema=(ModelEMA, model)`` updates the average after each step.
    ``eval_fn()`` returns metrics recorded every ``eval_every`` steps and after the last step.
    ``clip`` clips the global gradient norm; ``step_offset`` numbers the steps of a later training stage on
    from an earlier one (with the same ``history``).
    """
    if steps <= 0:
        raise ValueError(f"bad steps {steps}: expected > 0")
    hist = history if history is not None else History()
    for t in progress(steps, desc):
        out = step_fn(t)
        loss = out.pop("loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema[0].update(ema[1])
        metrics = {"loss": loss.detach(), **out}
        if eval_fn is not None and ((eval_every and (t + 1) % eval_every == 0) or t + 1 == steps):
            metrics.update(eval_fn())
        hist.log(step_offset + t + 1, **metrics)
    return hist


def fit(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
        optimizer: torch.optim.Optimizer, generator: torch.Generator, scheduler=None,
        loss_fn: Callable = per_sample_ce, weight_fn: Callable | None = None, augment: Callable | None = None,
        eval_data: tuple[torch.Tensor, torch.Tensor] | None = None, eval_every: int = 0,
        on_step: Callable[[int, nn.Module], dict] | None = None, ema: ModelEMA | None = None,
        perturb: Callable | None = None, side: torch.Tensor | None = None, desc: str = "fit") -> History:
    """Supervised training with per-sample losses and an optional per-sample weighting hook.

    - ``loss_fn(logits, y)`` returns one loss per sample (default: cross-entropy); with ``side`` (per-sample data
      beside the labels, e.g. a teacher's logits for distillation) it is called as ``loss_fn(logits, y, side[idx])``.
    - ``weight_fn(losses, idx, step)`` gets the detached per-sample losses and the batch's dataset indices and
      returns per-sample weights; the minimised loss is ``mean(weights * losses)`` (plain mean without it).
    - ``augment(x, generator)`` transforms a batch; ``on_step(step, model)`` returns extra metrics to record
      (e.g. weight norms); ``eval_data`` is evaluated (with the EMA model when given) every ``eval_every``.
    - ``perturb(model, x, y, generator)`` replaces each (augmented) batch before the loss -- adversarial
      training with :func:`rwlib.adversarial.pgd_perturb`; ``weight_fn`` then reweights the adversarial losses.
    - Batches move to the model's device: put the model on ``run.device`` and the data may stay on the CPU.
    """
    batches = Batches(len(y), batch_size, generator)
    device = module_device(model)

    def step_fn(t):
        idx = batches.next()
        xb, yb = X[idx], y[idx]
        if augment is not None:
            xb = augment(xb, generator)  # on the data's device, with the (CPU) generator
        xb, yb = xb.to(device), yb.to(device)  # no-op when the data live on the model's device
        if perturb is not None:
            xb = perturb(model, xb, yb, generator)
        logits = model(xb)
        losses = loss_fn(logits, yb) if side is None else loss_fn(logits, yb, side[idx].to(device))
        if weight_fn is not None:
            w = weight_fn(losses.detach(), idx, t)
            loss = (w * losses).mean()
        else:
            loss = losses.mean()
        out = {"loss": loss, "train_acc": (logits.argmax(1) == yb).float().mean().detach()}
        if on_step is not None:
            out.update(on_step(t, model))
        return out

    eval_fn = None
    if eval_data is not None:
        def eval_fn():
            m = evaluate(ema.module if ema is not None else model, *eval_data)
            return {"test_acc": m["acc"], "test_loss": m["loss"]}

    return loop(step_fn, steps=steps, optimizer=optimizer, scheduler=scheduler,
                ema=(ema, model) if ema is not None else None, eval_fn=eval_fn, eval_every=eval_every, desc=desc)


# ---------------------------------------------------------------------------------------------- language models
def token_weighted_mean(ell: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The usual LM loss from per-sequence mean losses ``ell`` and token counts ``n``: sum_i (n_i / sum n) ell_i."""
    return (n / n.sum() * ell).sum()


@torch.no_grad()
def eval_lm(model: nn.Module, val: dict[str, torch.Tensor], block: int, n_windows: int = 32) -> dict[str, float]:
    """Validation loss per domain on fixed windows (the same every call): ``{"val_<domain>": loss}``."""
    from .data.text import eval_windows

    device = module_device(model)
    out = {}
    with eval_mode(model):
        for name, tokens in val.items():
            x, y = (t.to(device) for t in eval_windows(tokens, block, n_windows))
            out[f"val_{name}"] = model.token_losses(x, y).mean().item()
    return out


def fit_lm(model: nn.Module, sampler, *, steps: int, batch_size: int, block: int,
           optimizer: torch.optim.Optimizer, scheduler=None, loss_hook: Callable | None = None,
           val: dict[str, torch.Tensor] | None = None, eval_every: int = 0, n_eval_windows: int = 32,
           clip: float | None = 1.0, history: History | None = None, step_offset: int = 0,
           desc: str = "lm") -> History:
    """Train a language model on windows from ``sampler`` (a :class:`rwlib.data.text.DomainSampler`).

    Each step computes every sequence's mean token loss ``ell`` and token count ``n``
    (``model.per_sample_loss``). ``loss_hook(step, ell, n, domain)`` -- the hook the sample-reweighting chapters
    plug into -- returns the loss to minimise (or ``(loss, metrics)``); without it the loss is the token-weighted
    mean. Domain weights can be changed between calls (``sampler.set_weights``): call ``fit_lm`` once per stage
    with the same ``history`` and a growing ``step_offset``. ``val`` (domain -> tokens) is evaluated per domain
    every ``eval_every`` steps and at the end.
    """

    device = module_device(model)

    def step_fn(t):
        x, y, dom = (b.to(device) for b in sampler.batch(batch_size, block))  # no-op when the corpus is there
        ell, n = model.per_sample_loss(x, y)
        metrics = {}
        if loss_hook is not None:
            out = loss_hook(step_offset + t, ell, n, dom)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
        else:
            loss = token_weighted_mean(ell, n)
        return {"loss": loss, "train_loss": token_weighted_mean(ell.detach(), n), **metrics}

    eval_fn = (lambda: eval_lm(model, val, block, n_eval_windows)) if val is not None else None
    return loop(step_fn, steps=steps, optimizer=optimizer, scheduler=scheduler, eval_fn=eval_fn,
                eval_every=eval_every, desc=desc, history=history, clip=clip, step_offset=step_offset)
