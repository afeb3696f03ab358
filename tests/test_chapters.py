"""Every written chapter, executed once in quick mode through the runner (see the ``executed`` fixture)."""

import pytest

from rwlib import catalog

CHAPTERS = catalog.written_chapters()


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_clean(executed_chapter, ch):
    r = executed_chapter
    assert r.returncode == 0, f"{ch.stem} raised: {r.errors}"
    assert r.errors == [], f"{ch.stem} wrote error output: {r.errors}"
    assert r.ledger is not None and r.ledger["mode"] == "quick" and r.ledger["seed"] == 0


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_robust_claims_hold(executed_chapter, ch):
    ledger = executed_chapter.ledger
    assert ledger is not None
    assert ledger["claims"], f"{ch.stem} records no claims"
    failed = [c for c in ledger["claims"] if c["robust"] and not c["held"]]
    assert not failed, f"{ch.stem}: robust claims not held: {failed}"


def test_some_chapters_are_written():
    assert {1, 24} <= {c.number for c in CHAPTERS}
