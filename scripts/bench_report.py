"""The evaluation report on a large run: how long `write_report` takes and how many bytes it reads from the
output's storage, on a synthetic OUT/scores/ of labelled shortlists with natural-questions-sized passages.

    python -m scripts.bench_report --rows 4000000 --files 8 [--latency-ms 30] [--giant 100000]

With --latency-ms the output directory sits behind the simulated object store of scripts/latency_fs.py
(a local disk that waits before every call), as it would on s3://.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import report_metrics as rm
from jobs.report import write_report
from jobs.storage import Location
from scripts.latency_fs import latency_fs

CANDIDATES = 100
PASSAGE_CHARS = 620  # natural-questions passages average about 620 characters


def make_scores(folder: Path, rows: int, files: int, seed: int = 0, row_group_size: int = 128 * 1024,
                giant: int = 0) -> int:
    """OUT/scores/*.parquet as the job writes them (the job's row group size by default): whole queries per
    file, positions 1..n, about 5% of candidates relevant. Returns their size in bytes."""
    rng = np.random.default_rng(seed)
    (folder / "scores").mkdir(parents=True)
    # Passages are slices of a long text of random words, so they compress like real text (about 3x).
    lexicon = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10)))
                        for _ in range(20_000)])
    text = " ".join(rng.choice(lexicon, min(4_000_000, 100 * rows + 1000)))
    per_file = rows // files // CANDIDATES * CANDIDATES
    size = 0
    for f in range(files):
        q = f * per_file // CANDIDATES + np.arange(per_file) // CANDIDATES
        score = rng.normal(size=per_file).astype(np.float32)
        fs_rank = np.tile(np.arange(1, CANDIDATES + 1, dtype=np.int32), per_file // CANDIDATES)
        # rerank position: rank of the score within the query (descending)
        order = np.lexsort((-score, q))
        pos = np.empty(per_file, np.int32)
        pos[order] = np.tile(np.arange(1, CANDIDATES + 1, dtype=np.int32), per_file // CANDIDATES)
        table = pa.table({
            "query_id": pa.array([f"q{i}" for i in q]),
            "query": pa.array([f"question {i}" for i in q]),
            "doc_id": pa.array([f"d{i}" for i in range(f * per_file, (f + 1) * per_file)]),
            "doc": pa.array([text[o:o + PASSAGE_CHARS] for o in rng.integers(0, len(text) - PASSAGE_CHARS, per_file)]),
            "label": pa.array((rng.random(per_file) < 0.05).astype(np.int32)),
            "score": score, "rescored": pa.array(np.ones(per_file, bool)),
            "first_stage_rank": fs_rank, "rerank_position": pos,
        })
        path = folder / "scores" / f"part-{f:05d}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)
        size += path.stat().st_size
    if giant:  # one query of `giant` candidates: what a pairwise metric must not square
        score = rng.normal(size=giant).astype(np.float32)
        pos = np.empty(giant, np.int32)
        pos[np.argsort(-score, kind="stable")] = np.arange(1, giant + 1, dtype=np.int32)
        table = pa.table({
            "query_id": pa.array(["q-giant"] * giant), "query": pa.array(["the giant question"] * giant),
            "doc_id": pa.array([f"g{i}" for i in range(giant)]),
            "doc": pa.array([text[o:o + PASSAGE_CHARS] for o in rng.integers(0, len(text) - PASSAGE_CHARS, giant)]),
            "label": pa.array((rng.random(giant) < 0.05).astype(np.int32)),
            "score": score, "rescored": pa.array(np.ones(giant, bool)),
            "first_stage_rank": np.arange(1, giant + 1, dtype=np.int32), "rerank_position": pos,
        })
        path = folder / "scores" / "part-giant.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)
        size += path.stat().st_size
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows-per-bucket", type=int, default=rm.ROWS_PER_BUCKET)
    ap.add_argument("--top-regressions", type=int, default=20, help="the review list's length (its text is read)")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="simulate an object store (0: plain local disk)")
    ap.add_argument("--giant", type=int, default=0, help="add one query with this many candidates")
    args = ap.parse_args()
    rm.ROWS_PER_BUCKET = args.rows_per_bucket
    with tempfile.TemporaryDirectory() as tmp:
        size = make_scores(Path(tmp), args.rows, args.files, giant=args.giant)
        if args.latency_ms:
            fs, handler = latency_fs(args.latency_ms / 1000)
            out: Location | str = Location(fs, tmp, f"latency://{tmp}")
        else:
            out, handler = tmp, None
        t0 = time.perf_counter()
        summary = write_report(out, quiet=True, max_review=args.top_regressions)
        elapsed = time.perf_counter() - t0
    print("| rows | files | buckets | review | scores on disk | storage | report s | storage calls | read from storage |")
    print("|---|---|---|---|---|---|---|---|---|")
    calls = sum(handler.calls.values()) if handler else "-"
    read = f"{handler.bytes_read / 1e6:,.1f} MB ({handler.bytes_read / size:.1%})" if handler else "-"
    where = f"latency {args.latency_ms:g} ms" if args.latency_ms else "local disk"
    buckets = max(1, -(-int(summary["rows"]) // args.rows_per_bucket))
    print(f"| {int(summary['rows']):,} | {args.files} | {buckets} | {args.top_regressions} | {size / 1e6:,.0f} MB | {where} | "
          f"{elapsed:.1f} | {calls} | {read} |")


if __name__ == "__main__":
    main()
