"""Execute chapters with papermill and collect their claim ledgers.

Each chapter runs in its own kernel (a ``papermill`` subprocess) with ``mode`` and ``seed`` injected into
its ``parameters`` cell; ``jobs`` chapters run at once, each with ``threads`` torch threads. The executed
notebook, its log and the ledger land in ``out/`` as ``NN-slug.ipynb``, ``NN-slug.log`` and ``NN-slug.json``.

Interrupting a run (Ctrl-C, or SIGTERM through ``python -m rwlib``) or a chapter's timeout stops its papermill
process *and its kernel*, and removes that chapter's partial notebook and ledger, so that nothing in ``out/`` looks
complete unless its chapter finished. Each papermill runs in a session of its own (the terminal's Ctrl-C reaches
only the runner, which decides how to stop it), and jupyter_client starts the kernel in yet another session, so
the runner finds the kernel among papermill's descendants and stops its process group as well.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import catalog
from .atomic import write_json_atomic

DEFAULT_TIMEOUT = 900
KILL_GRACE_S = 5.0  # how long a stopped chapter's processes get to exit after SIGTERM before SIGKILL
POLL_S = 0.2  # how often a running chapter checks whether the run was interrupted


@dataclass
class Result:
    chapter: catalog.Chapter
    returncode: int
    wall_s: float
    notebook: Path
    ledger: dict | None
    errors: list[str] = field(default_factory=list)
    stopped: str = ""  # why the runner stopped the chapter before it finished ("interrupted", "timed out ...")

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors and self.ledger is not None

    def counts(self) -> tuple[int, int, int, int]:
        claims = (self.ledger or {}).get("claims", [])
        rob = [c for c in claims if c["robust"]]
        return (sum(c["held"] for c in claims), len(claims), sum(c["held"] for c in rob), len(rob))

    def line(self) -> str:
        held, total, rh, rt = self.counts()
        status = "ok" if self.ok else (self.stopped.split(" after")[0].upper() if self.stopped else "FAILED")
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


def _process_table() -> dict[int, tuple[int, bool]]:
    """``pid -> (parent pid, alive)`` for every process, from psutil or else Linux's ``/proc``.

    A zombie (exited, not yet reaped) counts as dead. Empty when neither psutil nor ``/proc`` is available:
    then only papermill's own process group is stopped, and its kernel exits when it notices its parent died.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    table = {}
    if psutil is not None:
        for p in psutil.process_iter(["ppid", "status"]):
            table[p.pid] = (p.info["ppid"] or 0, p.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
        return table
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0] not in ("Z", "X"))
    return table


def _descendants(pid: int) -> list[int]:
    """The living processes started by ``pid``, directly or not (papermill's kernel and whatever it started)."""
    table = _process_table()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, (pp, alive) in table.items() if pp == parent and alive and c not in found]
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """Stop papermill (``proc``, the leader of its own session) and every process it started, kernel included.

    SIGTERM goes to papermill's process group and to the group of each of its descendants (the kernel leads a
    session of its own); whatever still runs after ``grace`` seconds gets SIGKILL. papermill (through nbclient)
    answers SIGTERM by asking its kernel to shut down, but that spares the kernel's own children (a data loader's
    workers, say) and a kernel that is still starting or wedged; signalling the groups reaches them too. Returns once papermill has been
    reaped and every descendant seen is gone, so that nothing can still write to the chapter's outputs.
    """
    pids = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = {proc.pid}
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())  # never signal the runner's own group
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                table = _process_table()
                if not any(table.get(pid, (0, False))[1] for pid in pids):
                    return
            time.sleep(0.05)
        pids += [p for p in _descendants(proc.pid) if p not in pids]
    proc.wait()


