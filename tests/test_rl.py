"""RL substrate: tasks and verifiers, advantages, the clipped loss, pass@k, sampling, and the cross-check
against TRL's GRPO trainer (its own code, called on our tensors)."""

import math
from collections import defaultdict
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from rwlib.data.tasks import (FORMAT_ERROR, AdditionTask, MultiplyTask, SumToTask, encode_prompts, sft_batch,
                              split_problems)
from rwlib.finetune import answer_loss, exact_match, sft_objective, sft_train
from rwlib.models import TinyGPT
from rwlib.rl import (GRPOConfig, aggregate, clipped_pg_loss, evaluate_task, group_advantages, pass_at_k,
                      rloo_advantages, sample_completions, sequence_logprobs, token_entropy, train_grpo)
from rwlib.rl.rollout import completion_mask


# ------------------------------------------------------------------------------------------------ tasks
def test_addition_verifier_edge_cases():
    t = AdditionTask(1, 3)
    p = t.make(57, 68)
    assert p.prompt == "057+068=" and p.target == "125;" and p.difficulty == 2
    assert t.verify(p, "125;") == 1 and t.verify(p, "125;junk") == 1
    assert t.verify(p, "124;") == 0
    assert t.verify(p, "125") == FORMAT_ERROR          # no stop symbol
    assert t.verify(p, "12a;") == FORMAT_ERROR and t.verify(p, ";") == FORMAT_ERROR
    s = AdditionTask(1, 3, "scratchpad").make(57, 68)
    assert s.target == "7+8+0=15,5+6+1=12|125;"
    assert AdditionTask(1, 3, "scratchpad").verify(s, s.target) == 1
    with pytest.raises(ValueError, match="'cot'.*direct, scratchpad"):
        AdditionTask(style="cot")


def test_addition_sampling_buckets_and_fixed_prompt_length():
    t = AdditionTask(2, 5)
    probs = t.sample(400, torch.Generator().manual_seed(0))
    assert {p.difficulty for p in probs} == {2, 3, 4, 5}
    assert all(t.verify(p, p.target) == 1 for p in probs)
    assert encode_prompts(probs).shape == (400, t.prompt_len)


def test_sum_to_task_many_answers():
    t = SumToTask(10, 99)
    p = t.make(37)
    assert t.verify(p, "1+36;") == 1 and t.verify(p, "20+17;") == 1 and t.verify(p, "0+37;") == 0
    assert t.verify(p, "36;") == FORMAT_ERROR


def test_sft_batch_masks_only_completion():
    t = AdditionTask(1, 2)
    x, y, m = sft_batch([t.make(3, 4), t.make(12, 34)])
    assert m[0].sum() == len("7;") and m[1].sum() == len("46;")
    assert x.shape == y.shape == m.shape


# ------------------------------------------------------------------------------------------------ advantages
def test_group_advantages_identities():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4, "none")
    assert torch.allclose(a.reshape(2, 4).sum(1), torch.zeros(2))   # mean-centred per group
    assert torch.equal(a[4:], torch.zeros(4))                        # all-equal group: no signal
    s = group_advantages(r, 4, "group")
    assert torch.allclose(s[:4], a[:4] / (r[:4].std() + 1e-4))
    loo = rloo_advantages(r, 4)
    assert torch.allclose(loo[:4], a[:4] * 4 / 3)                    # RLOO = G/(G-1) x mean-centred
    with pytest.raises(ValueError, match="'max'.*group, batch, none"):
        group_advantages(r, 4, "max")


# ------------------------------------------------------------------------------------------------ loss
def _tensors(seed=0, N=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 3
    logp_old = logp + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return logp.requires_grad_(), logp_old, adv, mask


def test_loss_reduces_to_policy_gradient_without_clipping_and_weights():
    logp, logp_old, adv, mask = _tensors()
    loss, _ = clipped_pg_loss(logp, logp.detach(), adv, mask, clip=False, agg="token-mean")
    loss.backward()
    # on-policy (ratio 1): gradient of -A * ratio is -A, spread over the batch's tokens
    expected = -adv[:, None] * mask / mask.sum()
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_weights_of_one_change_nothing_and_dual_clip_bounds():
    logp, logp_old, adv, mask = _tensors(1)
    a, _ = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28)
    b, _ = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28, token_weights=torch.ones_like(mask))
    assert torch.allclose(a, b)
    big = logp_old + 5.0  # ratios e^5: the dual clip caps the loss of negative-advantage tokens at -A c
    neg = -torch.ones(6)
    d, _ = clipped_pg_loss(big, logp_old, neg, mask, clip_c=3.0, agg="seq-sum")
    assert torch.allclose(d, torch.tensor(3.0) * mask.sum(1).mean())
    with pytest.raises(ValueError, match="'mean'"):
        aggregate(logp, mask, "mean")


