"""The command-line runner: listing, refusing bad input before anything runs, and executing notebooks.

Execution is tested on tiny stand-in notebooks in a temporary book tree, so no real chapter runs here
(each runs exactly once per test session, in test_chapters.py)."""

import json

import pytest

from rwlib import catalog, cli, runner


def test_list_prints_every_chapter(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 36 and out[0].startswith("01  shrinkmatch") and "Part III" in out[23]


@pytest.mark.parametrize("argv, message", [
    (["run", "99"], "unknown chapter '99'; valid: 01 (shrinkmatch)"),
    (["run", "nope"], "unknown chapter 'nope'; valid:"),
    (["run", "05"], "chapter 05 (kernel-balancing) is not written yet; valid:"),
    (["run", "24", "--mode", "fast"], "unknown mode 'fast'; valid: quick, full, auto"),
    (["run", "24", "--seed", "-3"], "bad seed '-3': expected an integer in 0..4294967295"),
    (["run", "24", "--seed", "abc"], "bad seed 'abc'"),
    (["book", "24", "--jobs", "0"], "bad --jobs 0"),
])
def test_bad_input_is_refused_before_running(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not out.exists(), "nothing may run (or be written) when the input is refused"


GOOD = """from rwlib.claims import Ledger
led = Ledger(24, mode=mode, seed=seed)
led.check("injected", source="ours (control)", paper="-", ours=seed, relation="~=", target=7)
led.finish()"""


def test_runner_injects_parameters_and_writes_ledger(tmp_path, stub_book):
    root = stub_book(tmp_path / "repo", GOOD)
    r = runner.run_one(catalog.chapter(24), mode="quick", seed=7, out=tmp_path / "out", threads=1, root=root)
    assert r.ok, r.errors
    led = json.loads((tmp_path / "out" / "24-adamp.json").read_text())
    assert led["seed"] == 7 and led["mode"] == "quick" and led["claims"][0]["held"]
    assert led["runner_wall_s"] > 0 and (tmp_path / "out" / "24-adamp.ipynb").exists()
    assert "claims 1/1 held (robust 1/1)" in r.line()


def test_runner_reports_stderr_output(tmp_path, stub_book):
    root = stub_book(tmp_path / "repo", GOOD + "\nimport warnings; warnings.warn('careful')")
    r = runner.run_one(catalog.chapter(24), mode="quick", seed=7, out=tmp_path / "out", threads=1, root=root)
    assert not r.ok and any("careful" in e for e in r.errors)


def test_cli_exits_nonzero_when_a_chapter_raises(tmp_path, monkeypatch, capsys, stub_book):
    root = stub_book(tmp_path / "repo", "raise RuntimeError('boom')")
    monkeypatch.setattr(catalog, "ROOT", root)
    assert cli.main(["run", "24", "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "boom" in out
