"""Quick mode opens no network connection: the chapter kernels of the test run import
tests/support/sitecustomize.py (see conftest's ``executed`` fixture), which refuses every socket connection
to a non-loopback address. These tests check that guard itself, in a fresh interpreter; the guard raises
before any packet is sent, so nothing leaves the machine."""

import os
import subprocess
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent / "support"

PROBE = r"""
import socket, sitecustomize
assert socket.socket.connect is sitecustomize.connect, "guard not installed"
for addr in [("192.0.2.1", 80), ("2001:db8::1", 80, 0, 0), ("example.org", 443)]:
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.connect(addr)
    except sitecustomize.NetworkBlocked:
        print("blocked", addr[0])
    finally:
        s.close()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.socket(); c.connect(srv.getsockname()); print("loopback ok"); c.close(); srv.close()
"""


def test_guard_blocks_outside_and_allows_loopback():
    env = dict(os.environ, PYTHONPATH=str(SUPPORT))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["blocked 192.0.2.1", "blocked 2001:db8::1", "blocked example.org",
                                          "loopback ok"]


def test_chapters_ran_under_the_guard(executed):
    """The chapter run used the guard (a chapter reaching the network would have raised NetworkBlocked)."""
    assert executed, "no chapter executed"
    for r in executed.values():
        assert not any("NetworkBlocked" in e for e in r.errors)
        log = r.notebook.with_suffix(".log").read_text()
        assert "NetworkBlocked" not in log
