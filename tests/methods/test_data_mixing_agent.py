"""Chapter 11: the Data Mixing Agent's offline-RL learner (discrete CQL), its state, score and reward, the CPT loop."""

import pytest
import torch
from torch import nn

from rwlib.data import text
from rwlib.methods import data_mixing_agent as dma
from rwlib.models import TinyGPT


def _tabular(gamma=0.5, seed=0, copies=4):
    """A 3-state, 2-action deterministic MDP and a dataset covering every (s, a) ``copies`` times; states one-hot."""
    g = torch.Generator().manual_seed(seed)
    nS, nA = 3, 2
    nxt = torch.tensor([[1, 2], [2, 0], [0, 1]])
    R = torch.rand(nS, nA, generator=g)
    P = torch.zeros(nS, nA, nS)
    P[torch.arange(nS)[:, None], torch.arange(nA)[None], nxt] = 1.0
    s = torch.arange(nS).repeat_interleave(nA).repeat(copies)
    a = torch.arange(nA).repeat(nS).repeat(copies)
    eye = torch.eye(nS)
    data = dma.Transitions(eye[s], a, R[s, a], eye[nxt[s, a]], torch.zeros(len(s)))
    return data, dma.value_iteration(P, R, gamma), nS, nA


def _table(nS, nA):
    table = nn.Linear(nS, nA, bias=False)  # Q(s, .) = W[:, s]: a Q-table on one-hot states
    nn.init.zeros_(table.weight)
    return table


def test_alpha_zero_is_fitted_q_iteration_and_matches_value_iteration():
    data, q_star, nS, nA = _tabular()
    q, _ = dma.fit_cql(data, nA, alpha=0.0, gamma=0.5, steps=3000, batch=len(data), lr=3e-2, target_every=50,
                       q=_table(nS, nA))
    with torch.no_grad():
        assert torch.allclose(q(torch.eye(nS)), q_star, atol=1e-3)


def test_conservatism_pushes_unseen_actions_below_the_best_seen_one():
    data, _, nS, nA = _tabular()
    keep = ~((data.obs[:, 0] == 1) & (data.act == 1))  # action 1 is never tried in state 0
    sub = data[keep]
    qs = {}
    for alpha in (0.0, 5.0):
        q, _ = dma.fit_cql(sub, nA, alpha=alpha, gamma=0.5, steps=2000, batch=len(sub), lr=3e-2, target_every=50,
                           q=_table(nS, nA))
        with torch.no_grad():
            qs[alpha] = q(torch.eye(nS))[0]
    assert qs[5.0][1] < qs[5.0][0]            # the unseen action falls below the seen one
    assert qs[0.0][1] - qs[5.0][1] > 1.0      # and far below its value without the penalty


def test_cql_gradient_is_softmax_minus_onehot_plus_td():
    """d loss / d Q(s_i, .) = [alpha (softmax(Q_i) - onehot(a_i)) + (Q_i(a_i) - r_i) onehot(a_i)] / N (gamma = 0)."""
    N, nA, alpha = 6, 5, 0.7
    g = torch.Generator().manual_seed(1)
    Q = torch.randn(N, nA, generator=g)
    table = nn.Linear(N, nA, bias=False)
    with torch.no_grad():
        table.weight.copy_(Q.T)                      # state i (one-hot) -> Q[i]
    act = torch.randint(nA, (N,), generator=g)
    rew = torch.randn(N, generator=g)
    batch = dma.Transitions(torch.eye(N), act, rew, torch.eye(N), torch.ones(N))
    loss, _ = dma.cql_loss(table, table, batch, alpha=alpha, gamma=0.0)
    loss.backward()
    onehot = torch.nn.functional.one_hot(act, nA).float()
    q_a = Q.gather(1, act[:, None])
    expected = (alpha * (torch.softmax(Q, 1) - onehot) + (q_a - rew[:, None]) * onehot) / N
    assert torch.allclose(table.weight.grad.T, expected, atol=1e-6)


def test_logsumexp_gradient_is_softmax_minus_onehot():
    Q = torch.randn(4, 5, requires_grad=True)
    a = torch.tensor([0, 3, 1, 4])
    (torch.logsumexp(Q, 1) - Q.gather(1, a[:, None]).squeeze(1)).sum().backward()
    assert torch.allclose(Q.grad, torch.softmax(Q.detach(), 1) - torch.nn.functional.one_hot(a, 5).float(), atol=1e-6)


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


def test_bad_inputs_name_the_valid_choices(tiny):
    corpus, model = tiny
    with pytest.raises(ValueError, match="valid: target only, 10% replay"):
        dma.action_index("everything")
    with pytest.raises(ValueError, match="unknown baseline 'oracle'.*decaying replay"):
        dma.baseline("oracle", 6)
    with pytest.raises(ValueError, match=r"bad action 99.*0\.\.7.*0=target only"):
        dma.run_cpt(model, corpus, lambda s, t: 99, T=1, S=1, batch=2, block=16,
                    generator=torch.Generator().manual_seed(0), n_eval_windows=1)
    data, _, nS, nA = _tabular()
    with pytest.raises(ValueError, match="alpha=-1"):
        dma.fit_cql(data, nA, alpha=-1)
    with pytest.raises(ValueError, match=r"actions must lie in 0\.\.0"):
        dma.fit_cql(data, 1)
