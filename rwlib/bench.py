"""Benchmarks (not tests).

- ``python -m rwlib.bench`` measures TinyGPT's training throughput against the same architecture written plainly
  with ``torch.nn.TransformerEncoderLayer`` and writes ``data/results/tinygpt_throughput.json``.
- ``python -m rwlib.bench peers`` times each of the book's methods that has an independent implementation against
  it, side by side in one process at one thread, in alternating rounds (ours, peer, ours, peer, ...), and writes
  the median ratio ours/peer and its spread over the rounds to ``data/results/peer_timings.json``: AdamP and SGDP
  (the ``adamp`` package), LoRA and Bat (``peft``), the GRPO loss (TRL's loss expression, with and without
  verl's log-ratio guard), and LIFT's sparse Adam (against dense AdamW: on bare matrices with and without its
  mask refresh, and in chapter 20's fine-tuning steps). ``python -m rwlib.bench table`` prints the recorded
  timings as the README's markdown table (a test keeps the two equal).

Speed targets live here and in recorded figures, never in timed unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import write_json_atomic
from .models import TinyGPT


class PlainGPT(nn.Module):
    """The TinyGPT architecture from stock parts: ``nn.TransformerEncoderLayer`` (pre-norm, GELU, 4x MLP) with a
    causal mask, learned positions and tied embeddings. Same parameter count as :class:`rwlib.models.TinyGPT`."""

    def __init__(self, vocab_size: int, block_size: int = 64, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        T = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T))
        return self.lm_head(self.ln_f(self.encoder(x, mask=mask, is_causal=True)))


def train_throughput(model: nn.Module, batch: int, block: int, steps: int = 30, warmup: int = 5,
                     vocab: int = 97) -> float:
    """Tokens per second of full training steps (forward, backward, AdamW step) on random tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), generator=g)
    y = torch.randint(0, vocab, (batch, block), generator=g)

    def step():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * block * steps / (time.perf_counter() - t0)


def tinygpt_benchmark(configs=((16, 32, 2, 64), (32, 64, 2, 64), (32, 128, 4, 128)), threads: int = 1,
                      repeats: int = 3) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for batch, block, layers, width in configs:
        res = {}
        for name, cls in (("TinyGPT", TinyGPT), ("TransformerEncoderLayer", PlainGPT)):
            torch.manual_seed(0)
            m = cls(97, block, layers, width, 4)
            res[name] = max(train_throughput(m, batch, block) for _ in range(repeats))
        rows.append({"batch": batch, "block": block, "n_layer": layers, "n_embd": width,
                     "tinygpt_tok_s": round(res["TinyGPT"]), "plain_tok_s": round(res["TransformerEncoderLayer"]),
                     "speedup": round(res["TinyGPT"] / res["TransformerEncoderLayer"], 3)})
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = ""
    return {"benchmark": "TinyGPT training throughput vs nn.TransformerEncoderLayer", "threads": threads,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpu_count": __import__("os").cpu_count(),
            "git": rev, "rows": rows}


# ---------------------------------------------------------------------------------------------- peers
def _alternate(ours, peer, rounds: int, reps: int) -> dict:
    """Median ratio (ours / peer) of ``reps`` calls each, over ``rounds`` alternating rounds, with the 10th and
    90th percentiles of the per-round ratios and the median times per call."""
    import statistics

    for f in (ours, peer):  # warm up
        f()
    t_o, t_p, ratios = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            ours()
        t1 = time.perf_counter()
        for _ in range(reps):
            peer()
        t2 = time.perf_counter()
        t_o.append((t1 - t0) / reps)
        t_p.append((t2 - t1) / reps)
        ratios.append((t1 - t0) / (t2 - t1))
    q = statistics.quantiles(ratios, n=10)
    return {"ratio": round(statistics.median(ratios), 3), "ratio_p10": round(q[0], 3), "ratio_p90": round(q[-1], 3),
            "ours_ms": round(1e3 * statistics.median(t_o), 3), "peer_ms": round(1e3 * statistics.median(t_p), 3),
            "rounds": rounds, "reps": reps}


