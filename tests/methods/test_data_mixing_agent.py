"""Chapter 11: the offline-RL learner (discrete CQL), state and reward definitions of the Data Mixing Agent."""

import pytest
import torch
from torch import nn

from rwlib.methods import data_mixing_agent as dma


def _tabular(gamma=0.5, seed=0):
    """A 3-state, 2-action deterministic MDP; a dataset covering every (s, a) once per copy."""
    g = torch.Generator().manual_seed(seed)
    nS, nA = 3, 2
    nxt = torch.tensor([[1, 2], [2, 0], [0, 1]])
    R = torch.rand(nS, nA, generator=g)
    P = torch.zeros(nS, nA, nS)
    P[torch.arange(nS)[:, None], torch.arange(nA)[None], nxt] = 1.0
    s = torch.arange(nS).repeat_interleave(nA).repeat(4)
    a = torch.arange(nA).repeat(nS).repeat(4)
    eye = torch.eye(nS)
    data = dma.Transitions(eye[s], a, R[s, a], eye[nxt[s, a]], torch.zeros(len(s)))
    return data, dma.value_iteration(P, R, gamma), nS, nA


def test_alpha_zero_is_fitted_q_iteration_and_matches_q_star():
    data, q_star, nS, nA = _tabular()
    table = nn.Linear(nS, nA, bias=False)  # a Q-table on one-hot states
    q = dma.fit_cql(data, nA, alpha=0.0, gamma=0.5, steps=3000, batch=len(data), lr=3e-2, target_every=50, q=table)
    with torch.no_grad():
        assert torch.allclose(q(torch.eye(nS)), q_star, atol=1e-3)


def test_conservatism_pushes_unseen_actions_down():
    data, _, nS, nA = _tabular()
    keep = ~((data.obs[:, 0] == 1) & (data.act == 1))  # action 1 is never seen in state 0
    sub = dma.Transitions(data.obs[keep], data.act[keep], data.rew[keep], data.next_obs[keep], data.done[keep])
    qs = {}
    for alpha in (0.0, 5.0):
        table = nn.Linear(nS, nA, bias=False)
        nn.init.zeros_(table.weight)
        q = dma.fit_cql(sub, nA, alpha=alpha, gamma=0.5, steps=2000, batch=len(sub), lr=3e-2, target_every=50,
                        q=table)
        with torch.no_grad():
            qs[alpha] = q(torch.eye(nS))[0]
    assert qs[5.0][1] < qs[5.0][0]                     # the unseen action falls below the seen one
    assert qs[0.0][1] - qs[5.0][1] > 1.0               # and much lower than without the penalty


def test_logsumexp_gradient_is_softmax_minus_onehot():
    Q = torch.randn(4, 5, requires_grad=True)
    a = torch.tensor([0, 3, 1, 4])
    (torch.logsumexp(Q, 1) - Q.gather(1, a[:, None]).squeeze(1)).sum().backward()
    assert torch.allclose(Q.grad, torch.softmax(Q.detach(), 1) - torch.nn.functional.one_hot(a, 5).float(), atol=1e-6)


def test_rewards_telescope_and_states_are_scale_free():
    b = [dma.balanced_score(s, t, 2.0, 3.0) for s, t in [(2.0, 3.0), (2.2, 2.4), (2.4, 2.1)]]
    rewards = [b[i + 1] - b[i] for i in range(2)]
    assert abs(sum(rewards) - (b[-1] - b[0])) < 1e-12 and b[0] == -1.0
    s1 = dma.make_state(2, 1, 4, 2.2, 2.4, 2.0, 3.0)
    s2 = dma.make_state(2, 1, 4, 22.0, 24.0, 20.0, 30.0)  # losses ten times larger: the same state
    assert torch.allclose(s1, s2) and s1[2] == 1 and s1.shape == (len(dma.ACTIONS) + 3,)


def test_action_grid_is_on_the_simplex():
    assert torch.allclose(dma.ACTIONS.sum(1), torch.ones(len(dma.ACTIONS)))
    assert (dma.ACTIONS >= 0).all() and len(dma.ACTION_NAMES) == len(dma.ACTIONS)


def test_bad_alpha():
    data, _, nS, nA = _tabular()
    with pytest.raises(ValueError, match="alpha=-1"):
        dma.fit_cql(data, nA, alpha=-1)
