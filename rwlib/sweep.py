"""The experiment kit every comparison goes through: arms x seeds into one tidy table.

A chapter writes one function that runs one arm (a method, a baseline, a setting) at one seed and returns its
numbers; :func:`sweep` runs it over all arms and seeds and collects::

    def one(arm, seed):
        model, hist = train(arm, seed)
        return {"acc": evaluate(model), "history": hist, "model": model}

    res = sweep(one, ["ERM", "ours"], seeds=range(3))
    res.table                       # one row per (arm, seed): arm, seed, acc
    res.curves                      # long frame: arm, seed, step, metric, value (from each History)
    res.objects["ours", 0]["model"] # anything that is not a number is kept here, not in the table
    res.compare("acc", "ours", ["ERM"])     # mean, paired gap, its standard error, worst seed, wins k/N
    res.gap("acc", "ours", "ERM")           # the same for one baseline, as a Gap (what the ledger takes)
    res.ranks("acc")                        # each arm's rank at each seed

``arms`` is a list of labels (``fn(label, seed)``) or a mapping label -> keyword arguments
(``fn(seed=seed, **kwargs)``), for arms that are settings rather than names. A *paired* gap compares the
method and the baseline at the same seed (same data, same initialisation where the arms share them), which
removes the seed-to-seed variation that both share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .train import History


@dataclass(frozen=True)
class Gap:
    """A paired gap ``method - baseline`` over ``n`` repeats, signed so that positive means *better*.

    ``se`` is the standard error of the mean gap (nan for one repeat); ``worst`` the smallest per-repeat gap;
    ``wins`` the number of repeats with a strictly positive gap."""

    mean: float
    se: float
    worst: float
    wins: int
    n: int
    method_mean: float
    baseline_mean: float

    def margin(self, k: float = 2.0) -> float:
        """``k`` standard errors (0 when there is a single repeat and so no estimate of the noise)."""
        return 0.0 if self.n < 2 or math.isnan(self.se) else k * self.se


def paired_gap(method: Sequence[float], baseline: Sequence[float], higher: bool = True) -> Gap:
    """The :class:`Gap` between paired measurements (same seeds, same order) of a method and a baseline."""
    a = np.asarray(method, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_gap needs two equally long non-empty 1-D sequences; got shapes {a.shape} "
                         f"and {b.shape}")
    d = (a - b) if higher else (b - a)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return Gap(float(d.mean()), se, float(d.min()), int((d > 0).sum()), len(d), float(a.mean()), float(b.mean()))


def _is_scalar(v) -> bool:
    """Numbers, booleans and strings go to the table; anything else to ``objects``."""
    if isinstance(v, (bool, np.bool_, str)):
        return True
    if isinstance(v, (int, float, np.integer, np.floating)):
        return True
    return hasattr(v, "ndim") and getattr(v, "ndim", None) == 0 and hasattr(v, "item")


@dataclass
class Result:
    """What :func:`sweep` collected (see the module docstring)."""

    table: pd.DataFrame
    curves: pd.DataFrame
    objects: dict
    arms: list
    seeds: list

    def values(self, metric: str, arm: str) -> np.ndarray:
        """``metric`` of ``arm`` at every seed, in the order of :attr:`seeds`."""
        self._check(metric, [arm])
        rows = self.table[self.table["arm"] == arm].set_index("seed")
        return rows.loc[self.seeds, metric].to_numpy(dtype=float)

    def pivot(self, metric: str) -> pd.DataFrame:
        """A seeds x arms frame of ``metric``."""
        self._check(metric, [])
        return self.table.pivot(index="seed", columns="arm", values=metric)[self.arms]

    def mean(self, metric: str) -> pd.Series:
        """Mean of ``metric`` over seeds, per arm (in the arms' order)."""
        return self.pivot(metric).mean()

    def gap(self, metric: str, method: str, baseline: str, higher: bool = True) -> Gap:
        """The paired :class:`Gap` of ``method`` over ``baseline`` on ``metric`` (``higher``: bigger is better)."""
        return paired_gap(self.values(metric, method), self.values(metric, baseline), higher)

    def compare(self, metric: str, method: str, baselines: Iterable[str] | None = None,
                higher: bool = True) -> pd.DataFrame:
        """One row per baseline: the means, the paired gap (positive = the method is better), its standard
        error, the worst seed's gap and the seeds the method won (strictly)."""
        baselines = [a for a in self.arms if a != method] if baselines is None else list(baselines)
        rows = []
        for b in baselines:
            g = self.gap(metric, method, b, higher)
            rows.append({"baseline": b, method: g.method_mean, "baseline mean": g.baseline_mean, "gap": g.mean,
                         "se": g.se, "worst seed gap": g.worst, "wins": f"{g.wins}/{g.n}"})
        return pd.DataFrame(rows)

    def ranks(self, metric: str, higher: bool = True) -> pd.DataFrame:
        """Each arm's rank (1 = best) at each seed: a seeds x arms frame."""
        return self.pivot(metric).rank(axis=1, ascending=not higher, method="min").astype(int)

    def _check(self, metric: str, arms: list) -> None:
        if metric not in self.table.columns or metric in ("arm", "seed"):
            valid = [c for c in self.table.columns if c not in ("arm", "seed")]
            raise KeyError(f"unknown metric {metric!r}; valid: {', '.join(valid)}")
        for a in arms:
            if a not in self.arms:
                raise KeyError(f"unknown arm {a!r}; valid: {', '.join(map(str, self.arms))}")


def sweep(fn: Callable, arms: Sequence[str] | Mapping[str, Mapping], seeds: Iterable[int], *,
          order: str = "seed") -> Result:
    """Run ``fn`` for every arm at every seed and collect a :class:`Result`.

    ``fn`` returns a dict: numbers and strings go to :attr:`Result.table`, a :class:`rwlib.train.History` (or a list of
    them under ``"history"``) to :attr:`Result.curves`, anything else to :attr:`Result.objects`.
    ``order="seed"`` runs all arms of seed 0 first (the default), ``"arm"`` all seeds of the first arm first.
    """
    if order not in ("seed", "arm"):
        raise ValueError(f"unknown order {order!r}; valid: seed, arm")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("sweep needs at least one seed")
    if isinstance(arms, Mapping):
        labels = list(arms)
        call = lambda arm, seed: fn(seed=seed, **arms[arm])  # noqa: E731
    else:
        labels = list(arms)
        call = fn
    if not labels:
        raise ValueError("sweep needs at least one arm")
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must be unique; got {labels}")
    pairs = [(a, s) for s in seeds for a in labels] if order == "seed" else [(a, s) for a in labels for s in seeds]
    rows, curves, objects = [], [], {}
    for arm, seed in pairs:
        out = call(arm, seed)
        if not isinstance(out, Mapping):
            raise TypeError(f"the sweep's function must return a dict; arm {arm!r} seed {seed} returned "
                            f"{type(out).__name__}")
        row, kept = {"arm": arm, "seed": seed}, {}
        for k, v in out.items():
            if isinstance(v, History):
                curves.append(v.frame(arm=arm, seed=seed).assign(curve=k))
            elif _is_scalar(v):
                row[k] = v.item() if hasattr(v, "item") else v
            else:
                kept[k] = v
        rows.append(row)
        objects[arm, seed] = kept
    cols = ["arm", "seed", "step", "metric", "value", "curve"]
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=cols)
    return Result(pd.DataFrame(rows), curves_df, objects, labels, seeds)