# ------------------------------------------------------------------------------------------------ pass@k
def test_log_ratio_clamp_only_acts_beyond_its_bound():
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(6, 4, generator=g, requires_grad=True)
    old = logp.detach() + 0.5 * torch.randn(6, 4, generator=g)
    adv, mask = torch.randn(6, generator=g), torch.ones(6, 4)
    a, _ = clipped_pg_loss(logp, old, adv, mask, with_metrics=False)
    b, _ = clipped_pg_loss(logp, old, adv, mask, with_metrics=False, log_ratio_clamp=None)
    assert torch.equal(a, b)
    far = old.clone()
    far[0, 0] = logp[0, 0].detach() - 30.0          # a ratio of e^30 on one token
    ga, = torch.autograd.grad(clipped_pg_loss(logp, far, -adv.abs(), mask, with_metrics=False)[0], logp)
    gb, = torch.autograd.grad(clipped_pg_loss(logp, far, -adv.abs(), mask, with_metrics=False,
                                              log_ratio_clamp=None)[0], logp)
    assert ga[0, 0] == 0 and gb[0, 0].abs() > 1e10    # clamped: no gradient from it; unclamped: e^30-sized
    assert torch.equal(ga[1:], gb[1:])


def test_pass_at_k_matches_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                brute = sum(any(i < c for i in s) for s in combinations(range(n), k)) / math.comb(n, k)
                assert abs(pass_at_k(n, c, k) - brute) < 1e-12
    assert torch.allclose(pass_at_k(4, torch.tensor([0, 2, 4]), 2), torch.tensor([0.0, 5 / 6, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


# ------------------------------------------------------------------------------------------------ sampling
def test_entropy_and_logprobs():
    z = torch.randn(3, 4, 7)
    p = torch.softmax(z, -1)
    assert torch.allclose(token_entropy(z), -(p * p.log()).sum(-1), atol=1e-5)
    torch.manual_seed(0)
    m = TinyGPT(97, 12, 1, 16, 2)
    tok = torch.randint(0, 97, (2, 12))
    lp, H = sequence_logprobs(m, tok, 5)
    ref = torch.log_softmax(m(tok[:, :-1]), -1)[:, 4:].gather(-1, tok[:, 5:, None]).squeeze(-1)
    assert lp.shape == (2, 7) and torch.allclose(lp, ref, atol=1e-5)


def test_completion_mask_stops_after_first_stop():
    c = torch.tensor([[5, 6, 27, 8, 27], [1, 2, 3, 4, 5]])
    assert completion_mask(c, stop_id=27).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_sampling_is_reproducible_for_a_seed():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 16, 2)
    t = AdditionTask(1, 2)
    probs = t.sample(3, torch.Generator().manual_seed(0))
    a = sample_completions(m, probs, 4, 5, torch.Generator().manual_seed(7))
    b = sample_completions(m, probs, 4, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and a.texts == b.texts and a.tokens.shape[0] == 12
    # logp_old is the sampling policy's log-prob of the sampled tokens
    lp, _ = sequence_logprobs(m, a.tokens, a.prompt_len)
    assert torch.allclose(lp, a.logp_old, atol=1e-5)


def test_multiply_problems_and_split():
    task = MultiplyTask(10, 19)
    problems = task.all_problems()
    assert len(problems) == 10 * 8 and len({p.prompt for p in problems}) == 80
    assert all(task.verify(p, p.target) == 1 for p in problems)
    train, held = split_problems(problems, 60, seed=3)
    assert len(train) == 60 and len(held) == 20 and not {p.prompt for p in train} & {p.prompt for p in held}
    assert split_problems(problems, 60, seed=3) == (train, held) and split_problems(problems, 60, seed=4) != (train, held)
    with pytest.raises(ValueError, match="bad n_train 80: expected 1..79"):
        split_problems(problems, 80, seed=0)


def test_sft_train_on_a_pool_learns_and_answer_loss_agrees():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 32, 2)
    problems = MultiplyTask(2, 5).all_problems()[:6]
    x, y, mask = sft_batch(problems)
    before = answer_loss(m, problems)
    with torch.no_grad():
        m.eval()
        assert before == pytest.approx(float(sft_objective(m, x, y, mask)), rel=1e-6)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    hist = sft_train(m, opt, None, 200, 6, torch.Generator().manual_seed(0), problems=problems)
    assert len(hist["loss"]) == 200 and answer_loss(m, problems) < 0.1 * before
    assert exact_match(m, MultiplyTask(2, 5), problems, max_new_tokens=4) == 1.0
    with pytest.raises(ValueError, match="either a fixed pool"):
        sft_train(m, opt, None, 1, 2, torch.Generator(), problems=problems, problem_fn=lambda n, g: problems)


def test_train_grpo_smoke_and_evaluate():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 16, 2)
    t = AdditionTask(1, 1)
    h = train_grpo(m, torch.optim.AdamW(m.parameters(), 1e-3), t, GRPOConfig(prompts_per_step=4, group_size=4,
                   max_new_tokens=3, minibatches=2), 4, torch.Generator().manual_seed(0))
    assert len(h["loss"]) == 4 and len(h["reward"]) == 2  # two updates per rollout
    e = evaluate_task(m, t, t.sample(5, torch.Generator().manual_seed(1)), n_samples=4, ks=(1, 4), max_new_tokens=3)
    assert 0 <= e["pass@1"] <= e["pass@4"] <= 1



@pytest.mark.parametrize("which", ["rollout", "current"])
def test_token_weight_fn_gets_the_rollout_entropy_or_the_current_one(which):
    """With two PPO epochs the policy has moved by the second pass: the rollout entropy is the sampling
    policy's (recorded once, as verl does), the current one is recomputed."""
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 16, 2)
    t = AdditionTask(1, 1)
    seen = []

    def fn(adv, ent, logp, logp_old, mask):
        seen.append(ent.clone())
        return torch.ones_like(logp)

    cfg = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=3, ppo_epochs=2, weight_entropy=which)
    gen = torch.Generator().manual_seed(0)
    train_grpo(m, torch.optim.AdamW(m.parameters(), 5e-2), t, cfg, 2, gen, token_weight_fn=fn)
    ro = sample_completions(m, t.sample(2, torch.Generator().manual_seed(3)), 4, 3, torch.Generator())
    assert ro.entropy_old.shape == ro.logp_old.shape
    assert torch.allclose(ro.entropy_old, sequence_logprobs(m.eval(), ro.tokens, ro.prompt_len)[1])
    # rows come in a random order per epoch: compare the sorted values of the two passes
    a, b = (torch.sort(e.flatten()).values for e in seen)
    assert torch.equal(a, b) == (which == "rollout")