def _optimizer_case(ours_cls, peer_cls, **kw):
    def make(cls):
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(s, generator=g)) for s in ((64, 32, 3, 3), (128, 64, 3, 3), (256, 512),
                                                                     (512,), (10, 256))]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt = cls(ps, **kw)
        return opt.step
    return make(ours_cls), make(peer_cls)


def _adapter_fwd_bwd(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).pow(2).mean().backward()
    return step


def peer_cases(rounds: int = 21, reps: float = 1.0) -> list[dict]:
    """Every method with a peer, timed against it (see the module docstring); ``reps`` scales the calls per
    round (a smoke test uses fewer)."""
    calls = lambda k: max(1, round(k * reps))  # noqa: E731
    import adamp as adamp_pkg
    import peft

    from .adapters import LoRALinear, wrap_linears
    from .methods import adamp as ours_adamp
    from .methods import lift as ours_lift
    from .methods.bone import BoneLinear
    from .rl.losses import clipped_pg_loss

    rows = []
    o, p = _optimizer_case(ours_adamp.AdamP, adamp_pkg.AdamP, lr=1e-3, weight_decay=1e-4)
    rows.append({"method": "AdamP step", "peer": "adamp.AdamP", **_alternate(o, p, rounds, calls(20))})
    o, p = _optimizer_case(ours_adamp.SGDP, adamp_pkg.SGDP, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    rows.append({"method": "SGDP step", "peer": "adamp.SGDP", **_alternate(o, p, rounds, calls(20))})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(256, 256)

        def forward(self, x):
            return self.fc(x)

    x = torch.randn(64 * 16, 256, generator=torch.Generator().manual_seed(1))
    for name, ours_factory, peer_cfg in (
            ("LoRA r=8 forward+backward", lambda l: LoRALinear(l, 8, alpha=16),
             peft.LoraConfig(r=8, lora_alpha=16, target_modules=["fc"], lora_dropout=0.0)),
            ("Bat r=8 forward+backward", lambda l: BoneLinear(l, 8, "bat"),
             peft.MissConfig(r=8, target_modules=["fc"], init_weights="bat"))):
        ours_net = Net()
        ad = wrap_linears(ours_net, ours_factory)["fc"]
        peer_net = peft.get_peft_model(Net(), peer_cfg)
        with torch.no_grad():  # a non-zero adapter in both, so no branch is skipped
            for q in ad.trainable_parameters():
                q.normal_(0, 0.02)
            for n, q in peer_net.named_parameters():
                if q.requires_grad:
                    q.normal_(0, 0.02)
        rows.append({"method": name, "peer": f"peft {type(peer_cfg).__name__}",
                     **_alternate(_adapter_fwd_bwd(ours_net, x), _adapter_fwd_bwd(peer_net, x), rounds, calls(5))})

    g = torch.Generator().manual_seed(2)
    N, T = 128, 16
    logits = torch.randn(N, T, generator=g, requires_grad=True)
    old = (logits.detach() + 0.1 * torch.randn(N, T, generator=g))
    adv = torch.randn(N, generator=g)
    mask = (torch.rand(N, T, generator=g) < 0.8).float()

    def ours_loss(guard=20.0):
        loss, _ = clipped_pg_loss(logits, old, adv, mask, eps_low=0.2, eps_high=0.28, with_metrics=False,
                                  log_ratio_clamp=guard)
        loss.backward()

    def trl_loss():  # TRL GRPOTrainer's loss expression, token mean over the batch (its "bnpo" aggregation)
        coef_1 = torch.exp(logits - old)
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
        per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        loss.backward()

    rows.append({"method": "GRPO clipped loss forward+backward (verl's +-20 log-ratio guard)",
                 "peer": "TRL's loss expression", **_alternate(ours_loss, trl_loss, rounds, calls(50))})
    rows.append({"method": "GRPO clipped loss forward+backward (no guard, as TRL)", "peer": "TRL's loss expression",
                 **_alternate(lambda: ours_loss(None), trl_loss, rounds, calls(50))})

    S = 50 if reps >= 1 else 5   # steps per call, one mask refresh among them (the chapter refreshes every 50)

    def lift_case(dense: bool, interval: int | None = S):
        gg = torch.Generator().manual_seed(3)
        ws = [nn.Parameter(torch.randn(256, 256, generator=gg) * 0.05) for _ in range(4)]
        grads = [torch.randn(256, 256, generator=gg) for _ in ws]
        opt = (torch.optim.AdamW(ws, lr=1e-3, weight_decay=0.0) if dense else
               ours_lift.LIFTAdam(ws, lr=1e-3, lora_rank=4, filter_rank=4, update_interval=interval))

        def steps():  # S steps: one mask refresh for LIFT, as in the chapter's schedule
            for _ in range(S):
                for w, gr in zip(ws, grads):
                    w.grad = gr
                opt.step()
        return steps

    lift_rounds = max(5, rounds // 3) if reps >= 1 else rounds
    rows.append({"method": "LIFT 50 steps incl. 1 mask refresh (4 x 256x256)", "peer": "torch AdamW (dense)",
                 **_alternate(lift_case(False), lift_case(True), lift_rounds, 1)})
    rows.append({"method": "LIFT 50 steps, masks fixed (4 x 256x256)", "peer": "torch AdamW (dense)",
                 **_alternate(lift_case(False, None), lift_case(True), lift_rounds, 1)})

    def lift_finetune(method: str):
        """Chapter 20's setting: 50 fine-tuning steps (forward, backward, optimizer; one mask refresh) of
        TinyGPT's block linears, width 64, batch 32 x 24 tokens."""
        from .finetune import Recipe, prepare

        gg = torch.Generator().manual_seed(4)
        prep = prepare(TinyGPT(97, 32, 2, 64, 4), "LIFT", rank=4, seed=0, update_interval=S)  # block linears
        model, recipe = prep.model, Recipe(steps=50, batch_size=32, lr=1e-3, betas=(0.9, 0.95))
        opt = (prep.make_optimizer(recipe) if method == "LIFT" else
               torch.optim.AdamW(prep.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0))
        x = torch.randint(0, 97, (32, 24), generator=gg)

        def steps():
            for _ in range(S):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
                opt.step()
        return steps

    rows.append({"method": "LIFT fine-tuning, 50 steps incl. 1 refresh (TinyGPT block linears)",
                 "peer": "torch AdamW on the same linears",
                 **_alternate(lift_finetune("LIFT"), lift_finetune("AdamW"), lift_rounds, 1)})
    return rows


def _best_ms(f, repeat: int = 5) -> float:
    """The fastest of ``repeat`` calls, in ms (single calls: the minimum is the least noisy estimate)."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return round(1e3 * best, 2)


def randomized_mask_agreement(niters=(4, 16), rank: int = 4, oversample: int = 10) -> list[dict]:
    """Would a randomized SVD (``torch.svd_lowrank``) select LIFT's masks? For the bench's 256x256 matrices and
    the real MiniLM's layer-0 matrices: the gap sigma_r / sigma_(r+1) and the Jaccard overlap of the mask from
    the randomized rank-r approximation with the exact one, per number of power iterations."""
    from .methods import lift as ours_lift

    mats = {"Gaussian 256x256 (bench)": torch.randn(256, 256, generator=torch.Generator().manual_seed(3)) * 0.05}
    mats.update({f"MiniLM {k}": v for k, v in ours_lift.minilm_linears(layers=[0]).items()
                 if k.endswith(("query", "intermediate.dense", "output.dense")) and "attention.output" not in k})
    rows = []
    for name, W in mats.items():
        k = ours_lift.lift_budget(W.shape, rank)
        exact = ours_lift.principal_mask(W, rank, k)
        S = torch.linalg.svdvals(W.double())
        row = {"matrix": name, "shape": list(W.shape), "gap": round(float(S[rank - 1] / S[rank]), 4)}
        row["exact_ms"] = _best_ms(lambda: ours_lift.principal_mask(W, rank, k))

        def randomized(it):
            torch.manual_seed(0)
            U, Sr, V = torch.svd_lowrank(W.double(), q=rank + oversample, niter=it)
            return ours_lift._topk_mask(((U[:, :rank] * Sr[:rank]) @ V[:, :rank].T).abs(), k, "largest")

        for it in niters:
            row[f"jaccard_niter{it}"] = round(ours_lift.jaccard(exact, randomized(it)), 3)
            row[f"ms_niter{it}"] = _best_ms(lambda: randomized(it))
        rows.append(row)
    return rows


def peers_benchmark(threads: int = 1, rounds: int = 21) -> dict:
    torch.set_num_threads(threads)
    return {"benchmark": "ours / peer, alternating rounds in one process", "threads": threads,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "git": _git_rev(),
            "processor": platform.processor() or platform.machine(), "rows": peer_cases(rounds),
            "lift_randomized_svd": randomized_mask_agreement()}


def markdown_table(result: dict) -> str:
    """The README's table of a :func:`peers_benchmark` result."""
    lines = ["| what | peer | ours / peer | ms per call (ours vs peer) |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['peer']} | {r['ratio']:.2f} ({r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}) "
                     f"| {r['ours_ms']:.3g} vs {r['peer_ms']:.3g} |")
    rand = result.get("lift_randomized_svd")
    if rand:
        its = [k.removeprefix("jaccard_niter") for k in rand[0] if k.startswith("jaccard_niter")]
        lines += ["", "| LIFT mask from a randomized SVD: matrix | σ4/σ5 | exact mask, ms | "
                  + " | ".join(f"{i} power iterations: Jaccard with the exact mask, ms" for i in its) + " |",
                  "|---|---|---|" + "---|" * len(its)]
        for r in rand:
            lines.append(f"| {r['matrix']}, {r['shape'][0]}x{r['shape'][1]} | {r['gap']:.3f} | {r['exact_ms']:.3g} | "
                         + " | ".join(f"{r['jaccard_niter' + i]:.3f}, {r['ms_niter' + i]:.3g}" for i in its) + " |")
    return "\n".join(lines)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwlib.bench", description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", default="tinygpt", choices=("tinygpt", "peers", "table"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=21, help="alternating rounds of the peer timings")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = Path(__file__).resolve().parent.parent / "data" / "results"
    if args.what == "table":
        print(markdown_table(json.loads(Path(args.out or results / "peer_timings.json").read_text())))
        return 0
    if args.what == "peers":
        result = peers_benchmark(args.threads, args.rounds)
        for r in result["rows"]:
            print(f"{r['method']:<50} ours/peer {r['ratio']:.3f} (p10 {r['ratio_p10']:.3f}, p90 {r['ratio_p90']:.3f})"
                  f"  {r['ours_ms']:.3f} ms vs {r['peer_ms']:.3f} ms  [{r['peer']}]")
        out = Path(args.out or results / "peer_timings.json")
        write_json_atomic(out, result)
        print(f"wrote {out}")
        return 0
    args.out = args.out or str(results / "tinygpt_throughput.json")
    result = tinygpt_benchmark(threads=args.threads)
    for r in result["rows"]:
        print(f"B={r['batch']:<3} T={r['block']:<4} layers={r['n_layer']} d={r['n_embd']:<4} "
              f"TinyGPT {r['tinygpt_tok_s']:>8} tok/s   TransformerEncoderLayer {r['plain_tok_s']:>8} tok/s   "
              f"x{r['speedup']}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
