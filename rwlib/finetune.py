"""The fine-tuning kit: supervised fine-tuning, what it learned and forgot, and a registry of adaptation methods.

- :func:`sft_objective`, :func:`sft_train` -- the fine-tuning loss (answer tokens only) and its training run;
- :func:`answer_loss`, :func:`exact_match`, :func:`source_loss`, :func:`finetune_report` -- the measures: what
  the fine-tune learned on the target task and how much of the source domains it forgot;
- a registry of adaptation methods (:func:`register`, :data:`METHODS`): each name maps to a builder that turns a
  base model into ``(model, trainable parameters)`` -- or a :class:`Prepared` carrying its own optimizer, as
  LIFT's sparse Adam does. Full fine-tuning, LoRA and PiSSA are registered here; a paper's own method registers
  itself in its module (``rwlib.methods.bone`` registers Bat and Bone, ``rwlib.methods.lift`` LIFT and its
  sparse baselines);
- :func:`finetune` runs one method under a :class:`Recipe`; :func:`compare` runs several at several seeds
  through :func:`rwlib.sweep.sweep`, at matched trainable parameters: every builder receives the same LoRA
  ``rank`` and sizes itself to LoRA's count at that rank per adapted matrix (:func:`lora_count`); a method that
  cannot match it (full fine-tuning) reports its own count in the ``trainable`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import adapters as _adapters
from .data.tasks import sft_batch
from .models import eval_mode, module_device
from .repro import stream, stream_seed
from .rl.losses import sft_loss, token_entropy, token_logprobs
from .rl.rollout import evaluate_task
from .sweep import Result, sweep
from .train import History, cosine_lr, eval_lm, loop


# ------------------------------------------------------------------------------------------------ the loss
def sft_objective(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, entropy_coef: float = 0.0
                  ) -> torch.Tensor:
    """The fine-tuning loss on one :func:`rwlib.data.tasks.sft_batch`: mean negative log-likelihood of the
    completion tokens (minus ``entropy_coef`` times their mean entropy), differentiable."""
    logits = model(x)
    logp = token_logprobs(logits, y)
    entropy = token_entropy(logits) if entropy_coef else torch.zeros_like(logp)
    return sft_loss(logp, entropy, mask, entropy_coef)


def sft_train(model, optimizer, task, steps: int, batch_size: int, generator: torch.Generator, *,
              problems: list | None = None, problem_fn: Callable | None = None, entropy_coef: float = 0.0,
              scheduler=None, clip: float | None = 1.0, history: History | None = None, desc: str = "sft",
              eval_fn: Callable[[], dict] | None = None, eval_every: int = 0) -> History:
    """Supervised fine-tuning on the reference completions (loss on completion tokens only), on the model's
    device. Batches come from ``problem_fn(batch_size, generator)``, or uniformly with replacement from a fixed
    pool ``problems`` (encoded once), or else from ``task.sample``. ``eval_fn()`` is recorded every
    ``eval_every`` steps and after the last (as in :func:`rwlib.train.loop`)."""
    if problems is not None and problem_fn is not None:
        raise ValueError("give sft_train either a fixed pool `problems` or a `problem_fn`, not both")
    device = module_device(model)
    if problems is not None:
        pool = [t.to(device) for t in sft_batch(problems)]  # padding beyond an example is masked out

    def step_fn(t):
        if problems is not None:
            idx = torch.randint(len(problems), (batch_size,), generator=generator).to(device)
            x, y, mask = (t[idx] for t in pool)
        else:
            batch = problem_fn(batch_size, generator) if problem_fn else task.sample(batch_size, generator)
            x, y, mask = (t.to(device) for t in sft_batch(batch))
        return {"loss": sft_objective(model, x, y, mask, entropy_coef)}

    return loop(step_fn, steps=steps, optimizer=optimizer, scheduler=scheduler, desc=desc, history=history,
                clip=clip, eval_fn=eval_fn, eval_every=eval_every)


# ------------------------------------------------------------------------------------------------ the measures
@torch.no_grad()
def answer_loss(model, problems: list) -> float:
    """Teacher-forced cross-entropy per answer token on ``problems`` (a smooth companion of exact match),
    computed in eval mode on the model's device."""
    with eval_mode(model):
        x, y, mask = (t.to(module_device(model)) for t in sft_batch(problems))
        return float(sft_objective(model, x, y, mask))


