r"""Data Mixing Agent: learning to re-weight domains for continual pre-training.

Reference
---------
Kailai Yang, Xiao Liu, Lei Ji, Hao Li, Xiao Liang, Zhiwei Liu, Yeyun Gong, Peng Cheng, Mao Yang.
"Data Mixing Agent: Learning to Re-weight Domains for Continual Pre-training." arXiv:2507.15640 (2025).
No official code was found (searched by name and title). This module follows the paper's framework: random
mixing trajectories on a small proxy model, an agent trained on them offline with conservative Q-learning,
and deployment of that agent on a larger model. The abstract says "reinforcement learning on large quantities of
data mixing trajectories"; that the learner is CQL, and the sizes quoted in the chapter, come from third-party
summaries we could not check against the full text. Everything marked (ours) is this book's miniature, not the
paper: the discrete action grid, the state features, the balanced score and the reward scaling in ``fit_cql``.

Equations (numbers referred to in the code)
-------------------------------------------
(E1) Continual pre-training in T stages: before stage t a policy picks a mixture a_t over the source-field
     domains (code, prose, grammar) and the target-field domains (addition, multiply); the model takes S
     optimizer steps on batches drawn from that mixture, then is evaluated on held-out text of both fields.
(E2) Balanced score (ours): b_t = 1/2 [(1 - L_src,t / L_src,0) + (1 - L_tgt,t / L_tgt,0)], the mean relative
     improvement of the two fields' held-out losses (b_0 = 0; higher is better; forgetting makes the first
     term negative).
(E3) Reward r_t = b_{t+1} - b_t, so the rewards of a run telescope: sum_t r_t = b_T - b_0 = b_T.
(E4) State (ours, scale-free so a policy learned on the proxy can read the target model): progress t / T, each
     domain's held-out loss ratio L_d,t / L_d,0, and the last reward. (The paper's state also holds the current
     mixture; with a few hundred transitions that made our agent unstable, so we leave it out.)
(E5) Trajectories: J runs of uniformly random actions, each from a fresh copy of the same source-pre-trained
     proxy, recorded as transitions (s_t, a_t, r_t, s_{t+1}, done_t).
(E6) Agent: a Q-network over the action grid (ours: the paper outputs a continuous distribution over 52
     domains), trained offline with discrete CQL(H):
     L(theta) = alpha E_s[log sum_a exp Q(s, a) - Q(s, a_data)]
                + 1/2 E[(Q(s, a_data) - (r + gamma (1 - done) max_a' Q_bar(s', a')))^2],
     Q_bar a target network copied from Q every ``target_every`` steps. The gradient of the first term with
     respect to Q(s, .) is softmax(Q(s, .)) - onehot(a_data): it lowers every action in proportion to its
     softmax weight and raises the action in the data, so actions the data never tried are pushed down.
(E7) Deployment: on a larger, unseen model the agent picks a_t = argmax_a Q(s_t, a) at every stage.
(E8) Flatness of the learned values (ours, a diagnostic): per state, the spread max_a Q - min_a Q and
     log sum_a exp Q(s, a) - mean_a Q(s, a) - log |A| = KL(uniform || softmax Q(s, .)) >= 0, zero only when all
     actions have the same value. With uniformly random behaviour actions the CQL term of (E6) averages
     log |A| + that KL, so a CQL term that ends near log |A| means nearly flat Q-values.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

from rwlib import train
from rwlib.data import text
from rwlib.rl.offline import QNet, Transitions, cql_loss, fit_cql, value_iteration  # noqa: F401  (E6)

__all__ = ["SOURCE", "TARGET", "DOMAINS", "ACTIONS", "ACTION_NAMES", "action_index", "balanced_score",
           "make_state", "STATE_DIM", "domain_losses", "field_losses", "run_cpt", "Transitions",
           "transitions", "source_share", "QNet", "cql_loss", "fit_cql", "DataMixingAgent", "constant",
           "decaying_replay", "random_policy", "BASELINES", "baseline", "value_iteration", "collect_trajectories",
           "fit_agent", "q_flatness"]

SOURCE = ("code", "prose", "grammar")
TARGET = ("addition", "multiply")
DOMAINS = SOURCE + TARGET


def _mix(replay: float, source=(1 / 3, 1 / 3, 1 / 3)) -> list[float]:
    """A mixture with ``replay`` of the batch from the source field (split by ``source``), the rest split evenly
    between the two target domains."""
    return [replay * s for s in source] + [(1 - replay) / 2] * 2


# (ours) the discrete grid of mixtures over (code, prose, grammar | addition, multiply)
_GRID = {
    "target only": _mix(0.0),
    "10% replay": _mix(0.10),
    "25% replay": _mix(0.25),
    "50% replay": _mix(0.50),
    "uniform": [0.2] * 5,
    "code replay": _mix(0.25, (1, 0, 0)),
    "prose replay": _mix(0.25, (0, 1, 0)),
    "grammar replay": _mix(0.25, (0, 0, 1)),
}
ACTION_NAMES = tuple(_GRID)
ACTIONS = torch.tensor(list(_GRID.values()), dtype=torch.float32)


def action_index(name: str) -> int:
    """The index of a named mixture of :data:`ACTIONS`."""
    if name not in ACTION_NAMES:
        raise ValueError(f"unknown mixture {name!r}; valid: {', '.join(ACTION_NAMES)}")
    return ACTION_NAMES.index(name)


def _check_action(a, n_actions: int = len(ACTIONS)) -> int:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not 0 <= int(a) < n_actions:
        raise ValueError(f"bad action {a!r}: a policy must return an index in 0..{n_actions - 1} of the grid "
                         f"({', '.join(f'{i}={n}' for i, n in enumerate(ACTION_NAMES))})")
    return int(a)


# ------------------------------------------------------------------------------------------- score and state
def balanced_score(l_src: float, l_tgt: float, l_src0: float, l_tgt0: float) -> float:
    """(E2) the mean relative improvement of the source and target held-out losses (0 at the start)."""
    return 0.5 * ((1 - l_src / l_src0) + (1 - l_tgt / l_tgt0))  # (E2)


def make_state(t: int, T: int, losses, losses0, last_reward: float = 0.0) -> torch.Tensor:
    """(E4) the scale-free state: progress t/T, each domain's held-out loss relative to its value before continual
    pre-training, and the last reward."""
    ratios = torch.as_tensor(losses, dtype=torch.float32) / torch.as_tensor(losses0, dtype=torch.float32)
    if ratios.shape != (len(DOMAINS),):
        raise ValueError(f"need one loss per domain ({', '.join(DOMAINS)}), got shape {tuple(ratios.shape)}")
    return torch.cat([torch.tensor([t / T]), ratios, torch.tensor([last_reward])])  # (E4)


STATE_DIM = len(DOMAINS) + 2


def domain_losses(metrics: dict) -> list[float]:
    """The held-out loss of each domain of :data:`DOMAINS`, from ``val_<domain>`` metrics."""
    return [float(metrics[f"val_{d}"]) for d in DOMAINS]


def field_losses(losses) -> tuple[float, float]:
    """Source- and target-field held-out loss: the mean over each field's domains."""
    losses = list(losses)
    return float(np.mean(losses[:len(SOURCE)])), float(np.mean(losses[len(SOURCE):]))


