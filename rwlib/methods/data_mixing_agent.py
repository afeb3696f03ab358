r"""Data Mixing Agent: learning to re-weight domains for continual pre-training.

Reference
---------
Kailai Yang, Xiao Liu, Lei Ji, Hao Li, Xiao Liang, Zhiwei Liu, Yeyun Gong, Peng Cheng, Mao Yang.
"Data Mixing Agent: Learning to Re-weight Domains for Continual Pre-training." arXiv:2507.15640 (2025).
No official code was found; this module follows the paper's framework as summarised in the chapter brief,
and the choices marked (ours) are this book's miniature, not the paper's.

The framework
-------------
(E1) Continual pre-training runs in T stages; before stage t the agent picks a mixture a_t over source- and
     target-field domains, the model trains S steps on it, then is evaluated.
(E2) Trajectories: on a small *proxy* model, J random mixing trajectories are recorded as transitions
     (s_t, a_t, r_t, s_{t+1}).
(E3) State (ours, scale-free so it transfers from proxy to target model): one-hot of the previous action,
     t / T, L_src,t / L_src,0, L_tgt,t / L_tgt,0.
(E4) Balanced score (ours): b_t = -(L_src,t / L_src,0 + L_tgt,t / L_tgt,0) / 2; reward r_t = b_{t+1} - b_t, so
     rewards telescope to the final improvement of the balanced score.
(E5) Agent: a Q-network over a discrete grid of mixtures (ours: the paper outputs a continuous distribution over
     52 domains), trained offline with conservative Q-learning, CQL(H):
     L(theta) = alpha E_s[logsumexp_a Q(s, a) - Q(s, a_data)] + 1/2 E[(Q(s, a) - (r + gamma max_a' Q_bar(s', a')))^2].
(E6) Deployment: on a larger, unseen target model the agent picks a_t = argmax_a Q(s_t, a) at every stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from rwlib import train
from rwlib.data.text import DomainSampler

__all__ = ["SOURCE", "TARGET", "DOMAINS", "ACTIONS", "ACTION_NAMES", "balanced_score", "make_state", "QNet",
           "cql_loss", "fit_cql", "run_cpt", "collect_trajectories", "Transitions", "value_iteration"]

SOURCE = ("code", "prose", "grammar")
TARGET = ("addition", "multiply")
DOMAINS = SOURCE + TARGET
# (ours) a discrete grid of mixtures over (code, prose, grammar | addition, multiply)
ACTIONS = torch.tensor([
    [0.00, 0.00, 0.00, 0.50, 0.50],   # target only
    [0.10 / 3, 0.10 / 3, 0.10 / 3, 0.45, 0.45],  # 10 % replay
    [0.25 / 3, 0.25 / 3, 0.25 / 3, 0.375, 0.375],  # 25 % replay
    [0.50 / 3, 0.50 / 3, 0.50 / 3, 0.25, 0.25],  # 50 % replay
    [0.25, 0.00, 0.00, 0.375, 0.375],  # replay code only
    [0.00, 0.25, 0.00, 0.375, 0.375],  # replay prose only
    [0.00, 0.00, 0.25, 0.375, 0.375],  # replay grammar only
    [0.80 / 3, 0.80 / 3, 0.80 / 3, 0.10, 0.10],  # source heavy
    [0.20, 0.20, 0.20, 0.20, 0.20],  # uniform over the five domains
])
ACTION_NAMES = ["target only", "10% replay", "25% replay", "50% replay", "code replay", "prose replay",
                "grammar replay", "source heavy", "uniform"]


def balanced_score(l_src: float, l_tgt: float, l_src0: float, l_tgt0: float) -> float:
    """(E4) b = -(L_src / L_src,0 + L_tgt / L_tgt,0) / 2 (higher is better; 0 change = -1)."""
    return -0.5 * (l_src / l_src0 + l_tgt / l_tgt0)


def make_state(prev_action: int | None, t: int, T: int, l_src: float, l_tgt: float, l_src0: float, l_tgt0: float,
               n_actions: int = len(ACTIONS)) -> torch.Tensor:
    """(E3) the scale-free state vector."""
    onehot = torch.zeros(n_actions)
    if prev_action is not None:
        onehot[prev_action] = 1.0
    return torch.cat([onehot, torch.tensor([t / T, l_src / l_src0, l_tgt / l_tgt0])])


def _field_losses(model, corpus, block: int, n_windows: int) -> tuple[float, float]:
    ev = train.eval_lm(model, corpus.val, block, n_windows)
    src = float(np.mean([ev[f"val_{d}"] for d in SOURCE]))
    tgt = float(np.mean([ev[f"val_{d}"] for d in TARGET]))
    return src, tgt


def run_cpt(model, corpus, policy: Callable, *, T: int, S: int, batch: int, block: int, lr: float,
            generator: torch.Generator, n_windows: int = 8) -> dict:
    """(E1) continual pre-training of ``model`` in place for T stages of S AdamW steps (a fresh optimizer per
    run). ``policy(state, t) -> action index`` chooses each stage's mixture. Returns the per-stage record:
    actions, losses, states, rewards, and the final balanced score."""
    sampler = DomainSampler({d: corpus.train[d] for d in DOMAINS}, generator=generator)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    l_src0, l_tgt0 = _field_losses(model, corpus, block, n_windows)
    state = make_state(None, 0, T, l_src0, l_tgt0, l_src0, l_tgt0)
    rec = {"actions": [], "src": [l_src0], "tgt": [l_tgt0], "states": [state], "rewards": []}
    b = balanced_score(l_src0, l_tgt0, l_src0, l_tgt0)
    for t in range(T):
        a = int(policy(state, t))
        sampler.set_weights(ACTIONS[a].tolist())
        train.fit_lm(model, sampler, steps=S, batch_size=batch, block=block, optimizer=opt, desc=f"stage {t}")
        l_src, l_tgt = _field_losses(model, corpus, block, n_windows)
        b_next = balanced_score(l_src, l_tgt, l_src0, l_tgt0)
        state = make_state(a, t + 1, T, l_src, l_tgt, l_src0, l_tgt0)
        rec["actions"].append(a); rec["src"].append(l_src); rec["tgt"].append(l_tgt)
        rec["states"].append(state); rec["rewards"].append(b_next - b)  # (E4) reward telescopes
        b = b_next
    rec["score"] = b
    return rec


@dataclass
class Transitions:
    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor

    def __len__(self) -> int:
        return len(self.act)


def collect_trajectories(proxy, corpus, *, J: int, T: int, S: int, batch: int, block: int, lr: float,
                         generator: torch.Generator, n_windows: int = 8) -> tuple[Transitions, list[dict]]:
    """(E2) J trajectories of uniformly random actions, each from a fresh copy of the same proxy checkpoint."""
    obs, act, rew, nxt, done, records = [], [], [], [], [], []
    for _ in range(J):
        model = copy.deepcopy(proxy)
        rec = run_cpt(model, corpus, lambda s, t: int(torch.randint(len(ACTIONS), (1,), generator=generator)),
                      T=T, S=S, batch=batch, block=block, lr=lr, generator=generator, n_windows=n_windows)
        for t in range(T):
            obs.append(rec["states"][t]); act.append(rec["actions"][t]); rew.append(rec["rewards"][t])
            nxt.append(rec["states"][t + 1]); done.append(float(t == T - 1))
        records.append(rec)
    data = Transitions(torch.stack(obs), torch.tensor(act), torch.tensor(rew, dtype=torch.float32),
                       torch.stack(nxt), torch.tensor(done))
    return data, records


class QNet(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_actions))

    def forward(self, obs):
        return self.net(obs)


def cql_loss(q: nn.Module, q_target: nn.Module, batch: Transitions, alpha: float, gamma: float):
    """(E5) discrete CQL(H): alpha * (logsumexp_a Q - Q(s, a_data)) + 1/2 TD error^2 against a target network."""
    qs = q(batch.obs)
    q_data = qs.gather(1, batch.act[:, None]).squeeze(1)
    with torch.no_grad():
        target = batch.rew + gamma * (1 - batch.done) * q_target(batch.next_obs).max(1).values
    td = 0.5 * ((q_data - target) ** 2).mean()
    conservative = (torch.logsumexp(qs, 1) - q_data).mean()  # (E5)
    return alpha * conservative + td, {"td": td.item(), "cql": conservative.item()}


def fit_cql(data: Transitions, n_actions: int, *, alpha: float = 1.0, gamma: float = 0.9, steps: int = 2000,
            batch: int = 64, lr: float = 1e-3, target_every: int = 100, hidden: int = 64, seed: int = 0,
            q: nn.Module | None = None) -> nn.Module:
    """Train a Q-network offline on ``data`` with :func:`cql_loss` (Adam, hard target updates)."""
    if alpha < 0:
        raise ValueError(f"bad alpha={alpha}: the CQL weight must be >= 0")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    q = q if q is not None else QNet(data.obs.shape[1], n_actions, hidden)
    q_target = copy.deepcopy(q)
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch, len(data)),), generator=g)
        b = Transitions(data.obs[idx], data.act[idx], data.rew[idx], data.next_obs[idx], data.done[idx])
        loss, _ = cql_loss(q, q_target, b, alpha, gamma)
        opt.zero_grad(); loss.backward(); opt.step()
        if (step + 1) % target_every == 0:
            q_target.load_state_dict(q.state_dict())
    return q.eval()


def value_iteration(P: torch.Tensor, R: torch.Tensor, gamma: float, iters: int = 2000) -> torch.Tensor:
    """Q* of a tabular MDP with transition tensor P[s, a, s'] and rewards R[s, a] (for the tests)."""
    Q = torch.zeros_like(R)
    for _ in range(iters):
        Q = R + gamma * P @ Q.max(1).values
    return Q
