"""Offline datasets, splits and few-label subsets; see :mod:`rwlib.data.augment` for views and
:mod:`rwlib.data.registry` for the checksummed downloads that full mode may use.

Every loader here works without a network: scikit-learn's bundled ``load_digits``, the procedurally
generated ``mnist1d`` (generated, never downloaded) and synthetic generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .augment import strong_view, weak_view  # noqa: F401  (re-exported)

DATASETS = ("digits", "mnist1d")


@dataclass
class Dataset:
    """Tensors of one dataset: ``X`` of shape (N, C, H, W) or (N, C, L), float32; ``y`` int64 labels."""

    X: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "Dataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Dataset(self.X[idx], self.y[idx], self.n_classes, self.name)

    @property
    def shape(self) -> tuple:
        return tuple(self.X.shape[1:])


@lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=None)
def _mnist1d(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG: give it back untouched
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    X = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return X, y


def load(name: str, *, num_samples: int = 5000) -> Dataset:
    """Load an offline dataset by name.

    - ``"digits"``: scikit-learn's 1797 8x8 handwritten digits, pixels in [0, 1], shape (N, 1, 8, 8).
    - ``"mnist1d"``: Greydanus's procedurally generated 1-D digits (length 40), shape (N, 1, 40);
      ``num_samples`` sets how many are generated (5000 by default, ~2 s).
    """
    if name == "digits":
        X, y = _digits()
        return Dataset(torch.from_numpy(X).unsqueeze(1), torch.from_numpy(y), 10, name)
    if name == "mnist1d":
        X, y = _mnist1d(int(num_samples))
        return Dataset(torch.from_numpy(X).unsqueeze(1), torch.from_numpy(y), 10, name)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def stratified_split(y: torch.Tensor, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with ``n_test`` test samples spread evenly over the classes."""
    y = torch.as_tensor(y)
    classes = torch.unique(y)
    if not 0 < n_test < len(y):
        raise ValueError(f"bad n_test {n_test}: expected 0 < n_test < {len(y)}")
    g = torch.Generator().manual_seed(seed)
    per = np.full(len(classes), n_test // len(classes))
    per[: n_test % len(classes)] += 1
    train, test = [], []
    for c, k in zip(classes, per):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class FewLabelSplit:
    labeled: Dataset
    unlabeled: Dataset
    test: Dataset


def few_label_split(data: Dataset, n_per_class: int, n_test: int, seed: int) -> FewLabelSplit:
    """Semi-supervised split: a stratified test set, ``n_per_class`` labels per class, the rest unlabeled.

    The unlabeled part keeps its labels in ``y`` for diagnostics only (pseudo-label accuracy); methods
    must never train on them.
    """
    train_idx, test_idx = stratified_split(data.y, n_test, seed)
    ytr = data.y[train_idx]
    g = torch.Generator().manual_seed(seed + 1)
    lab = []
    for c in range(data.n_classes):
        idx = train_idx[ytr == c]
        if len(idx) < n_per_class:
            raise ValueError(f"class {c} has {len(idx)} training samples, fewer than n_per_class={n_per_class}")
        lab.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])
    lab = torch.cat(lab)
    unl = train_idx[~torch.isin(train_idx, lab)]
    return FewLabelSplit(data.subset(lab), data.subset(unl), data.subset(test_idx))


def gaussian_blobs(n: int, n_classes: int = 2, dim: int = 2, sep: float = 2.0, seed: int = 0) -> Dataset:
    """A synthetic classification set: ``n_classes`` Gaussian blobs whose means are ``sep`` apart."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, dim, generator=g)
    means = sep * means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.randint(0, n_classes, (n,), generator=g)
    X = means[y] + torch.randn(n, dim, generator=g)
    return Dataset(X, y, n_classes, "blobs")
