"""``python -m rwlib``: list the chapters, execute them, build the book.

    python -m rwlib list
    python -m rwlib pages            (after adding a chapter notebook)
    python -m rwlib run [NN ...] [--mode quick|full|auto] [--seed S] [--jobs J] [--out DIR]
    python -m rwlib book [same options as run]
    python -m rwlib seeds [NN ...] [--seeds N] [--jobs J]      (writes data/results/seeds/NN-slug.json)
    python -m rwlib seeds [NN ...] --verify DIR                 (executed ledgers in DIR against the sweeps)

Bad input (an unknown chapter, mode or seed) is refused before anything runs, with the valid choices.
Ctrl-C or SIGTERM stops the running chapters (papermill and their kernels), removes their partial notebooks
and ledgers, and exits with 128 + the signal's number (130 or 143).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from . import catalog
from .repro import MODES, check_seed


class Refused(ValueError):
    pass


def resolve_chapters(keys: list[str], root: Path | None = None) -> list[catalog.Chapter]:
    written = catalog.written_chapters(root)
    valid = ", ".join(f"{c.number:02d} ({c.slug})" for c in written)
    if not keys:
        return written
    chosen = []
    for k in keys:
        try:
            ch = catalog.chapter(k)
        except KeyError:
            raise Refused(f"unknown chapter {k!r}; valid: {valid}") from None
        if not ch.written(root):
            raise Refused(f"chapter {ch.number:02d} ({ch.slug}) is not written yet; valid: {valid}")
        if ch not in chosen:
            chosen.append(ch)
    return chosen


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rwlib", description="Reweighting, Reproduced: chapters and book")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the chapters: number, slug, title, part")
    sub.add_parser("pages", help="rewrite the part landing pages and _toc.yml from the catalogue")
    for name, text in (("run", "execute chapters with papermill"), ("book", "execute chapters, build the book")):
        s = sub.add_parser(name, help=text)
        s.add_argument("chapters", nargs="*", help="chapter numbers or slugs (default: all written chapters)")
        s.add_argument("--mode", default="quick", help=f"one of {', '.join(MODES)} (default quick)")
        s.add_argument("--seed", default="0", help="an integer >= 0 (default 0)")
        s.add_argument("--jobs", type=int, default=None, help="chapters at once (default: one per core)")
        s.add_argument("--threads", type=int, default=None, help="torch threads per chapter (default cores/jobs)")
        s.add_argument("--out", default="_build/executed", help="where executed notebooks and ledgers go")
        # A book tree other than this checkout whose notebooks run instead (tests point it at stand-in notebooks).
        s.add_argument("--root", default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("seeds", help="run chapters at N seeds (quick mode, 1 thread each) and record how often each "
                                     "claim held in data/results/seeds/")
    s.add_argument("chapters", nargs="*", help="chapter numbers or slugs (default: all written chapters)")
    s.add_argument("--seeds", type=int, default=5, help="number of seeds: 0..N-1 (default 5)")
    s.add_argument("--jobs", type=int, default=None, help="executions at once (default: one per core)")
    s.add_argument("--threads", type=int, default=1, help="torch threads per execution (default 1, as CI)")
    s.add_argument("--verify", default=None, metavar="DIR",
                   help="run nothing: check the ledgers in DIR (from `run`) against the committed sweeps")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it shuts the run down exactly as Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the body runs, SIGTERM raises :class:`Terminated` in the main thread (then the old handler returns)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for c in catalog.CHAPTERS:
            mark = "" if c.written() else "   (not written yet)"
            print(f"{c.number:02d}  {c.slug:<30} Part {c.part.roman:<4} {c.title}{mark}")
        return 0
    if args.command == "pages":
        from . import book

        for path in book.write_pages():
            print(f"wrote {path}")
        return 0
    if args.command == "seeds":
        return _seeds(args)
    try:
        if args.mode not in MODES:
            raise Refused(f"unknown mode {args.mode!r}; valid: {', '.join(MODES)}")
        try:
            seed = check_seed(args.seed)
        except ValueError as e:
            raise Refused(str(e)) from None
        if args.jobs is not None and args.jobs < 1:
            raise Refused(f"bad --jobs {args.jobs}: expected an integer >= 1")
        if args.threads is not None and args.threads < 1:
            raise Refused(f"bad --threads {args.threads}: expected an integer >= 1")
        root = Path(args.root).resolve() if args.root else None
        if root is not None and not (root / "book").is_dir():
            raise Refused(f"bad --root {args.root!r}: no book/ folder there")
        chapters = resolve_chapters(args.chapters, root)
    except Refused as e:
        print(f"python -m rwlib {args.command}: {e}", file=sys.stderr)
        return 2
    from . import runner

    t0 = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            results = runner.run(chapters, mode=args.mode, seed=seed, jobs=args.jobs, out=Path(args.out),
                                 threads=args.threads, root=root)
    except KeyboardInterrupt as e:
        sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"python -m rwlib {args.command}: {sig.name} after {time.perf_counter() - t0:.1f} s: stopped the "
              f"running chapters and removed their partial notebooks and ledgers from {args.out}", file=sys.stderr)
        return 128 + sig
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} chapters ran without error in "
          f"{time.perf_counter() - t0:.1f} s; executed notebooks and ledgers in {args.out}")
    if failed:
        return 1
    if args.command == "book":
        from . import book

        html = book.build(Path(args.out), root=root or catalog.ROOT)
        print(f"book built: {html / 'index.html'}")
    return 0


def _seeds(args) -> int:
    import json

    from . import seeds

    try:
        if args.seeds < 1:
            raise Refused(f"bad --seeds {args.seeds}: expected an integer >= 1")
        if args.jobs is not None and args.jobs < 1:
            raise Refused(f"bad --jobs {args.jobs}: expected an integer >= 1")
        if args.threads < 1:
            raise Refused(f"bad --threads {args.threads}: expected an integer >= 1")
        chapters = resolve_chapters(args.chapters)
        if args.verify is not None and not Path(args.verify).is_dir():
            raise Refused(f"bad --verify {args.verify!r}: not a folder")
    except Refused as e:
        print(f"python -m rwlib seeds: {e}", file=sys.stderr)
        return 2
    if args.verify is not None:
        problems = []
        for ch in chapters:
            path = Path(args.verify) / ch.ledger_name
            ledger = json.loads(path.read_text()) if path.exists() else None
            if ledger is None:
                problems.append(f"{ch.stem}: no executed ledger {path}")
            problems += seeds.verify(ch, ledger)
        for p in problems:
            print(p)
        print(f"{len(chapters)} chapters checked: {'ok' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    t0 = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            written = seeds.run_sweep(chapters, args.seeds, jobs=args.jobs or 2, threads=args.threads)
    except KeyboardInterrupt:
        print("python -m rwlib seeds: interrupted; no sweep was written for unfinished chapters", file=sys.stderr)
        return 130
    print(f"{len(written)}/{len(chapters)} sweeps written in {time.perf_counter() - t0:.1f} s")
    return 0 if len(written) == len(chapters) else 1

