"""Offline reinforcement learning on a fixed dataset of transitions: discrete conservative Q-learning.

- :class:`Transitions` -- an offline dataset (s, a, r, s', done) that indexes like a tensor;
- :class:`QNet` -- a small MLP Q-network;
- :func:`cql_loss` -- discrete CQL(H) (Kumar, Zhou, Tucker, Levine, "Conservative Q-Learning for Offline
  Reinforcement Learning", NeurIPS 2020, eq. 4 with the log-sum-exp regulariser):
  ``alpha * E_s[logsumexp_a Q(s, a) - Q(s, a_data)] + 1/2 E[(Q(s, a_data) - y)^2]`` with the max target
  ``y = r + gamma (1 - done) max_a' Q_bar(s', a')`` from a frozen target network;
- :func:`fit_cql` -- training on :func:`rwlib.train.loop` with hard target copies;
- :func:`value_iteration` -- Q* of a small tabular MDP, the reference the tests compare against.

The tests cross-check :func:`cql_loss` against ``d3rlpy``'s DiscreteCQL (which uses a double-DQN target and a
Huber TD loss: equal to ours when the target network is the online one and every TD error is below 1).
Chapters 07 (trajectory weighting) and 11 (Data Mixing Agent) use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import train
from ..repro import seeded


@dataclass
class Transitions:
    """An offline RL dataset: observations, actions, rewards, next observations, terminal flags."""
    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor

    def __len__(self) -> int:
        return len(self.act)

    def __getitem__(self, idx) -> "Transitions":
        return Transitions(self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx])


class QNet(nn.Module):
    """An MLP Q-network (two hidden ReLU layers): state -> one value per action."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def cql_loss(q: nn.Module, q_target: nn.Module, batch: Transitions, alpha: float, gamma: float):
    """Discrete CQL(H): ``alpha * mean(logsumexp_a Q(s, a) - Q(s, a_data)) + 1/2 mean TD error^2``, the TD target
    from the frozen target network. Returns ``(loss, {"td": ..., "cql": ...})``."""
    qs = q(batch.obs)                                                                           # (N, A)
    q_data = qs.gather(1, batch.act[:, None]).squeeze(1)
    with torch.no_grad():
        target = batch.rew + gamma * (1 - batch.done) * q_target(batch.next_obs).max(1).values  # TD target
    td = 0.5 * ((q_data - target) ** 2).mean()                                                  # 1/2 TD^2
    conservative = (torch.logsumexp(qs, 1) - q_data).mean()                                     # CQL(H) term
    return alpha * conservative + td, {"td": td.item(), "cql": conservative.item()}


def fit_cql(data: Transitions, n_actions: int, *, alpha: float = 1.0, gamma: float = 0.9, steps: int = 2000,
            batch: int = 64, lr: float = 1e-3, target_every: int = 100, hidden: int = 64, seed: int = 0,
            reward_scale: float = 1.0, q: nn.Module | None = None) -> tuple[nn.Module, train.History]:
    """Train a Q-network offline on ``data`` with :func:`cql_loss` (Adam, hard target-network copies every
    ``target_every`` steps). Rewards are multiplied by ``reward_scale`` first: CQL's ``alpha`` acts against the
    scale of the rewards. ``q`` replaces the default :class:`QNet` (the tests pass a Q-table). Returns the network
    (in eval mode) and the loss history (``td``, ``cql`` per step)."""
    if alpha < 0:
        raise ValueError(f"bad alpha={alpha}: the CQL weight must be >= 0")
    if not 0 <= gamma <= 1:
        raise ValueError(f"bad gamma={gamma}: expected 0 <= gamma <= 1")
    if len(data) == 0 or int(data.act.max()) >= n_actions or int(data.act.min()) < 0:
        raise ValueError(f"bad dataset: {len(data)} transitions, actions must lie in 0..{n_actions - 1}")
    g = torch.Generator().manual_seed(seed)
    if q is None:
        with seeded(seed):
            q = QNet(data.obs.shape[1], n_actions, hidden)
    data = Transitions(data.obs, data.act, data.rew * reward_scale, data.next_obs, data.done)
    q_target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    bs = min(batch, len(data))

    def step_fn(t):
        if t > 0 and t % target_every == 0:
            q_target.load_state_dict(q.state_dict())
        idx = torch.randperm(len(data), generator=g)[:bs] if bs == len(data) else \
            torch.randint(len(data), (bs,), generator=g)
        loss, info = cql_loss(q, q_target, data[idx], alpha, gamma)
        return {"loss": loss, **info}

    hist = train.loop(step_fn, steps=steps, optimizer=opt, desc="CQL")
    return q.eval(), hist


def value_iteration(P: torch.Tensor, R: torch.Tensor, gamma: float, iters: int = 2000) -> torch.Tensor:
    """Q* of a tabular MDP with transitions P[s, a, s'] and rewards R[s, a] (the tests' reference)."""
    Q = torch.zeros_like(R)
    for _ in range(iters):
        Q = R + gamma * P @ Q.max(1).values
    return Q
