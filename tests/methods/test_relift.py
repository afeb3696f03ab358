"""Chapter 17 (ReLIFT): the buffer of hardest questions, the interleaved fine-tuning step and the RL settings."""

import pytest
import torch
import torch.nn.functional as F

from rwlib.data.tasks import AdditionTask, sft_batch
from rwlib.methods import relift
from rwlib.models import TinyGPT
from rwlib.rl import clipped_pg_loss, group_advantages, sample_completions, sequence_logprobs, token_entropy
from rwlib.rl.rollout import score

TASK = AdditionTask(1, 2, width=2)


def _problems(n, seed=0):
    return TASK.sample(n, torch.Generator().manual_seed(seed))


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(97, 24, 1, 16, 2)


def test_all_fail_counts_format_errors_as_failures():
    r = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, -1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    assert relift.all_fail(r).tolist() == [True, False, True, True, False]
    assert relift.all_fail(r.reshape(-1), group_size=3).tolist() == [True, False, True, True, False]
    with pytest.raises(ValueError, match="group_size"):
        relift.all_fail(r.reshape(-1))
    with pytest.raises(ValueError, match="shape"):
        relift.all_fail(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="torch tensor"):
        relift.all_fail([[0.0, 0.0]])


def test_binary_reward_is_the_official_version_3_reward():
    task = relift.BinaryReward(TASK)
    p = TASK.make(57, 68)
    assert [TASK.verify(p, c) for c in ("125;", "124;", "12x;")] == [1.0, 0.0, -1.0]
    assert [task.verify(p, c) for c in ("125;", "124;", "12x;")] == [1.0, 0.0, 0.0]
    assert task.prompt_len == TASK.prompt_len and task.make(1, 2).answer == 3


def test_buffer_keeps_one_item_per_question_newest_first_and_pops_only_at_M():
    ps = _problems(4)
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])  # three all-fail groups of G = 2
    b = relift.HardestBuffer(4)
    assert b.add(ps, r, lambda p: "d" + p.prompt) == 3 and len(b) == 3  # one item per group, not G
    assert [p.prompt for p, _ in b.items] == [ps[0].prompt, ps[2].prompt, ps[3].prompt]
    assert b.items[0][1] == "d" + ps[0].prompt
    assert not b.ready()
    with pytest.raises(RuntimeError, match="fewer than M=4"):
        b.pop_batch()
    qs = _problems(2, seed=1)
    assert b.add(qs, torch.zeros(2, 2), lambda p: p.target) == 2  # the newer batch goes in front
    assert [p.prompt for p, _ in b.items] == [qs[0].prompt, qs[1].prompt, ps[0].prompt, ps[2].prompt,
                                              ps[3].prompt]
    batch = b.pop_batch()
    assert [p.prompt for p, _ in batch] == [qs[0].prompt, qs[1].prompt, ps[0].prompt, ps[2].prompt]
    assert len(b) == 1 and b.used == 4 and b.added == 5 and not b.ready()


def test_buffer_rejects_bad_input():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="bad M"):
            relift.HardestBuffer(bad)
    b = relift.HardestBuffer(2)
    with pytest.raises(ValueError, match="P = 3"):
        b.add(_problems(3), torch.zeros(2, 4), lambda p: p.target)
    with pytest.raises(ValueError, match="P = 3"):
        b.add(_problems(3), torch.zeros(12), lambda p: p.target)


