"""The claim ledger: what the paper said (and where), what we measured, and whether it held.

A claim is a statement *of the paper*: ``source`` says where the paper makes it ("Table 3", "Fig. 2",
"Sec. 4.2", "abstract") and ``paper_value`` carries the paper's own number when it gives one::

    ledger = Ledger(chapter=24, run=run)
    ledger.check("norm growth suppressed", source="Fig. 2", paper="SGDP keeps ||w|| nearly flat",
                 ours=ratio, relation="<=", target=0.5)
    ledger.better("AdamP beats Adam", source="Table 2", paper="+0.5 pt top-1", paper_value=0.5,
                  method=acc_adamp, baseline=acc_adam)     # paired over repeats, margin 2 standard errors
    ledger.finish()          # shows the table, writes NN-slug.json atomically

- :meth:`Ledger.check` compares one number with a threshold fixed before the run (from the paper or the
  chapter brief). :meth:`Ledger.better` is every "method beats baseline" claim: strict, by more than ``k``
  standard errors of the paired gap over the chapter's repeats; a result where both are at the ``floor`` is
  *inconclusive*, never a win.
- A control that the chapter adds and the paper never states uses ``source="ours (control)"``; it is shown and
  counted apart from the paper's claims.
- Checks of our own code (identities, ranges, brute-force equalities) are tests, not claims.
- ``robust=True`` declares that the claim held at every seed of the committed seed sweep
  (``python -m rwlib seeds``, ``data/results/seeds/``); the test suite checks the declaration against the sweep.

The ledger is written only when ``$RWLIB_LEDGER_DIR`` is set (the runner sets it), so an interactive run leaves
no files behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import catalog
from .atomic import write_json_atomic

RELATIONS = {
    ">=": lambda a, b, tol: a >= b - tol,
    "<=": lambda a, b, tol: a <= b + tol,
    ">": lambda a, b, tol: a > b,
    "<": lambda a, b, tol: a < b,
    "~=": lambda a, b, tol: abs(a - b) <= tol,
    "is": lambda a, b, tol: bool(a) == bool(b),
}
STATUSES = ("held", "not held", "inconclusive")
CONTROL = "ours (control)"


@dataclass(repr=False)
class Claim:
    name: str
    source: str
    paper: str
    ours: float | str | bool
    relation: str
    target: float | str | bool
    held: bool
    robust: bool
    note: str = ""
    paper_value: float | str | None = None
    status: str = "held"
    margin: float | None = None        # for ``better``: the margin the gap had to exceed

    @property
    def control(self) -> bool:
        return self.source == CONTROL

    def describe(self) -> str:
        if self.margin is not None:
            return f"gap > {fmt(self.margin)} (2 SE)" if self.margin else "gap > 0"
        return f"ours {self.relation} {fmt(self.target)}"

    def __repr__(self) -> str:
        return f"[{self.status.upper()}] {self.name}: ours = {fmt(self.ours)}, must hold {self.describe()} " \
               f"({'robust' if self.robust else 'weak'})"


def fmt(x) -> str:
    """A value for a table: numbers at 3 significant digits, everything else as text."""
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, (int, float)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if x == int(x) and abs(x) < 1e6:
            return str(int(x))
        return f"{x:.3g}"
    return str(x)


def seed_sweep(chapter) -> dict | None:
    """The committed seed sweep of ``chapter`` (``data/results/seeds/NN-slug.json``) when this checkout has it
    (a pip install on Colab has no ``data/``), else None."""
    path = catalog.ROOT / "data" / "results" / "seeds" / catalog.chapter(chapter).ledger_name
    return json.loads(path.read_text()) if path.exists() else None


class Ledger:
    """Claims of one chapter for one execution (mode, seed)."""

    def __init__(self, chapter: int | str, run=None, *, mode: str | None = None, seed: int | None = None):
        self.chapter = catalog.chapter(chapter)
        self.mode = run.mode if run is not None else mode
        self.seed = run.seed if run is not None else seed
        self.started = run.started if run is not None else time.perf_counter()
        self.claims: list[Claim] = []

    def _add(self, claim: Claim) -> Claim:
        if any(c.name == claim.name for c in self.claims):
            raise ValueError(f"claim {claim.name!r} recorded twice")
        if not isinstance(claim.source, str) or not claim.source.strip():
            raise ValueError(f"claim {claim.name!r} needs source= (where the paper says it, e.g. 'Table 3', "
                             f"'Fig. 2', 'Sec. 4.2', 'abstract'; or {CONTROL!r} for a control of ours)")
        self.claims.append(claim)
        return claim

    def check(self, name: str, *, source: str, paper: str, ours, relation: str, target, robust: bool = True,
              tol: float = 0.0, note: str = "", paper_value=None) -> Claim:
        """Record ``ours <relation> target``; ``held`` is computed here (never typed in). A NaN never holds."""
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
        ours = plain(ours)
        if isinstance(ours, (int, float)) and not isinstance(ours, bool):
            ours = float(ours)
            held = (not math.isnan(ours)) and bool(RELATIONS[relation](ours, float(target), tol))
        else:
            held = bool(RELATIONS[relation](ours, target, tol))
        return self._add(Claim(name, source, paper, ours, relation, plain(target), held, robust, note,
                               plain(paper_value), "held" if held else "not held"))

    def better(self, name: str, *, source: str, paper: str, method, baseline, higher: bool = True,
               k: float = 2.0, floor: float | None = None, robust: bool = True, note: str = "",
               paper_value=None) -> Claim:
        """Record "method beats baseline" from paired measurements (same seeds/repeats, same order).

        ``ours`` is the mean paired gap, signed so that positive means the method is better (``higher``: bigger
        values are better). It holds only when the gap exceeds ``k`` standard errors of the paired gap (strict;
        with one repeat, only when it is above 0). When ``floor`` is given and both means are at or below it
        (at or above it for ``higher=False``) the claim is *inconclusive* and does not hold."""
        from .sweep import paired_gap

        g = paired_gap(method, baseline, higher)
        margin = g.margin(k)
        at_floor = floor is not None and (max(g.method_mean, g.baseline_mean) <= floor if higher
                                          else min(g.method_mean, g.baseline_mean) >= floor)
        held = (g.mean > margin) and not at_floor and not math.isnan(g.mean)
        status = "inconclusive" if at_floor else ("held" if held else "not held")
        extra = (f"paired over {g.n} repeats: method {fmt(g.method_mean)}, baseline {fmt(g.baseline_mean)}, "
                 f"worst repeat {fmt(g.worst)}, wins {g.wins}/{g.n}")
        if at_floor:
            extra += f"; both at the floor ({fmt(floor)})"
        note = f"{note}; {extra}" if note else extra
        return self._add(Claim(name, source, paper, g.mean, ">", 0.0, held, robust, note, plain(paper_value),
                               status, margin))

    # -- views ---------------------------------------------------------------------------------
    def frame(self, sweep: dict | None | bool = True):
        """The chapter's table: claim, paper (source and value), ours, must hold, held, robust, and -- when the
        committed seed sweep is there -- held over seeds (k/N) and the range of ours over them."""
        import pandas as pd

        if sweep is True:
            sweep = seed_sweep(self.chapter.number)
        by_name = {c["name"]: c for c in (sweep or {}).get("claims", [])}
        rows = []
        for c in self.claims:
            paper = c.source + (f": {fmt(c.paper_value)}" if c.paper_value is not None else "")
            row = {"claim": c.name + (" (control)" if c.control else ""), "paper says": c.paper,
                   "paper (where, value)": paper, "ours": fmt(c.ours), "must hold": c.describe(),
                   "held": {"held": "yes", "not held": "NO", "inconclusive": "inconclusive"}[c.status],
                   "robust": "yes" if c.robust else "weak"}
            if sweep:
                s = by_name.get(c.name)
                row["over seeds"] = f"{s['held']}/{s['n']}" if s else "not swept"
                row["ours over seeds"] = (f"{fmt(s['min'])} to {fmt(s['max'])}"
                                          if s and s.get("min") is not None else "")
            row["note"] = c.note
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> str:
        paper = [c for c in self.claims if not c.control]
        ctrl = [c for c in self.claims if c.control]
        rob = [c for c in self.claims if c.robust]
        text = (f"{self.chapter.stem}: {sum(c.held for c in paper)}/{len(paper)} paper claims held "
                f"({sum(c.held for c in rob)}/{len(rob)} robust)")
        if ctrl:
            text += f", {sum(c.held for c in ctrl)}/{len(ctrl)} controls"
        return text + f" in {self.mode} mode, seed {self.seed}"

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


def glue_all(**values) -> None:
    """:func:`glue` every keyword argument under its name, none displayed: ``glue_all(acc=0.91, n=5)``."""
    for name, value in values.items():
        glue(name, value)
