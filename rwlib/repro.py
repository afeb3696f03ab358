"""Reproducibility: seeds, threads, device, and the quick/full mode of a chapter.

A chapter declares its sizes once, for both modes, with :func:`setup`::

    run = setup(mode, seed, quick=dict(steps=300, seeds=2), full=dict(steps=20_000, seeds=3))
    run.sizes.steps      # 300 on a CPU laptop, 20_000 on a GPU
    run.device           # torch.device("cpu") or ("cuda")

``mode="auto"`` means quick on a CPU and full when a GPU is present. Both modes must declare the same keys,
so no size silently changes meaning between them.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

MODES = ("quick", "full", "auto")
MAX_SEED = 2**32 - 1


def check_seed(seed) -> int:
    """Return ``seed`` as an int, or raise ``ValueError`` naming the bad value and the valid range."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, str)):
        raise ValueError(f"bad seed {seed!r}: expected an integer in 0..{MAX_SEED}")
    try:
        value = int(seed)
    except ValueError:
        raise ValueError(f"bad seed {seed!r}: expected an integer in 0..{MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"bad seed {seed!r}: expected an integer in 0..{MAX_SEED}")
    return value


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh CPU ``torch.Generator`` seeded with ``seed``."""
    seed = check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def stream_seed(seed: int, name: str) -> int:
    """The seed of the random stream ``name`` of a run seeded with ``seed``: a 63-bit hash of both.

    Different names give unrelated streams, and so do different seeds: unlike hand-picked offsets
    (``1000 + seed``), the streams of seed 0 never coincide with those of seed 1000."""
    seed = check_seed(seed)
    if not isinstance(name, str) or not name:
        raise ValueError(f"bad stream name {name!r}: expected a non-empty string such as 'rollouts'")
    digest = hashlib.sha256(f"rwlib/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream(seed: int, name: str) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` for the named random stream of ``seed`` (see :func:`stream_seed`).

    Every random draw of the library takes a generator; chapters name their streams::

        g_data = stream(run.seed, "data"); g_init = stream(run.seed, "init/LoRA")
    """
    return torch.Generator().manual_seed(stream_seed(seed, name))


def repeat_seeds(seed: int, k: int, name: str = "repeat") -> list[int]:
    """Seeds of a chapter's ``k`` inner repeats, derived from the chapter seed (``stream_seed(seed, f"{name}/{i}")``
    reduced to a valid chapter seed): sweep seeds 0..4 never share a repeat, as ``range(seed, seed + k)`` would."""
    if k < 1:
        raise ValueError(f"bad number of repeats {k!r}: expected >= 1")
    return [stream_seed(seed, f"{name}/{i}") % (MAX_SEED + 1) for i in range(k)]


@contextmanager
def seeded(seed: int):
    """Run a block with torch's global generator seeded with ``seed`` and restore it afterwards.

    For code that draws from the global generator and cannot be handed one (``nn.Module`` initialisers):
    ``with seeded(stream_seed(run.seed, "init")): model = TinyGPT(...)``. The library never reseeds the
    global generator otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"bad seed {seed!r}: expected an integer in 0..2**64-1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: ``n``, else ``$RWLIB_THREADS``, else leave torch's default."""
    if n is None and os.environ.get("RWLIB_THREADS"):
        n = int(os.environ["RWLIB_THREADS"])
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def has_gpu() -> bool:
    return torch.cuda.is_available()


def get_device(mode: str = "quick") -> torch.device:
    """``cuda`` in full mode when a GPU exists, else ``cpu`` (quick mode always runs on the CPU)."""
    return torch.device("cuda" if mode == "full" and has_gpu() else "cpu")


def resolve_mode(mode: str) -> str:
    """``"auto"`` becomes ``"full"`` on a GPU and ``"quick"`` otherwise; other modes pass through."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "auto":
        return "full" if has_gpu() else "quick"
    return mode


def progress_enabled() -> bool:
    """Progress bars show unless ``$RWLIB_PROGRESS=0`` (the runner sets it: bars are noise in a log)."""
    return os.environ.get("RWLIB_PROGRESS", "1") != "0"


@dataclass
class Run:
    """What a chapter needs to know about this execution."""

    mode: str
    seed: int
    device: torch.device
    sizes: SimpleNamespace
    threads: int
    started: float = field(default_factory=time.perf_counter)

    def stream(self, name: str) -> torch.Generator:
        """The run's named random stream (:func:`stream`)."""
        return stream(self.seed, name)



def setup(mode: str = "auto", seed: int = 0, *, quick: dict, full: dict) -> Run:
    """Resolve the mode, seed everything, pick the device and the sizes of this chapter.

    ``quick`` and ``full`` are the chapter's sizes in each mode; they must have the same keys.
    """
    resolved = resolve_mode(mode)
    seed = check_seed(seed)
    if set(quick) != set(full):
        raise ValueError(f"quick and full sizes must declare the same keys; only in quick: "
                         f"{sorted(set(quick) - set(full))}, only in full: {sorted(set(full) - set(quick))}")
    threads = set_threads()
    seed_everything(seed)
    sizes = SimpleNamespace(**(quick if resolved == "quick" else full))
    return Run(resolved, seed, get_device(resolved), sizes, threads)
