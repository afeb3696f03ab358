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
    """
    from rwlib import catalog, runner

    out = tmp_path_factory.mktemp("executed")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(SUPPORT) + (os.pathsep + old if old else "")
    try:
        results = runner.run(catalog.written_chapters(), mode="quick", seed=0, out=out,
                             echo=lambda line: print(line, file=sys.stderr))
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    return {r.chapter.number: r for r in results}
