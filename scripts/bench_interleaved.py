"""Engine vs CrossEncoder.predict with the runs interleaved: the fair comparison on a shared, noisy machine.

`jobs.bench` times each configuration's repeats back to back, so a slow spell of a shared box can land on
one runner only (seen here: the same command gave the packed engine 1.23x, then 1.65x). This script builds
every runner once, warms each, then times them in rounds: anchor, engine A, engine B, anchor, ... Each round
gives each engine a ratio against the anchor pass right beside it; the table reports the median of those.

    python -m scripts.bench_interleaved                       # MiniLM-L6 shape, 2,000 mixed pairs, 5 rounds
    python -m scripts.bench_interleaved --model bert-base --mix nq --pairs 1000 --rounds 3 --device cuda --dtype float16

Random weights from `jobs.bench_models` (or a local folder); pairs from `jobs.bench_data`. Writes every
pass to --out as JSON when given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", help="a jobs.bench_models shape or a local model folder")
    ap.add_argument("--mix", default="mixed")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--engine", nargs="+", default=["packed", "padded"],
                    choices=["packed", "padded", "packed-compiled", "padded-compiled", "packed-aten"],
                    help="engine runners; -compiled: torch.compile'd, warmed up (compiled) before any timing; "
                         "-aten: Linear layers on plain F.linear, not oneDNN-prepacked (kernels/linear.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=None, help="engine token budget (default: the engine's)")
    ap.add_argument("--anchor-batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="write every timed pass here (JSON)")
    args = ap.parse_args()

    from jobs.bench import Bench, make_cross_encoder
    from kernels.config import EngineConfig
    from kernels.engine import Engine

    bench = Bench(device=args.device, repeats=1)
    bundle = bench.model(args.model)
    pairs = bench.pairs(args.mix, args.pairs, args.candidates)
    n = len(pairs.queries)
    real_tokens = int(bench.lengths(bundle, pairs).sum())
    ce, _ = make_cross_encoder(bench.ce_path(bundle), bench.device, args.dtype, bundle.max_length)
    items = [[q, d] for q, d in zip(pairs.queries, pairs.docs)]
    bs = args.anchor_batch_size
    runners = {"anchor": lambda: np.asarray(ce.predict(items, batch_size=bs, show_progress_bar=False), np.float32)}
    for name in args.engine:
        kind, _, variant = name.partition("-")
        eng = Engine.from_model(bundle.model, bundle.tokenizer, EngineConfig(
            device=args.device, dtype=args.dtype, engine=kind, max_batch_tokens=args.budget, max_length=bundle.max_length,
            compile=variant == "compiled"))
        if variant == "aten":
            eng.packed.set_linear_backend("aten")
        eng.warmup()
        runners[name] = (lambda e: lambda: e.score(pairs.queries, pairs.docs)[0])(eng)
    for fn in runners.values():  # one untimed pass each: caches, allocator, thread pools
        fn()

    passes, scores = [], {}
    for r in range(args.rounds):
        for name, fn in runners.items():
            t = time.perf_counter()
            scores[name] = fn()
            wall = time.perf_counter() - t
            passes.append({"round": r, "runner": name, "wall_s": wall, "pairs_per_s": n / wall})
        line = ", ".join(f"{p['runner']} {p['pairs_per_s']:,.1f}" for p in passes[-len(runners):])
        print(f"round {r + 1}/{args.rounds}: {line} pairs/s", flush=True)

    def pps(name: str, r: int) -> float:
        return next(p["pairs_per_s"] for p in passes if p["round"] == r and p["runner"] == name)

    print(f"\n{args.model}, {args.mix}, {n:,} pairs ({real_tokens / n:.0f} tokens a pair), {args.dtype} on "
          f"{args.device}, {args.rounds} interleaved rounds; anchor = CrossEncoder.predict(batch_size={bs})")
    print(f"{'runner':<16} {'pairs/s':>9} {'x anchor':>9}  per-round ratios to the anchor pass beside it    "
          f"max |diff| vs anchor")
    for name in runners:
        rates = [pps(name, r) for r in range(args.rounds)]
        ratios = [pps(name, r) / pps("anchor", r) for r in range(args.rounds)]
        diff = float(np.abs(scores[name] - scores["anchor"]).max())
        print(f"{name:<16} {statistics.median(rates):>9,.1f} {statistics.median(ratios):>8.2f}x  "
              f"{', '.join(f'{x:.2f}' for x in ratios):<46} {diff:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "pairs": n, "real_tokens": real_tokens, "passes": passes}, f, indent=1)


if __name__ == "__main__":
    main()
