"""Atomic writes: a file is either its old self or completely written, never half-written.

Every file rwlib writes (ledgers, seed sweeps, recorded results, cached checkpoints, downloads) goes through
:func:`atomic_path`: the content is written to a temporary file in the same folder and renamed over the target
only when the writer finished without an exception.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on any exception delete it.

    Use it with writers that want a file name (``torch.save(obj, tmp)``, a download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (numpy/torch scalars become floats)."""
    text = json.dumps(obj, indent=2, default=float) + "\n"  # serialise first: a bad object leaves no file
    return write_text_atomic(path, text)
