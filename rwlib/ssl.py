"""Semi-supervised learning pieces shared by the SSL chapters: FixMatch's losses, distribution alignment,
and one trainer that runs FixMatch and accepts an extra unlabeled-loss module (ShrinkMatch plugs in there).

FixMatch (Sohn et al., 2020): with a weak view alpha(u) and a strong view A(u) of each unlabeled sample,

    p_b = softmax(f(alpha(u_b)))            (detached; optionally distribution-aligned)
    m_b = 1[max_k p_bk >= tau]              (the certain mask)
    L_x = CE(f(alpha(x)), y)                (labeled batch)
    L_u = (1/muB) sum_b m_b H(p_b, softmax(f(A(u_b))))     (soft target p_b, or its argmax when hard)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import repro
from .data import FewLabelSplit, strong_view, weak_view
from .models import SmallCNN
from .train import History, ModelEMA, cosine_lr, decay_groups, evaluate, loop, Batches


def fixmatch_losses(logits_x: torch.Tensor, y: torch.Tensor, probs_w: torch.Tensor, logits_s: torch.Tensor,
                    tau: float, soft: bool = False):
    """Return (L_x, L_u, mask): supervised CE, masked consistency loss (mean over the unlabeled batch), mask."""
    probs_w = probs_w.detach()
    L_x = F.cross_entropy(logits_x, y)
    conf, hard = probs_w.max(1)
    mask = (conf >= tau).float()
    if soft:
        per = -(probs_w * F.log_softmax(logits_s, 1)).sum(1)
    else:
        per = F.cross_entropy(logits_s, hard, reduction="none")
    L_u = (per * mask).mean()
    return L_x, L_u, mask


class DistributionAlignment:
    """p <- normalise(p / mean of the last ``queue_len`` batch-mean predictions) (ReMixMatch-style, as in
    SimMatch/ShrinkMatch's CIFAR code). The queue is updated with the batch mean *before* alignment."""

    def __init__(self, num_classes: int, queue_len: int = 32):
        self.queue = torch.full((queue_len, num_classes), 1.0 / num_classes)
        self.ptr = 0

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if self.queue.device != probs.device:
            self.queue = self.queue.to(probs.device)
        self.queue[self.ptr] = probs.mean(0)
        self.ptr = (self.ptr + 1) % len(self.queue)
        p = probs / self.queue.mean(0)
        return p / p.sum(1, keepdim=True)


@dataclass(frozen=True)
class SSLConfig:
    steps: int = 1000
    batch: int = 16          # labeled batch B
    mu: int = 7              # unlabeled batch = mu * B
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    tau: float = 0.95
    ema: float = 0.99
    da: bool = True          # distribution alignment
    soft: bool = True        # soft (DA) targets in L_u, as ShrinkMatch's CIFAR code; False = hard argmax
    lambda_u: float = 1.0
    eval_every: int = 100
    widths: tuple = (16, 32)
    feat_dim: int = 64
    unsupervised: bool = True  # False: supervised-only reference (labeled loss alone)

    def but(self, **kw) -> "SSLConfig":
        return replace(self, **kw)


def train_ssl(split: FewLabelSplit, cfg: SSLConfig, seed: int, extra: nn.Module | None = None,
              desc: str = "ssl", device: str | torch.device = "cpu") -> tuple[History, nn.Module]:
    """Train FixMatch (or the supervised reference, ``cfg.unsupervised=False``) on a few-label split.

    ``extra``, when given, is a module called as ``extra(feats_s, probs_w, mask, step) -> (loss, metrics)``
    on the strong-view features of the unlabeled batch; its parameters are trained too and its loss is added
    (times ``lambda_u``). Labeled, weak and strong views go through the network in one forward pass, so
    BatchNorm sees them together. Returns the history (EMA test accuracy, mask ratio, ...) and the EMA model.
    The networks train on ``device``; the data stay where they are and the augmentations draw from a CPU
    generator, so a run is the same on any device up to floating-point order.

    Randomness comes from two named streams of ``seed``: ``"ssl/init"`` (the network's initialisation) and
    ``"ssl/batches"`` (batch order and augmentations); the global generator is left alone. An ``extra`` module
    is initialised by the caller (e.g. under ``repro.seeded(repro.stream_seed(seed, "init/aux"))``).
    """
    g = repro.stream(seed, "ssl/batches")
    with repro.seeded(repro.stream_seed(seed, "ssl/init")):
        model = SmallCNN(split.labeled.shape, split.labeled.n_classes, cfg.widths, cfg.feat_dim)
    model.to(device)
    if extra is not None:
        extra.to(device)
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    opt = torch.optim.SGD(decay_groups(params, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=True)
    sched = cosine_lr(opt, cfg.steps)
    ema = ModelEMA(model, cfg.ema)
    da = DistributionAlignment(split.labeled.n_classes) if cfg.da else None
    Xl, yl, Xu = split.labeled.X, split.labeled.y, split.unlabeled.X
    lab, unl = Batches(len(yl), cfg.batch, g), Batches(len(Xu), cfg.mu * cfg.batch, g)

    def step_fn(t):
        li = lab.next()
        xl = weak_view(Xl[li], g).to(device)
        yb = yl[li].to(device)
        if not cfg.unsupervised:
            logits_x = model(xl)
            return {"loss": F.cross_entropy(logits_x, yb)}
        u = Xu[unl.next()]
        xw, xs = weak_view(u, g).to(device), strong_view(u, g).to(device)
        feats = model.features(torch.cat([xl, xw, xs]))
        n_l, n_u = len(xl), len(u)
        logits = model.head(feats)
        logits_x, logits_w, logits_s = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
        probs = torch.softmax(logits_w.detach(), 1)
        if da is not None:
            probs = da(probs)
        L_x, L_u, mask = fixmatch_losses(logits_x, yb, probs, logits_s, cfg.tau, cfg.soft)
        loss = L_x + cfg.lambda_u * L_u
        out = {"mask_ratio": mask.mean(), "utilisation": mask.mean()}
        if extra is not None:
            L_e, m = extra(feats[n_l + n_u:], probs, mask.bool(), t)
            loss = loss + cfg.lambda_u * L_e
            out.update(m)
        out["loss"] = loss
        return out

    def eval_fn():
        return {"test_acc": evaluate(ema.module, split.test.X, split.test.y)["acc"]}

    hist = loop(step_fn, steps=cfg.steps, optimizer=opt, scheduler=sched, ema=(ema, model), eval_fn=eval_fn,
                eval_every=cfg.eval_every, desc=desc)
    return hist, ema.module
