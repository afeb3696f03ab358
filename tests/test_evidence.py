"""Robustness is measured: every written chapter has a committed, fresh 5-seed sweep, its claims are the sweep's,
and every claim it declares robust held at every seed of that sweep."""

import copy

import pytest

from rwlib import catalog, seeds

CHAPTERS = catalog.written_chapters()


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_committed_sweep_is_fresh(ch):
    assert seeds.verify(ch) == []


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_robust_claims_held_at_every_seed_of_the_sweep(executed_chapter, ch):
    assert executed_chapter.ledger is not None
    assert seeds.verify(ch, executed_chapter.ledger) == []


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_claim_says_where_the_paper_makes_it(executed_chapter, ch):
    missing = [c["name"] for c in executed_chapter.ledger["claims"]
               if not c.get("source")]
    assert not missing, f"{ch.stem}: claims without source=: {missing}"


# ------------------------------------------------------------------------------------- the machinery itself
def _ledger(seed, held=(True, True), ours=(1.0, 2.0)):
    return {"seed": seed, "runner_wall_s": 1.0, "claims": [
        {"name": "a", "source": "Table 1", "paper": "p", "paper_value": 3.0, "relation": ">", "target": 0.5,
         "robust": True, "held": held[0], "ours": ours[0], "status": "held" if held[0] else "not held"},
        {"name": "b", "source": "ours (control)", "paper": "-", "relation": "is", "target": True,
         "robust": False, "held": held[1], "ours": held[1], "status": "held"}]}


def test_aggregate_counts_seeds_and_ranges():
    ch = catalog.chapter(24)
    rec = seeds.aggregate(ch, [_ledger(1, ours=(0.2, 0)), _ledger(0, held=(False, True), ours=(0.4, 0)),
                               _ledger(2, ours=(0.9, 0))], threads=1)
    a, b = rec["claims"]
    assert (a["held"], a["n"], a["min"], a["median"], a["max"]) == (2, 3, 0.2, 0.4, 0.9)
    assert a["seeds"] == [0, 1, 2] and a["paper_value"] == 3.0 and not a["control"]
    assert b["control"] and b["min"] is None and b["held"] == 3
    assert rec["provenance"]["code_hash"] == seeds.code_hash(ch) and rec["provenance"]["threads"] == 1


def test_aggregate_refuses_claims_that_depend_on_the_seed():
    other = _ledger(1)
    other["claims"][0]["name"] = "renamed"
    with pytest.raises(ValueError, match="other claims"):
        seeds.aggregate(catalog.chapter(24), [_ledger(0), other], threads=1)


def test_verify_finds_stale_sweeps_changed_claims_and_unheld_robust_claims(tmp_path, monkeypatch):
    ch = catalog.chapter(24)
    rec = seeds.aggregate(ch, [_ledger(s, held=(s != 3, True)) for s in range(5)], threads=1)
    monkeypatch.setattr(seeds, "load", lambda c, root=None: copy.deepcopy(rec))
    problems = seeds.verify(ch, _ledger(0))
    assert len(problems) == 1 and "held at 4/5" in problems[0]
    changed = _ledger(0)
    changed["claims"][0]["target"] = 0.4
    changed["claims"][0]["robust"] = False
    assert "is now `> 0.4`" in seeds.verify(ch, changed)[0]
    stale = copy.deepcopy(rec)
    stale["provenance"]["code_hash"] = "0" * 64
    monkeypatch.setattr(seeds, "load", lambda c, root=None: stale)
    assert "stale" in seeds.verify(ch)[0]
    monkeypatch.setattr(seeds, "load", lambda c, root=None: None)
    assert "no seed sweep" in seeds.verify(ch)[0]


def test_code_hash_ignores_robust_declarations_and_prose(tmp_path):
    import json
    import shutil

    ch = catalog.chapter(24)
    root = tmp_path
    (root / ch.notebook).parent.mkdir(parents=True)
    (root / "rwlib" / "methods").mkdir(parents=True)
    shutil.copy(catalog.ROOT / "rwlib" / "methods" / "adamp.py", root / "rwlib" / "methods" / "adamp.py")
    nb = {"cells": [{"cell_type": "markdown", "source": ["prose"]},
                    {"cell_type": "code", "source": ["ledger.check('a', ours=1, robust=True, target=0)\n"]}]}
    (root / ch.notebook).write_text(json.dumps(nb))
    h = seeds.code_hash(ch, root)
    nb["cells"][0]["source"] = ["other prose"]
    nb["cells"][1]["source"] = ["ledger.check('a', ours=1, robust=False, target=0)\n"]
    (root / ch.notebook).write_text(json.dumps(nb))
    assert seeds.code_hash(ch, root) == h
    nb["cells"][1]["source"] = ["ledger.check('a', ours=2, robust=False, target=0)\n"]
    (root / ch.notebook).write_text(json.dumps(nb))
    assert seeds.code_hash(ch, root) != h
