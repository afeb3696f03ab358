"""Unit tests of rwlib's substrate: repro, data, augment, models, train, ssl, claims, registry, viz."""

import json
import math
import os

import numpy as np
import pytest
import torch

from rwlib import claims, data, models, repro, ssl, train
from rwlib.data import registry


# ------------------------------------------------------------------------------------------------ repro
def test_resolve_mode_and_bad_mode():
    assert repro.resolve_mode("quick") == "quick"
    assert repro.resolve_mode("auto") == ("full" if torch.cuda.is_available() else "quick")
    with pytest.raises(ValueError, match="'fast'.*quick, full, auto"):
        repro.resolve_mode("fast")


@pytest.mark.parametrize("bad", [-1, "x", 1.5, 2**32, True])
def test_bad_seed_is_refused(bad):
    with pytest.raises(ValueError, match="bad seed"):
        repro.check_seed(bad)


def test_setup_sizes_and_determinism():
    run = repro.setup("quick", 3, quick=dict(steps=5), full=dict(steps=500))
    assert run.sizes.steps == 5 and run.seed == 3 and run.device.type == "cpu"
    a = torch.randn(3)
    repro.setup("quick", 3, quick=dict(steps=5), full=dict(steps=500))
    assert torch.equal(a, torch.randn(3))
    with pytest.raises(ValueError, match="same keys"):
        repro.setup("quick", 0, quick=dict(steps=5), full=dict(epochs=5))


# ------------------------------------------------------------------------------------------------ data
def test_digits_and_mnist1d_offline_shapes():
    d = data.load("digits")
    assert d.X.shape == (1797, 1, 8, 8) and float(d.X.max()) <= 1.0 and d.n_classes == 10
    state = np.random.get_state()[1].copy()
    m = data.load("mnist1d", num_samples=1000)
    assert m.X.shape == (1000, 1, 40) and set(m.y.tolist()) == set(range(10))
    assert np.array_equal(state, np.random.get_state()[1]), "mnist1d must not change numpy's global RNG"
    with pytest.raises(ValueError, match="'cifar'.*digits, mnist1d"):
        data.load("cifar")


def test_few_label_split_is_stratified_disjoint_and_deterministic():
    d = data.load("digits")
    a = data.few_label_split(d, 4, 360, seed=1)
    b = data.few_label_split(d, 4, 360, seed=1)
    assert torch.equal(a.labeled.X, b.labeled.X)
    assert torch.bincount(a.labeled.y, minlength=10).tolist() == [4] * 10
    assert len(a.labeled) + len(a.unlabeled) + len(a.test) == len(d)
    assert torch.bincount(a.test.y, minlength=10).tolist() == [36] * 10
    keys = lambda ds: {tuple(x.flatten().tolist()) for x in ds.X}  # noqa: E731
    assert not (keys(a.labeled) & keys(a.test))


@pytest.mark.parametrize("shape", [(7, 1, 8, 8), (7, 1, 40)])
def test_views_shape_determinism_and_shift(shape):
    x = torch.rand(shape)
    w1 = data.weak_view(x, torch.Generator().manual_seed(0))
    w2 = data.weak_view(x, torch.Generator().manual_seed(0))
    assert w1.shape == x.shape and torch.equal(w1, w2)
    s = data.strong_view(x, torch.Generator().manual_seed(0))
    assert s.shape == x.shape and not torch.allclose(s, x)
    # a weak view is a shifted copy: every output value is an input value or zero padding
    vals = set(x.flatten().tolist()) | {0.0}
    assert set(w1.flatten().tolist()) <= vals


