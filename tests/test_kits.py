"""The experiment kits and the small shared pieces: sweep, finetune (registry, matched counts, compare), named
random streams, eval_mode, atomic writes."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rwlib import adapters, finetune, repro
from rwlib.atomic import atomic_path, write_json_atomic
from rwlib.data.tasks import MultiplyTask
from rwlib.models import TinyGPT, eval_mode
from rwlib.sweep import paired_gap, sweep
from rwlib.train import History


# ---------------------------------------------------------------------------------------------- sweep
def _arm(arm, seed):
    h = History()
    for t in range(3):
        h.log(t + 1, loss=10.0 - t - seed)
    base = {"A": 1.0, "B": 0.5, "C": 1.0}[arm]
    return {"acc": base + 0.1 * seed, "label": arm.lower(), "history": h, "model": object()}


def test_sweep_collects_a_tidy_table_curves_and_objects():
    res = sweep(_arm, ["A", "B", "C"], seeds=[0, 1, 2])
    assert list(res.table.columns) == ["arm", "seed", "acc", "label"]
    assert len(res.table) == 9 and set(res.table["arm"]) == {"A", "B", "C"}
    assert len(res.curves) == 27 and set(res.curves["metric"]) == {"loss"}
    assert set(res.objects["A", 1]) == {"model"}
    np.testing.assert_allclose(res.values("acc", "B"), [0.5, 0.6, 0.7])
    assert res.pivot("acc").shape == (3, 3)


def test_sweep_mapping_arms_are_keyword_settings():
    res = sweep(lambda seed, lr: {"x": lr * (seed + 1)}, {"small": {"lr": 0.1}, "big": {"lr": 1.0}}, seeds=[0, 1])
    np.testing.assert_allclose(res.values("x", "big"), [1.0, 2.0])


def test_compare_gap_and_ranks():
    res = sweep(_arm, ["A", "B", "C"], seeds=[0, 1, 2])
    g = res.gap("acc", "A", "B")
    assert g.mean == pytest.approx(0.5) and g.wins == 3 and g.n == 3 and g.worst == pytest.approx(0.5)
    tie = res.gap("acc", "A", "C")
    assert tie.mean == 0 and tie.wins == 0          # a tie is not a win
    table = res.compare("acc", "A")
    assert list(table["baseline"]) == ["B", "C"] and list(table["wins"]) == ["3/3", "0/3"]
    r = res.ranks("acc")
    assert (r["B"] == 3).all() and (r["A"] == 1).all() and (r["C"] == 1).all()


def test_paired_gap_direction_and_standard_error():
    g = paired_gap([1.0, 2.0, 3.0], [1.5, 1.5, 1.5], higher=False)  # lower is better: baseline - method
    assert g.mean == pytest.approx(-0.5)
    d = np.array([0.5, -0.5, -1.5])
    assert g.se == pytest.approx(d.std(ddof=1) / math.sqrt(3)) and g.margin() == pytest.approx(2 * g.se)
    assert paired_gap([1.0], [0.0]).margin() == 0.0
    with pytest.raises(ValueError, match="equally long"):
        paired_gap([1.0, 2.0], [1.0])


def test_sweep_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unique"):
        sweep(_arm, ["A", "A"], seeds=[0])
    with pytest.raises(ValueError, match="order"):
        sweep(_arm, ["A"], seeds=[0], order="random")
    with pytest.raises(TypeError, match="must return a dict"):
        sweep(lambda a, s: 1.0, ["A"], seeds=[0])
    res = sweep(_arm, ["A"], seeds=[0])
    with pytest.raises(KeyError, match="valid: acc"):
        res.values("accuracy", "A")
    with pytest.raises(KeyError, match="unknown arm"):
        res.values("acc", "Z")


# ---------------------------------------------------------------------------------------------- finetune
def _base():
    torch.manual_seed(0)
    return TinyGPT(97, 16, 1, 32, 4).eval()


def test_registry_has_the_substrate_methods_and_refuses_unknown_names():
    names = finetune.method_names()
    assert {"Full FT", "LoRA", "PiSSA"} <= set(names)
    with pytest.raises(ValueError, match="valid: .*LoRA"):
        finetune.prepare(_base(), "NoSuchMethod", rank=2)
    with pytest.raises(ValueError, match="unknown optimizer"):
        finetune.Recipe(steps=1, batch_size=1, lr=1e-3, optimizer="sgd")


def test_lora_count_is_the_lora_adapters_trainable_count():
    base = _base()
    prep = finetune.prepare(base, "LoRA", rank=3, seed=0)
    assert prep.count() == finetune.lora_count(base, 3) == adapters.count_trainable(prep.model)
    assert not any(isinstance(m, adapters.AdapterLinear) for m in base.modules())


def test_compare_runs_every_method_and_reports_counts():
    base = _base()
    task = MultiplyTask(1, 9)
    problems = task.all_problems()[:12]
    val = {"x": torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(0))}
    res = finetune.compare(base, task, ["LoRA", ("Full FT fast", "Full FT", {"lr": 3e-3})], problems, problems,
                           val, recipe=finetune.Recipe(steps=3, batch_size=4, lr=1e-3), rank=2, seeds=[0, 1],
                           block=16, n_windows=4)
    t = res.table.set_index(["arm", "seed"])
    assert t.loc[("LoRA", 0), "trainable"] == t.loc[("LoRA", 0), "lora count"] == finetune.lora_count(base, 2)
    assert t.loc[("Full FT fast", 1), "trainable"] == sum(p.numel() for p in base.parameters())
    assert t.loc[("Full FT fast", 0), "lr"] == 3e-3 and t.loc[("LoRA", 0), "lr"] == 1e-3
    assert {"exact match", "target loss", "source loss", "forgetting"} <= set(res.table.columns)
    assert isinstance(res.objects["LoRA", 0]["run"], finetune.FineTuned)
    assert len(res.curves) == 2 * 2 * 3


def test_finetune_is_deterministic_for_a_seed_and_leaves_the_base_alone():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    problems = MultiplyTask(1, 9).all_problems()[:8]
    rec = finetune.Recipe(steps=4, batch_size=4, lr=1e-2, schedule="cosine")
    a = finetune.finetune(base, "PiSSA", problems, rec, rank=2, seed=1)
    b = finetune.finetune(base, "PiSSA", problems, rec, rank=2, seed=1)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


# ---------------------------------------------------------------------------------------------- streams
def test_named_streams_are_reproducible_distinct_and_do_not_touch_the_global_generator():
    state = torch.get_rng_state()
    a = torch.rand(4, generator=repro.stream(0, "data"))
    assert torch.equal(a, torch.rand(4, generator=repro.stream(0, "data")))
    assert not torch.equal(a, torch.rand(4, generator=repro.stream(0, "init")))
    assert not torch.equal(a, torch.rand(4, generator=repro.stream(1, "data")))
    assert repro.stream_seed(0, "data") != repro.stream_seed(1000, "data")
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="stream name"):
        repro.stream(0, "")
    with pytest.raises(ValueError, match="bad seed"):
        repro.stream(-1, "data")


def test_seeded_restores_the_global_generator():
    state = torch.get_rng_state()
    with repro.seeded(repro.stream_seed(3, "init")):
        x = torch.rand(3)
    with repro.seeded(repro.stream_seed(3, "init")):
        assert torch.equal(x, torch.rand(3))
    assert torch.equal(state, torch.get_rng_state())


def test_eval_mode_restores_the_mode_even_on_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with eval_mode(m):
        assert not m.training
    assert m.training
    with pytest.raises(RuntimeError):
        with eval_mode(m):
            raise RuntimeError("boom")
    assert m.training
    m.eval()
    with eval_mode(m):
        pass
    assert not m.training


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_writes_leave_nothing_half_written(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_sft_train_records_eval_fn_like_the_loop():
    import torch

    from rwlib.data.tasks import AdditionTask
    from rwlib.data.text import TOKENIZER
    from rwlib.finetune import sft_train
    from rwlib.models import TinyGPT

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyGPT(TOKENIZER.vocab_size, 12, 1, 16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    hist = sft_train(model, opt, AdditionTask(1, 1), 5, 4, torch.Generator().manual_seed(0),
                     eval_fn=lambda: calls.append(1) or {"ev": float(len(calls))}, eval_every=2)
    steps, vals = hist.series("ev")
    assert steps.tolist() == [2, 4, 5] and vals.tolist() == [1.0, 2.0, 3.0]


def test_noisy_answers_changes_only_the_last_digit_at_the_given_rate():
    import pytest
    import torch

    from rwlib.data.tasks import AdditionTask, noisy_answers

    task = AdditionTask(1, 2)
    ps = noisy_answers(task, 0.3)(2000, torch.Generator().manual_seed(0))
    wrong = [p for p in ps if p.target != f"{p.answer};"]
    assert 0.25 < len(wrong) / len(ps) < 0.35
    assert all(p.target[:-2] == str(p.answer)[:-1] and p.target[-2] != str(p.answer)[-1] for p in wrong)
    assert all(task.verify(p, p.target) == 0.0 for p in wrong)
    with pytest.raises(ValueError, match="valid 0 <= noise < 1"):
        noisy_answers(task, 1.0)


def test_repeat_seeds_are_valid_distinct_and_do_not_overlap_across_chapter_seeds():
    a, b = repro.repeat_seeds(0, 3), repro.repeat_seeds(1, 3)
    assert len(set(a + b)) == 6 and all(0 <= s <= repro.MAX_SEED for s in a + b)
    assert a == repro.repeat_seeds(0, 3) and repro.stream(a[0], "data") is not None
    with pytest.raises(ValueError, match="repeats"):
        repro.repeat_seeds(0, 0)


# ------------------------------------------------------------------------ learning vs forgetting (finetune)
def test_block_dense_control_trains_every_entry_of_the_block_linears_only():
    torch.manual_seed(0)
    base = TinyGPT(97, block_size=16, n_layer=1, n_embd=32, n_head=2)
    prep = finetune.prepare(base, "Full FT (block linears)", rank=2)
    blocks = {f"{n}.weight" for n, m in prep.model.named_modules() if isinstance(m, nn.Linear)
              and adapters.block_linears(n, m)}
    assert {n for n, p in prep.model.named_parameters() if p.requires_grad} == blocks
    assert prep.count() == sum(p.numel() for n, p in base.named_parameters() if n in blocks)
    problems = MultiplyTask(2, 9).all_problems()
    recipe = finetune.Recipe(steps=3, batch_size=8, lr=1e-2, optimizer="adam", betas=(0.9, 0.95))
    ft = finetune.finetune(base, "Full FT (block linears)", problems, recipe, rank=2)
    before = dict(base.named_parameters())
    for name, p in ft.model.named_parameters():
        if name in blocks:  # dense: (almost) every entry moves, unlike any sparse mask
            assert (p.detach() != before[name].detach()).float().mean() > 0.9
        else:
            assert torch.equal(p.detach(), before[name].detach())


def test_frontier_keeps_the_undominated_runs_and_the_base():
    acc = [0.5, 0.2, 0.5, 0.1, 0.3]
    forg = [2.0, 1.0, 3.0, 1.5, 4.0]     # (0.5, 3) and (0.1, 1.5) and (0.3, 4) are dominated
    a, f = finetune.frontier(acc, forg, base_acc=0.0)
    np.testing.assert_array_equal(a, [0.0, 0.2, 0.5])
    np.testing.assert_array_equal(f, [0.0, 1.0, 2.0])
    assert finetune.forgetting_at(acc, forg, 0.35) == pytest.approx(1.5)   # halfway from (0.2, 1) to (0.5, 2)
    assert finetune.forgetting_at(acc, forg, 0.1) == pytest.approx(0.5)    # between the base and (0.2, 1)
    assert finetune.forgetting_at(acc, forg, 0.5) == pytest.approx(2.0)
    assert np.isnan(finetune.forgetting_at(acc, forg, 0.6))                # no run reaches it
    with pytest.raises(ValueError, match="equally long"):
        finetune.frontier([0.1, 0.2], [1.0])


def test_matched_forgetting_reads_both_frontiers_at_the_lower_best_accuracy():
    import pandas as pd

    t = pd.DataFrame({"family": ["A"] * 3 + ["B"] * 3 + ["A"] * 2 + ["B"] * 2, "seed": [0] * 6 + [1] * 4,
                      "exact match": [0.1, 0.4, 0.2, 0.1, 0.2, 0.05, 0.3, 0.3, 0.6, 0.1],
                      "forgetting": [1.0, 4.0, 5.0, 0.5, 3.0, 2.0, 1.0, 2.0, 3.0, 0.2]})
    m = finetune.matched_forgetting(t, "A", "B")
    assert list(m.index) == [0, 1] and list(m.columns) == ["level", "A", "B"]
    assert m.loc[0, "level"] == pytest.approx(0.2)              # B's best; A reaches 0.4
    assert m.loc[0, "A"] == pytest.approx(2.0)                  # A: (0.1, 1) -> (0.4, 4) at 0.2
    assert m.loc[0, "B"] == pytest.approx(3.0)
    assert m.loc[1, "level"] == pytest.approx(0.3)              # A's best; B reaches 0.6
    assert m.loc[1, "A"] == pytest.approx(1.0) and m.loc[1, "B"] == pytest.approx(0.2 + 2.8 * 0.2 / 0.5)
    with pytest.raises(ValueError, match="valid: A, B"):
        finetune.matched_forgetting(t, "A", "C")
    summ = finetune.matched_summary(t, "A", ["B"])
    assert summ.loc["B", "wins"] == 2 and summ.loc["B", "n"] == 2      # A forgets less at both seeds
    assert summ.loc["B", "gap"] == pytest.approx(((3.0 - 2.0) + (1.32 - 1.0)) / 2)
    assert summ.loc["B", "level"] == pytest.approx(0.25)
