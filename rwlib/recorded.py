"""Recorded full-mode runs: an experiment too large for quick mode, run once by a script under
``data/results/full/`` and shown by its chapter, labelled as recorded (DESIGN.md, "Data").

The script runs a :func:`rwlib.sweep.sweep` and saves it with its provenance::

    t0 = time.perf_counter()
    res = sweep(one_run, arms, seeds)
    recorded.save("01-shrinkmatch-regime", res, chapter=1, what="the brief's 1000-step regime",
                  parameters=REGIME, t0=t0, threads=2, command="python data/results/full/01-...py",
                  curves=recorded.curves_by_seed(res, ["test_acc"]))

and the chapter reads it back (``None`` where there is no ``data/``, e.g. after a pip install)::

    rec = recorded.load("01-shrinkmatch-regime")
    if rec:
        rec.result.compare("test accuracy", "ShrinkMatch")   # the same Result API as a live sweep
        rec.glue("rec")                                       # rec_date, rec_wall_min for the caption

The file is written atomically; its provenance records the date, the commit the run started from, whether
``rwlib/`` had uncommitted changes, the device, threads, wall time and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from .atomic import write_json_atomic
from .catalog import ROOT
from .sweep import Result

FULL_DIR = ROOT / "data" / "results" / "full"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def script_args(doc: str, *, threads: int = 2, out: str | Path | None = None) -> tuple[argparse.Namespace, float]:
    """The command line every recording script shares: ``--threads`` (torch threads, set here; default
    ``threads``) and, when ``out`` is given, ``--out`` (the JSON's path, default ``out``). Returns the parsed
    arguments and the start time to hand to :func:`save`."""
    import torch

    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--threads", type=int, default=threads)
    if out is not None:
        ap.add_argument("--out", default=str(out))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, time.perf_counter()


def provenance(t0: float, threads: int, command: str, device: str | None = None) -> dict:
    """Where and how a recorded run was made; ``t0`` is its ``time.perf_counter()`` at the start."""
    import torch

    from . import __version__

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git": _git("rev-parse", "HEAD"),
            "rwlib_dirty": bool(_git("status", "--porcelain", "--", "rwlib")),
            "device": device or f"cpu ({platform.processor() or platform.machine()})",
            "threads": threads, "wall_s": round(time.perf_counter() - t0, 1),
            "rwlib": __version__, "torch": torch.__version__, "command": command}


def curves_by_seed(result: Result, metrics: Iterable[str], every: int | dict = 1) -> dict:
    """``{metric: {arm: {"step": [...], "by_seed": [[...] per seed]}}}`` from a sweep's curves, keeping every
    ``every``-th step (an int, or a dict metric -> int) so that per-step metrics stay small on disk."""
    out = {}
    for metric in metrics:
        sub = result.curves[result.curves.metric == metric]
        if not len(sub):
            continue
        k = every.get(metric, 1) if isinstance(every, dict) else every
        sub = sub[sub.step % k == 0]
        out[metric] = {arm: {"step": sorted({int(x) for x in g.step}),
                             "by_seed": [g[g.seed == s].sort_values("step").value.astype(float).tolist()
                                         for s in result.seeds]}
                       for arm, g in sub.groupby("arm")}
    return out


def save(name: str, result: Result, *, chapter: int, what: str, parameters: dict, t0: float, threads: int,
         command: str, curves: dict | None = None, extra: dict | None = None, device: str | None = None,
         directory: str | Path | None = None) -> Path:
    """Write ``<directory or data/results/full>/<name>.json`` atomically and return its path."""
    out = {"chapter": chapter, "what": what, "provenance": provenance(t0, threads, command, device),
           "parameters": parameters, "arms": [str(a) for a in result.arms], "seeds": list(result.seeds),
           "table": result.table.to_dict(orient="records"), "curves": curves or {}, **(extra or {})}
    path = Path(directory or FULL_DIR) / f"{name}.json"
    write_json_atomic(path, out)
    return path


@dataclass
class Recorded:
    """A recorded run read back: :attr:`result` has the :class:`rwlib.sweep.Result` API (no live curves; the
    saved ones are in :attr:`curves`)."""

    name: str
    result: Result
    provenance: dict
    parameters: dict
    curves: dict
    raw: dict = field(repr=False)

    @property
    def date(self) -> str:
        return self.provenance["date"][:10]

    @property
    def wall_min(self) -> float:
        return self.provenance["wall_s"] / 60

    def glue(self, prefix: str = "rec") -> None:
        """Glue ``<prefix>_date`` and ``<prefix>_wall_min`` for the figure caption."""
        from .claims import glue

        glue(f"{prefix}_date", self.date)
        glue(f"{prefix}_wall_min", self.wall_min)


def load(name: str, directory: str | Path | None = None) -> Recorded | None:
    """Read a recorded run; ``None`` when there is no results folder at all (a pip install ships no
    ``data/``). A name that is not there while the folder is raises, naming the recorded runs that are."""
    d = Path(directory or FULL_DIR)
    if not d.is_dir():
        return None
    path = d / f"{name}.json"
    if not path.exists():
        have = sorted(p.stem for p in d.glob("*.json"))
        raise FileNotFoundError(f"no recorded run {name!r} in {d}; recorded: {', '.join(have) or 'none'}")
    raw = json.loads(path.read_text())
    table = pd.DataFrame(raw["table"])
    arms = raw.get("arms") or list(dict.fromkeys(table.arm))
    curves = pd.DataFrame(columns=["arm", "seed", "step", "metric", "value"])
    result = Result(table, curves, {}, arms, raw["seeds"])
    return Recorded(name, result, raw["provenance"], raw.get("parameters", {}), raw.get("curves", {}), raw)