def test_difficulty_buckets_are_the_papers_ranges_for_eight_samples():
    acc = torch.arange(9) / 8
    assert relift.difficulty_buckets(acc) == ["hardest", "hard", "hard", "medium", "medium", "medium", "easy",
                                              "easy", "easy"]
    assert relift.difficulty_buckets([]) == []
    for bad in ([1.2], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            relift.difficulty_buckets(bad)
    with pytest.raises(ValueError, match="one-dimensional"):
        relift.difficulty_buckets(torch.zeros(2, 2))


def test_all_fail_groups_give_no_policy_gradient_under_the_official_loss():
    """(R2)-(R4): an all-fail group has zero advantages, so only the entropy bonus moves the policy; and the shared
    loss with clip=False, agg='seq-sum-const' is the official sum(-A rho mask) / T_max divided by N."""
    torch.manual_seed(0)
    N, T, G = 8, 5, 4
    r = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0.0])           # first group all-fail, second mixed
    adv = group_advantages(r, G, scale="none")
    assert torch.equal(adv[:4], torch.zeros(4))
    assert torch.allclose(adv[4:], torch.tensor([0.5, -0.5, 0.5, -0.5]))
    logp = torch.randn(N, T).clamp(max=0).requires_grad_(True)
    logp_old = logp.detach() + 0.1 * torch.randn(N, T)
    mask = (torch.rand(N, T) > 0.2).float()
    loss, _ = clipped_pg_loss(logp, logp_old, adv, mask, clip=False, agg="seq-sum-const", max_len=T)
    official = (-adv[:, None] * torch.exp(logp - logp_old) * mask).sum() / T          # compute_policy_loss
    assert torch.allclose(loss * N, official, atol=1e-6)
    loss.backward()
    assert torch.equal(logp.grad[:4], torch.zeros(4, T)) and logp.grad[4:].abs().sum() > 0


def test_finetune_step_loss_matches_cross_entropy_minus_entropy():
    m = _model()
    ps = _problems(3)
    batch = [(p, relift.compact_scratchpad(p)) for p in ps]
    x, y, mask = sft_batch(ps, [d for _, d in batch])
    with torch.no_grad():
        logits = m(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape)
        p = torch.softmax(logits, -1)
        ent = -(p * torch.log(p)).sum(-1)
        expected = ((ce - 0.1 * ent) * mask).sum() / mask.sum()
    loss = relift.finetune_step(m, torch.optim.SGD(m.parameters(), lr=0.0), batch, alpha=0.1)
    assert abs(loss - float(expected)) < 1e-5
    assert torch.allclose(token_entropy(logits), ent, atol=1e-5)


def test_hook_fine_tunes_only_when_the_buffer_reaches_M():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    buf = relift.HardestBuffer(3)
    hook = relift.relift_hook(m, opt, buf, relift.compact_scratchpad, alpha=1e-4)
    ro = sample_completions(m, _problems(2, 1), 2, 4, torch.Generator().manual_seed(0))
    score(TASK, ro)
    ro.rewards = torch.tensor([0.0, -1.0, 0.0, 1.0])        # question 0 all-fail, question 1 solved once
    before = [p.detach().clone() for p in m.parameters()]
    out = hook(ro)
    assert out["buffer"] == 1 and out["hardest"] == 1 and out["demos_used"] == 0 and "sft_loss" not in out
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    ro2 = sample_completions(m, _problems(2, 2), 2, 4, torch.Generator().manual_seed(1))
    score(TASK, ro2)
    ro2.rewards = torch.zeros(4)
    old = ro2.logp_old.clone()
    out = hook(ro2)                                          # 3 >= M = 3: one step on the newest three
    assert out["demos_used"] == 3 and out["buffer"] == 0 and out["sft_steps"] == 1 and "sft_loss" in out
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    m.eval()
    with torch.no_grad():                                    # old log-probs recomputed after the step: ratio 1
        now, _ = sequence_logprobs(m, ro2.tokens, ro2.prompt_len, False)
    assert torch.allclose(ro2.logp_old, now) and not torch.allclose(old, now)


def test_compact_scratchpad_is_the_task_scratchpad_with_column_sums_only():
    assert AdditionTask(1, 2, "scratchpad", width=2).make(57, 68).target == "7+8+0=15,5+6+1=12|125;"
    assert relift.compact_scratchpad(TASK.make(57, 68)) == "15,12|125;"
    assert relift.compact_scratchpad(TASK.make(7, 8)) == "15|15;"
    for p in _problems(50, seed=3):
        assert TASK.verify(p, relift.compact_scratchpad(p)) == 1.0


