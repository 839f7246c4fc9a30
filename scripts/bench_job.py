"""The job around the engine: does `jobs.rerank` keep the engine busy? (issue target: >= 0.85x)

Measures, on the same model and the same pairs, side by side in one run:
  engine   in-process `Engine.score` pairs/s (the anchor of this comparison; model load apart)
  job      `python -m jobs.rerank` pairs/s over the time after the first actor was ready (Ray start-up,
           actor start and model load reported apart), ranking pass included

    python -m scripts.bench_job [--pairs 20000] [--shape tinybert-l2] [--mix msmarco] [--repeats 3]

The two alternate (engine, job, engine, job, ...) so a slow spell of a shared machine hits both; the table
gives medians and the ratio of each adjacent pair.

Random weights (the shape of cross-encoder/ms-marco-TinyBERT-L2-v2 by default, fast enough for a CPU box);
the pairs and tokenizer come from jobs.bench_data, so lengths are realistic.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHAPES = {
    "tinybert-l2": dict(family="bert", hidden=128, layers=2, heads=2, intermediate=512, vocab=30522, positions=512),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--shape", default="tinybert-l2", help=f"{list(SHAPES)} or a jobs.bench_models shape")
    ap.add_argument("--mix", default="msmarco")
    ap.add_argument("--shard-rows", type=int, default=5_000)
    ap.add_argument("--repeats", type=int, default=3, help="engine/job rounds, alternating")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crossrank-bench-job-"))
    try:
        _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> None:
    from jobs.bench_data import build_tokenizer, make_pairs
    from jobs.bench_models import build_model
    from kernels.engine import Engine

    shape = SHAPES.get(args.shape, args.shape)
    tokenizer = build_tokenizer("wordpiece")
    model_dir = work / "model"
    build_model(shape, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs = make_pairs(args.pairs, mix=args.mix)
    n = len(pairs)
    table = pa.table({"query_id": pairs.query_ids, "query": pairs.queries,
                      "doc_id": list(range(n)), "doc": pairs.docs})
    inp = work / "pairs.parquet"
    pq.write_table(table, inp, row_group_size=1000)

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(str(model_dir))
    load_s = time.perf_counter() - t0
    engine.score(pairs.queries[:256], pairs.docs[:256])  # warm caches, as the job's actor has by then
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    engine_pps, runs = [], []
    for r in range(args.repeats):
        _, stats = engine.score(pairs.queries, pairs.docs)
        engine_pps.append(n / stats.wall_s)
        runs.append(_run_job(inp, work / f"out{r}", model_dir, args.shard_rows, env))
        print(f"round {r + 1}: engine {engine_pps[-1]:,.0f} pairs/s, job {n / runs[-1]['busy']:,.0f} pairs/s",
              file=sys.stderr, flush=True)
    job_pps = [n / t["busy"] for t in runs]
    scoring_pps = [n / t["score_after_ready_s"] for t in runs]
    med = lambda xs: float(np.median(xs))  # noqa: E731
    ratios = [j / e for j, e in zip(job_pps, engine_pps)]
    rows = [
        ("pairs, rounds", f"{n:,} x {args.repeats}", "engine and job alternate"),
        ("engine in-process", f"{med(engine_pps):,.0f} pairs/s", f"median; model load {load_s:.1f} s (apart)"),
        ("job (after first actor ready)", f"{med(job_pps):,.0f} pairs/s",
         f"median; scoring {med([t['score_after_ready_s'] for t in runs]):.1f} s + ranking pass "
         f"{med([t['finalize_s'] for t in runs]):.1f} s"),
        ("job / engine", f"{med(ratios):.2f}x", "median of rounds " + ", ".join(f"{x:.2f}" for x in ratios)
         + "; target >= 0.85"),
        ("job scoring only / engine", f"{med([s / e for s, e in zip(scoring_pps, engine_pps)]):.2f}x",
         "the actors alone, ranking pass left out"),
        ("actor busy in scoring phase", f"{med([t['actor_busy'] for t in runs]):.1%}",
         "time inside shards / scoring time (the rest: gaps between shards)"),
        ("actors' time in the model", f"{med([t['model_share'] or 0 for t in runs]):.1%}",
         "manifest totals.model_share: the rest of their time on shards is reading, splitting, handing over"),
        ("job start-up (apart)", f"{med([t['ray_start_s'] + t['actor_start_s'] for t in runs]):.1f} s",
         f"Ray {med([t['ray_start_s'] for t in runs]):.1f} s + actor start and model load "
         f"{med([t['actor_start_s'] for t in runs]):.1f} s"),
        ("job wall, whole command", f"{med([t['command_s'] for t in runs]):.1f} s", "incl. Python and Ray start-up"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{w}}  {'value':>18}  note")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>18}  {note}")


def _run_job(inp: Path, out: Path, model_dir: Path, shard_rows: int, env: dict) -> dict:
    """One `python -m jobs.rerank` run; its manifest totals plus `busy` (scoring + ranking) and `command_s`."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.rerank", "--input", str(inp), "--output", str(out), "--model",
                    str(model_dir), "--no-report", "--quiet", "--shard-rows", str(shard_rows)],
                   check=True, env=env)
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    shards = pq.read_table(out / "stats.parquet", columns=["actor", "wall_s"]).to_pylist()
    actors = len({s["actor"] for s in shards})
    return {**totals, "busy": totals["score_after_ready_s"] + totals["finalize_s"],
            "command_s": time.perf_counter() - t0,
            # Share of the scoring phase the actors spent inside shards (the rest: scheduling gaps, and any
            # actor that started later than the first).
            "actor_busy": sum(s["wall_s"] for s in shards) / max(actors, 1) / totals["score_after_ready_s"]}


if __name__ == "__main__":
    main()
