"""A chapter on Colab gets what it imports: every third-party module that rwlib or a chapter notebook imports is
in rwlib's core requirements or its ``book`` extra (what each chapter's install cell installs).

Imports guarded by ``try: ... except ImportError`` are optional (a progress widget, myst-nb's glue) and are not
counted; the tooling that executes chapters and builds the book (runner, book, cli, bench, seeds) runs in the
project's own environment, never on Colab, and is not counted either."""

import ast
import importlib.metadata
import json
import re
import sys
import tomllib

import pytest

from rwlib import catalog, seeds

ROOT = catalog.ROOT
TOOLING = {"runner.py", "book.py", "cli.py", "bench.py", "seeds.py", "__main__.py"}


def _guarded(tree: ast.AST) -> set[int]:
    """Line numbers of imports inside a ``try`` whose handlers catch ImportError."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if any("ImportError" in n or "ModuleNotFoundError" in n for n in names):
                for inner in node.body:
                    for sub in ast.walk(inner):
                        if isinstance(sub, (ast.Import, ast.ImportFrom)):
                            lines.add(sub.lineno)
    return lines


def _imports(source: str) -> set[str]:
    tree = ast.parse(source)
    guarded = _guarded(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in guarded:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("rwlib", "__future__")}


def _sources():
    for path in sorted((ROOT / "rwlib").rglob("*.py")):
        if path.name not in TOOLING:
            yield str(path.relative_to(ROOT)), path.read_text()
    for ch in catalog.written_chapters():
        nb = json.loads((ROOT / ch.notebook).read_text())
        code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
        yield ch.notebook.as_posix(), code


def _requirement_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["book"]
    return {re.split(r"[<>=!~\[ ;@]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_every_runtime_import_is_a_core_or_book_requirement():
    dists = importlib.metadata.packages_distributions()
    allowed = _requirement_names()
    missing = []
    for where, source in _sources():
        for module in sorted(_imports(source)):
            names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            if not names & allowed:
                missing.append(f"{where} imports {module} ({', '.join(sorted(names))})")
    assert not missing, "add these to pyproject's dependencies or its `book` extra:\n" + "\n".join(missing)


@pytest.mark.parametrize("ch", catalog.written_chapters(), ids=lambda c: c.stem)
def test_install_cell_installs_the_book_extra(ch):
    nb = json.loads((ROOT / ch.notebook).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    install = [c for c in cells if seeds.is_colab_install(c)]
    assert len(install) == 1, "exactly one Colab install cell"
    assert "install -q 'rwlib[book] @ {url}'" in install[0] and 'url = "git+https://github.com/' in install[0], \
        "the Colab install cell must install rwlib[book] from the repository"