def exact_match(model, task, problems: list, max_new_tokens: int = 8) -> float:
    """Greedy (temperature 0) exact-match accuracy on ``problems``."""
    return evaluate_task(model, task, problems, temperature=0, max_new_tokens=max_new_tokens)["pass@1"]


def source_loss(model: nn.Module, val: dict[str, torch.Tensor], block: int, n_windows: int = 32) -> float:
    """Mean next-token cross-entropy over the source domains' held-out windows: it rises when a fine-tune
    forgets what pre-training taught."""
    out = eval_lm(model, val, block, n_windows)
    return sum(out.values()) / len(out)


def finetune_report(model: nn.Module, task, problems: list, val: dict[str, torch.Tensor], *, block: int,
                    before: float, n_windows: int = 32, max_new_tokens: int = 4) -> dict[str, float]:
    """What a fine-tune on ``task`` learned and forgot: greedy exact match and answer cross-entropy on
    ``problems``, the source loss after, and forgetting = that loss minus ``before`` (:func:`source_loss` of the
    base model)."""
    after = source_loss(model, val, block, n_windows)
    return {"exact match": exact_match(model, task, problems, max_new_tokens=max_new_tokens),
            "target loss": answer_loss(model, problems), "source loss": after, "forgetting": after - before}


# ------------------------------------------------------------------------------------------------ the recipe
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune trains: ``steps`` of ``batch_size`` problems drawn uniformly from the training pool,
    ``optimizer`` (``adamw`` or ``adam``) at ``lr`` with ``betas`` and ``weight_decay``, a ``constant`` learning
    rate or a ``cosine`` decay to 0 without warm-up, and global gradient-norm clipping at ``clip``."""

    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "constant"
    clip: float | None = 1.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"bad recipe: steps={self.steps}, batch_size={self.batch_size}, lr={self.lr} "
                             f"must all be > 0")

    def but(self, **kw) -> "Recipe":
        return replace(self, **kw)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def make_scheduler(self, optimizer):
        return cosine_lr(optimizer, self.steps, 0.5) if self.schedule == "cosine" else None


# ------------------------------------------------------------------------------------------------ the registry
@dataclass
class Prepared:
    """A model ready to fine-tune: its trainable ``params`` and, for a method with its own optimizer,
    ``make_optimizer(recipe)``; ``finalize(model)`` runs after training (e.g. merge an adapter)."""

    model: nn.Module
    params: list
    make_optimizer: Callable[[Recipe], torch.optim.Optimizer] | None = None
    finalize: Callable[[nn.Module], None] | None = None
    trainable: int | None = None  # the method's trainable count when it is not the size of ``params`` (LIFT)

    def count(self) -> int:
        return self.trainable if self.trainable is not None else sum(p.numel() for p in self.params)


@dataclass
class FineTuned:
    """The outcome of :func:`finetune`: the model (eval mode), its optimizer, the training history and the
    method's trainable-parameter count."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    history: History
    trainable: int


Builder = Callable[..., Prepared]
METHODS: dict[str, Builder] = {}


def register(name: str):
    """Decorator: register ``builder(base, *, rank, seed, **options) -> Prepared | (model, params)`` under
    ``name``. ``rank`` is the LoRA rank whose trainable count the method should match; ``seed`` seeds any random
    initialisation without touching the global generator."""
    def deco(builder: Builder) -> Builder:
        if name in METHODS and METHODS[name] is not builder:
            raise ValueError(f"adaptation method {name!r} is registered twice")
        METHODS[name] = builder
        return builder
    return deco


def method_names() -> list[str]:
    _load_builtin_methods()
    return list(METHODS)


def _load_builtin_methods() -> None:
    """Import the method modules that register adaptation methods (the registry is filled on import)."""
    import importlib

    for mod in ("rwlib.methods.bone", "rwlib.methods.lift"):
        importlib.import_module(mod)


def prepare(base: nn.Module, method: str, *, rank: int, seed: int = 0, **options) -> Prepared:
    """A deep copy of ``base`` prepared for ``method`` (``base`` itself is never changed)."""
    if method not in METHODS:
        _load_builtin_methods()
    if method not in METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; valid: {', '.join(METHODS)}")
    out = METHODS[method](base, rank=rank, seed=seed, **options)
    return out if isinstance(out, Prepared) else Prepared(*out)


