"""Tests for rwlib.methods.steer (chapter 13: STEER's entropy-change estimate and token weights)."""

import math

import numpy as np
import pytest
import torch

from rwlib.data.tasks import AdditionTask
from rwlib.data.text import TOKENIZER
from rwlib.methods import steer
from rwlib.models import TinyGPT
from rwlib.rl import GRPOConfig, clipped_pg_loss, sample_completions, score, train_grpo
from rwlib.train import History


def _batch(seed=0, N=8, T=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 4
    adv = torch.randn(N, generator=g)
    ent = torch.rand(N, T, generator=g) * 3
    logp_old = logp + 0.1 * torch.randn(N, T, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.25).float()
    mask[0] = 1.0
    return adv, ent, logp, logp_old, mask


# -- Omega ---------------------------------------------------------------------------------------------------------
def test_omega_closed_form_and_per_sequence_advantage():
    pi, pi_old, H, A = 0.5, 0.25, 1.3, 2.0
    lp, lpo = torch.tensor([[math.log(pi)]]), torch.tensor([[math.log(pi_old)]])
    expected = A / pi_old * pi * (1 - pi) * (math.log(pi) + H)
    assert math.isclose(float(steer.omega(torch.tensor([A]), torch.tensor([[H]]), lp, lpo, signed=True)),
                        expected, rel_tol=1e-5)
    adv, ent, logp, old, _ = _batch()
    per_seq = steer.omega(adv, ent, logp, old)
    per_tok = steer.omega(adv[:, None].expand_as(logp).contiguous(), ent, logp, old)
    assert torch.equal(per_seq, per_tok)
    assert torch.equal(per_seq, steer.omega(adv, ent, logp, old, signed=True).abs())
    assert (per_seq >= 0).all()


def test_omega_signs_follow_the_four_quadrants():
    # log pi + H > 0: the token is more likely than typical; < 0: less likely
    likely, rare = torch.tensor([[math.log(0.6)]]), torch.tensor([[math.log(0.01)]])
    H = torch.tensor([[1.0]])
    om = lambda A, lp: float(steer.omega(torch.tensor([A]), H, lp, lp, signed=True))  # noqa: E731
    assert om(1.0, likely) > 0 and om(-1.0, likely) < 0      # reinforcing a likely token lowers entropy (-Omega < 0)
    assert om(1.0, rare) < 0 and om(-1.0, rare) > 0          # reinforcing a rare token raises it


def test_omega_zero_cases_and_non_finite_values():
    lp = torch.tensor([[math.log(0.5)]])
    H = torch.tensor([[0.7]])
    assert float(steer.omega(torch.tensor([0.0]), H, lp, lp)) == 0.0                    # A = 0
    assert float(steer.omega(torch.tensor([1.0]), -lp, lp, lp)) < 1e-7                  # log pi + H = 0
    assert float(steer.omega(torch.tensor([1.0]), H, torch.zeros(1, 1), torch.zeros(1, 1))) < 1e-6  # pi = 1
    nan = steer.omega(torch.tensor([1.0]), torch.tensor([[float("nan")]]), lp, lp)
    inf = steer.omega(torch.tensor([float("inf")]), H, lp, lp)
    assert float(nan) == 0.0 and float(inf) == 0.0                                      # non-finite -> 0
    # tiny pi_old is clamped at 1e-8, so Omega stays finite
    assert torch.isfinite(steer.omega(torch.tensor([1.0]), H, lp, torch.tensor([[-1e4]]))).all()


# -- token weights -------------------------------------------------------------------------------------------------
def test_exponential_weights_range_endpoints_and_closed_form():
    adv, ent, logp, old, mask = _batch()
    om = steer.omega(adv, ent, logp, old)
    m = mask.bool()
    assert float(om[m].max()) >= 0.02
    w = steer.token_weights(om, mask, w_min=0.8)
    assert (w[m] >= 0.8 - 1e-7).all() and (w[m] <= 1.0).all() and (w[~m] == 0).all()
    assert math.isclose(float(w[m][om[m].argmax()]), 0.8, rel_tol=1e-6)   # the largest |Omega| gets w_min
    # hand-derived: |Omega| = (0.1, 0.05, 0) -> k = -ln 0.8 / 0.1 -> w = (0.8, sqrt 0.8, 1)
    w3 = steer.token_weights(torch.tensor([[0.1, -0.05, 0.0]]), torch.ones(1, 3), w_min=0.8)
    assert torch.allclose(w3, torch.tensor([[0.8, math.sqrt(0.8), 1.0]]))


def test_exponential_floor_keeps_small_changes_near_one():
    om = torch.tensor([[0.01, 0.005, 0.0]])   # max |Omega| below the 0.02 floor: k = -ln 0.8 / 0.02
    w = steer.token_weights(om, torch.ones(1, 3), w_min=0.8)
    assert torch.allclose(w, torch.tensor([[0.8 ** 0.5, 0.8 ** 0.25, 1.0]]))
    assert float(w.min()) > 0.8


def test_linear_mapping_endpoints_and_all_equal_case():
    om = torch.tensor([[0.0, 1.0, 2.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = steer.token_weights(om, mask, 0.8, 1.2, linear=True)
    assert torch.allclose(w, torch.tensor([[1.2, 1.0, 0.8, 0.0]]))   # the masked 50 plays no part
    same = steer.token_weights(torch.full((2, 3), 0.3), torch.ones(2, 3), 0.8, 1.2, linear=True)
    assert torch.allclose(same, torch.full((2, 3), 1.0))              # all equal: the midpoint
    w01 = steer.token_weights(torch.tensor([[3.0, 1.0, 2.0]]), torch.ones(1, 3), 0.8, 1.0, linear=True)
    assert torch.allclose(w01, torch.tensor([[0.8, 1.0, 0.9]]))


@pytest.mark.parametrize("linear", [False, True])
def test_masked_tokens_are_ignored(linear):
    adv, ent, logp, old, mask = _batch(3)
    om = steer.omega(adv, ent, logp, old)
    w = steer.token_weights(om, mask, 0.7, 1.0, linear=linear)
    om2 = torch.where(mask.bool(), om, torch.full_like(om, 1e6))     # garbage where the mask is 0
    assert torch.equal(w, steer.token_weights(om2, mask, 0.7, 1.0, linear=linear))
    assert (w[~mask.bool()] == 0).all()
    assert torch.equal(steer.token_weights(om, torch.zeros_like(mask)), torch.zeros_like(om))


def test_unit_weights_leave_the_loss_unchanged():
    adv, ent, logp, old, mask = _batch(1)
    kw = dict(eps_low=0.2, eps_high=0.28, clip_c=10.0, agg="token-mean")
    plain, _ = clipped_pg_loss(logp, old, adv, mask, **kw)
    ones, _ = clipped_pg_loss(logp, old, adv, mask, token_weights=torch.ones_like(mask), **kw)
    assert torch.equal(plain, ones)
    # lambda_min = 1 makes every STEER weight 1: the STEER loss is then clip-higher GRPO's loss exactly
    steer_one, info = steer.steer_loss(logp, old, adv, mask, ent, w_min=1.0)
    assert torch.equal(info["weights"], mask) and torch.allclose(steer_one, plain, rtol=0, atol=1e-7)
    # weights are constants: the gradient is the weighted per-token gradient
    lp = logp.clone().requires_grad_(True)
    loss, info = steer.steer_loss(lp, old, adv, mask, ent)
    loss.backward()
    lp2 = logp.clone().requires_grad_(True)
    ref, _ = clipped_pg_loss(lp2, old, adv, mask, token_weights=info["weights"], eps_high=0.28, clip_c=10.0)
    ref.backward()
    assert torch.allclose(lp.grad, lp2.grad)


# -- the first-order entropy change --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_first_order_entropy_change_matches_a_finite_difference(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(300, 20, generator=g, dtype=torch.float64) * 2
    a = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    A = torch.randn(300, generator=g, dtype=torch.float64)
    lpo = torch.log_softmax(z, -1).gather(1, a[:, None]).squeeze(1) + 0.1 * torch.randn(300, generator=g,
                                                                                      dtype=torch.float64)
    eta = 1e-5
    pred = steer.first_order_entropy_change(z, a, A, eta, lpo)
    # finite difference written out independently: autograd gradient of A * pi_a / pi_old, step, entropy
    zz = z.clone().requires_grad_(True)
    p = torch.softmax(zz, -1)
    (A * p.gather(1, a[:, None]).squeeze(1) / lpo.exp()).sum().backward()
    z2 = z + eta * zz.grad
    H = lambda x: -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)  # noqa: E731
    measured = H(z2) - H(z)
    rel = ((pred - measured).abs() / measured.abs().clamp(min=1e-300)).numpy()
    assert np.median(rel) < 1e-2 and torch.allclose(pred, measured, rtol=1e-2, atol=1e-9)
    assert torch.allclose(steer.stepped_entropy_change(z, a, A, eta, lpo), measured, rtol=1e-6, atol=1e-14)


def test_first_order_formula_is_the_directional_derivative():
    # (S2) equals <dH/dz, dz> with dz = eta A r (e_a - pi); dH/dz from autograd
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    a = torch.tensor([0, 3, 8, 1])
    H = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum()
    (gH,) = torch.autograd.grad(H, z)
    p = torch.softmax(z.detach(), -1)
    dz = 0.1 * 1.5 * (torch.nn.functional.one_hot(a, 9) - p)
    assert torch.allclose(steer.first_order_entropy_change(z.detach(), a, 1.5, 0.1), (gH * dz).sum(-1))


def test_tabular_check_statistics():
    df = steer.tabular_check(torch.Generator().manual_seed(0), n=500, vocab=30)
    rel = (df.first_order - df.measured).abs() / df.measured.abs()
    assert rel.median() < 1e-2
    assert steer.spearman(-df.omega, df.measured) > 0.5 and steer.sign_agreement(-df.omega, df.measured) > 0.7
    assert steer.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# -- hooks into the GRPO trainer -------------------------------------------------------------------------------------
def test_token_weight_fn_and_probe_inside_train_grpo():
    torch.manual_seed(0)
    task = AdditionTask(1, 1)
    model = TinyGPT(TOKENIZER.vocab_size, block_size=8, n_layer=1, n_embd=16, n_head=2)
    probe = steer.Probe(steer.token_weight_fn(w_min=0.8))
    cfg = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=3, ppo_epochs=2, eps_high=0.28)
    hist = train_grpo(model, torch.optim.Adam(model.parameters(), 1e-3), task, cfg, 4,
                      torch.Generator().manual_seed(0), token_weight_fn=probe, on_rollout=probe.on_rollout)
    df = probe.frame()
    assert len(df) == 4 and list(df["rollout"]) == [0, 0, 1, 1] and np.isfinite(hist["loss"]).all()
    assert (df.w_min >= 0.8 - 1e-6).all() and (df.w_max <= 1.0).all()
    assert len(steer.entropy_changes(hist)) == 2
    adv, ent, logp, old, mask = _batch(2)
    w = steer.token_weight_fn(0.5, linear=True)(adv, ent, logp, old, mask)
    assert w.shape == mask.shape and (w[mask.bool()] >= 0.5).all() and (w[mask.bool()] <= 1.0).all()


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_valid_values():
    one, m = torch.zeros(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match=r"w_min=1.5 .*valid 0 < w_min <= 1"):
        steer.token_weights(one, m, w_min=1.5, w_max=2.0)
    with pytest.raises(ValueError, match=r"valid 0 < w_min <= w_max"):
        steer.token_weights(one, m, w_min=0.9, w_max=0.8)
    with pytest.raises(ValueError, match=r"valid 0 < w_min <= w_max"):
        steer.token_weight_fn(w_min=0.0)
    with pytest.raises(ValueError, match=r"floor=0.*valid floor > 0"):
        steer.token_weights(one, m, floor=0.0)
    with pytest.raises(ValueError, match=r"valid: equal shapes"):
        steer.token_weights(torch.zeros(2, 3), torch.ones(3, 2))
    adv, ent, logp, old, _ = _batch()
    with pytest.raises(ValueError, match=r"adv has shape \(3,\); valid: \(8, 6\) or \(8,\)"):
        steer.omega(adv[:3], ent, logp, old)
    with pytest.raises(ValueError, match=r"entropy has shape \(8, 5\); valid: \(8, 6\)"):
        steer.omega(adv, ent[:, :5], logp, old)
    with pytest.raises(ValueError, match=r"valid: logits.shape\[:-1\]"):
        steer.first_order_entropy_change(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long), 1.0, 0.1)


def test_agreement_and_the_first_order_formula_on_the_tabular_check():
    """(Moved from the chapter's ledger: a check of our code.) The exact first-order formula matches the measured
    change of a small step (median relative error < 1e-3), and agreement() is (spearman, sign_agreement) of -Omega."""
    df = steer.tabular_check(torch.Generator().manual_seed(1), n=1000, vocab=50, eta=1e-3)
    rel = ((df.first_order - df.measured).abs() / df.measured.abs()).median()
    assert rel < 1e-3
    assert steer.agreement(df) == (steer.spearman(-df.omega, df.measured),
                                   steer.sign_agreement(-df.omega, df.measured))


def test_probe_weights_stay_in_their_range_during_training():
    """(Moved from the chapter's ledger.) Inside train_grpo no weight leaves [lambda_min, 1] (that the largest |Omega|
    gets exactly lambda_min is test_exponential_weights_range_endpoints_and_closed_form)."""
    task = AdditionTask(1, 1)
    torch.manual_seed(0)
    model = TinyGPT(TOKENIZER.vocab_size, 12, 1, 32, 2)
    probe = steer.Probe(steer.token_weight_fn(w_min=0.8))
    cfg = GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=3, ppo_epochs=2, eps_high=0.28)
    train_grpo(model, torch.optim.Adam(model.parameters(), lr=1e-3), task, cfg, 6,
               torch.Generator().manual_seed(0), token_weight_fn=probe, on_rollout=probe.on_rollout)
    f = probe.frame()
    assert len(f) == 6 and (f.w_min >= 0.8 - 1e-6).all() and (f.w_max <= 1.0 + 1e-6).all()


