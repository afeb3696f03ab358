"""Chapter 20's recorded full-mode run: the learning/forgetting frontier over learning rates, on the CPU.

Issue 13: LIFT's lower forgetting at the paper's learning-rate ratio is confounded with how little it learns
(in quick mode Full FT learns most of the table and LIFT a fifth of it), so each method is run over a grid of
learning rates and the forgetting is compared at matched target accuracy
(:func:`rwlib.finetune.matched_forgetting`). The regime is the chapter's quick mode, fixed before this
was run: the pretrained TinyGPT, the 64-fact table ``MultiplyTask(2, 9)``, 200 steps of batch 32, Adam with
beta = (0.9, 0.95), constant learning rate, clipping at 1, rho = 4, LIFT with r = 4 and T = 50. The grid
multiplies each method's base learning rate (Full FT and its block-linears control 2.5e-3; LoRA, LIFT and
magnitude-sparse 4x that, the paper's ratio) by 1/27, 1/9, 1/3, 1 and 3. Five repeats derived from chapter
seed 0 (``repro.repeat_seeds(0, 5)``); all runs of a repeat share the batch stream, as in the chapter.

    python data/results/full/20-lift-frontier.py --threads 2      # writes 20-lift-frontier.json

Writes the JSON beside this file through :mod:`rwlib.recorded` (with provenance). Chapter 20 shows it,
labelled as recorded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this checkout's rwlib, not an installed one
from rwlib import finetune, pretrained, recorded, repro  # noqa: E402
from rwlib.data.tasks import MultiplyTask  # noqa: E402

REGIME = dict(steps=200, batch=32, lr_full=2.5e-3, lr_ratio=4, rho=4, filter_rank=4, T=50,
              grid=[1 / 27, 1 / 9, 1 / 3, 1, 3], chapter_seed=0, repeats=5,
              families=["Full FT", "Full FT (block linears)", "LoRA", "LIFT", "Magnitude"])


def main() -> None:
    args, t0 = recorded.script_args(__doc__, threads=2, out=Path(__file__).with_suffix(".json"))
    R = REGIME
    cfg = pretrained.PretrainConfig()
    base, _ = pretrained.pretrained_tinygpt(cfg)
    source = pretrained.source_corpus(cfg)
    task = MultiplyTask(2, 9)
    problems = task.all_problems()
    sparse = {"filter_rank": R["filter_rank"], "update_interval": R["T"]}
    lr0 = {m: R["lr_full"] * (1 if m.startswith("Full FT") else R["lr_ratio"]) for m in R["families"]}
    opts = {"LoRA": {"merge": True}, "LIFT": sparse, "Magnitude": sparse}
    runs = [(f"{m} @{x:.3g}", m, {"lr": lr0[m] * x, **opts.get(m, {})}) for m in R["families"]
            for x in R["grid"]]
    recipe = finetune.Recipe(steps=R["steps"], batch_size=R["batch"], lr=lr0["LIFT"], optimizer="adam",
                             betas=(0.9, 0.95), schedule="constant", clip=1.0)
    repeats = repro.repeat_seeds(R["chapter_seed"], R["repeats"])
    res = finetune.compare(base, task, runs, problems, problems, source.val, recipe=recipe, rank=R["rho"],
                           seeds=repeats, block=cfg.block, keep_models=False)
    res.table["family"] = res.table["arm"].str.split(" @").str[0]
    base_acc = finetune.exact_match(base, task, problems, max_new_tokens=4)
    recorded.save(Path(args.out).stem, res, chapter=20, directory=Path(args.out).parent,
                  what="forgetting vs target accuracy over a learning-rate grid, per method (issue 13)",
                  parameters=R, t0=t0, threads=args.threads,
                  command=f"python data/results/full/20-lift-frontier.py --threads {args.threads}",
                  extra={"base exact match": base_acc,
                         "source loss before": res.table.attrs["source loss before"]})
    print(res.table.groupby(["family", "lr"], sort=False)[["exact match", "forgetting"]].mean().round(3))
    for b in R["families"]:
        if b != "LIFT":
            print(b, finetune.matched_forgetting(res.table, "LIFT", b, base_acc=base_acc).round(3).to_string())
    print("wall", round(time.perf_counter() - t0, 1), "s")


if __name__ == "__main__":
    main()
