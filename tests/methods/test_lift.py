"""Tests of rwlib.methods.lift: the principal-weight mask against a numpy brute force, the sparse Adam against
torch.optim.Adam on masked gradients, and the mask-refresh semantics of the official SparseAdamW."""

import numpy as np
import pytest
import torch

from rwlib.methods import lift
from rwlib.models import TinyGPT


# ---------------------------------------------------------------------------------------------- budget, masks
def test_budget_formula():
    assert lift.lift_budget((4096, 4096), 128) == 8192 * 128  # 6.25 % of the matrix
    assert lift.lift_budget((4096, 11008), 128) == (4096 + 11008) * 128
    assert lift.lift_budget((192, 64), 4) == 1024
    assert lift.lift_budget((10, 10), 8) == 100  # capped at m * n
    with pytest.raises(ValueError, match=">= 1"):
        lift.lift_budget((10, 10), 0)
    with pytest.raises(ValueError, match="2-D"):
        lift.lift_budget((10,), 2)


@pytest.mark.parametrize("shape", [(128, 128), (512, 128), (384, 128)])
@pytest.mark.parametrize("r", [1, 4, None])
def test_principal_mask_equals_brute_force(shape, r):
    g = torch.Generator().manual_seed(hash((shape, r)) % 2**31)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    k = lift.lift_budget(shape, 4)
    ours = lift.principal_mask(W, r, k)
    assert ours.dtype == torch.bool and ours.shape == W.shape and int(ours.sum()) == k
    np.testing.assert_array_equal(ours.numpy(), lift.brute_force_mask(W, r, k))



def _chapter_matrices():
    """The matrices chapter 20 selects from: TinyGPT's block linears (width 64) and the real MiniLM's
    layer-0 linears (384 x 384 and the 1:4 MLP matrices)."""
    torch.manual_seed(0)
    mats = {k: v.detach() for k, v in lift.model_linears(TinyGPT(97, 32, 2, 64, 4)).items()}
    shapes = ("query", "intermediate.dense", "output.dense")   # its three shapes
    mats.update({f"minilm.{k}": v for k, v in lift.minilm_linears(layers=[0]).items()
                 if k.endswith(shapes) and "attention.output" not in k})
    return mats


def test_gram_route_selects_the_svd_masks_at_the_chapter_sizes():
    """The Gram-matrix eigh route of lowrank_approx gives the SVD mask (numpy SVD and a stable argsort, as in
    brute_force_mask) on every matrix the chapter uses, at r = 1, 4, 32. Where the k-th and (k+1)-th scores tie
    to rounding, any valid top-k is right: then no unselected score may beat a selected one."""
    for name, W in _chapter_matrices().items():
        k = lift.lift_budget(W.shape, 4)
        U, S, Vt = np.linalg.svd(W.double().numpy(), full_matrices=False)
        for r in (1, 4, 32):
            ours = lift.principal_mask(W, r, k).numpy()
            score = np.abs((U[:, :r] * S[:r]) @ Vt[:r])
            order = np.argsort(-score.ravel(), kind="stable")
            kth, nxt = score.ravel()[order[[k - 1, k]]]
            if kth - nxt > 1e-9 * score.max():
                ref = np.zeros(score.size, dtype=bool)
                ref[order[:k]] = True
                np.testing.assert_array_equal(ours, ref.reshape(score.shape), err_msg=f"{name} r={r}")
            else:
                assert score[ours].min() >= score[~ours].max() - 1e-9 * score.max(), f"{name} r={r}"


def test_ties_give_a_valid_top_k():
    """A rank-1 integer matrix has many equal |entries|: the mask is still a top-k of the scores."""
    a = torch.tensor([1.0, -2.0, 2.0, 3.0, -1.0, 1.0] * 4, dtype=torch.float64)
    W = torch.outer(a, a[:12])
    k = lift.lift_budget(W.shape, 1)
    m = lift.principal_mask(W, 1, k)
    score = lift.lowrank_approx(W, 1).abs()
    assert int(m.sum()) == k and score[m].min() >= score[~m].max() - 1e-9

def test_smallest_selection_equals_brute_force():
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = lift.lift_budget(W.shape, 4)
    ours = lift.principal_mask(W, 4, k, select="smallest")
    np.testing.assert_array_equal(ours.numpy(), lift.brute_force_mask(W, 4, k, "smallest"))
    assert not (ours & lift.principal_mask(W, 4, k)).any()  # k + k < m n: disjoint from the largest


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_gives_the_magnitude_mask(dtype):
    W = torch.randn(192, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
    k = lift.lift_budget(W.shape, 4)
    mag = lift.magnitude_mask(W, k)
    assert torch.equal(lift.principal_mask(W, None, k), mag)
    assert torch.equal(lift.principal_mask(W, 64, k), mag)
    assert torch.equal(lift.principal_mask(W, 1000, k), mag)  # ranks above min(m, n) mean full rank
    np.testing.assert_array_equal(mag.numpy(), lift.brute_force_mask(W, None, k))
    if dtype == torch.float32:  # the float64 reconstruction rounds back to the float32 matrix itself
        assert torch.equal(lift.lowrank_approx(W, None), W)


def test_rank_reduction_changes_the_mask_and_jaccard():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 64, generator=g) + 3 * torch.randn(128, 1, generator=g) @ torch.randn(1, 64, generator=g)
    k = lift.lift_budget(W.shape, 4)
    a, b = lift.principal_mask(W, 1, k), lift.magnitude_mask(W, k)
    j = lift.jaccard(a, b)
    assert 0 < j < 1
    assert j == pytest.approx(int((a & b).sum()) / int((a | b).sum()))
    assert lift.jaccard(a, a) == 1.0
    df = lift.mask_overlap({"w": W}, [1, 4, None], lora_rank=4)
    assert df["jaccard"].iloc[0] == pytest.approx(j)
    assert df.loc[df["full"], "jaccard"].item() == 1.0


