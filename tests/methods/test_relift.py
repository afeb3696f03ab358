"""Chapter 17: ReLIFT's buffer of hardest questions and its interleaved fine-tuning step."""

import pytest
import torch

from rwlib.data.tasks import AdditionTask
from rwlib.methods import relift
from rwlib.models import TinyGPT
from rwlib.rl import sample_completions
from rwlib.rl.rollout import score

T = AdditionTask(1, 2)


def _probs(n, seed=0):
    return T.sample(n, torch.Generator().manual_seed(seed))


def test_buffer_adds_only_all_fail_questions_newest_first_once():
    ps = _probs(4)
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, -1.0]])  # format errors count as failures
    b = relift.HardestBuffer(2)
    assert b.add(ps, r, lambda p: p.target) == 3
    assert [p.prompt for p, _ in b.items] == [ps[3].prompt, ps[2].prompt, ps[0].prompt]
    assert b.add(ps, r, lambda p: p.target) == 0  # one copy per question
    batch = b.pop_batch()
    assert [p.prompt for p, _ in batch] == [ps[3].prompt, ps[2].prompt] and b.used == 2 and len(b) == 1
    with pytest.raises(RuntimeError, match="fewer than M=2"):
        b.pop_batch()
    with pytest.raises(ValueError, match="M=0"):
        relift.HardestBuffer(0)


def test_difficulty_buckets():
    assert relift.difficulty_buckets(torch.tensor([1.0, 0.5, 0.25, 0.0])) == ["easy", "medium", "hard", "hardest"]


def test_hook_fine_tunes_only_when_the_buffer_fills():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 16, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    buf = relift.HardestBuffer(3)
    hook = relift.relift_hook(m, opt, buf, lambda p: p.target)
    ro = sample_completions(m, _probs(2, 1), 2, 4, torch.Generator().manual_seed(0))
    score(T, ro)
    ro.rewards = torch.zeros(4)                         # both questions all-fail: 2 < M, no step yet
    before = [p.detach().clone() for p in m.parameters()]
    out = hook(ro)
    assert out["buffer"] == 2 and "sft_loss" not in out
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    ro2 = sample_completions(m, _probs(2, 2), 2, 4, torch.Generator().manual_seed(1))
    score(T, ro2)
    ro2.rewards = torch.zeros(4)
    out = hook(ro2)                                     # 4 >= 3: one step on the newest 3
    assert out["demos_used"] == 3 and out["buffer"] == 1 and "sft_loss" in out
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_rl_config_is_the_official_setting():
    c = relift.RL_CONFIG
    assert (c.clip, c.agg, c.scale, c.entropy_coef) == (False, "seq-sum-const", "none", 1e-3)