def test_weak_view_shift_moves_a_single_pixel_by_at_most_one():
    x = torch.zeros(200, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    w = data.weak_view(x, torch.Generator().manual_seed(0))
    pos = w.flatten(1).argmax(1)
    r, c = pos // 8, pos % 8
    assert (r - 4).abs().max() <= 1 and (c - 4).abs().max() <= 1
    assert len(set(zip(r.tolist(), c.tolist()))) == 9  # all nine shifts occur


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_small_cnn_shapes_and_scale_invariance(shape):
    torch.manual_seed(0)
    m = models.SmallCNN(shape, 10, (4, 8), 16, bn=True)
    x = torch.randn(32, *shape)
    out = m(x)
    assert out.shape == (32, 10) and m.features(x).shape == (32, 16)
    with torch.no_grad():
        m.body[0].weight.mul_(3.0)  # a BN-followed weight: the output must not change
    assert torch.allclose(m(x), out, atol=1e-4)


def test_mlp():
    m = models.MLP(4, (8, 8), 3, bn=True)
    assert m(torch.randn(5, 4)).shape == (5, 3)


# ------------------------------------------------------------------------------------------------ train
def test_fit_learns_and_weight_fn_sees_per_sample_losses():
    d = data.gaussian_blobs(400, 3, dim=2, sep=4.0, seed=0)
    seen = []

    def weight_fn(losses, idx, step):
        seen.append((losses.shape, idx.shape))
        return torch.ones_like(losses)

    torch.manual_seed(0)
    m = models.MLP(2, (16,), 3)
    h = train.fit(m, d.X, d.y, steps=150, batch_size=32, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                  generator=torch.Generator().manual_seed(0), weight_fn=weight_fn, eval_data=(d.X, d.y),
                  eval_every=50)
    assert seen[0] == (torch.Size([32]), torch.Size([32])) and len(seen) == 150
    assert h.last("test_acc") > 0.9 and h["loss"][-10:].mean() < h["loss"][:10].mean()
    assert len(h["test_acc"]) == 3


def test_zero_weights_freeze_training():
    d = data.gaussian_blobs(64, 2, seed=1)
    m = models.MLP(2, (4,), 2)
    before = [p.detach().clone() for p in m.parameters()]
    train.fit(m, d.X, d.y, steps=5, batch_size=8, optimizer=torch.optim.SGD(m.parameters(), lr=1.0),
              generator=torch.Generator().manual_seed(0), weight_fn=lambda l, i, t: torch.zeros_like(l))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_batches_cover_every_item_each_epoch():
    b = train.Batches(10, 5, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([b.next(), b.next()]).tolist()) == list(range(10))


def test_model_ema_update():
    m = torch.nn.Linear(2, 1)
    ema = train.ModelEMA(m, 0.9)
    with torch.no_grad():
        m.weight.add_(1.0)
    old = ema.module.weight.clone()
    ema.update(m)
    assert torch.allclose(ema.module.weight, 0.9 * old + 0.1 * m.weight)
    with pytest.raises(ValueError, match="decay"):
        train.ModelEMA(m, 1.5)


def test_history_series_and_frame():
    h = train.History()
    h.log(1, loss=torch.tensor(2.0))
    h.log(2, loss=1.0, acc=0.5)
    assert h["loss"].tolist() == [2.0, 1.0] and h.last("acc") == 0.5
    assert set(h.frame(method="x").columns) == {"step", "metric", "value", "method"}
    with pytest.raises(KeyError, match="recorded"):
        h["nope"]


# ------------------------------------------------------------------------------------------------ ssl
def test_fixmatch_losses_against_manual():
    torch.manual_seed(0)
    lx, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    p = torch.softmax(3 * torch.randn(8, 5), 1)
    ls = torch.randn(8, 5)
    L_x, L_u, mask = ssl.fixmatch_losses(lx, y, p, ls, tau=0.7)
    m = (p.max(1).values >= 0.7).float()
    manual = sum(m[i] * -torch.log_softmax(ls[i], 0)[p[i].argmax()] for i in range(8)) / 8
    assert torch.allclose(L_u, manual) and torch.equal(mask, m)
    assert torch.allclose(L_x, torch.nn.functional.cross_entropy(lx, y))


def test_distribution_alignment_normalises_and_flattens_bias():
    da = ssl.DistributionAlignment(3, queue_len=4)
    p = torch.tensor([[0.8, 0.1, 0.1]]).repeat(16, 1)
    for _ in range(4):
        q = da(p)
    assert torch.allclose(q.sum(1), torch.ones(16))
    assert torch.allclose(q, torch.full_like(q, 1 / 3), atol=1e-6)  # a constant bias is divided out


def test_train_ssl_smoke():
    d = data.load("digits")
    split = data.few_label_split(d, 2, 100, seed=0)
    cfg = ssl.SSLConfig(steps=3, batch=8, mu=2, widths=(2, 4), feat_dim=8, eval_every=3)
    hist, model = ssl.train_ssl(split, cfg, seed=0)
    assert {"mask_ratio", "test_acc", "loss"} <= hist.keys()


# ------------------------------------------------------------------------------------------------ claims
def test_ledger_relations_and_atomic_json(tmp_path, monkeypatch):
    monkeypatch.setenv("RWLIB_LEDGER_DIR", str(tmp_path))
    led = claims.Ledger(24, mode="quick", seed=0)
    assert led.check("a", source="Table 1", paper="p", ours=2.0, relation=">=", target=1.0).held
    assert not led.check("b", source="Fig. 2", paper="p", ours=0.4, relation=">", target=0.5).held
    assert not led.check("c", source="Sec. 3", paper="p", ours=float("nan"), relation="<=", target=1.0).held
    assert led.check("d", source="abstract", paper="p", ours=1.05, relation="~=", target=1.0, tol=0.1,
                     paper_value=1.0).held
    with pytest.raises(ValueError, match="'!='.*>="):
        led.check("e", source="Table 1", paper="p", ours=1, relation="!=", target=1)
    with pytest.raises(ValueError, match="twice"):
        led.check("a", source="Table 1", paper="p", ours=1, relation=">=", target=0)
    with pytest.raises(ValueError, match="needs source="):
        led.check("f", source=" ", paper="p", ours=1, relation=">=", target=0)
    led.finish()
    saved = json.loads((tmp_path / "24-adamp.json").read_text())
    assert [c["held"] for c in saved["claims"]] == [True, False, False, True]
    assert saved["claims"][3]["paper_value"] == 1.0 and saved["claims"][1]["source"] == "Fig. 2"
    assert saved["mode"] == "quick" and "wall_s" in saved
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert "2/4 paper claims held" in led.summary()


def test_better_is_strict_paired_and_reports_the_floor():
    led = claims.Ledger(24, mode="quick", seed=0)
    tie = led.better("tie", source="Table 2", paper="p", method=[0.8, 0.8, 0.9], baseline=[0.8, 0.8, 0.9])
    assert not tie.held and tie.status == "not held"                      # a tie is never a win
    small = led.better("noisy", source="Table 2", paper="p", method=[0.9, 0.5, 0.9], baseline=[0.6, 0.7, 0.6])
    assert small.ours > 0 and not small.held                              # inside 2 standard errors
    clear = led.better("clear", source="Table 2", paper="p", method=[0.9, 0.91, 0.92], baseline=[0.5, 0.5, 0.52])
    assert clear.held and clear.margin > 0 and "wins 3/3" in clear.note
    low = led.better("lower loss", source="Fig. 1", paper="p", method=[1.0, 1.1], baseline=[2.0, 2.2], higher=False)
    assert low.held and low.ours > 0
    floor = led.better("floor", source="Table 3", paper="p", method=[0.02, 0.03], baseline=[0.0, 0.01], floor=0.05)
    assert floor.status == "inconclusive" and not floor.held
    ctrl = led.check("control", source=claims.CONTROL, paper="-", ours=1.0, relation=">", target=0.0)
    assert ctrl.control and "1/1 controls" in led.summary() and "2/5 paper claims held" in led.summary()
    table = led.frame(sweep=None)
    assert "inconclusive" in set(table["held"]) and table["claim"].iloc[-1] == "control (control)"


def test_fmt_three_significant_digits():
    assert claims.fmt(0.2125514903028) == "0.213" and claims.fmt(2.0) == "2" and claims.fmt(12345.6) == "1.23e+04"
    assert claims.fmt(float("nan")) == "nan" and claims.fmt(True) == "True"

def _entry(tmp_path, payload: bytes, digest: str):
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    return {"toy": registry.Entry(src.as_uri(), "toy.bin", digest)}


def test_fetch_verifies_and_caches(tmp_path):
    import hashlib

    payload = b"rwlib" * 100
    reg = _entry(tmp_path, payload, hashlib.sha256(payload).hexdigest())
    path = registry.fetch("toy", directory=tmp_path / "cache", registry=reg)
    assert path.read_bytes() == payload
    path.write_bytes(b"corrupt")  # a corrupt cached copy is detected and fetched again
    assert registry.fetch("toy", directory=tmp_path / "cache", registry=reg).read_bytes() == payload


def test_fetch_bad_checksum_leaves_nothing(tmp_path):
    reg = _entry(tmp_path, b"abc", "0" * 64)
    with pytest.raises(registry.ChecksumError, match="does not match"):
        registry.fetch("toy", directory=tmp_path / "cache", registry=reg)
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_offline_error_and_unknown_name(tmp_path):
    # loopback port 9 refuses the connection: the same failure path as having no network
    reg = {"toy": registry.Entry("http://127.0.0.1:9/none.bin", "none.bin", "0" * 64)}
    with pytest.raises(registry.OfflineError, match="cannot download 'toy'"):
        registry.fetch("toy", directory=tmp_path, registry=reg, timeout=0.5)
    with pytest.raises(ValueError, match="'mnist'.*cifar10"):
        registry.fetch("mnist", directory=tmp_path)


def test_glue_gets_plain_numbers():
    """myst-nb formats glued numbers from their text; np.float64(0.25) would not parse."""
    assert repr(claims.plain(np.float64(0.25))) == "0.25" and claims.plain(torch.tensor(3.0)) == 3.0
    assert type(claims.plain(np.int64(4))) is int and claims.plain("x") == "x"
    assert isinstance(claims.plain(torch.zeros(2)), torch.Tensor)  # not a scalar: unchanged


def test_glue_all_glues_each_keyword(monkeypatch):
    seen = []
    monkeypatch.setattr(claims, "glue", lambda name, value, display=False: seen.append((name, value, display)))
    claims.glue_all(acc=np.float64(0.5), n=3)
    assert seen == [("acc", 0.5, False), ("n", 3, False)]
