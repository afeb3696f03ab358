"""Interrupting ``python -m rwlib run``: SIGTERM stops papermill and its kernel, leaves no ledger or executed
notebook behind, and the runner exits non-zero.

The chapter is a stand-in notebook in a temporary book tree (``--root``): it writes its ledger, tells the test
its kernel's pid, then sleeps, so the interrupt lands while the kernel is busy and after a ledger exists."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from rwlib import catalog

from conftest import write_stub_book

ROOT = catalog.ROOT


def _process_table() -> dict[int, tuple[int, bool]]:
    """``pid -> (parent pid, alive)``; a zombie counts as dead (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        table = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(stat.parent.name)] = (int(fields[1]), fields[0] not in ("Z", "X"))
        return table
    return {p.pid: (p.info["ppid"] or 0, p.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD))
            for p in psutil.process_iter(["ppid", "status"])}


def _descendants(pid: int) -> set[int]:
    table = _process_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        kids = {c for c, (pp, alive) in table.items() if pp == parent and alive} - found
        found |= kids
        todo += kids
    return found


def _stub_book(root: Path, marker: Path) -> Path:
    """A book tree whose chapter 24 writes its ledger, starts a child process (as a data loader's worker would),
    writes its kernel's pid to ``marker``, then sleeps."""
    body = f"""import os, subprocess, sys, time
from pathlib import Path
from rwlib.claims import Ledger
led = Ledger(24, mode=mode, seed=seed)
led.check("stub", source="ours (control)", paper="-", ours=1, relation="~=", target=1)
led.finish()
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
Path({str(marker)!r}).write_text(str(os.getpid()))
time.sleep(120)"""
    return write_stub_book(root, body)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_sigterm_stops_papermill_and_kernel_and_leaves_no_ledger(tmp_path):
    marker = tmp_path / "kernel.pid"
    root = _stub_book(tmp_path / "repo", marker)
    out = tmp_path / "out"
    ch = catalog.chapter(24)
    cmd = [sys.executable, "-m", "rwlib", "run", "24", "--root", str(root), "--out", str(out),
           "--jobs", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[int] = set()
    try:
        kernel = int(_wait_for(lambda: marker.exists() and marker.read_text(), 25, "the stub kernel to start"))
        assert (out / ch.ledger_name).exists(), "the stub wrote its ledger before sleeping"
        children = _descendants(proc.pid)
        assert kernel in children, f"kernel {kernel} is not among the runner's descendants {sorted(children)}"
        assert len(children) >= 3, "papermill, its kernel and the kernel's worker"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = {pid for pid in children if _process_table().get(pid, (0, False))[1]}
        for pid in leftovers:  # never leak a sleeping kernel into the rest of the test session
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM" in output and "stopped the running chapters" in output
    assert not leftovers, f"processes survived the interrupt: {sorted(leftovers)}"
    assert not (out / ch.ledger_name).exists(), "an interrupted chapter's ledger must not be left behind"
    assert not (out / f"{ch.stem}.ipynb").exists(), "nor its partial executed notebook"
    assert not list(out.glob(".*.tmp")), "nor the temporary file of a cut-short atomic write"
    assert (out / f"{ch.stem}.log").exists(), "the log stays, to show how far it got"