# ------------------------------------------------------------------------------------------- one CPT run
def run_cpt(model: nn.Module, corpus, policy: Callable, *, T: int, S: int, batch: int = 32, block: int = 32,
            lr: float = 3e-3, generator: torch.Generator, n_eval_windows: int = 8) -> dict:
    """(E1) continual pre-training of ``model`` in place: T stages of S AdamW steps (one fresh optimizer per run),
    each on the mixture ``policy(state, t)`` (an index into :data:`ACTIONS`) picked from the scale-free state.

    Uses :func:`rwlib.train.fit_lm` once per stage with ``sampler.set_weights`` before it and ``step_offset=t*S``,
    so one ``History`` holds the whole run (``val_<domain>`` at step 0 and at the end of every stage). Returns a
    dict: ``actions`` (T), ``losses`` per-domain held-out losses (T+1 lists), ``src``/``tgt`` field losses (T+1),
    ``scores`` b_t (T+1), ``rewards`` (T), ``states`` (T+1 tensors), ``score`` = b_T, ``history``.
    """
    if T <= 0 or S <= 0:
        raise ValueError(f"bad T={T}, S={S}: need at least one stage of at least one step")
    missing = [d for d in DOMAINS if d not in corpus.train or d not in corpus.val]
    if missing:
        raise ValueError(f"corpus lacks domain(s) {missing}; needs all of {', '.join(DOMAINS)}")
    val = {d: corpus.val[d] for d in DOMAINS}
    sampler = text.DomainSampler({d: corpus.train[d] for d in DOMAINS}, generator=generator)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    hist = train.History()
    ev = train.eval_lm(model, val, block, n_eval_windows)
    hist.log(0, **ev)
    losses0 = domain_losses(ev)
    l_src0, l_tgt0 = field_losses(losses0)
    state = make_state(0, T, losses0, losses0)
    rec = {"actions": [], "losses": [losses0], "src": [l_src0], "tgt": [l_tgt0], "scores": [0.0], "rewards": [],
           "states": [state]}
    for t in range(T):
        a = _check_action(policy(state, t))
        sampler.set_weights(ACTIONS[a].tolist())                               # (E1) this stage's mixture
        train.fit_lm(model, sampler, steps=S, batch_size=batch, block=block, optimizer=opt, val=val,
                     n_eval_windows=n_eval_windows, history=hist, step_offset=t * S, desc=f"stage {t + 1}/{T}")
        losses = domain_losses(hist.rows[-1])                                   # held-out, never training batches
        l_src, l_tgt = field_losses(losses)
        b = balanced_score(l_src, l_tgt, l_src0, l_tgt0)                        # (E2)
        r = b - rec["scores"][-1]                                               # (E3)
        state = make_state(t + 1, T, losses, losses0, r)                        # (E4)
        for k, v in (("actions", a), ("losses", losses), ("src", l_src), ("tgt", l_tgt), ("scores", b),
                     ("rewards", r), ("states", state)):
            rec[k].append(v)
    rec["score"] = rec["scores"][-1]
    rec["history"] = hist
    return rec


