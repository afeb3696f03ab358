"""The book's structure: pages and table of contents in sync with the catalogue, the chapter contract,
the repository URL in one place, the bibliography, and a real build from the executed chapters."""

import json
import os
import re
from pathlib import Path

import pytest

from rwlib import book, catalog

ROOT = catalog.ROOT
CHAPTERS = catalog.written_chapters()


def _config_url() -> str:
    text = (ROOT / "_config.yml").read_text()
    return re.search(r"^repository:\s*\n\s+url:\s*(\S+)", text, re.M).group(1)


def test_toc_and_part_pages_are_up_to_date():
    assert (ROOT / "_toc.yml").read_text() == book.toc_yaml(ROOT), "run `python -m rwlib pages`"
    for part in catalog.PARTS:
        page = (ROOT / "book" / part.dirname / "index.md").read_text()
        assert page == book.part_page(part, book.PART_INTROS[part.number], ROOT), "run `python -m rwlib pages`"
        for ch in catalog.CHAPTERS:
            if ch.part_number == part.number:
                assert f"{{cite:p}}`{ch.slug}`" in page


def test_bibliography_has_every_paper():
    pybtex = pytest.importorskip("pybtex.database")
    db = pybtex.parse_file(str(ROOT / "book" / "references.bib"))
    assert {c.slug for c in catalog.CHAPTERS} <= set(db.entries)


@pytest.mark.parametrize("ch", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_contract(ch):
    nb = json.loads((ROOT / ch.notebook).read_text())
    cells = nb["cells"]
    params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    src = "".join(params[0]["source"])
    assert re.search(r'^mode = "auto"', src, re.M) and re.search(r"^seed = \d+", src, re.M)
    head = "".join(cells[0]["source"])
    assert head.startswith(f"# {ch.number:02d} ") and f"{{cite:p}}`{ch.slug}`" in head
    url = _config_url().removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{url}/blob/main/{ch.notebook.as_posix()}" in head
    text = "".join("".join(c["source"]) for c in cells)
    assert f"git+https://github.com/{url}" in text, "the Colab install cell must use _config.yml's URL"
    assert "ledger.finish()" in text and "glue(" in text
    assert (ROOT / "rwlib" / "methods" / f"{ch.slug.replace('-', '_')}.py").exists()
    assert (ROOT / "tests" / "methods" / f"test_{ch.slug.replace('-', '_')}.py").exists()
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), "commit chapters without outputs"


MAX_CODE_LINE = 100


def test_chapter_code_lines_fit_the_page():
    """No code line of a chapter (or of the tour) is longer than the rendered code cell shows without scrolling."""
    long = []
    for stem, path in [(ch.stem, ROOT / ch.notebook) for ch in CHAPTERS] + [("tour", ROOT / "book" / "tour.ipynb")]:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            for n, line in enumerate("".join(cell["source"]).splitlines(), 1):
                if len(line) > MAX_CODE_LINE:
                    long.append(f"{stem} cell {i} line {n}: {len(line)} characters")
    assert not long, f"code lines over {MAX_CODE_LINE} characters:\n" + "\n".join(long)


def test_injected_parameters_cell_is_hidden():
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "mode = 'auto'"},
                    {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "source": "# Parameters"},
                    {"cell_type": "markdown", "metadata": {}, "source": "text"}]}
    assert book.hide_injected_parameters(nb) == 1
    assert [c["metadata"].get("tags") for c in nb["cells"]] == [
        ["parameters"], ["injected-parameters", "remove-cell"], None]


def _check_html(html: Path) -> None:
    """Every page loads MathJax (if at all) from the built book itself, and none shows papermill's injected cell."""
    mathjax = []
    for page in html.rglob("*.html"):
        text = page.read_text()
        for src in re.findall(r'<script[^>]*\ssrc="([^"]*mathjax[^"]*)"', text, re.I):
            assert not re.match(r"(https?:)?//", src), f"{page.relative_to(html)} loads MathJax from the network: {src}"
            local = page.parent / re.split(r"[?#]", src)[0]  # Sphinx may append ?v=<checksum>
            assert local.resolve().is_file(), f"{page.relative_to(html)}: MathJax {src} is not in the build"
            mathjax.append(page)
        assert "# Parameters" not in text and "injected-parameters" not in text, \
            f"{page.relative_to(html)} shows the cell papermill injected"
    assert mathjax, "no page loads MathJax (the chapters have equations)"


def test_book_builds_from_executed_chapters(executed, tmp_path):
    """The HTML book builds, warnings as errors, from the notebooks the chapter test executed (no re-run)."""
    if os.environ.get("RWLIB_TEST_CHAPTERS"):
        pytest.skip("only some chapters were executed (RWLIB_TEST_CHAPTERS)")
    assert all(r.ok for r in executed.values()), "a chapter failed; see test_chapters"
    out_dir = next(iter(executed.values())).notebook.parent
    html = book.build(out_dir, tmp_path / "site")
    assert (html / "index.html").exists()
    score = (html / "book" / "scorecard.html").read_text()
    for ch in CHAPTERS:
        page = html / ch.notebook.with_suffix(".html")
        assert page.exists()
        assert ch.slug in score
    assert "claims held" in score
    _check_html(html)
