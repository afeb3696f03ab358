"""Chapter 11: the Data Mixing Agent's state, score and reward, the CPT loop, the transitions and the greedy agent.

The offline-RL learner (discrete CQL, :mod:`rwlib.rl.offline`) is tested in tests/test_offline_rl.py."""

import pytest
import torch
from torch import nn

from rwlib.data import text
from rwlib.methods import data_mixing_agent as dma
from rwlib.models import TinyGPT


def _table(nS, nA):
    table = nn.Linear(nS, nA, bias=False)  # Q(s, .) = W[:, s]: a Q-table on one-hot states
    nn.init.zeros_(table.weight)
    return table


def test_state_is_scale_free_and_score_starts_at_zero():
    losses0 = torch.tensor([2.0, 2.5, 1.5, 3.0, 2.8])
    losses = torch.tensor([2.2, 2.4, 1.8, 1.2, 1.4])
    s1 = dma.make_state(1, 4, losses, losses0, 0.05)
    s2 = dma.make_state(1, 4, 10 * losses, 10 * losses0, 0.05)  # every loss ten times larger: the same state
    assert torch.allclose(s1, s2) and s1.shape == (dma.STATE_DIM,)
    assert torch.allclose(s1, torch.tensor([0.25, 1.1, 0.96, 1.2, 0.4, 0.5, 0.05]))
    with pytest.raises(ValueError, match="one loss per domain"):
        dma.make_state(1, 4, losses[:3], losses0[:3])
    assert dma.balanced_score(2.0, 3.0, 2.0, 3.0) == 0.0
    assert dma.balanced_score(2.2, 1.5, 2.0, 3.0) == pytest.approx(0.5 * (-0.1 + 0.5))


@pytest.fixture(scope="module")
def tiny():
    corpus = text.multidomain_corpus({d: 3000 for d in dma.DOMAINS}, seed=0)
    torch.manual_seed(0)
    return corpus, TinyGPT(text.TOKENIZER.vocab_size, 16, 1, 16, 2)


def test_cpt_rewards_telescope_and_stages_are_numbered(tiny):
    corpus, model = tiny
    T, S = 3, 2
    rec = dma.run_cpt(model, corpus, lambda s, t: [0, 3, 5][t], T=T, S=S, batch=4, block=16,
                      generator=torch.Generator().manual_seed(0), n_eval_windows=2)
    assert rec["actions"] == [0, 3, 5] and rec["scores"][0] == 0.0
    assert sum(rec["rewards"]) == pytest.approx(rec["score"], abs=1e-12)       # (E3) telescoping
    assert rec["score"] == pytest.approx(dma.balanced_score(rec["src"][-1], rec["tgt"][-1], rec["src"][0],
                                                            rec["tgt"][0]), abs=1e-12)
    steps, _ = rec["history"].series("val_code")
    assert list(steps) == [0, S, 2 * S, 3 * S]                                  # one evaluation per stage
    last = rec["states"][-1]
    assert last[0] == 1.0 and last[-1] == pytest.approx(rec["rewards"][-1])
    assert torch.allclose(last[1:-1], torch.tensor(rec["losses"][-1]) / torch.tensor(rec["losses"][0]))
    data = dma.transitions([rec, rec])                                          # (E5) one transition per stage
    assert len(data) == 2 * T and data.done.tolist() == [0, 0, 1] * 2 and data.act.tolist() == [0, 3, 5] * 2
    assert torch.equal(data.next_obs[0], data.obs[1]) and torch.allclose(data.rew[:T], torch.tensor(rec["rewards"]))
    assert dma.source_share(rec["actions"]) == pytest.approx((0 + 0.5 + 0.25) / 3)  # target only, 50% replay, code replay


def test_greedy_agent_picks_the_argmax():
    table = _table(dma.STATE_DIM, len(dma.ACTIONS))
    with torch.no_grad():
        table.weight[3, 1] = 1.0  # Q(s, a=3) = s[1] (the code loss ratio), every other Q = 0
    agent = dma.DataMixingAgent(table)
    state = dma.make_state(0, 4, [1.0] * 5, [1.0] * 5)
    assert agent(state, 0) == 3 and agent.next_mixture(state)["code"] == pytest.approx(0.5 / 3)


