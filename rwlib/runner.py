"""Execute chapters with papermill and collect their claim ledgers.

Each chapter runs in its own kernel (a ``papermill`` subprocess) with ``mode`` and ``seed`` injected into
its ``parameters`` cell; ``jobs`` chapters run at once, each with ``threads`` torch threads. The executed
notebook, its log and the ledger land in ``out/`` as ``NN-slug.ipynb``, ``NN-slug.log`` and ``NN-slug.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog
from .atomic import write_json_atomic

DEFAULT_TIMEOUT = 900


@dataclass
class Result:
    chapter: catalog.Chapter
    returncode: int
    wall_s: float
    notebook: Path
    ledger: dict | None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors and self.ledger is not None

    def counts(self) -> tuple[int, int, int, int]:
        claims = (self.ledger or {}).get("claims", [])
        rob = [c for c in claims if c["robust"]]
        return (sum(c["held"] for c in claims), len(claims), sum(c["held"] for c in rob), len(rob))

    def line(self) -> str:
        held, total, rh, rt = self.counts()
        status = "ok" if self.ok else "FAILED"
        if self.ok and rh < rt:
            status = "ROBUST CLAIM NOT HELD"
        return (f"{self.chapter.stem:<40} claims {held}/{total} held (robust {rh}/{rt})  "
                f"{self.wall_s:6.1f} s  {status}")


def error_outputs(nb_path: Path) -> list[str]:
    """Error outputs and anything written to stderr by the executed notebook's cells."""
    nb = json.loads(Path(nb_path).read_text())
    found = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {i}: {out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = "".join(out.get("text", ""))
                found.append(f"cell {i}: stderr: {text.strip()[:500]}")
    return found


def kernel_env(threads: int, out: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "RWLIB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "RWLIB_LEDGER_DIR": str(out.resolve()), "RWLIB_PROGRESS": "0", "PYTHONWARNINGS": "default",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    })
    root = str(Path(__file__).resolve().parent.parent)  # the checkout holding this rwlib
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_one(ch: catalog.Chapter, *, mode: str, seed: int, out: Path, threads: int,
            timeout: int = DEFAULT_TIMEOUT, root: Path | None = None) -> Result:
    src = (root or catalog.ROOT) / ch.notebook
    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"{ch.stem}.ipynb"
    log = out / f"{ch.stem}.log"
    ledger_path = out / ch.ledger_name
    for stale in (dst, ledger_path):
        if stale.exists():
            stale.unlink()
    cmd = [sys.executable, "-m", "papermill", str(src), str(dst), "-k", "python3", "--cwd", str(src.parent),
           "-p", "mode", mode, "-p", "seed", str(seed), "--no-progress-bar", "--execution-timeout", str(timeout)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=kernel_env(threads, out),
                                timeout=timeout + 60).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    errors = error_outputs(dst) if dst.exists() else [f"no executed notebook; see {log}"]
    if rc != 0 and not errors:
        errors.append(f"papermill exited {rc}; see {log}")
    ledger = None
    if ledger_path.exists():
        ledger = json.loads(ledger_path.read_text())
        ledger["runner_wall_s"] = round(wall, 2)
        ledger["threads"] = threads
        write_json_atomic(ledger_path, ledger)
    elif rc == 0:
        errors.append(f"the chapter wrote no ledger {ledger_path.name} (does it call ledger.finish()?)")
    return Result(ch, rc, wall, dst, ledger, errors)


def default_jobs() -> int:
    return max(1, os.cpu_count() or 1)


def run(chapters: list[catalog.Chapter], *, mode: str = "quick", seed: int = 0, jobs: int | None = None,
        out: Path | str = "_build/executed", threads: int | None = None, echo=print) -> list[Result]:
    """Execute ``chapters`` (``jobs`` at once, ``threads`` torch threads each) and return their results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or default_jobs()
    jobs = min(jobs, max(1, len(chapters)))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    results: list[Result] = []

    def task(ch):
        r = run_one(ch, mode=mode, seed=seed, out=out, threads=threads)
        if echo:
            echo(r.line())
            for e in r.errors:
                echo(f"    {e}")
        return r

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(task, chapters))
    return results