@register("Full FT")
def _full(base, *, rank, seed, target=None, **options):
    """Every parameter trains; with ``target`` (a ``(name, module) -> bool`` selector of linears) only the
    weights of the selected linears do, and the embeddings, head, norms and biases stay frozen."""
    if target is None:
        return Prepared(*_adapters.trainable_copy(base))
    model, _ = _adapters.trainable_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(n, m)]
    for w in weights:
        w.requires_grad_(True)
    return Prepared(model, weights)


@register("Full FT (block linears)")
def _full_block(base, *, rank, seed, target=None, **options):
    """The dense control of the sparse methods: every entry of the block linears (the matrices LIFT and the
    adapters change) trains with the recipe's optimizer, everything else frozen as for them."""
    return _full(base, rank=rank, seed=seed, target=target or _adapters.block_linears)


@register("LoRA")
def _lora(base, *, rank, seed, alpha=None, target=None, merge=False):
    model, params = _adapters.lora_copy(base, rank, init="lora", alpha=alpha, seed=seed, target=target)
    return Prepared(model, params, finalize=_adapters.merge_all if merge else None)


@register("PiSSA")
def _pissa(base, *, rank, seed, alpha=None, target=None, merge=False):
    model, params = _adapters.lora_copy(base, rank, init="pissa", alpha=alpha, seed=seed, target=target)
    return Prepared(model, params, finalize=_adapters.merge_all if merge else None)


def lora_count(model: nn.Module, rank: int, target=_adapters.block_linears) -> int:
    """LoRA's trainable count at ``rank``: ``rank * (in + out)`` summed over the adapted linears -- the reference
    every method of :func:`compare` is matched to."""
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and target(n, m))


# ------------------------------------------------------------------------------------------------ running
def finetune(base: nn.Module, method: str, problems: list, recipe: Recipe, *, rank: int, seed: int = 0,
             generator: torch.Generator | None = None, desc: str | None = None, **options):
    """Fine-tune a deep copy of ``base`` with ``method`` on batches from ``problems`` under ``recipe``.

    ``seed`` seeds the method's initialisation; ``generator`` draws the batches (default: a generator seeded
    with ``seed``). Returns a :class:`FineTuned`."""
    prep = prepare(base, method, rank=rank, seed=seed, **options)
    opt = prep.make_optimizer(recipe) if prep.make_optimizer else recipe.make_optimizer(prep.params)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    hist = sft_train(prep.model, opt, None, recipe.steps, recipe.batch_size, g, problems=problems,
                     scheduler=recipe.make_scheduler(opt), clip=recipe.clip, desc=desc or method)
    if prep.finalize is not None:
        prep.finalize(prep.model)
    return FineTuned(prep.model.eval(), opt, hist, prep.count())


def compare(base: nn.Module, task, runs, train_problems: list, eval_problems: list, val: dict, *,
            recipe: Recipe, rank: int, seeds, block: int, n_windows: int = 32, max_new_tokens: int = 4,
            streams: Callable[[int, str], tuple[int, torch.Generator]] | None = None,
            keep_models: bool = True) -> Result:
    """Fine-tune every run at every seed and report what each learned and forgot, through :func:`rwlib.sweep.sweep`.

    ``runs`` lists method names or ``(label, method, overrides)`` triples; ``overrides`` may hold a ``"lr"`` (or
    any :class:`Recipe` field) and the method's options (e.g. ``("LIFT r=16", "LIFT", {"filter_rank": 16})``).
    The table has, per (arm, seed): method, lr, trainable (the method's own count), lora count (the reference),
    the columns of :func:`finetune_report`, and the training loss curve goes to ``curves``. ``streams(seed,
    label)`` returns ``(init seed, batch generator)`` for a run (default: the named streams ``"init"`` and
    ``"batches"`` of ``seed``, the same for every run of a seed). The fine-tuned
    run (a :class:`FineTuned`) is kept in ``objects[label, seed]["run"]`` unless ``keep_models=False``."""
    entries = [(r, r, {}) if isinstance(r, str) else r for r in runs]
    recipe_fields = set(Recipe.__dataclass_fields__)
    before = source_loss(base, val, block, n_windows)
    reference = lora_count(base, rank)

    def one(label, seed):
        _, method, over = next(e for e in entries if e[0] == label)
        rec = recipe.but(**{k: v for k, v in over.items() if k in recipe_fields})
        options = {k: v for k, v in over.items() if k not in recipe_fields}
        init_seed, gen = streams(seed, label) if streams else (stream_seed(seed, "init"), stream(seed, "batches"))
        ft = finetune(base, method, train_problems, rec, rank=rank, seed=init_seed, generator=gen, desc=label,
                      **options)
        out = {"method": method, "lr": rec.lr, "trainable": ft.trainable, "lora count": reference,
               **finetune_report(ft.model, task, eval_problems, val, block=block, before=before,
                                 n_windows=n_windows, max_new_tokens=max_new_tokens),
               "history": ft.history}
        if keep_models:
            out["run"] = ft
        return out

    res = sweep(one, [e[0] for e in entries], seeds)
    res.table.attrs["source loss before"] = before
    return res