def test_action_grid_and_baselines():
    assert torch.allclose(dma.ACTIONS.sum(1), torch.ones(len(dma.ACTIONS)))
    assert (dma.ACTIONS >= 0).all() and len(dma.ACTION_NAMES) == len(dma.ACTIONS)
    decay = dma.decaying_replay(6)
    replay = [float(dma.ACTIONS[decay(None, t), :3].sum()) for t in range(6)]
    assert replay[0] == pytest.approx(0.5) and replay[-1] == pytest.approx(0.1) and replay == sorted(replay)[::-1]
    assert dma.baseline("uniform", 6)(None, 0) == dma.action_index("uniform")
    rand = dma.baseline("random", 6, generator=torch.Generator().manual_seed(0))
    picks = [rand(None, t) for t in range(800)]
    assert set(picks) == set(range(len(dma.ACTIONS))) and max(map(picks.count, set(picks))) < 150  # 100 each


def test_bad_inputs_name_the_valid_choices(tiny):
    corpus, model = tiny
    with pytest.raises(ValueError, match="valid: target only, 10% replay"):
        dma.action_index("everything")
    with pytest.raises(ValueError, match="unknown baseline 'oracle'.*decaying replay, random"):
        dma.baseline("oracle", 6)
    with pytest.raises(ValueError, match="'random' needs a generator"):
        dma.baseline("random", 6)
    with pytest.raises(ValueError, match=r"bad action 99.*0\.\.7.*0=target only"):
        dma.run_cpt(model, corpus, lambda s, t: 99, T=1, S=1, batch=2, block=16,
                    generator=torch.Generator().manual_seed(0), n_eval_windows=1)
    with pytest.raises(ValueError, match="at least one trajectory"):
        dma.transitions([])


def test_q_flatness_is_zero_only_for_flat_values():
    table = _table(2, 4)
    with torch.no_grad():
        table.weight[:, 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])   # state 1: Q = 0, 1, 2, 3; state 0: flat (0)
    f = dma.q_flatness(table, torch.eye(2))
    assert f["spread"].tolist() == pytest.approx([0.0, 3.0])
    q1 = torch.tensor([0.0, 1.0, 2.0, 3.0])
    kl = (torch.full((4,), 0.25) * (torch.full((4,), 0.25).log() - torch.log_softmax(q1, 0))).sum()
    assert f["kl"][0] == pytest.approx(0.0, abs=1e-6) and f["kl"][1] == pytest.approx(float(kl), rel=1e-5)
    with pytest.raises(ValueError, match="batch of states"):
        dma.q_flatness(lambda s: s.sum(), torch.eye(2))


def test_trajectories_start_from_the_same_proxy_and_the_agent_is_scale_free(tiny):
    corpus, model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    recs = dma.collect_trajectories(model, corpus, 3, dma.random_policy(g), generator=g, T=2, S=1, batch=4,
                                    block=16, n_eval_windows=2)
    assert len(recs) == 3 and all(r["losses"][0] == recs[0]["losses"][0] for r in recs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # the proxy is not trained
    data = dma.transitions(recs)
    a1 = dma.fit_agent(data, alpha=0.1, gamma=0.9, steps=20, seed=0)
    scaled = dma.Transitions(data.obs, data.act, 10 * data.rew, data.next_obs, data.done)
    a10 = dma.fit_agent(scaled, alpha=0.1, gamma=0.9, steps=20, seed=0)
    assert a10.reward_sd == pytest.approx(10 * a1.reward_sd)                      # rewards enter in sd units
    assert torch.allclose(a1.values(data.obs[0]), a10.values(data.obs[0]), atol=1e-4)
    assert len(a1.history["cql"]) == 20
    with pytest.raises(ValueError, match="J=0"):
        dma.collect_trajectories(model, corpus, 0, dma.random_policy(g), generator=g, T=1, S=1)
    flat = dma.Transitions(data.obs, data.act, torch.zeros(len(data)), data.next_obs, data.done)
    with pytest.raises(ValueError, match="standard deviation 0"):
        dma.fit_agent(flat, alpha=0.1, gamma=0.9, steps=5, seed=0)