def test_pool_and_sampler():
    pool = relift.make_pool(6, 5, torch.Generator().manual_seed(0))
    assert len({p.prompt for p in pool}) == 11
    assert all(p.difficulty == 1 for p in pool[:6]) and all(p.answer >= 100 for p in pool[6:])
    s = relift.PoolSampler(pool)
    g = torch.Generator().manual_seed(0)
    epoch = s(11, g)
    assert sorted(p.prompt for p in epoch) == sorted(p.prompt for p in pool) and s.seen == 11
    with pytest.raises(ValueError, match="empty"):
        relift.PoolSampler([])
    with pytest.raises(ValueError, match="bad pool sizes"):
        relift.make_pool(101, 1, torch.Generator())


def test_rl_config_is_the_official_setting():
    c = relift.RL_CONFIG
    assert (c.clip, c.agg, c.scale, c.entropy_coef, c.group_size, c.temperature) == (
        False, "seq-sum-const", "none", 1e-3, 8, 1.0)


def test_question_accuracy_is_the_fraction_of_correct_samples():
    m = _model()
    ps = _problems(5)
    acc = relift.question_accuracy(m, TASK, ps, torch.Generator().manual_seed(0), n=4, max_new_tokens=4)
    e = relift.evaluate_task(m, TASK, ps, n_samples=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert acc.shape == (5,) and torch.equal(acc, (e["rollout"].rewards.reshape(5, 4) == 1).float().mean(1))


def test_random_buffer_takes_as_many_random_questions_as_there_were_all_fail_ones():
    ps = _problems(8)
    r = torch.ones(8, 2)
    r[[1, 6]] = 0.0                                          # two all-fail groups
    takes = []
    for seed in range(20):
        b = relift.HardestBuffer(4, select="random", generator=torch.Generator().manual_seed(seed))
        assert b.add(ps, r, lambda p: p.target) == 2 and len(b) == 2
        takes.append(tuple(sorted(p.prompt for p, _ in b.items)))
    assert len(set(takes)) > 1                               # random, not the all-fail ones every time
    hardest = tuple(sorted(ps[i].prompt for i in (1, 6)))
    assert any(t != hardest for t in takes)
    again = relift.HardestBuffer(4, select="random", generator=torch.Generator().manual_seed(3))
    again.add(ps, r, lambda p: p.target)
    assert tuple(sorted(p.prompt for p, _ in again.items)) == takes[3]   # deterministic given the generator
    b = relift.HardestBuffer(4, select="random", generator=torch.Generator().manual_seed(0))
    assert b.add(ps, torch.ones(8, 2), lambda p: p.target) == 0          # no all-fail group: nothing added
    with pytest.raises(ValueError, match="unknown select 'easiest'"):
        relift.HardestBuffer(4, select="easiest")
    with pytest.raises(ValueError, match="needs a generator"):
        relift.HardestBuffer(4, select="random")


def test_every_step_trigger_fine_tunes_on_any_non_empty_buffer():
    b = relift.HardestBuffer(3)
    b.add(_problems(2), torch.tensor([[0.0, 0.0], [1.0, 0.0]]), lambda p: p.target)
    with pytest.raises(RuntimeError, match="fewer than M=3"):
        b.pop_batch()
    assert len(b.pop_batch(partial=True)) == 1 and len(b) == 0 and b.used == 1
    with pytest.raises(RuntimeError):
        b.pop_batch(partial=True)                            # empty: nothing to hand out
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for trigger, fired in (("buffer", False), ("every-step", True)):
        buf = relift.HardestBuffer(3)
        hook = relift.relift_hook(m, opt, buf, relift.compact_scratchpad, trigger=trigger)
        ro = sample_completions(m, _problems(2, 1), 2, 4, torch.Generator().manual_seed(0))
        score(TASK, ro)
        ro.rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])    # one all-fail question, M = 3
        out = hook(ro)
        assert ("sft_loss" in out) == fired and out["demos_used"] == (1 if fired else 0)
    with pytest.raises(ValueError, match="unknown trigger 'sometimes'"):
        relift.relift_hook(m, opt, relift.HardestBuffer(3), relift.compact_scratchpad, trigger="sometimes")