# ----------------------------------------------------------------------------------------------------------
# learning against forgetting: compare methods at matched target accuracy over a learning-rate grid
# ----------------------------------------------------------------------------------------------------------
def frontier(acc, forgetting, base_acc: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The learning/forgetting frontier of one method over a learning-rate grid: the runs that no other run
    beats on both target accuracy (higher) and forgetting (lower), plus the untouched base (``base_acc``, 0),
    which a learning rate of 0 gives. Returns the frontier's accuracies and forgetting, both increasing."""
    a, f = np.asarray(acc, dtype=float), np.asarray(forgetting, dtype=float)
    if a.shape != f.shape or a.ndim != 1 or not len(a) or np.isnan(a).any() or np.isnan(f).any():
        raise ValueError(f"frontier needs two equally long non-empty 1-D arrays without nan; got shapes "
                         f"{a.shape} and {f.shape}")
    a, f = np.append(a, base_acc), np.append(f, 0.0)
    order = np.lexsort((f, -a))              # by accuracy, descending; ties: least forgetting first
    keep, best = [], np.inf
    for i in order:                          # a run is on the frontier if it forgets less than every
        if f[i] < best:                      # run at least as accurate
            keep.append(i)
            best = f[i]
    keep = keep[::-1]
    return a[keep], f[keep]


def forgetting_at(acc, forgetting, level: float, base_acc: float = 0.0) -> float:
    """Forgetting needed to reach target accuracy ``level``, read off :func:`frontier` by linear interpolation
    between its runs (nan when no run of the grid reaches ``level``)."""
    fa, ff = frontier(acc, forgetting, base_acc)
    if level > fa[-1]:
        return float("nan")
    return float(np.interp(level, fa, ff))


def matched_forgetting(table, method: str, baseline: str, by: str = "family", base_acc: float = 0.0,
                       acc: str = "exact match", forgetting: str = "forgetting"):
    """Forgetting of ``method`` and ``baseline`` at matched target accuracy, per seed, from a learning-rate
    sweep (a tidy ``table`` with columns ``by``, ``seed``, ``acc`` and ``forgetting``; one row per learning
    rate). The matched level is the highest accuracy both reach on their grids, ``min(max acc)``, and each
    method's forgetting there is read off its frontier (:func:`forgetting_at`). Returns a frame indexed by
    seed: level, ``method``, ``baseline``."""
    for name in (method, baseline):
        if name not in set(table[by]):
            raise ValueError(f"unknown {by} {name!r}; valid: {', '.join(map(str, dict.fromkeys(table[by])))}")
    rows = {}
    for seed, d in table.groupby("seed", sort=True):
        a, b = d[d[by] == method], d[d[by] == baseline]
        level = min(a[acc].max(), b[acc].max())
        rows[seed] = {"level": level,
                      method: forgetting_at(a[acc], a[forgetting], level, base_acc),
                      baseline: forgetting_at(b[acc], b[forgetting], level, base_acc)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("seed")


def matched_summary(table, method: str, baselines, by: str = "family", base_acc: float = 0.0,
                    acc: str = "exact match", forgetting: str = "forgetting"):
    """:func:`matched_forgetting` of ``method`` against each of ``baselines``, summarised over seeds: a frame
    indexed by baseline with the mean matched level, the mean forgetting of the method and of the baseline
    there, the mean gap (baseline minus method: positive = the method forgets less), ``wins`` (seeds where
    the method forgets strictly less) and ``n`` (seeds)."""
    rows = {}
    for b in baselines:
        m = matched_forgetting(table, method, b, by, base_acc, acc, forgetting)
        rows[b] = {"level": m["level"].mean(), "method": m[method].mean(), "baseline": m[b].mean(),
                   "gap": (m[b] - m[method]).mean(), "wins": int((m[method] < m[b]).sum()), "n": len(m)}
    return pd.DataFrame.from_dict(rows, orient="index")
