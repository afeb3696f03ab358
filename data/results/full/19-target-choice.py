"""Chapter 19's target choice: which new skill is learnable in the quick budget, judged on full fine-tuning and
LoRA only (no Bone/Bat run), before the adapters are compared.

Criterion (fixed before this was run): full fine-tuning, and LoRA at the best of the learning rates
1e-3, 3e-3, 1e-2, 3e-2, must reach exact match well above the 5 % floor in 400 steps of batch 32 (AdamW,
cosine, clip 1, one repeat: chapter seed 0's first). Candidates:

- ``mult2x1``: two-digit times one-digit products (``MultiplyTask()``), 560 training problems, scored on the
  160 held out (the chapter's first target);
- ``add2``: two-digit addition (``AdditionTask(1, 2, width=2)``), 2000 training problems, 500 held out;
- ``table``: the one-digit table (``MultiplyTask(2, 9)``, chapter 20's target), trained and scored on its
  64 facts.

    python data/results/full/19-target-choice.py --threads 1     # writes 19-target-choice.json (~2 min)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this checkout's rwlib, not an installed one
from rwlib import finetune, pretrained, recorded, repro  # noqa: E402
from rwlib.data.tasks import AdditionTask, MultiplyTask, split_problems  # noqa: E402
from rwlib.methods import bone  # noqa: E402

SETTINGS = dict(steps=400, batch=32, lr_full=1e-3, lora_lrs=(1e-3, 3e-3, 1e-2, 3e-2), r=16, chapter_seed=0)


def targets(seed: int) -> dict:
    split = repro.stream_seed(seed, "split")
    mult = MultiplyTask()
    m_train, m_test = split_problems(mult.all_problems(), 560, split)
    add = AdditionTask(1, 2, width=2)
    a_train, a_test = split_problems([add.make(a, b) for a in range(100) for b in range(100)], 2000, split)
    table = MultiplyTask(2, 9)
    return {"mult2x1": (mult, m_train, m_test), "add2": (add, a_train, a_test[:500]),
            "table": (table, table.all_problems(), table.all_problems())}


def main() -> None:
    args, t0 = recorded.script_args(__doc__, threads=1)
    cfg = pretrained.PretrainConfig()
    base, _ = pretrained.pretrained_tinygpt(cfg)
    source = pretrained.source_corpus(cfg)
    rank = round(bone.lora_rank_for(base, SETTINGS["r"]))
    seed = repro.repeat_seeds(SETTINGS["chapter_seed"], 1)[0]
    recipe = finetune.Recipe(steps=SETTINGS["steps"], batch_size=SETTINGS["batch"], lr=SETTINGS["lr_full"],
                             optimizer="adamw", schedule="cosine", clip=1.0)
    runs = ["Full FT"] + [(f"LoRA, lr {lr:g}", "LoRA", {"lr": lr}) for lr in SETTINGS["lora_lrs"]]
    tables = []
    for name, (task, train, test) in targets(SETTINGS["chapter_seed"]).items():
        res = finetune.compare(base, task, runs, train, test, source.val, recipe=recipe, rank=rank,
                               seeds=[seed], block=cfg.block, keep_models=False)
        tables.append(res.table.assign(target=name, n_train=len(train), n_scored=len(test)))
        print(name, res.table[["arm", "exact match"]].to_string(index=False), flush=True)
    res.table = pd.concat(tables, ignore_index=True).drop(columns=["history"], errors="ignore")
    cols = ["target", "arm", "seed", "lr", "n_train", "n_scored", "exact match", "target loss"]
    res.table = res.table[cols]
    path = recorded.save("19-target-choice", res, chapter=19, what="the target-choice check (Full FT, LoRA)",
                         parameters=SETTINGS, t0=t0, threads=args.threads,
                         command=f"python data/results/full/19-target-choice.py --threads {args.threads}")
    print("wrote", path)


if __name__ == "__main__":
    main()
