"""Real datasets for full mode: downloaded once, cached, verified by SHA-256.

Quick mode and the tests never call this module's downloads. Full mode on Colab may, e.g.::

    path = fetch("cifar10")         # ~/.cache/rwlib/cifar-10-python.tar.gz, verified

Offline, :func:`fetch` fails with :class:`OfflineError` naming the file, the URL and where to put a copy.
A download goes to a temporary file first and is moved into the cache only once its checksum matches,
so a broken transfer never leaves a half-written file in the cache.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path


@dataclass(frozen=True)
class Entry:
    url: str
    filename: str
    sha256: str
    note: str = ""


REGISTRY: dict[str, Entry] = {
    "cifar10": Entry(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "CIFAR-10, python version (Krizhevsky 2009), 163 MB",
    ),
    "cifar100": Entry(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        "CIFAR-100, python version (Krizhevsky 2009), 161 MB",
    ),
}


class OfflineError(RuntimeError):
    """The dataset is not cached and cannot be downloaded (no network)."""


class ChecksumError(RuntimeError):
    """A file's SHA-256 does not match the registry."""


def cache_dir() -> Path:
    return Path(os.environ.get("RWLIB_CACHE", Path.home() / ".cache" / "rwlib"))


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, *, directory: str | Path | None = None, registry: dict[str, Entry] | None = None,
          timeout: float = 60.0) -> Path:
    """Return the verified local path of dataset ``name``, downloading it into the cache if needed."""
    registry = REGISTRY if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(registry))}")
    entry = registry[name]
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / entry.filename
    if path.exists():
        digest = sha256(path)
        if digest == entry.sha256:
            return path
        path.unlink()  # corrupt or partial copy: fetch again
    with atomic_path(path, suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(entry.url, timeout=timeout) as r, open(tmp, "wb") as f:
                while block := r.read(1 << 20):
                    f.write(block)
        except (urllib.error.URLError, OSError) as e:
            raise OfflineError(
                f"cannot download {name!r} from {entry.url} ({e}). Full mode needs the network for this "
                f"dataset: run it where the network is reachable (e.g. Colab), or put a verified copy at {path}"
            ) from e
        digest = sha256(tmp)
        if digest != entry.sha256:
            raise ChecksumError(f"{entry.url}: sha256 {digest} does not match the registry's {entry.sha256}")
    return path
