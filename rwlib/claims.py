"""The claim ledger: what the paper said, what we measured, and whether it held.

A chapter records each claim with the relation that must hold between our number and a target::

    ledger = Ledger(chapter=24, run=run)
    ledger.check("norm growth suppressed", paper="SGDP keeps ||w|| nearly flat",
                 ours=ratio, relation="<=", target=0.5, robust=True)
    ledger.finish()          # shows the table, writes NN-slug.json atomically

*robust* claims are expected to hold in quick mode at any seed; the test suite asserts them. Non-robust
claims are reported honestly, held or not. The ledger is written only when ``$RWLIB_LEDGER_DIR`` is set
(the runner sets it), so an interactive run leaves no files behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import catalog

RELATIONS = {
    ">=": lambda a, b, tol: a >= b - tol,
    "<=": lambda a, b, tol: a <= b + tol,
    ">": lambda a, b, tol: a > b,
    "<": lambda a, b, tol: a < b,
    "~=": lambda a, b, tol: abs(a - b) <= tol,
    "is": lambda a, b, tol: bool(a) == bool(b),
}


@dataclass(repr=False)
class Claim:
    name: str
    paper: str
    ours: float | str | bool
    relation: str
    target: float | str | bool
    held: bool
    robust: bool
    note: str = ""

    def describe(self) -> str:
        return f"ours {self.relation} {_fmt(self.target)}"

    def __repr__(self) -> str:
        mark = "held" if self.held else "NOT HELD"
        return f"[{mark}] {self.name}: ours = {_fmt(self.ours)}, must hold {self.describe()} " \
               f"({'robust' if self.robust else 'weak'})"


def _fmt(x) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.4g}"
    return str(x)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=float)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Ledger:
    """Claims of one chapter for one execution (mode, seed)."""

    def __init__(self, chapter: int | str, run=None, *, mode: str | None = None, seed: int | None = None):
        self.chapter = catalog.chapter(chapter)
        self.mode = run.mode if run is not None else mode
        self.seed = run.seed if run is not None else seed
        self.started = run.started if run is not None else time.perf_counter()
        self.claims: list[Claim] = []

    def check(self, name: str, *, paper: str, ours, relation: str, target, robust: bool = True,
              tol: float = 0.0, note: str = "") -> Claim:
        """Record a claim; ``held`` is computed here as ``ours <relation> target`` (never typed in)."""
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
        if any(c.name == name for c in self.claims):
            raise ValueError(f"claim {name!r} recorded twice")
        if isinstance(ours, (int, float)) and not isinstance(ours, bool):
            ours = float(ours)
            held = (not math.isnan(ours)) and bool(RELATIONS[relation](ours, float(target), tol))
        else:
            held = bool(RELATIONS[relation](ours, target, tol))
        claim = Claim(name, paper, ours, relation, target, held, robust, note)
        self.claims.append(claim)
        return claim

    # -- views ---------------------------------------------------------------------------------
    def frame(self):
        import pandas as pd

        rows = [{"claim": c.name, "paper": c.paper, "ours": _fmt(c.ours), "must hold": c.describe(),
                 "held": "yes" if c.held else "NO", "robust": "yes" if c.robust else "weak",
                 "note": c.note} for c in self.claims]
        return pd.DataFrame(rows, columns=["claim", "paper", "ours", "must hold", "held", "robust", "note"])

    def summary(self) -> str:
        held = sum(c.held for c in self.claims)
        rob = [c for c in self.claims if c.robust]
        return (f"{self.chapter.stem}: {held}/{len(self.claims)} claims held "
                f"({sum(c.held for c in rob)}/{len(rob)} robust) in {self.mode} mode, seed {self.seed}")

    def _repr_html_(self):
        return self.frame().to_html(index=False, escape=True)

    def to_dict(self, wall_s: float | None = None) -> dict:
        import rwlib

        return {
            "chapter": self.chapter.number, "slug": self.chapter.slug, "title": self.chapter.title,
            "mode": self.mode, "seed": self.seed, "rwlib": rwlib.__version__,
            "wall_s": round(wall_s if wall_s is not None else time.perf_counter() - self.started, 2),
            "claims": [asdict(c) for c in self.claims],
        }

    def save(self, directory: str | Path | None = None) -> Path | None:
        """Write ``NN-slug.json`` atomically into ``directory`` (default ``$RWLIB_LEDGER_DIR``)."""
        directory = directory or os.environ.get("RWLIB_LEDGER_DIR")
        if not directory:
            return None
        path = Path(directory) / self.chapter.ledger_name
        write_json_atomic(path, self.to_dict())
        return path

    def finish(self):
        """Save the ledger (when a directory is set) and return it for display as the chapter's table."""
        self.save()
        print(self.summary())
        return self


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def plain(value):
    """A numpy or torch scalar as a plain Python number; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def glue(name: str, value, display: bool = False) -> None:
    """Glue a number for the prose (myst-nb); a no-op outside the book's toolchain (e.g. on Colab).

    numpy and torch scalars are turned into Python numbers first: myst-nb formats ``{glue:text}`x:.2f``` from the
    stored text, and ``np.float64(0.5)`` would not parse as a number."""
    value = plain(value)
    try:
        from myst_nb import glue as _glue
    except ImportError:  # pragma: no cover - Colab without myst-nb
        return
    _glue(name, value, display=display)
