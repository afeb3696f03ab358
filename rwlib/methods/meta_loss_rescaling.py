r"""STORM: self-taught on-the-fly meta loss rescaling (chapter 02).

Reference
---------
Michael Heck, Christian Geishauser, Nurul Lubis, Carel van Niekerk, Shutong Feng, Hsien-Chin Lin,
Benjamin Matthias Ruppik, Renato Vukovic, Milica Gašić. "Learning from Noisy Labels via Self-Taught
On-the-Fly Meta Loss Rescaling." AAAI 2025, arXiv:2412.12955. Official code:
gitlab.cs.uni-duesseldorf.de/general/dsml/storm-public (``storm.py``, ``modeling.py``, ``utils_storm.py``;
read in a public copy). Written for this book; no code is taken from it.

Equations (numbers as in the paper)
-----------------------------------
(1) Inner objective: theta is trained on the rescaled loss ``sum_i Omega_w(f_i) * l_i(theta)``.
(5) Outer objective ("meta loss rescaling"): the validation batch is drawn from the *noisy training set*
    and its losses are rescaled by the same Omega,
    ``L_val(w) = sum_j Omega_w(f_j^val) * l_j(theta'(w))``,
    so that w receives two gradients: ``grad_meta`` through theta'(w) (the look-ahead step of Ren et al.)
    and ``grad_outer`` through Omega_w(f_j^val) directly. Both are accumulated and w takes one Adam step.
(4) + Table 1 -- the 19 rescaler features of sample i with label c, from G forward passes
    (pass 0 plain, passes 1..G-1 with dropout on the input, as the official code does for TF-IDF inputs):
    for o in (loss l, max-probability p):  o_bar_i = mean_g o_ig,  o_breve_i = std_g o_ig;
    group statistics over a memory M of the last ``msize`` samples of class c that share the sample's
    agreement category: mean and std of o_bar, mean and std of o_breve;
    KL_i = KL( N(l_bar_i, l_breve_i) || N(mean l_bar, mean l_breve) ) and its group mean and std;
    OVL_i = overlap( same two normals ) and its group mean and std;
    CAT_i = 1 when the majority of the G predictions equals the (noisy) label.
(6) Rescaler: ``[w0, w1] = softmax(BN2(L2(ReLU(BN1(L1(f))))))``, one such network per class c (the sample's
    label picks it; ``class_separation=False`` is the paper's single-network ablation); w0 is the loss weight.
    The batch normalisations carry no affine parameters and always use the current batch's statistics. BN2
    keeps the weights from collapsing to zero: both logits are standardised over the batch, so their difference
    averages zero and each network gives at least one sample of the batch a weight >= 1/2.
    Initialisation: the two output columns start equal, so every weight starts at exactly 1/2 (the paper: "the
    inner loop approximates regular training without rescaling" at first).

Departures, all stated in the chapter: the look-ahead is one SGD step (the paper's text says SGD; the official
code steps the real Adam through ``higher``), taken on the batch mean instead of the sum (a constant factor
that moves into the look-ahead learning rate); the memories are not reset each epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..meta import functional_losses, lookahead, parameters_of
from ..models import eval_mode, module_device
from ..train import per_sample_ce

N_FEATURES = 19
EPS = 1e-8


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def forward_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, passes: int, dropout: float,
                   generator: torch.Generator, params: dict | None = None):
    """Losses, max-probabilities and predictions of ``passes`` forward passes, each of shape (G, B).

    Pass 0 sees the input as it is; passes 1..G-1 drop input features with probability ``dropout`` (inverted
    dropout, masks drawn from ``generator``; ``dropout=0`` gives G identical passes). ``params`` evaluates
    the model at other parameters (theta')."""
    views = [x]
    for _ in range(passes - 1):  # inverted dropout on the input, masks drawn from the generator
        keep = (torch.rand(x.shape, generator=generator) >= dropout).to(x.device, x.dtype)
        views.append(x * keep / (1.0 - dropout))
    xs = torch.cat(views)  # all G passes in one forward call
    with eval_mode(model):  # BatchNorm frozen, nothing updated
        logits = model(xs) if params is None else functional_call(model, params, (xs,))
    p = logits.softmax(-1).view(passes, len(y), -1)
    losses = per_sample_ce(logits, y.repeat(passes)).view(passes, len(y))
    return losses, p.max(-1).values, p.argmax(-1)


def gaussian_kl(mu1, sd1, mu2, sd2) -> torch.Tensor:
    """KL( N(mu1, sd1^2) || N(mu2, sd2^2) ), and 0 where either deviation is 0 (as the official code)."""
    ok = (sd1 > 0) & (sd2 > 0)
    s1, s2 = torch.where(ok, sd1, 1.0), torch.where(ok, sd2, 1.0)
    kl = torch.log(s2 / s1) + (s1 ** 2 + (mu1 - mu2) ** 2) / (2 * s2 ** 2) - 0.5
    return torch.where(ok, kl, torch.zeros_like(kl))


def normal_overlap(mu1, sd1, mu2, sd2) -> torch.Tensor:
    """Overlapping coefficient of two normal densities, integral of min(p1, p2) (Inman and Bradley 1989).

    The densities cross where their log-densities are equal, a quadratic in x; the overlap is one minus the
    probability mass by which the two distributions differ between and beyond the crossings."""
    dtype = mu1.dtype
    mu1, sd1, mu2, sd2 = (t.double() for t in (mu1, sd1.clamp_min(EPS), mu2, sd2.clamp_min(EPS)))
    swap = (sd2 < sd1) | ((sd2 == sd1) & (mu2 < mu1))  # order so that X has the smaller deviation
    mx, sx = torch.where(swap, mu2, mu1), torch.where(swap, sd2, sd1)
    my, sy = torch.where(swap, mu1, mu2), torch.where(swap, sd1, sd2)
    vx, vy = sx ** 2, sy ** 2
    dv, dm = vy - vx, (my - mx).abs()
    equal = dv == 0
    dv_safe = torch.where(equal, torch.ones_like(dv), dv)
    a = mx * vy - my * vx
    b = sx * sy * torch.sqrt(dm ** 2 + dv * torch.log(vy / vx))
    x1, x2 = (a + b) / dv_safe, (a - b) / dv_safe
    cdf = lambda x, m, s: 0.5 * (1 + torch.erf((x - m) / (s * math.sqrt(2))))  # noqa: E731
    unequal = 1 - ((cdf(x1, my, sy) - cdf(x1, mx, sx)).abs() + (cdf(x2, my, sy) - cdf(x2, mx, sx)).abs())
    same_sd = 2 * 0.5 * (1 + torch.erf(-dm / (2 * sx) / math.sqrt(2)))
    return torch.where(equal, same_sd, unequal).to(dtype)


def _group_stats(values: torch.Tensor, group: torch.Tensor, n_groups: int):
    """Mean and (unbiased) std of ``values`` (N, K) within each group; std = EPS for groups of one."""
    one_hot = F.one_hot(group, n_groups).to(values.dtype)  # (N, G)
    n = one_hot.sum(0)[:, None]
    mean = one_hot.T @ values / n.clamp_min(1)
    ss = one_hot.T @ (values - mean[group]) ** 2
    std = torch.where(n > 1, (ss / (n - 1).clamp_min(1)).sqrt(), torch.full_like(ss, EPS))
    return mean, std


class FeatureMemory:
    """The memory M of Table 1: per class, the per-sample statistics of the last ``size`` samples seen
    (``msize``; the paper sets it to the batch size), from which the group features are computed."""

    def __init__(self, n_classes: int, size: int):
        self.n_classes, self.size = n_classes, size
        self.stats = torch.empty(0, 5)  # l_bar, l_breve, p_bar, p_breve, agree
        self.labels = torch.empty(0, dtype=torch.long)

    def push(self, stats: torch.Tensor, labels: torch.Tensor) -> None:
        s = torch.cat([self.stats.to(stats), stats])
        lab = torch.cat([self.labels.to(labels.device), labels])
        one_hot = F.one_hot(lab, self.n_classes)
        newer = one_hot.flip(0).cumsum(0).flip(0)  # entries of each class from here to the newest
        keep = newer[torch.arange(len(lab), device=lab.device), lab] <= self.size
        self.stats, self.labels = s[keep], lab[keep]


def sample_statistics(losses: torch.Tensor, probs: torch.Tensor, preds: torch.Tensor, y: torch.Tensor):
    """Per-sample (B, 5): mean and std over the G passes of the loss and of the max-probability, and CAT
    (majority of the G predictions equals the label; a tie goes to pass 0)."""
    votes = (preds == y).sum(0)
    passes = preds.shape[0]
    agree = torch.where(2 * votes == passes, preds[0] == y, 2 * votes > passes)
    sd = (lambda t: t.std(0)) if passes > 1 else (lambda t: torch.zeros_like(t[0]))
    return torch.stack([losses.mean(0), sd(losses), probs.mean(0), sd(probs), agree.float()], 1)


def rescaler_features(stats: torch.Tensor, y: torch.Tensor, memory: FeatureMemory) -> torch.Tensor:
    """The 19 features of eq. (4) for a batch, given its per-sample statistics (:func:`sample_statistics`);
    the batch is first pushed into ``memory``. Groups are (class, CAT) pairs."""
    memory.push(stats, y)
    m, lab = memory.stats, memory.labels
    n_groups = 2 * memory.n_classes
    g_mem = 2 * lab + m[:, 4].long()
    g = 2 * y + stats[:, 4].long()
    mean, std = _group_stats(m[:, :4], g_mem, n_groups)  # Table 1: group mean/std of the four statistics
    # KL and OVL of each memory sample's loss normal against its group's (mean l_bar, mean l_breve)
    mu_g, sd_g = mean[g_mem, 0], mean[g_mem, 1]
    kl_m = gaussian_kl(m[:, 0], m[:, 1], mu_g, sd_g)
    ovl_m = normal_overlap(m[:, 0], m[:, 1], mu_g, sd_g)
    d_mean, d_std = _group_stats(torch.stack([kl_m, ovl_m], 1), g_mem, n_groups)
    kl, ovl = kl_m[-len(y):], ovl_m[-len(y):]  # the batch is the newest part of the memory, kept in order
    cols = []
    for k in range(4):  # o_i, group mean of o_bar/o_breve, group std of it -- in the order of eq. (4)
        cols += [stats[:, k], mean[g, k], std[g, k]]
    cols += [kl, d_mean[g, 0], d_std[g, 0], ovl, d_mean[g, 1], d_std[g, 1], stats[:, 4]]
    return torch.stack(cols, 1)


# ---------------------------------------------------------------------------------------------- rescaler
class Rescaler(nn.Module):
    """Omega of eq. (6), one network per class (``class_separation``), evaluated for all classes at once:
    ``softmax(BN2(L2(ReLU(BN1(L1(f))))))[:, 0]`` from the head of each sample's label."""

    def __init__(self, n_classes: int, n_features: int = N_FEATURES, *, class_separation: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        heads = n_classes if class_separation else 1
        bound = 1 / math.sqrt(n_features)  # torch.nn.Linear's default initialisation range

        def init(*shape):
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.w1, self.b1 = init(heads, n_features, n_features), init(heads, 1, n_features)
        # identical output columns: z0 = z1, so every weight starts at exactly 1/2 ("initially, the inner loop
        # approximates regular training without rescaling", Sec. "Learning the Model")
        self.w2 = nn.Parameter(init(heads, n_features, 1).data.repeat(1, 1, 2))
        self.b2 = nn.Parameter(init(heads, 1, 1).data.repeat(1, 1, 2))
        self.class_separation = class_separation

    @staticmethod
    def _bn(h: torch.Tensor) -> torch.Tensor:
        """Batch normalisation without affine parameters, over the batch dimension (dim 1)."""
        return (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-5)

    def forward(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self._bn(torch.matmul(f, self.w1) + self.b1))  # (heads, B, F)
        w = torch.softmax(self._bn(torch.matmul(h, self.w2) + self.b2), -1)  # eq. (6)
        head = y if self.class_separation else torch.zeros_like(y)
        return w[head, torch.arange(len(y), device=f.device), 0]


# ---------------------------------------------------------------------------------------------- the method
class STORM:
    """Meta loss rescaling as a ``weight_fn`` for :func:`rwlib.train.fit` (Algorithm 1).

    At each training step, on the batch ``idx`` of the (noisy) training set ``(X, y)``:

    1. features f_i from G forward passes of the current model (no gradient), weights w_i = Omega_w(f_i);
    2. the look-ahead ``theta'(w) = theta - lr * grad mean_i w_i l_i(theta)`` (:func:`rwlib.meta.lookahead`);
    3. a validation batch: drawn uniformly (with replacement) from ``val`` -- by default the noisy training set
       itself -- with its features computed at theta';
    4. the outer objective, eq. (5): ``mean_j Omega_w(f_j^val) l_j(theta')`` (``rescale_val=True``), or the plain
       validation loss (``False``: classic meta-reweighting, as with clean validation data); one Adam step on w;
    5. returns the weights of step 1 (detached): the model's real step uses the rescaler as it was before this
       step's meta update, as in the official code.

    Every weight handed out is logged (``history_idx``, ``history_w``, ``history_step``) for analysis.
    """

    def __init__(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int, *,
                 generator: torch.Generator, lookahead_lr: float = 0.1, meta_lr: float = 1e-2,
                 passes: int = 3, dropout: float = 0.1, msize: int = 128, val_batch: int = 128,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, rescale_val: bool = True,
                 class_separation: bool = True):
        self.model, self.X, self.y, self.n_classes = model, X, y, n_classes
        self.g, self.lr, self.passes, self.dropout = generator, lookahead_lr, passes, dropout
        self.val = val if val is not None else (X, y)
        self.val_batch, self.rescale_val = val_batch, rescale_val
        device = module_device(model)
        self.rescaler = Rescaler(n_classes, class_separation=class_separation, generator=generator).to(device)
        self.opt = torch.optim.Adam(self.rescaler.parameters(), lr=meta_lr)
        self.memory = FeatureMemory(n_classes, msize)      # M for the training batches
        self.val_memory = FeatureMemory(n_classes, msize)  # a separate one for the validation batches
        self.history_idx, self.history_w, self.history_step = [], [], []

    def features(self, x, y, memory, params=None) -> torch.Tensor:
        out = forward_passes(self.model, x, y, passes=self.passes, dropout=self.dropout, generator=self.g,
                             params=params)
        return rescaler_features(sample_statistics(*out, y), y, memory)

    def meta_objective(self, x, y, xv, yv, f=None, fv=None) -> torch.Tensor:
        """Eq. (5) at the current rescaler: look ahead on (x, y) with w = Omega(f), then the (rescaled)
        validation loss at theta'. Differentiable in the rescaler's parameters through both paths; the
        features f and f_val carry no gradient (they are inputs to Omega, computed without a graph)."""
        f = self.features(x, y, self.memory) if f is None else f
        w = self.rescaler(f, y)
        new = lookahead(self.model, x, y, w, self.lr)  # theta'(w): the meta path
        if fv is None:  # Algorithm 1: the validation features come from the updated model theta'
            fv = self.features(xv, yv, self.val_memory, {k: v.detach() for k, v in new.items()})
        lv = functional_losses(self.model, new, xv, yv)
        if not self.rescale_val:
            return lv.mean()
        return (self.rescaler(fv, yv) * lv).mean()  # eq. (5): the outer path through Omega(f_val)

    def __call__(self, losses: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        device = losses.device
        x, y = self.X[idx].to(device), self.y[idx].to(device)
        f = self.features(x, y, self.memory)
        with torch.no_grad():
            w = self.rescaler(f, y)  # the weights of this step's real update (eq. 1)
        j = torch.randint(len(self.val[1]), (self.val_batch,), generator=self.g)
        xv, yv = self.val[0][j].to(device), self.val[1][j].to(device)
        self.opt.zero_grad(set_to_none=True)
        self.meta_objective(x, y, xv, yv, f).backward(inputs=list(self.rescaler.parameters()))
        self.opt.step()
        self.history_idx.append(idx.cpu())
        self.history_w.append(w.cpu())
        self.history_step.append(step)
        return w

    def weights_by_step(self):
        """``(step, idx, w)`` of every weight handed out, as three flat tensors."""
        steps = torch.cat([torch.full((len(i),), s) for s, i in zip(self.history_step, self.history_idx)])
        return steps, torch.cat(self.history_idx), torch.cat(self.history_w)
