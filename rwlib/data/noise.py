"""Noisy and imbalanced versions of a labelled dataset, for the sample-reweighting chapters.

- :func:`symmetric_noise` -- each label is replaced, with probability ``rate``, by a uniformly drawn *other* class;
- :func:`pair_noise` -- class-dependent (asymmetric) noise: a label of class c flips to class ``(c + 1) % C``
  with probability ``rate`` (the "pair flip" of Han et al., 2018);
- :func:`noisy_labels` -- either kind on a :class:`rwlib.data.Dataset`, returning a :class:`NoisyLabels` that keeps
  the clean labels *for analysis only* (the weight histograms and AUROCs of the chapters), never for training;
- :func:`step_imbalance` and :func:`long_tail` -- the two imbalance splits of the literature: the last
  ``n_minority`` classes keep ``1 / ratio`` of their samples (step), or class c keeps ``ratio ** (-c / (C - 1))``
  of them (exponential long tail).

Every draw takes a ``torch.Generator``: the same generator state gives the same corruption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOISE_KINDS = ("symmetric", "pair")


def _check_rate(rate: float) -> float:
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"bad noise rate {rate!r}: expected 0 <= rate < 1")
    return float(rate)


def symmetric_noise(y: torch.Tensor, rate: float, n_classes: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_noisy, is_noisy)``: each label flips with probability ``rate`` to one of the other ``n_classes - 1``
    classes, uniformly (so a flipped label is always wrong)."""
    rate = _check_rate(rate)
    if n_classes < 2:
        raise ValueError(f"bad n_classes {n_classes}: noise needs at least 2 classes")
    flip = torch.rand(len(y), generator=generator) < rate
    shift = torch.randint(1, n_classes, (len(y),), generator=generator)
    y_noisy = torch.where(flip, (y + shift) % n_classes, y)
    return y_noisy, flip


def pair_noise(y: torch.Tensor, rate: float, n_classes: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_noisy, is_noisy)``: each label of class c flips to ``(c + 1) % n_classes`` with probability ``rate``."""
    rate = _check_rate(rate)
    flip = torch.rand(len(y), generator=generator) < rate
    return torch.where(flip, (y + 1) % n_classes, y), flip


@dataclass
class NoisyLabels:
    """Training labels with noise: ``y`` to train on, ``clean`` and ``is_noisy`` for analysis only."""

    y: torch.Tensor
    clean: torch.Tensor
    is_noisy: torch.Tensor
    kind: str
    rate: float

    @property
    def realised_rate(self) -> float:
        return float(self.is_noisy.float().mean())


def noisy_labels(y: torch.Tensor, n_classes: int, *, rate: float, kind: str = "symmetric",
                 generator: torch.Generator) -> NoisyLabels:
    """Corrupt ``y`` with ``kind`` noise (one of :data:`NOISE_KINDS`) at ``rate``."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    fn = symmetric_noise if kind == "symmetric" else pair_noise
    y_noisy, flip = fn(y, rate, n_classes, generator)
    return NoisyLabels(y_noisy, y.clone(), flip, kind, float(rate))


def _keep_per_class(y: torch.Tensor, fractions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    keep = []
    for c, frac in enumerate(fractions.tolist()):
        idx = (y == c).nonzero().flatten()
        n = max(1, round(frac * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(keep).sort().values


def step_imbalance(y: torch.Tensor, n_classes: int, *, ratio: float, n_minority: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Indices of a step-imbalanced subset: the last ``n_minority`` classes keep a ``1 / ratio`` share of their
    samples (at least one), the others keep all. ``ratio >= 1``."""
    if ratio < 1:
        raise ValueError(f"bad imbalance ratio {ratio!r}: expected >= 1 (majority size / minority size)")
    if not 0 < n_minority < n_classes:
        raise ValueError(f"bad n_minority {n_minority!r}: expected 1..{n_classes - 1}")
    fractions = torch.ones(n_classes)
    fractions[n_classes - n_minority:] = 1.0 / ratio
    return _keep_per_class(y, fractions, generator)


def long_tail(y: torch.Tensor, n_classes: int, *, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of an exponentially long-tailed subset: class c keeps a ``ratio ** (-c / (C - 1))`` share, so the
    first class keeps all and the last ``1 / ratio``."""
    if ratio < 1:
        raise ValueError(f"bad imbalance ratio {ratio!r}: expected >= 1 (head size / tail size)")
    fractions = ratio ** (-torch.arange(n_classes, dtype=torch.float64) / max(1, n_classes - 1))
    return _keep_per_class(y, fractions, generator)


def class_counts(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.bincount(y, minlength=n_classes)