def test_split_holds_out_questions_never_seen_in_training():
    train, test = relift.make_split(6, 4, 10, 5, torch.Generator().manual_seed(0))
    assert len(train) == 10 and len(test) == 15
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert sum(p.answer >= 100 for p in train) == 4 and sum(p.answer >= 100 for p in test) == 5
    assert all(p.difficulty == 1 for p in test[:10])


def test_bucket_table_uses_the_base_buckets_of_the_same_seed():
    acc = {("base", 0): torch.tensor([1.0, 0.5, 0.0]), ("RL", 0): torch.tensor([0.5, 1.0, 0.25]),
           ("base", 1): torch.tensor([0.0, 0.0, 0.875]), ("RL", 1): torch.tensor([1.0, 0.0, 0.0])}
    t = relift.bucket_table(acc)
    assert t[t.arm == "RL"].bucket.tolist() == ["easy", "medium", "hardest", "hardest", "hardest", "easy"]
    assert relift.bucket_means(t, "RL", ["easy"]) == [0.5, 0.0]
    assert relift.bucket_means(t, "RL", ["hardest"]) == [0.25, 0.5]
    assert relift.bucket_means(t, "base")[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bad arm 'SFT'"):
        relift.bucket_means(t, "SFT", ["easy"])
    with pytest.raises(ValueError, match="buckets"):
        relift.bucket_means(t, "RL", ["trivial"])
    with pytest.raises(ValueError, match="no arm 'base'"):
        relift.bucket_table({("RL", 0): torch.zeros(2)})


def test_measure_reports_both_question_sets_with_their_prefixes():
    m = _model()
    train, test = relift.make_split(3, 2, 3, 2, torch.Generator().manual_seed(0))
    out = relift.measure(m, TASK, {"": train, "test_": test}, lambda pre: torch.Generator().manual_seed(1), 4)
    for pre, qs in (("", train), ("test_", test)):
        e = relift.evaluate_task(m, TASK, qs, temperature=0, max_new_tokens=4)
        assert out[pre + "accuracy"] == e["pass@1"] and out[pre + "easy"] == e["acc_d1"]
        assert out[pre + "hardest"] == e["acc_d2"] and out[pre + "acc"].shape == (len(qs),)
    greedy = relift.measure(m, TASK, {"": train}, None, 4)     # no generator: greedy numbers only
    assert "acc" not in greedy and greedy["accuracy"] == out["accuracy"]


def test_zero_rl_base_is_a_fixed_eval_mode_model_of_its_seed():
    a, b = relift.zero_rl_base(3, 2, 10), relift.zero_rl_base(3, 2, 10)
    assert not a.training and a.block_size == 6 + 10 + 2
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), relift.zero_rl_base(4, 2, 10).parameters()))


def test_arm_hook_wires_each_ablation():
    m = _model()
    g = torch.Generator().manual_seed(0)
    for arm, select, hooked in (("ReLIFT", "hardest", True), ("random buffer", "random", True),
                                ("SFT every step", "hardest", True), ("RL-only", "hardest", False)):
        buf, hook = relift.arm_hook(arm, m, 4, 1, g)
        assert buf.M == 4 and buf.select == select and (hook is not None) == hooked
    buf, hook = relift.arm_hook("SFT every step", m, 4, 1, g)
    ro = sample_completions(m, _problems(2, 1), 2, 4, torch.Generator().manual_seed(0))
    score(TASK, ro)
    ro.rewards = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert "sft_loss" in hook(ro) and buf.used == 1           # one item, fine-tuned at once