# ------------------------------------------------------------------------------------------- policies
def constant(a: int | str) -> Callable:
    """The policy that always picks mixture ``a`` (an index or a name of :data:`ACTION_NAMES`)."""
    a = action_index(a) if isinstance(a, str) else _check_action(a)
    return lambda state, t: a


def decaying_replay(T: int) -> Callable:
    """A hand heuristic: source replay decays linearly from 50 % to 10 % over the T stages (nearest grid point
    among the 50 %, 25 %, 10 % replay mixtures)."""
    levels = {0.5: action_index("50% replay"), 0.25: action_index("25% replay"), 0.1: action_index("10% replay")}

    def policy(state, t):
        want = 0.5 + (0.1 - 0.5) * (t / max(T - 1, 1))
        return levels[min(levels, key=lambda x: abs(x - want))]
    return policy


def random_policy(generator: torch.Generator, n_actions: int = len(ACTIONS)) -> Callable:
    """(E5) the behaviour policy of the trajectories: a uniformly random mixture at every stage."""
    return lambda state, t: int(torch.randint(n_actions, (1,), generator=generator))


BASELINES = ("target only", "uniform", "50% replay", "decaying replay", "random")


def baseline(name: str, T: int, generator: torch.Generator | None = None) -> Callable:
    """A baseline policy by name: one of :data:`BASELINES` or any constant mixture of :data:`ACTION_NAMES`.
    ``"random"`` is the behaviour policy of the trajectories (:func:`random_policy`) and draws from ``generator``."""
    if name == "decaying replay":
        return decaying_replay(T)
    if name == "random":
        if generator is None:
            raise ValueError("baseline 'random' needs a generator (the stream its mixtures are drawn from)")
        return random_policy(generator)
    if name in ACTION_NAMES:
        return constant(name)
    raise ValueError(f"unknown baseline {name!r}; valid: decaying replay, random, {', '.join(ACTION_NAMES)}")


