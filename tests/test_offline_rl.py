"""rwlib.rl.offline: discrete CQL against value iteration, its conservatism, its gradient, and d3rlpy's DiscreteCQL.

The d3rlpy cross-check is optional (``pytest.importorskip``): d3rlpy pins gymnasium 1.0.0 and pulls gym, which
writes to stderr on import, so it lives in the tests and never in a chapter.
"""

import contextlib
import io

import pytest
import torch
from torch import nn

from rwlib.rl.offline import QNet, Transitions, cql_loss, fit_cql, value_iteration


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
    data = Transitions(eye[s], a, R[s, a], eye[nxt[s, a]], torch.zeros(len(s)))
    return data, value_iteration(P, R, gamma), nS, nA


def _table(nS, nA):
    table = nn.Linear(nS, nA, bias=False)  # Q(s, .) = W[:, s]: a Q-table on one-hot states
    nn.init.zeros_(table.weight)
    return table


def test_alpha_zero_is_fitted_q_iteration_and_matches_value_iteration():
    data, q_star, nS, nA = _tabular()
    q, _ = fit_cql(data, nA, alpha=0.0, gamma=0.5, steps=3000, batch=len(data), lr=3e-2, target_every=50,
                   q=_table(nS, nA))
    with torch.no_grad():
        assert torch.allclose(q(torch.eye(nS)), q_star, atol=1e-3)


def test_conservatism_pushes_unseen_actions_below_the_best_seen_one():
    data, _, nS, nA = _tabular()
    sub = data[~((data.obs[:, 0] == 1) & (data.act == 1))]  # action 1 is never tried in state 0
    qs = {}
    for alpha in (0.0, 5.0):
        q, _ = fit_cql(sub, nA, alpha=alpha, gamma=0.5, steps=2000, batch=len(sub), lr=3e-2, target_every=50,
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
    batch = Transitions(torch.eye(N), act, rew, torch.eye(N), torch.ones(N))
    loss, _ = cql_loss(table, table, batch, alpha=alpha, gamma=0.0)
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


def test_bad_inputs_name_the_valid_range():
    data, _, nS, nA = _tabular()
    with pytest.raises(ValueError, match="alpha=-1"):
        fit_cql(data, nA, alpha=-1)
    with pytest.raises(ValueError, match="gamma=2"):
        fit_cql(data, nA, gamma=2)
    with pytest.raises(ValueError, match=r"actions must lie in 0\.\.0"):
        fit_cql(data, 1)


# ------------------------------------------------------------------------------------------- d3rlpy
@pytest.fixture(scope="module")
def d3rlpy():
    with contextlib.redirect_stderr(io.StringIO()):  # gym's import-time notice
        return pytest.importorskip("d3rlpy")


def _d3rlpy_cql(d3rlpy, q: QNet, obs_dim: int, n_actions: int, alpha: float, gamma: float, hidden: int):
    """d3rlpy's DiscreteCQL implementation with its Q-network (and target network) set to ``q``'s weights."""
    from d3rlpy.models.encoders import VectorEncoderFactory

    algo = d3rlpy.algos.DiscreteCQLConfig(alpha=alpha, gamma=gamma,
                                          encoder_factory=VectorEncoderFactory(hidden_units=[hidden, hidden]))
    impl = algo.create(device="cpu:0")
    impl.create_impl((obs_dim,), n_actions)
    ours = q.net
    state = {"0._encoder._layers.0.weight": ours[0].weight, "0._encoder._layers.0.bias": ours[0].bias,
             "0._encoder._layers.2.weight": ours[2].weight, "0._encoder._layers.2.bias": ours[2].bias,
             "0._fc.weight": ours[4].weight, "0._fc.bias": ours[4].bias}
    impl.impl.q_function.load_state_dict(state)
    impl.impl.update_target()                          # the target network equals the online one
    return impl.impl


def _d3rlpy_batch(batch: Transitions):
    from d3rlpy.torch_utility import TorchMiniBatch

    col = lambda x: x.float()[:, None]  # noqa: E731
    return TorchMiniBatch(observations=batch.obs, actions=col(batch.act), rewards=col(batch.rew),
                          next_observations=batch.next_obs, next_actions=col(batch.act),
                          returns_to_go=torch.zeros(len(batch), 1), terminals=col(batch.done),
                          intervals=torch.ones(len(batch), 1), device="cpu:0")


@pytest.mark.parametrize("alpha", [0.1, 1.0, 5.0])
def test_cql_loss_matches_d3rlpy_discrete_cql(d3rlpy, alpha):
    """Same batch, same Q-network: d3rlpy's conservative term equals ours; with the target network equal to the
    online one (double-DQN target = max target) and every TD error below 1 (Huber = half square) the whole loss
    does too."""
    obs_dim, n_actions, hidden, gamma, N = 7, 8, 64, 0.9, 48
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        q = QNet(obs_dim, n_actions, hidden)
    obs, nxt = torch.randn(N, obs_dim, generator=g), torch.randn(N, obs_dim, generator=g)
    act = torch.randint(n_actions, (N,), generator=g)
    done = (torch.rand(N, generator=g) < 0.2).float()
    with torch.no_grad():   # rewards that make every TD error a uniform draw in (-0.5, 0.5)
        y0 = q(obs).gather(1, act[:, None]).squeeze(1) - gamma * (1 - done) * q(nxt).max(1).values
    rew = y0 + torch.rand(N, generator=g) - 0.5
    batch = Transitions(obs, act, rew, nxt, done)

    loss, info = cql_loss(q, q, batch, alpha=alpha, gamma=gamma)
    with torch.no_grad():
        td_err = q(obs).gather(1, act[:, None]).squeeze(1) - (rew + gamma * (1 - done) * q(nxt).max(1).values)
    assert td_err.abs().max() < 1.0

    impl = _d3rlpy_cql(d3rlpy, q, obs_dim, n_actions, alpha, gamma, hidden)
    b = _d3rlpy_batch(batch)
    with torch.no_grad():
        theirs = impl.compute_loss(b, impl.compute_target(b))
    assert float(theirs.conservative_loss) == pytest.approx(info["cql"], abs=1e-6)
    assert float(theirs.td_loss) == pytest.approx(info["td"], abs=1e-6)
    assert float(theirs.loss) == pytest.approx(loss.item(), abs=1e-6)


def test_d3rlpy_differs_once_a_td_error_exceeds_one(d3rlpy):
    """The check above is not vacuous: with a TD error of 3 the Huber loss (3 - 1/2) differs from half its square."""
    obs_dim, n_actions, hidden = 3, 2, 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        q = QNet(obs_dim, n_actions, hidden)
    obs = torch.zeros(1, obs_dim)
    with torch.no_grad():
        q0 = float(q(obs)[0, 0])
    batch = Transitions(obs, torch.tensor([0]), torch.tensor([q0 + 3.0]), obs, torch.ones(1))
    _, info = cql_loss(q, q, batch, alpha=0.0, gamma=0.9)
    impl = _d3rlpy_cql(d3rlpy, q, obs_dim, n_actions, 0.0, 0.9, hidden)
    b = _d3rlpy_batch(batch)
    with torch.no_grad():
        theirs = impl.compute_loss(b, impl.compute_target(b))
    assert info["td"] == pytest.approx(4.5, abs=1e-5) and float(theirs.td_loss) == pytest.approx(2.5, abs=1e-5)
