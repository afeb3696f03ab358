"""Robustness measured, not declared: run chapters at several seeds and record how often each claim held.

``python -m rwlib seeds [NN ...] [--seeds N]`` executes each chapter in quick mode through the runner at seeds
``0..N-1`` (one torch thread per chapter, as CI runs them) and writes ``data/results/seeds/NN-slug.json``: for every
claim, held at k of N seeds and ``ours`` as min / median / max, with provenance (date, git commit, threads, torch,
and a hash of the chapter's code so that a stale sweep is detected).

The hash covers the notebook's *code* cells, with every ``robust=...`` argument removed, and the chapter's method
module: prose and the robust declarations may change after a sweep without making it stale (the declarations are
what the sweep is there to check); any other code change does. The Colab install cell (it does nothing off Colab)
is not part of the hash either. :func:`verify` compares an executed ledger with
the committed sweep: every robust claim must have held at every seed, and the claims must be the same.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from . import catalog
from .atomic import write_json_atomic

SWEEP_DIR = Path("data") / "results" / "seeds"
_ROBUST_ARG = re.compile(r",?\s*robust\s*=\s*(True|False)")


def sweep_path(ch: catalog.Chapter, root: Path = catalog.ROOT) -> Path:
    return root / SWEEP_DIR / ch.ledger_name


def is_colab_install(source: str) -> bool:
    """The chapter's first code cell, which installs rwlib only on Colab (guarded by ``google.colab``)."""
    return '"google.colab" in sys.modules' in source and "pip" in source


def code_hash(ch: catalog.Chapter, root: Path = catalog.ROOT) -> str:
    """SHA-256 of the chapter's code: its notebook's code cells (``robust=`` arguments removed) and its method
    module."""
    nb = json.loads((root / ch.notebook).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    code = "\n".join(c for c in cells if not is_colab_install(c))
    code = _ROBUST_ARG.sub("", code)
    module = (root / "rwlib" / "methods" / f"{ch.slug.replace('-', '_')}.py").read_text()
    return hashlib.sha256((code + "\n#--module--\n" + module).encode()).hexdigest()


def _git(root: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def aggregate(ch: catalog.Chapter, ledgers: list[dict], *, threads: int, root: Path = catalog.ROOT) -> dict:
    """The sweep record of one chapter from its ledgers at every seed (same claims in each)."""
    import torch

    import rwlib

    ledgers = sorted(ledgers, key=lambda d: d["seed"])
    names = [c["name"] for c in ledgers[0]["claims"]]
    for led in ledgers[1:]:
        if [c["name"] for c in led["claims"]] != names:
            raise ValueError(f"{ch.stem}: seed {led['seed']} recorded other claims than seed {ledgers[0]['seed']}; "
                             f"a chapter's claims must not depend on the seed")
    claims = []
    for i, name in enumerate(names):
        at = [led["claims"][i] for led in ledgers]
        first = at[0]
        values = [c["ours"] for c in at]
        numeric = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        rec = {"name": name, "source": first.get("source"), "paper": first["paper"],
               "paper_value": first.get("paper_value"), "relation": first["relation"], "target": first["target"],
               "robust_declared": first["robust"], "control": first.get("source") == "ours (control)",
               "held": sum(bool(c["held"]) for c in at), "n": len(at),
               "inconclusive": sum(c.get("status") == "inconclusive" for c in at),
               "ours": values, "seeds": [led["seed"] for led in ledgers]}
        if numeric and len(numeric) == len(values):
            rec.update(min=min(numeric), median=statistics.median(numeric), max=max(numeric))
        else:
            rec.update(min=None, median=None, max=None)
        claims.append(rec)
    return {
        "chapter": ch.number, "slug": ch.slug, "n_seeds": len(ledgers),
        "provenance": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": _git(root),
            "code_hash": code_hash(ch, root), "threads": threads, "mode": "quick", "rwlib": rwlib.__version__,
            "torch": torch.__version__, "wall_s": [led.get("runner_wall_s") for led in ledgers],
        },
        "claims": claims,
    }


def run_sweep(chapters: list[catalog.Chapter], n: int = 5, *, jobs: int = 2, threads: int = 1,
              root: Path = catalog.ROOT, echo=print) -> list[Path]:
    """Execute every chapter at seeds ``0..n-1`` (``jobs`` executions at once) and write their sweeps.

    A chapter any of whose executions failed gets no sweep file (the old one, if any, stays)."""
    from . import runner

    if n < 1:
        raise ValueError(f"bad number of seeds {n}: expected >= 1")
    work = Path(tempfile.mkdtemp(prefix="rwlib-seeds-"))
    pairs = [(ch, s) for ch in chapters for s in range(n)]
    results = runner.run_pairs(pairs, jobs=jobs, out=lambda s: work / f"seed-{s}", threads=threads, echo=echo,
                               root=None if root == catalog.ROOT else root)
    written = []
    for ch in chapters:
        rs = [r for r in results if r.chapter == ch]
        if not all(r.ok for r in rs):
            if echo:
                echo(f"{ch.stem}: an execution failed; no sweep written")
            continue
        path = sweep_path(ch, root)
        write_json_atomic(path, aggregate(ch, [r.ledger for r in rs], threads=threads, root=root))
        written.append(path)
        if echo:
            echo(f"wrote {path}")
    return written


def load(ch: catalog.Chapter, root: Path = catalog.ROOT) -> dict | None:
    path = sweep_path(ch, root)
    return json.loads(path.read_text()) if path.exists() else None


def verify(ch: catalog.Chapter, ledger: dict | None = None, root: Path = catalog.ROOT, min_seeds: int = 5
           ) -> list[str]:
    """Problems with ``ch``'s committed sweep (empty when none): missing, stale, too few seeds; and, given an
    executed ``ledger``, claims that differ from the sweep's (name, relation, target) and robust claims that did
    not hold at every seed."""
    sweep = load(ch, root)
    if sweep is None:
        return [f"{ch.stem}: no seed sweep {SWEEP_DIR / ch.ledger_name}; run `python -m rwlib seeds {ch.number:02d}`"]
    problems = []
    if sweep["provenance"]["code_hash"] != code_hash(ch, root):
        problems.append(f"{ch.stem}: the seed sweep is stale (the chapter's code changed since); re-run "
                        f"`python -m rwlib seeds {ch.number:02d}`")
    if sweep["n_seeds"] < min_seeds:
        problems.append(f"{ch.stem}: the sweep has {sweep['n_seeds']} seeds; at least {min_seeds} are needed")
    if ledger is not None:
        swept = {c["name"]: c for c in sweep["claims"]}
        names = [c["name"] for c in ledger["claims"]]
        if set(names) != set(swept):
            problems.append(f"{ch.stem}: claims differ from the sweep's: only in the chapter "
                            f"{sorted(set(names) - set(swept))}, only in the sweep {sorted(set(swept) - set(names))}")
        for c in ledger["claims"]:
            s = swept.get(c["name"])
            if s is None:
                continue
            if (c["relation"], c["target"]) != (s["relation"], s["target"]):
                problems.append(f"{ch.stem}: claim {c['name']!r} is now `{c['relation']} {c['target']}`, the sweep "
                                f"has `{s['relation']} {s['target']}`")
            if c["robust"] and s["held"] < s["n"]:
                problems.append(f"{ch.stem}: claim {c['name']!r} is declared robust but held at {s['held']}/{s['n']} "
                                f"seeds of the sweep")
    return problems