def test_bad_weight_entropy_names_the_choices():
    with pytest.raises(ValueError, match="'old'.*rollout, current"):
        GRPOConfig(weight_entropy="old")

# ------------------------------------------------------------------------------------------------ TRL
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL cross-check needs `trl`")
from trl.trainer.utils import entropy_from_logits, nanstd  # noqa: E402

TRL_TO_RWLIB = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-sum-const", "dapo": "token-mean"}


class _Accel:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(loss_type, logp, logp_old, adv, mask, eps_low, eps_high, max_len, num_items):
    """TRL's own GRPOTrainer._compute_loss, run on our tensors through a minimal stand-in for the trainer."""
    fake = SimpleNamespace(
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=0.0, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=_Accel(),
        model=SimpleNamespace(training=True),
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    N, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": logp_old, "num_items_in_batch": torch.tensor(num_items)}
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", sorted(TRL_TO_RWLIB))
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_agrees_with_trl(loss_type, eps):
    for seed in range(3):
        logp, logp_old, adv, mask = _tensors(seed, N=8, T=6)
        T = mask.shape[1]
        num_items = float(mask.sum()) + (7.0 if loss_type == "dapo" else 0.0)  # dapo: a global token count
        ours, _ = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=eps[0], eps_high=eps[1],
                                  agg=TRL_TO_RWLIB[loss_type], max_len=T,
                                  normalizer=num_items if loss_type == "dapo" else None)
        theirs = _trl_loss(loss_type, logp, logp_old, adv, mask, eps[0], eps[1], T, num_items)
        assert abs(ours.item() - theirs.item()) < 1e-6, (loss_type, seed)
        g1, = torch.autograd.grad(ours, logp)
        g2, = torch.autograd.grad(theirs, logp)
        assert torch.allclose(g1, g2, atol=1e-6)


def test_advantages_and_entropy_agree_with_trl():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (32,), generator=g).float()
    G = 8
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
    trl_adv = (r - mean) / (std + 1e-4)     # TRL's scale_rewards="group" expression
    assert torch.allclose(group_advantages(r, G, "group"), trl_adv, atol=1e-6)
    assert torch.allclose(group_advantages(r, G, "none"), r - mean, atol=1e-6)
    std_b = nanstd(r).expand_as(r)
    assert torch.allclose(group_advantages(r, G, "batch"), (r - mean) / (std_b + 1e-4), atol=1e-6)
    z = torch.randn(4, 5, 97, generator=g)
    assert torch.allclose(token_entropy(z), entropy_from_logits(z), atol=1e-5)


def test_clip_fractions_count_masked_tokens_only():
    logp_old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[0.5, 1.5, 1.0], [0.7, 1.0, 2.0]]))
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    _, info = clipped_pg_loss(logp, logp_old, adv, mask, eps_low=0.2)
    # row 0 (adv < 0): ratio 0.5 < 0.8 clips low; row 1 (adv > 0): ratio 2.0 > 1.2 clips high; 5 masked tokens
    assert float(info["clip_low"]) == pytest.approx(1 / 5) and float(info["clip_high"]) == pytest.approx(1 / 5)
    _, none = clipped_pg_loss(logp, logp_old, adv, torch.zeros(2, 3))
    assert float(none["clip_low"]) == 0.0
