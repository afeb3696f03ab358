"""Bone / Bat (chapter 19): identities of the block-affine adapter and a cross-check against peft's MiSS."""

import pytest
import torch
from torch import nn

from rwlib.adapters import LoRALinear, count_trainable, wrap_linears
from rwlib.methods import bone
from rwlib.methods.bone import BoneLinear, apply_bone, bat_block_grad, bat_delta, bone_block_grad, bone_delta
from rwlib.models import TinyGPT

F64 = torch.float64


def _lin(i=24, o=16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o).to(F64)


@pytest.mark.parametrize("mode,inp", [("bat", 24), ("bone", 24), ("bone", 26)])
def test_zero_init_is_identity_with_nonzero_gradient(mode, inp):
    base = _lin(inp)
    x = torch.randn(7, inp, dtype=F64)
    y0 = base(x).detach()
    a = BoneLinear(base, 4, mode)
    assert torch.count_nonzero(a.block) == 0
    y = a(x)
    assert torch.equal(y, y0)  # Delta W = 0 exactly at init
    y.pow(2).sum().backward()
    assert a.block.grad.abs().sum() > 0  # unlike LoRA's dL/dA, which is 0 at init
    assert base.weight.grad is None  # the base stays frozen


def test_lora_gradient_of_A_vanishes_where_bone_does_not():
    x = torch.randn(5, 24, dtype=F64)
    lora = LoRALinear(_lin(), 4, alpha=8)
    lora(x).pow(2).sum().backward()
    assert torch.count_nonzero(lora.A.grad) == 0
    b = BoneLinear(_lin(), 4, "bat")
    b(x).pow(2).sum().backward()
    assert torch.count_nonzero(b.block.grad) == b.block.numel()


def test_bat_delta_blockwise_definition_and_bone_special_case():
    torch.manual_seed(1)
    W = torch.randn(16, 24, dtype=F64)
    D = torch.randn(4, 4, 4, dtype=F64)
    dW = bat_delta(W, D)
    for a in range(4):
        for c in range(6):
            blk = W[4 * a:4 * a + 4, 4 * c:4 * c + 4]
            assert torch.allclose(dW[4 * a:4 * a + 4, 4 * c:4 * c + 4], blk @ D[a] + D[a], atol=1e-12)  # (B1)
    # with W = 0, Bat is Bone: block_bone[j, a r + i] = block_bat[a, i, j]
    Dbone = D.permute(2, 0, 1).reshape(4, 16)
    assert torch.allclose(bat_delta(torch.zeros_like(W), D), bone_delta(Dbone, 24), atol=0)
    B = bone.blocks(W, 4)
    assert B.shape == (4, 6, 4, 4) and torch.equal(B[2, 5], W[8:12, 20:24])