def test_probe_history_and_entropy_changes_from_the_grpo_history():
    p = steer.Probe()
    assert p.history().rows == []
    p.rows = [{"rollout": 0, "entropy_old": 1.0}, {"rollout": 0, "entropy_old": 1.0}]
    steps, ent = p.history().series("entropy_old")
    assert steps.tolist() == [1, 2] and ent.tolist() == [1.0, 1.0]
    h = History()
    for t, row in enumerate([dict(reward=0.1, entropy=1.0), dict(entropy=0.7), dict(reward=0.2, entropy=0.5),
                             dict(entropy=0.6)]):
        h.log(t + 1, **row)
    assert steer.entropy_changes(h) == pytest.approx([-0.3, 0.1])       # never across two rollout batches
    assert steer.mean_abs_change(h) == pytest.approx(0.2)
    assert np.isnan(steer.mean_abs_change(History()))


# -- per-micro-batch normalisation (the official code normalises inside each loss call of 8 responses) ----------
def test_weights_are_normalised_per_micro_batch():
    adv, ent, logp, old, mask = _batch(4, N=16)
    om = steer.omega(adv, ent, logp, old)
    w = steer.token_weights(om, mask, w_min=0.5)                        # default: micro-batches of 8 rows
    halves = [steer.token_weights(om[i:i + 8], mask[i:i + 8], w_min=0.5, micro_batch=None) for i in (0, 8)]
    assert torch.equal(w, torch.cat(halves))
    for i in (0, 8):                                                     # each micro-batch's largest |Omega| gets 0.5
        m = mask[i:i + 8].bool()
        assert math.isclose(float(w[i:i + 8][m][om[i:i + 8][m].argmax()]), 0.5, rel_tol=1e-6)
    whole = steer.token_weights(om, mask, w_min=0.5, micro_batch=None)
    assert torch.equal(whole, steer.token_weights(om, mask, w_min=0.5, micro_batch=16))
    assert not torch.allclose(w, whole) and (w <= whole + 1e-7).all()  # a smaller max only lowers them
    # a ragged last micro-batch: rows 0-2 and 3-4 are normalised apart
    w5 = steer.token_weights(torch.tensor([[0.4], [0.2], [0.1], [0.1], [0.05]]), torch.ones(5, 1), 0.5,
                             micro_batch=3)
    assert torch.allclose(w5.squeeze(1), torch.tensor([0.5, 0.5 ** 0.5, 0.5 ** 0.25, 0.5, 0.5 ** 0.5]))
    fn = steer.token_weight_fn(0.5, micro_batch=4)
    assert torch.equal(fn(adv, ent, logp, old, mask), steer.token_weights(om, mask, 0.5, micro_batch=4))
    loss, info = steer.steer_loss(logp, old, adv, mask, ent, w_min=0.5)
    assert torch.equal(info["weights"], w)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_micro_batch_names_the_valid_values(bad):
    with pytest.raises(ValueError, match=r"micro_batch=.*valid a whole number >= 1 .* or None"):
        steer.token_weights(torch.zeros(2, 2), torch.ones(2, 2), micro_batch=bad)
    with pytest.raises(ValueError, match=r"valid a whole number >= 1"):
        steer.token_weight_fn(micro_batch=bad)


