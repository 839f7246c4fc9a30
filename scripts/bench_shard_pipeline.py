"""What the shard pipeline around the engine costs the device, without Ray (so it runs on the GPU box too).

On the same engine and pairs, cut into Parquet shards as the job cuts them:
  engine          `Engine.score` over all pairs at once: the device's pace, the anchor of this comparison
  commit inline   per shard: read (the next one read ahead), split rejects, score, then commit (rejects,
                  keys, stats, scored file) before the next shard: what a CPU actor does
  commit apart    the same, with each commit handed to a background thread (at most 2 in flight) while the
                  next shard scores: what a GPU actor and its commit tasks do, with threads for processes

    python -m scripts.bench_shard_pipeline --model tiny --pairs 40000 --shard-rows 10000     # CPU box
    (scripts/gpu_check.py runs it on MiniLM-L6 in fp16 as its last step)
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench import _sync
from jobs.commit import commit_shard
from jobs.plan import make_plan
from jobs.worker import ShardWorker
from schemas.contract import ColumnMap

MAX_COMMITS = 2  # as jobs.pool.MAX_COMMITS_PER_ACTOR (not imported: jobs.pool needs Ray)


def _inline(worker: ShardWorker, shards: list[dict]) -> None:
    for i, shard in enumerate(shards):
        worker.process(shard, 1, shards[i + 1] if i + 1 < len(shards) else None)


def _apart(worker: ShardWorker, shards: list[dict]) -> None:
    with ThreadPoolExecutor(MAX_COMMITS, thread_name_prefix="commit") as pool:
        pending = []
        for i, shard in enumerate(shards):
            while len(pending) >= MAX_COMMITS:
                pending.pop(0).result()
            stats, output = worker.score_shard(shard, 1, shards[i + 1] if i + 1 < len(shards) else None)
            pending.append(pool.submit(commit_shard, worker.spec, shard, 1, stats, output))
        for f in pending:
            f.result()


def measure(engine, queries: list[str], docs: list[str], query_ids, shard_rows: int, work: Path,
            buckets: int = 8, rounds: int = 1) -> list[dict]:
    """pairs/s of the three runners (rounds interleaved), each with its ratio to the engine alone."""
    n = len(queries)
    inp = work / "pairs.parquet"
    pq.write_table(pa.table({"query_id": list(map(int, query_ids)), "query": queries,
                             "doc_id": [str(i) for i in range(n)], "doc": docs}),
                   inp, row_group_size=max(1, shard_rows // 4))
    shards = [s.to_dict() for s in make_plan([str(inp)], ColumnMap(), shard_rows).shards]
    results: dict[str, list[float]] = {"engine": [], "commit inline": [], "commit apart": []}
    for r in range(rounds):
        for name in results:
            out = work / f"out-{r}-{name.replace(' ', '-')}"
            spec = {"output": str(out), "columns": {}, "buckets": buckets}  # the default column names
            worker = ShardWorker(spec, engine=engine)
            _sync(engine.device)
            t = time.perf_counter()
            if name == "engine":
                engine.score(queries, docs)
            else:
                (_inline if name == "commit inline" else _apart)(worker, shards)
            _sync(engine.device)
            results[name].append(n / (time.perf_counter() - t))
            if name != "engine":  # a pipeline that lost rows would not be faster, only wrong: check every pass
                written = sum(pq.read_metadata(p).num_rows for p in (out / "_work" / "scored").glob("*.parquet"))
                if written != n:
                    raise AssertionError(f"{name}: {written} rows committed, {n} expected")
            shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(results["engine"])
    return [{"runner": k, "pairs_per_s": statistics.median(v), "x_engine": statistics.median(v) / base, "rounds": v,
             "shards": len(shards), "shard_rows": shard_rows, "pairs": n} for k, v in results.items()]


def table(rows: list[dict]) -> str:
    head = f"{rows[0]['pairs']:,} pairs in {rows[0]['shards']} shards of <= {rows[0]['shard_rows']:,} rows"
    lines = [head, f"{'runner':<15} {'pairs/s':>10} {'x engine':>9}  rounds"]
    for r in rows:
        lines.append(f"{r['runner']:<15} {r['pairs_per_s']:>10,.0f} {r['x_engine']:>8.2f}x  "
                     + ", ".join(f"{x:,.0f}" for x in r["rounds"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="a jobs.bench_models shape (random weights)")
    ap.add_argument("--mix", default="nq")
    ap.add_argument("--pairs", type=int, default=40_000)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    from jobs.bench_data import build_tokenizer, make_pairs
    from jobs.bench_models import SHAPES, build_model
    from kernels.config import EngineConfig
    from kernels.engine import Engine

    tok = build_tokenizer("unigram" if SHAPES[args.model]["family"] == "xlmr" else "wordpiece")
    engine = Engine.from_model(build_model(args.model, tok), tok, EngineConfig(device=args.device, dtype=args.dtype))
    engine.warmup()
    pairs = make_pairs(args.pairs, mix=args.mix)
    work = Path(tempfile.mkdtemp(prefix="crossrank-pipeline-"))
    try:
        rows = measure(engine, pairs.queries, pairs.docs, pairs.query_ids, args.shard_rows, work, rounds=args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    d = engine.describe()
    print(f"{args.model} ({d['engine']}, {d['dtype']}, {d['device_name']}), {args.mix} mix")
    print(table(rows))


if __name__ == "__main__":
    main()