def _remove_outputs(*paths: Path) -> None:
    """Remove a chapter's outputs, and the temporary files of an atomic write that was cut short."""
    for path in paths:
        path.unlink(missing_ok=True)
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def run_one(ch: catalog.Chapter, *, mode: str, seed: int, out: Path, threads: int,
            timeout: int = DEFAULT_TIMEOUT, root: Path | None = None,
            stop: threading.Event | None = None) -> Result:
    """Execute one chapter with papermill; ``root`` is the book tree holding its notebook (default this checkout).

    When ``stop`` is set (another thread handles an interrupt), or this thread is interrupted, or the chapter
    runs past ``timeout`` (+60 s for papermill's own start and save), papermill and its kernel are stopped and
    the chapter's partial notebook and ledger are removed; its log stays. An interrupt is then raised again.
    """
    src = (root or catalog.ROOT) / ch.notebook
    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"{ch.stem}.ipynb"
    log = out / f"{ch.stem}.log"
    ledger_path = out / ch.ledger_name
    _remove_outputs(dst, ledger_path)
    cmd = [sys.executable, "-m", "papermill", str(src), str(dst), "-k", "python3", "--cwd", str(src.parent),
           "-p", "mode", mode, "-p", "seed", str(seed), "--no-progress-bar", "--execution-timeout", str(timeout)]
    t0 = time.perf_counter()
    stopped = None
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=kernel_env(threads, out),
                                start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop is not None and stop.is_set():
                    stopped = "interrupted"
                elif time.perf_counter() - t0 > timeout + 60:
                    stopped = f"timed out after {timeout + 60} s"
                if stopped:
                    _kill_tree(proc)
                    rc = 124 if stopped.startswith("timed out") else 130
                    break
        except BaseException:  # KeyboardInterrupt (or SIGTERM turned into one) in this thread
            _kill_tree(proc)
            _remove_outputs(dst, ledger_path)
            raise
    wall = time.perf_counter() - t0
    if stopped:
        _remove_outputs(dst, ledger_path)
        return Result(ch, rc, wall, dst, None, [f"{stopped}: stopped papermill and its kernel, removed the partial "
                                                f"notebook and ledger; see {log}"], stopped=stopped)
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
        out: Path | str = "_build/executed", threads: int | None = None, echo=print,
        root: Path | None = None) -> list[Result]:
    """Execute ``chapters`` (``jobs`` at once, ``threads`` torch threads each) and return their results.

    ``root`` is the book tree holding the notebooks (default this checkout). An interrupt (KeyboardInterrupt in
    the calling thread) stops every running chapter, papermill and kernel, removes their partial notebooks and
    ledgers, starts no further chapter, and is raised again once all of that is done.
    """
    return run_pairs([(ch, seed) for ch in chapters], mode=mode, jobs=jobs, out=lambda s: Path(out),
                     threads=threads, echo=echo, root=root)


def run_pairs(pairs: list[tuple[catalog.Chapter, int]], *, mode: str = "quick", jobs: int | None = None,
              out=lambda seed: Path("_build/executed"), threads: int | None = None, echo=print,
              root: Path | None = None) -> list[Result]:
    """Execute each ``(chapter, seed)`` of ``pairs`` into the folder ``out(seed)``, ``jobs`` at once; interrupts
    are handled as in :func:`run` (the seed sweep runs one chapter at several seeds in parallel with it)."""
    jobs = jobs or default_jobs()
    jobs = min(jobs, max(1, len(pairs)))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    stop = threading.Event()

    def task(pair):
        ch, seed = pair
        if stop.is_set():
            return None
        folder = Path(out(seed))
        folder.mkdir(parents=True, exist_ok=True)
        r = run_one(ch, mode=mode, seed=seed, out=folder, threads=threads, root=root, stop=stop)
        if echo:
            echo(r.line() if len({s for _, s in pairs}) == 1 else f"seed {seed}: {r.line()}")
            for e in r.errors:
                echo(f"    {e}")
        return r

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(task, pair) for pair in pairs]
        results = [f.result() for f in futures]
    except BaseException:
        stop.set()  # the running chapters stop their processes and clean up within POLL_S + KILL_GRACE_S
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results