def test_block_norms_are_the_spectral_norms_of_the_frozen_blocks():
    torch.manual_seed(2)
    m = TinyGPT(97, 16, 1, 32, 4)
    apply_bone(m, 8, "bat")
    norms = bone.block_norms(m, 8)
    W = m.blocks[0].attn.proj.base.weight.detach()   # 32 x 32: the 4 x 4 blocks come after qkv's 12 x 4
    assert len(norms) == sum((a.out_features // 8) * (a.in_features // 8) for a in bone.adapters(m).values())
    assert norms[48].item() == pytest.approx(float(torch.linalg.matrix_norm(W[:8, :8], ord=2)), rel=1e-6)


@pytest.mark.parametrize("inp", [24, 26])
def test_bone_rank_at_most_r_and_adapter_forward_matches_dense(inp):
    a = BoneLinear(_lin(inp, 32), 4, "bone")
    with torch.no_grad():
        a.block.normal_()
    dW = a.delta_weight()
    assert torch.linalg.matrix_rank(dW) <= 4  # (B4) rank(Delta W) <= r
    x = torch.randn(3, 5, inp, dtype=F64)
    assert torch.allclose(a.adapter_forward(x), nn.functional.linear(x, dW), atol=1e-12)
    b = BoneLinear(_lin(24, 32), 4, "bat")
    with torch.no_grad():
        b.block.normal_()
    assert torch.linalg.matrix_rank(b.delta_weight()) > 4  # the Weight Guide lifts the rank


def test_bat_gradient_formula_matches_autograd():
    a = BoneLinear(_lin(24, 16, seed=3), 4, "bat")
    with torch.no_grad():
        a.block.normal_(0, 0.1)
    x = torch.randn(9, 24, dtype=F64)
    target = torch.randn(9, 16, dtype=F64)
    # G = dL/dW_eff for L = ||(W + Delta W) x + b - t||^2
    W_eff = (a.base.weight + a.delta_weight()).detach().requires_grad_()
    nn.functional.linear(x, W_eff, a.base.bias).sub(target).pow(2).sum().backward()
    a(x).sub(target).pow(2).sum().backward()
    expected = bat_block_grad(a.base.weight.detach(), W_eff.grad, 4)  # (B2)
    assert torch.allclose(a.block.grad, expected, atol=1e-10)
    b = BoneLinear(_lin(26, 16, seed=3), 4, "bone")  # 26 is not a multiple of 4: the padded case
    with torch.no_grad():
        b.block.normal_(0, 0.1)
    x = torch.randn(9, 26, dtype=F64)
    W_eff = (b.base.weight + b.delta_weight()).detach().requires_grad_()
    nn.functional.linear(x, W_eff, b.base.bias).sub(target).pow(2).sum().backward()
    b(x).sub(target).pow(2).sum().backward()
    assert torch.allclose(b.block.grad, bone_block_grad(W_eff.grad, 4), atol=1e-10)  # (B5)


@pytest.mark.parametrize("mode", ["bat", "bone"])
def test_merge_unmerge_exact(mode):
    a = BoneLinear(_lin(), 4, mode)
    with torch.no_grad():
        a.block.normal_(0, 0.5)
    W = a.base.weight.detach().clone()
    x = torch.randn(4, 24, dtype=F64)
    y = a(x).detach()
    dW = a.delta_weight().detach()
    a.merge()
    assert torch.allclose(a(x), y, atol=1e-12)
    assert torch.allclose(a.delta_weight(), dW, atol=1e-12)  # Delta W is still that of the original W
    a.unmerge()
    assert torch.allclose(a.base.weight, W, atol=1e-12)  # (B3) exact for Bat
    with pytest.raises(RuntimeError, match="not merged"):
        a.unmerge()


@pytest.mark.parametrize("mode,r,msg", [("bat", 5, "r=5"), ("bat", 3, "r=3"), ("bone", 30, "r=30"),
                                        ("bone", 0, "r=0")])
def test_bad_block_size_raises(mode, r, msg):
    with pytest.raises(ValueError, match=msg):
        BoneLinear(_lin(24, 16), r, mode)
    with pytest.raises(ValueError, match="unknown Bone mode 'mini'"):
        BoneLinear(_lin(), 4, "mini")


def test_apply_bone_on_tinygpt_counts_and_identity():
    m = TinyGPT(97, 16, 2, 32, 4).double()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        y0 = m(x)
    ads = apply_bone(m, 8, "bat")
    assert len(ads) == 8 and count_trainable(m) == sum(a.out_features * 8 for a in ads.values())
    with torch.no_grad():
        assert torch.equal(m(x), y0)
    assert bone.lora_rank_for(m, 8) == pytest.approx(8 * (96 + 32 + 128 + 32) / (128 + 64 + 160 + 160))


def test_registered_with_the_finetune_kit_on_a_tiny_model():
    from rwlib import finetune
    from rwlib.data.tasks import MultiplyTask, split_problems

    torch.manual_seed(0)
    base = TinyGPT(97, 16, 1, 32, 4).eval()
    task = MultiplyTask(10, 19)
    train, held = split_problems(task.all_problems(), 60, seed=0)
    assert len(train) == 60 and len(held) == 20 and not {p.prompt for p in train} & {p.prompt for p in held}
    rank = round(bone.lora_rank_for(base, 16))
    assert rank == 9 and bone.block_size_for(base, rank) == 16  # 16 * 288 / 512 = 9 -> back to 16
    for name, mode in (("Bat", "bat"), ("Bone", "bone")):
        prep = finetune.prepare(base, name, rank=rank)
        assert {a.mode for a in bone.adapters(prep.model).values()} == {mode}
        assert prep.count() == finetune.lora_count(base, rank) == count_trainable(prep.model)
    with pytest.raises(ValueError, match="no block size matches"):
        bone.block_size_for(base, 4)
    ft = finetune.finetune(base, "Bone", train, finetune.Recipe(steps=3, batch_size=4, lr=1e-2), rank=rank)
    st = bone.update_structure(ft.model, base, 16)
    assert (st["rank"] <= 16).all() and st["shared fraction"].min() > 1 - 1e-9 and len(ft.history["loss"]) == 3
    with pytest.raises(ValueError, match="unknown adaptation method 'DoRA'"):
        finetune.prepare(base, "DoRA", rank=rank)


def test_bat_fused_forward_equals_base_plus_adapter():
    """Bat's forward computes one product with W + Delta W; it equals W x + b + Delta W x (and its gradients)."""
    a = BoneLinear(_lin(24, 16), 4, "bat")
    with torch.no_grad():
        a.block.normal_(0, 0.3)
    x = torch.randn(5, 24, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = a(x)
    y2 = a.base(x2) + a.adapter_forward(x2)
    assert torch.allclose(y, y2, atol=1e-12, rtol=0)
    g1, = torch.autograd.grad(y.pow(2).sum(), a.block)
    g2, = torch.autograd.grad(y2.pow(2).sum(), a.block)
    assert torch.allclose(g1, g2, atol=1e-12, rtol=0)
    assert a.base.weight.grad is None


def test_weight_guide_lifts_bat_update_above_rank_r():
    """(B1) with a generic W: (W_{a,c} + I) D_a differs from block to block, so rank(Delta W) > r, unlike Bone's."""
    g = torch.Generator().manual_seed(3)
    a = BoneLinear(_lin(64, 32), 4, "bat")
    with torch.no_grad():
        a.block.copy_(torch.randn(a.block.shape, generator=g, dtype=F64))
    assert torch.linalg.matrix_rank(a.delta_weight()) > 4


def test_step_zero_on_tinygpt_through_the_kit():
    """Chapter 19's step-0 facts on a TinyGPT: Bat/Bone/LoRA leave the outputs unchanged, Bat's and Bone's
    gradients are non-zero, LoRA's dL/dA is exactly zero, PiSSA starts at the base to float32 precision."""
    from rwlib.data.tasks import MultiplyTask

    torch.manual_seed(0)
    base = TinyGPT(97, 16, 1, 32, 4).eval()
    problems = MultiplyTask(10, 19).all_problems()[:16]
    for method in ("Bat", "Bone", "LoRA", "PiSSA", "Full FT"):
        out = bone.init_gradients(base, method, problems, r=16, seed=0)
        assert out["lora rank"] == 9 and out["output change"] <= (1e-5 if method == "PiSSA" else 0.0), method
        assert out["grad norm"] > 0, method
        if method == "LoRA":
            assert out["grad A"] == 0.0 and out["grad B"] > 0


# ------------------------------------------------------------------------------------------------ peft
peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self, inp):
        super().__init__()
        self.fc = nn.Linear(inp, 16).to(F64)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("init,inp", [("bat", 24), (True, 24), (True, 26)])
def test_agrees_with_peft_miss(init, inp):
    torch.manual_seed(0)
    ref, ours = _Net(inp), _Net(inp)
    ours.load_state_dict(ref.state_dict())
    W0 = ref.fc.weight.detach().clone()
    pm = peft.get_peft_model(ref, peft.MissConfig(r=4, target_modules=["fc"], init_weights=init))
    layer = pm.base_model.model.fc
    ad = wrap_linears(ours, lambda l: BoneLinear(l, 4, "bat" if init == "bat" else "bone"))["fc"]
    theirs = layer.miss_block["default"]
    assert theirs.shape == ad.block.shape and torch.count_nonzero(theirs) == 0
    with torch.no_grad():  # the same random block in both
        theirs.normal_(0, 0.3)
        ad.block.copy_(theirs)
    x = torch.randn(6, inp, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = ours(x), pm(x2)
    assert torch.allclose(y1, y2, atol=1e-10, rtol=0)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    assert torch.allclose(ad.block.grad, theirs.grad, atol=1e-10, rtol=0)
    assert torch.allclose(x.grad, x2.grad, atol=1e-10, rtol=0)
    ad.merge()
    layer.merge()
    assert torch.allclose(ad.base.weight, layer.base_layer.weight, atol=1e-10, rtol=0)
    ad.unmerge()
    layer.unmerge()
    assert torch.allclose(ad.base.weight, W0, atol=1e-10, rtol=0)
    # peft inverts I + D in float32 for Bat, so its unmerge is only float32-accurate
    assert torch.allclose(layer.base_layer.weight, W0, atol=1e-10 if init is True else 1e-5, rtol=0)
