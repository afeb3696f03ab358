import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = Path(__file__).resolve().parent / "support"

os.environ.setdefault("RWLIB_PROGRESS", "0")


@pytest.fixture(scope="session")
def executed(tmp_path_factory):
    """Every written chapter executed once, in quick mode, through the runner, with the network blocked.

    Chapters run two at a time with one torch thread each (the faster layout on two cores; README).
    ``RWLIB_TEST_CHAPTERS=10,11`` executes only those chapters (the tests of the others are skipped): for working
    on one chapter without executing the whole book.
    """
    from rwlib import catalog, runner

    out = tmp_path_factory.mktemp("executed")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(SUPPORT) + (os.pathsep + old if old else "")
    try:
        chosen = catalog.written_chapters()
        if os.environ.get("RWLIB_TEST_CHAPTERS"):
            keep = {catalog.chapter(k.strip()).number for k in os.environ["RWLIB_TEST_CHAPTERS"].split(",")}
            chosen = [c for c in chosen if c.number in keep]
        results = runner.run(chosen, mode="quick", seed=0, out=out,
                             echo=lambda line: print(line, file=sys.stderr))
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    return {r.chapter.number: r for r in results}


@pytest.fixture
def executed_chapter(executed, request):
    """The runner's result for the chapter a parametrized test names (``ch``); skips a chapter not executed."""
    ch = request.getfixturevalue("ch")
    if ch.number not in executed:
        pytest.skip(f"{ch.stem} not executed in this run (RWLIB_TEST_CHAPTERS)")
    return executed[ch.number]


def write_stub_book(root: Path, body: str) -> Path:
    """A repository tree whose chapter 24 is a tiny notebook running ``body`` after its parameters cell (for the
    runner's tests: nothing of the real chapter runs)."""
    import nbformat

    from rwlib import catalog

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('mode = "auto"\nseed = 0', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = root / catalog.chapter(24).notebook
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    return root


@pytest.fixture
def stub_book():
    """:func:`write_stub_book` as a fixture."""
    return write_stub_book