def test_random_mask_is_reproducible():
    W = torch.zeros(20, 30)
    a = lift.random_mask(W, 50, torch.Generator().manual_seed(5))
    b = lift.random_mask(W, 50, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and int(a.sum()) == 50


# ---------------------------------------------------------------------------------------------- optimizer
def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) * (1 + t % 3) for t in range(steps)]


def test_fixed_mask_matches_torch_adam_on_masked_gradients():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 32, generator=g, dtype=torch.float64)
    a = torch.nn.Parameter(W0.clone())
    b = torch.nn.Parameter(W0.clone())
    ours = lift.LIFTAdam([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-12, lora_rank=2, filter_rank=4,
                         update_interval=None, eps_mode="torch")
    mask = ours.state[a]["mask"].clone()
    k = lift.lift_budget(a.shape, 2)
    assert ours.state[a]["exp_avg"].shape == (k,) and ours.state_floats() == 2 * k
    peer = torch.optim.Adam([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-12)
    for G in _grads(a.shape, 50, 1):
        a.grad = G.clone()
        b.grad = G * mask
        ours.step()
        peer.step()
    assert torch.equal(ours.state[a]["mask"], mask) and ours.refreshes == []
    assert (a.detach() - b.detach()).abs().max().item() < 1e-10
    assert torch.equal(a.detach()[~mask], W0[~mask])  # unmasked entries bit-identical
    assert (a.detach()[mask] != W0[mask]).all()
    assert ours.state[a]["step"] == 50


def test_hf_eps_placement_matches_the_official_formula():
    """eps outside sqrt(v), bias corrections folded into the step size (E4, eps_mode="hf")."""
    W0 = torch.randn(24, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = torch.nn.Parameter(W0.clone())
    lr, (b1, b2), eps = 3e-3, (0.9, 0.95), 1e-6
    ours = lift.LIFTAdam([a], lr=lr, betas=(b1, b2), eps=eps, lora_rank=2, mask="magnitude")
    mask = ours.state[a]["mask"].numpy()
    w, m, v = W0.numpy().copy(), 0.0, 0.0
    for t, G in enumerate(_grads(a.shape, 20, 4), start=1):
        a.grad = G.clone()
        ours.step()
        g = G.numpy()[mask]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w[mask] -= lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(a.detach().numpy(), w, rtol=0, atol=1e-12)


def test_refresh_semantics():
    """Shared entries keep their moments, new entries start at 0, step keeps counting; refreshes fire after
    global steps T-1, 2T-1, ..."""
    shape, k = (6, 5), lift.lift_budget((6, 5), 1)  # k = 11
    A = torch.zeros(30, dtype=torch.bool)
    A[:11] = True
    B = torch.zeros(30, dtype=torch.bool)
    B[5:16] = True  # shares entries 5..10 with A
    masks = [A.view(shape), B.view(shape), A.view(shape)]
    calls = []

    def cycle(W, kk):
        calls.append(kk)
        return masks[(len(calls) - 1) % len(masks)]

    W0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.nn.Parameter(W0.clone())
    ref = torch.nn.Parameter(W0.clone())
    T = 3
    opt = lift.LIFTAdam([p], lr=1e-2, lora_rank=1, update_interval=T, mask=cycle)
    fixed = lift.LIFTAdam([ref], lr=1e-2, lora_rank=1, update_interval=None, mask=lambda W, kk: A.view(shape))
    grads = _grads(shape, 6, 7)
    for t in range(2):
        p.grad, ref.grad = grads[t].clone(), grads[t].clone()
        opt.step()
        fixed.step()
    assert opt.refreshes == [T - 1] and calls == [k, k]
    st, sf = opt.state[p], fixed.state[ref]
    assert torch.equal(p.detach(), ref.detach())  # same updates before the refresh
    assert torch.equal(st["mask"], B.view(shape)) and st["step"] == 2
    for key in ("exp_avg", "exp_avg_sq"):
        dense = torch.zeros(30, dtype=torch.float64)
        dense[A] = sf[key]
        assert torch.equal(st[key], dense[B])  # shared entries keep state, new ones are 0
        assert (st[key][:6] != 0).all() and (st[key][6:] == 0).all()
    before = p.detach().clone()
    p.grad = grads[2].clone()
    opt.step()
    assert st["step"] == 3
    changed = (p.detach() != before).flatten()
    assert torch.equal(changed, B)  # only the new mask moves
    for t in range(3, 6):
        p.grad = grads[t].clone()
        opt.step()
    assert opt.refreshes == [T - 1, 2 * T - 1] and opt.global_step == 6 and st["step"] == 6
    assert torch.equal(st["ever_masked"].flatten(), A | B)


def test_lift_mask_is_recomputed_from_current_weights():
    p = torch.nn.Parameter(torch.randn(16, 12, generator=torch.Generator().manual_seed(0)))
    opt = lift.LIFTAdam([p], lr=0.5, lora_rank=1, filter_rank=2, update_interval=2)
    p.grad = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    opt.step()  # global step 1 = T - 1: refresh
    assert opt.refreshes == [1]
    assert torch.equal(opt.state[p]["mask"], lift.principal_mask(p.detach(), 2, lift.lift_budget(p.shape, 1)))


# ---------------------------------------------------------------------------------------------- drivers, errors
def test_methods_train_the_intended_parameters():
    from rwlib import finetune

    torch.manual_seed(0)
    base = TinyGPT(97, block_size=16, n_layer=1, n_embd=32, n_head=2)
    recipe = finetune.Recipe(steps=1, batch_size=1, lr=1e-3, optimizer="adam", betas=(0.9, 0.95))
    lora_params = None
    for method in ("Full FT", "LoRA", "Magnitude", "Random", "LIFT"):
        prep = finetune.prepare(base, method, rank=2, filter_rank=2, update_interval=None) \
            if method not in ("Full FT", "LoRA") else finetune.prepare(base, method, rank=2)
        model = prep.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if method == "Full FT":
            assert trainable == {n for n, _ in base.named_parameters()}
        elif method == "LoRA":
            assert all(n.endswith((".A", ".B")) for n in trainable)
            lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert lora_params == finetune.lora_count(base, 2)
        else:
            assert trainable == {f"{n}.weight" for n in lift.model_linears(model)}
            opt = prep.make_optimizer(recipe)
            assert isinstance(opt, lift.LIFTAdam) and opt.defaults["betas"] == (0.9, 0.95)
            assert opt.state_floats() == 2 * lora_params == 2 * prep.count()  # same budget as the LoRA


def test_finetune_changes_only_selected_entries():
    from rwlib import finetune
    from rwlib.data.tasks import MultiplyTask
    from rwlib.finetune import exact_match

    torch.manual_seed(0)
    base = TinyGPT(97, block_size=16, n_layer=1, n_embd=32, n_head=2)
    task = MultiplyTask(2, 9)
    problems = task.all_problems()
    assert len(problems) == 64
    recipe = finetune.Recipe(steps=6, batch_size=8, lr=1e-2, optimizer="adam", betas=(0.9, 0.95))
    ft = finetune.finetune(base, "LIFT", problems, recipe, rank=2, filter_rank=2, update_interval=3)
    model, opt = ft.model, ft.optimizer
    assert opt.refreshes == [2, 5]
    before = dict(base.named_parameters())
    for name, p in model.named_parameters():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in lift.model_linears(model):
            ever = opt.state[p]["ever_masked"]
            assert torch.equal(p.detach()[~ever], before[name].detach()[~ever])
            assert (p.detach() != before[name].detach()).any()
        else:
            assert torch.equal(p.detach(), before[name].detach())
    assert 0.0 <= exact_match(model, task, problems[:8]) <= 1.0


def test_bad_inputs_name_the_valid_choices():
    W = torch.randn(8, 6)
    with pytest.raises(ValueError, match="largest, smallest"):
        lift.principal_mask(W, 2, 10, select="biggest")
    with pytest.raises(ValueError, match="1..48"):
        lift.principal_mask(W, 2, 49)
    with pytest.raises(ValueError, match="None"):
        lift.principal_mask(W, 0, 10)
    with pytest.raises(ValueError, match="2-D"):
        lift.principal_mask(torch.randn(8), 2, 3)
    p = torch.nn.Parameter(W.clone())
    with pytest.raises(ValueError, match="lift, magnitude, random"):
        lift.LIFTAdam([p], lora_rank=1, mask="movement")
    with pytest.raises(ValueError, match="hf, torch"):
        lift.LIFTAdam([p], lora_rank=1, eps_mode="adam")
    with pytest.raises(ValueError, match="largest, smallest"):
        lift.LIFTAdam([p], lora_rank=1, select="top")
    with pytest.raises(ValueError, match="update_interval"):
        lift.LIFTAdam([p], lora_rank=1, update_interval=0)
    with pytest.raises(ValueError, match="2-D"):
        lift.LIFTAdam([torch.nn.Parameter(torch.randn(5))], lora_rank=1)
    from rwlib import finetune

    with pytest.raises(ValueError, match="LIFT, Magnitude, Random"):
        finetune.prepare(TinyGPT(97, 16, 1, 32, 2), "DoRA", rank=2)
