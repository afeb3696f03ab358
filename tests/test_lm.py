"""The language-model substrate: tokenizer, offline corpus, domain sampler, TinyGPT, the LM loop."""

import math

import pytest
import torch

from rwlib import train
from rwlib.data import text
from rwlib.models import TinyGPT


def test_tokenizer_round_trip_and_unknowns():
    s = "def f(x):\n    return x + 1  # ok ~"
    assert text.TOKENIZER.decode(text.TOKENIZER.encode(s)) == s
    assert text.TOKENIZER.decode(text.TOKENIZER.encode("é\t")) == "?    "
    assert text.TOKENIZER.vocab_size == 97 and int(text.TOKENIZER.encode("é")[0]) == 96


@pytest.mark.parametrize("name", sorted(text.GENERATORS))
def test_generators_are_deterministic_and_sized(name):
    a, b = text.GENERATORS[name](3000, 1), text.GENERATORS[name](3000, 1)
    assert a == b and len(a) == 3000
    assert text.GENERATORS[name](3000, 2) != a


def test_arithmetic_domains_are_correct():
    for fact in text.gen_addition(2000, 0).split(";")[:-1]:
        lhs, rhs = fact.split("=")
        a, b = lhs.split("+")
        assert int(a) + int(b) == int(rhs)
    for fact in text.gen_multiply(500, 0).split(";")[:-1]:
        lhs, rhs = fact.split("=")
        a, b = lhs.split("*")
        assert int(a) * int(b) == int(rhs)
    for expr in text.gen_grammar(2000, 0).split(";")[:-1]:
        eval(expr)  # a well-formed arithmetic expression  # noqa: S307


def test_corpus_splits_and_bad_domain():
    c = text.multidomain_corpus(["grammar", "noise"], n_chars=5000, val_frac=0.2, seed=3)
    assert len(c.train["grammar"]) == 4000 and len(c.val["grammar"]) == 1000
    c2 = text.multidomain_corpus(["grammar", "noise"], n_chars=5000, val_frac=0.2, seed=3)
    assert torch.equal(c.train["noise"], c2.train["noise"])
    with pytest.raises(ValueError, match="'poetry'.*code, prose"):
        text.multidomain_corpus(["poetry"])


def test_sampler_proportions_windows_and_bad_weights():
    toks = {"a": torch.zeros(500, dtype=torch.long), "b": torch.ones(500, dtype=torch.long),
            "c": torch.full((500,), 2, dtype=torch.long)}
    s = text.DomainSampler(toks, [0.6, 0.3, 0.1], generator=torch.Generator().manual_seed(0))
    x, y, dom = s.batch(20000, 8)
    freq = torch.bincount(dom, minlength=3).double() / len(dom)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015)
    assert torch.equal(x[:, 0], dom) and torch.equal(y, x)  # each row comes from its own domain
    s.set_weights({"c": 1.0})
    assert set(s.batch(50, 8)[2].tolist()) == {2}
    with pytest.raises(ValueError, match="bad mixture weights"):
        s.set_weights([1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="unknown domain"):
        s.set_weights({"z": 1.0})


def test_sampler_targets_are_shifted_inputs():
    toks = {"a": torch.arange(1000)}
    x, y, _ = text.DomainSampler(toks).batch(4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)


def test_tinygpt_is_causal():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 2, 32, 4).eval()
    x = torch.randint(0, 97, (3, 16))
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, 97, (3, 6))
    a, b = m(x), m(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tinygpt_loss_identities_and_tying():
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 32, 4)
    assert m.lm_head.weight is m.tok_emb.weight
    x, y = torch.randint(0, 97, (5, 16)), torch.randint(0, 97, (5, 16))
    ell, n = m.per_sample_loss(x, y)
    full = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
    assert torch.allclose(train.token_weighted_mean(ell, n), full, atol=1e-6)
    mask = torch.zeros(5, 16)
    mask[:, :4] = 1
    ellm, nm = m.per_sample_loss(x, y, mask)
    assert torch.equal(nm, torch.full((5,), 4.0))
    assert torch.allclose(ellm, m.token_losses(x, y)[:, :4].mean(1), atol=1e-6)
    # an untrained model predicts nearly uniformly: loss close to log(vocab)
    assert abs(full.item() - math.log(97)) < 0.1


def test_generate_batched_reproducible_and_greedy():
    torch.manual_seed(0)
    m = TinyGPT(97, 8, 1, 16, 2)
    prompt = torch.randint(0, 97, (4, 3))
    a = m.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 15) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    g = m.generate(prompt, 3, temperature=0)
    assert torch.equal(g[:, 3], m(prompt)[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 1, temperature=-1)


def test_fit_lm_learns_and_calls_hook_with_domains():
    c = text.multidomain_corpus(["repeat", "noise"], n_chars=6000, seed=0)
    s = text.DomainSampler(c.train, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = TinyGPT(97, 16, 1, 32, 4)
    seen = []

    def hook(step, ell, n, dom):
        seen.append((step, ell.shape, dom.shape))
        return train.token_weighted_mean(ell, n), {"hooked": 1.0}

    h = train.fit_lm(m, s, steps=60, batch_size=8, block=16, optimizer=torch.optim.AdamW(m.parameters(), 3e-3),
                     loss_hook=hook, val=c.val, eval_every=30, n_eval_windows=8, step_offset=100)
    assert seen[0] == (100, torch.Size([8]), torch.Size([8])) and h.series("loss")[0][0] == 101
    assert h.last("val_repeat") < h["val_repeat"][0] and h.last("val_repeat") < h.last("val_noise")
    assert "hooked" in h.keys()


def test_benchmark_compares_equal_sized_models():
    from rwlib.bench import PlainGPT, train_throughput

    a, b = TinyGPT(97, 8, 1, 16, 2), PlainGPT(97, 8, 1, 16, 2)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    assert b(torch.randint(0, 97, (2, 8))).shape == (2, 8, 97)
    assert train_throughput(a, 2, 8, steps=2, warmup=1) > 0
