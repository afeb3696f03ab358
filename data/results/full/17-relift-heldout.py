"""Chapter 17's recorded CPU run: every arm on a question pool large enough to generalise from, measured on
held-out questions.

The live miniature trains on a small fixed pool (24 questions in quick mode), which a one-layer model learns by
heart: it never learns column addition, so nothing transfers to questions it has not seen. Here the pool holds
256 two-digit additions with three-digit sums and 48 one-digit ones, each seen only a few times, and every arm
is measured on 32 + 32 held-out questions of the same two kinds. Everything else is the chapter's setting
(one-layer TinyGPT base, ``relift.RL_CONFIG`` with 8 prompts x 8 answers, M = 8, 8 passes per fine-tuning
batch, the same learning rates); the regime (pool sizes, 400 base steps, 500 updates, three repeats derived
from chapter seed 0) was fixed before this was run and not tuned afterwards.

    python data/results/full/17-relift-heldout.py --threads 2      # writes 17-relift-heldout.json

Writes the JSON beside this file atomically, with provenance. Chapter 17 shows it, labelled as recorded.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # this checkout's rwlib, not an installed one
from rwlib import finetune, recorded, repro  # noqa: E402
from rwlib.data.tasks import AdditionTask  # noqa: E402
from rwlib.methods import relift  # noqa: E402
from rwlib.rl import train_grpo  # noqa: E402
from rwlib.sweep import sweep  # noqa: E402

REGIME = dict(base_steps=400, n_easy=48, n_hard=256, test_easy=32, test_hard=32, updates=500, M=8, epochs=8,
              prompts=8, group=8, tokens=10, chapter_seed=0, repeats=3)
ARMS = ["RL-only", "SFT-only", "ReLIFT", "random buffer", "SFT every step", "SFT then RL"]


def main() -> None:
    args, t0 = recorded.script_args(__doc__, threads=2)
    R = REGIME
    task, T = AdditionTask(1, 2, width=2), R["tokens"]
    RL = relift.RL_CONFIG.but(prompts_per_step=R["prompts"], group_size=R["group"], max_new_tokens=T)
    bases, sft_models = {}, {}

    def base(s):
        if s not in bases:
            split = relift.make_split(R["n_easy"], R["n_hard"], R["test_easy"], R["test_hard"],
                                      repro.stream(s, "pool"))
            bases[s] = (relift.zero_rl_base(s, R["base_steps"], T), *split)
        return bases[s]

    def one(arm, s):
        b, pool, test = base(s)
        sets = {"": pool, "test_": test}
        if arm == "base":
            return relift.measure(b, task, sets, None, T)
        model, g = copy.deepcopy(b).train(), repro.stream(s, "train")
        sampler = relift.PoolSampler(pool)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if arm == "SFT-only" else 1e-3)
        if arm == "SFT-only":
            fn = lambda n, g: [dataclasses.replace(p, target=relift.compact_scratchpad(p))  # noqa: E731
                               for p in sampler(n, g)]
            finetune.sft_train(model, opt, None, R["updates"], R["prompts"], g, problem_fn=fn, entropy_coef=1e-4)
            sft_models[s], demos = copy.deepcopy(model), sampler.seen
        else:
            if arm == "SFT then RL":
                model = copy.deepcopy(sft_models[s]).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            buf, hook = relift.arm_hook(arm, model, R["M"], R["epochs"], repro.stream(s, "random-buffer"))
            train_grpo(model, opt, relift.BinaryReward(task), RL, R["updates"], g, problem_fn=sampler,
                       on_rollout=hook, desc=arm)
            demos = buf.used
        print(f"{arm} seed {s}: {time.perf_counter() - t0:.0f} s", flush=True)
        return {**relift.measure(model.eval(), task, sets, None, T), "demos": demos}

    seeds = repro.repeat_seeds(R["chapter_seed"], R["repeats"])
    res = sweep(one, ["base", *ARMS], seeds=seeds)
    recorded.save("17-relift-heldout", res, chapter=17, parameters=R, t0=t0, threads=args.threads,
                  what="every arm on a 304-question pool, measured on 64 held-out questions",
                  command=f"python data/results/full/17-relift-heldout.py --threads {args.threads}")
    print(res.table.groupby("arm", sort=False).mean(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