def test_weight_entropy_choice_at_the_second_epoch():
    torch.manual_seed(0)
    task = AdditionTask(1, 1)
    model = TinyGPT(TOKENIZER.vocab_size, block_size=8, n_layer=1, n_embd=16, n_head=2)
    g = torch.Generator().manual_seed(0)
    ro = sample_completions(model, task.sample(4, g), 4, 3, g)
    score(task, ro)
    ro.advantages = torch.randn(16, generator=g)          # an untrained model earns no reward: made-up advantages
    before = [p.detach().clone() for p in model.parameters()]
    df = steer.weight_entropy_choice(model, ro, lr=1e-2, w_min=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))      # the model is not changed
    assert len(df) == int(ro.mask.sum()) and np.allclose(df.entropy_old, ro.entropy_old[ro.mask.bool()])
    assert df.w_rollout.between(0.5 - 1e-6, 1).all() and df.w_current.between(0.5 - 1e-6, 1).all()
    assert (df.entropy_now - df.entropy_old).abs().max() > 1e-4                    # the step moved the entropy
    assert (df.w_rollout - df.w_current).abs().max() > 0                           # and so the weights
    # with lr = 0 the policy does not move: both choices agree exactly
    same = steer.weight_entropy_choice(model, ro, lr=0.0, w_min=0.5)
    assert np.allclose(same.w_rollout, same.w_current, atol=1e-6)
    ro.entropy_old = None
    with pytest.raises(ValueError, match="entropy_old"):
        steer.weight_entropy_choice(model, ro, lr=1e-2)