# ------------------------------------------------------------------------------------------- trajectories
def transitions(records: list[dict]) -> Transitions:
    """(E5) the offline dataset of a list of :func:`run_cpt` records: one transition (s_t, a_t, r_t, s_{t+1},
    done_t) per stage, ``done`` at each run's last stage."""
    if not records:
        raise ValueError("need at least one trajectory record")
    obs, act, rew, nxt, done = [], [], [], [], []
    for rec in records:
        T = len(rec["actions"])
        for t in range(T):
            obs.append(rec["states"][t]); act.append(rec["actions"][t]); rew.append(rec["rewards"][t])
            nxt.append(rec["states"][t + 1]); done.append(float(t == T - 1))
    return Transitions(torch.stack(obs), torch.tensor(act), torch.tensor(rew, dtype=torch.float32),
                       torch.stack(nxt), torch.tensor(done))


def source_share(actions) -> float:
    """The mean share of source-field data in the batches of a run that picked ``actions`` (the paper's
    "less source-field data")."""
    return float(ACTIONS[list(actions)][:, :len(SOURCE)].sum(1).mean())


def collect_trajectories(proxy: nn.Module, corpus, J: int, policy: Callable, *, generator: torch.Generator,
                         **cpt) -> list[dict]:
    """(E5) J runs of :func:`run_cpt`, each on a fresh deep copy of the same ``proxy`` (fresh optimizer), under the
    behaviour ``policy`` (the paper: random mixtures); batches from ``generator``. Returns the J records."""
    if J < 1:
        raise ValueError(f"bad J={J}: need at least one trajectory")
    return [run_cpt(copy.deepcopy(proxy), corpus, policy, generator=generator, **cpt) for _ in range(J)]


def fit_agent(data: Transitions, *, alpha: float, gamma: float, steps: int, seed: int) -> "DataMixingAgent":
    """(E6) the agent of one offline dataset: discrete CQL with the rewards divided by their standard deviation
    (ours: CQL's ``alpha`` acts against the reward scale). The agent keeps ``history`` (td and cql per step) and
    ``reward_sd``."""
    sd = float(data.rew.std())
    if not sd > 0:
        raise ValueError(f"bad dataset: the rewards have standard deviation {sd}; need > 0 to scale them")
    q, hist = fit_cql(data, len(ACTIONS), alpha=alpha, gamma=gamma, steps=steps, seed=seed, reward_scale=1 / sd)
    agent = DataMixingAgent(q)
    agent.history, agent.reward_sd = hist, sd
    return agent


@torch.no_grad()
def q_flatness(q: nn.Module, obs: torch.Tensor) -> dict[str, torch.Tensor]:
    """(E8) per state of ``obs``: ``spread`` = max_a Q - min_a Q and ``kl`` = logsumexp_a Q - mean_a Q - log|A|
    (KL from the uniform distribution to softmax Q; 0 when every action has the same value)."""
    qs = q(obs)
    if qs.ndim != 2:
        raise ValueError(f"need a batch of states (N, {STATE_DIM}); got Q-values of shape {tuple(qs.shape)}")
    kl = torch.logsumexp(qs, 1) - qs.mean(1) - float(np.log(qs.shape[1]))
    return {"spread": qs.max(1).values - qs.min(1).values, "kl": kl}


class DataMixingAgent:
    """(E7) the deployed agent: the greedy policy of a trained Q-network, usable wherever a policy is."""

    def __init__(self, q: nn.Module):
        self.q = q

    @torch.no_grad()
    def values(self, state: torch.Tensor) -> torch.Tensor:
        """Q(state, .) for every mixture of the grid."""
        return self.q(state[None])[0]

    def __call__(self, state: torch.Tensor, t: int) -> int:
        return int(self.values(state).argmax())                                       # (E7) argmax_a Q(s, a)

    def next_mixture(self, state: torch.Tensor) -> dict[str, float]:
        """The mixture the agent picks in ``state``, as domain -> weight."""
        return dict(zip(DOMAINS, ACTIONS[self(state, 0)].tolist()))
