"""Chapter 01's recorded full-mode run: the chapter brief's regime and the paper's ablations, on the CPU.

The regime is the brief's (chapter brief 01, section 4), fixed before this was run and not tuned afterwards:
8x8 digits, 4 labels per class, 360 test images, 1000 steps, B = 16, mu = 7, tau = 0.95, DA and soft FixMatch
targets, EMA 0.99 -- with one departure: the network is the chapter's miniature SmallCNN (widths (8, 16), 64-d
features), not the brief's (32, 64)/128, which took ~50 ms a step on these 2 shared CPU cores (40 runs of 1000
steps would take over half an hour; the miniature takes ~6 ms a step). The split of chapter
seed 0 and five repeats derived from it (``repro.repeat_seeds(0, 5)``), shared by all arms. Arms: supervised-only,
FixMatch (+DA), ShrinkMatch, and ShrinkMatch's ablations (``shrinkmatch.ABLATIONS``: Table 8, Table 9).

    python data/results/full/01-shrinkmatch-regime.py --threads 2      # writes 01-shrinkmatch-regime.json

Writes the JSON beside this file atomically, with provenance (date, git hash, device, threads, wall time,
parameters). Chapter 01 shows it, labelled as recorded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this checkout's rwlib, not an installed one
from rwlib import data, recorded, repro, ssl  # noqa: E402
from rwlib.methods import shrinkmatch as sm  # noqa: E402
from rwlib.sweep import sweep  # noqa: E402

REGIME = dict(labels_per_class=4, n_test=360, steps=1000, widths=(8, 16), feat_dim=64, ema=0.99, batch=16,
              mu=7, tau=0.95, da=True, soft=True, chapter_seed=0, repeats=5)


def main() -> None:
    args, t0 = recorded.script_args(__doc__, threads=2, out=Path(__file__).with_suffix(".json"))
    R = REGIME
    digits = data.load("digits")
    split = data.few_label_split(digits, R["labels_per_class"], R["n_test"],
                                 repro.stream_seed(R["chapter_seed"], "split"))
    cfg = ssl.SSLConfig(steps=R["steps"], batch=R["batch"], mu=R["mu"], tau=R["tau"], da=R["da"], soft=R["soft"],
                        widths=R["widths"], feat_dim=R["feat_dim"], ema=R["ema"], eval_every=R["steps"] // 10)
    arms = {"supervised": None, "FixMatch": None, "ShrinkMatch": {}, **sm.ABLATIONS}

    def one_run(arm, s):
        extra = None
        if arms[arm] is not None:
            with repro.seeded(repro.stream_seed(s, "init/aux")):
                extra = sm.ShrinkMatchLoss(cfg.feat_dim, digits.n_classes, cfg.tau, cfg.ema, **arms[arm])
        hist, _ = ssl.train_ssl(split, cfg.but(unsupervised=arm != "supervised"), s, extra=extra, desc=arm)
        out = {"test accuracy": hist.last("test_acc"), "history": hist}
        if arm != "supervised":
            out["utilisation (first 30%)"] = float(hist["utilisation"][: int(0.3 * cfg.steps)].mean())
        return out

    repeats = repro.repeat_seeds(R["chapter_seed"], R["repeats"])
    res = sweep(one_run, list(arms), seeds=repeats)
    every = {"n_removed": 10, "utilisation": 10, "lambda": 10}   # the per-step metrics: every 10th step
    recorded.save(Path(args.out).stem, res, chapter=1, directory=Path(args.out).parent,
                  what="the brief's 1000-step regime and the paper's ablations (Tables 8-9)",
                  parameters={**R, "arms": arms}, t0=t0, threads=args.threads,
                  command=f"python data/results/full/01-shrinkmatch-regime.py --threads {args.threads}",
                  curves=recorded.curves_by_seed(res, ("test_acc", "n_removed", "utilisation", "lambda"), every))
    print(res.table.groupby("arm", sort=False)[["test accuracy"]].agg(["mean", "std", "min"]))
    print("wall", round(time.perf_counter() - t0, 1), "s")


if __name__ == "__main__":
    main()
