"""Peak memory of one ranking-pass bucket task (`jobs.finalize.rank_bucket`) by id length: what a bucket's
size in rows costs in bytes, so that buckets can be sized by bytes rather than rows.

Each run is a fresh process: it writes one bucket's key files (as `--shards` shards would) with query and
doc ids of the given length, then ranks the bucket and reports its peak RSS above the process's RSS just
before ranking.

    python -m scripts.bench_bucket_memory --rows 500000 --id-bytes 8 64 256 1024
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _one(rows: int, id_bytes: int, shards: int, folder: str) -> dict:
    from jobs.finalize import rank_bucket
    from jobs.layout import OutputLayout
    from jobs.storage import locate, write_parquet
    from schemas.contract import DOC_ID, FIRST_STAGE_SCORE, QUERY_ID, RESCORED, ROW, SCORE, SEQ

    rng = np.random.default_rng(0)
    per_query = 100
    pad = "x" * max(0, id_bytes - 12)
    layout = OutputLayout(locate(folder))
    files, names = [], {}
    per_shard = rows // shards
    for s in range(shards):
        n = per_shard
        q = np.arange(s * n, (s + 1) * n) // per_query
        table = pa.table({
            QUERY_ID: pa.array([f"{pad}q{i:011d}"[-id_bytes:] if id_bytes >= 12 else f"q{i}" for i in q]),
            DOC_ID: pa.array([f"{pad}d{i:011d}"[-id_bytes:] if id_bytes >= 12 else f"d{i}" for i in range(s * n, (s + 1) * n)]),
            SCORE: pa.array(rng.standard_normal(n).astype(np.float32)), RESCORED: pa.array(np.ones(n, bool)),
            FIRST_STAGE_SCORE: pa.array(rng.standard_normal(n)), ROW: pa.array(np.arange(n, dtype=np.int64)),
            SEQ: pa.array((np.int64(s) << 32) + np.arange(n, dtype=np.int64)),
        })
        name = f"shard-{s:03d}"
        names[s] = name
        loc = layout.keys(name, 0)
        write_parquet(table, loc)
        files.append(loc.uri)
        del table
    before = _rss_mb()
    rank_bucket(folder, 0, files, names, top_k=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "id_bytes": id_bytes, "peak_above_mb": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--id-bytes", type=int, nargs="+", default=[8, 64, 256, 1024])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(_one(args.rows, args.id_bytes[0], args.shards, folder)))
        return
    print(f"{'rows':>10} {'id bytes':>9} {'peak above start MB':>20} {'bytes per row':>14}")
    for b in args.id_bytes:
        out = subprocess.run([sys.executable, "-m", "scripts.bench_bucket_memory", "--child", "--rows", str(args.rows),
                              "--id-bytes", str(b), "--shards", str(args.shards)], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['rows']:>10,} {b:>9} {r['peak_above_mb']:>20,.0f} {r['peak_above_mb'] * 2**20 / r['rows']:>14,.0f}")


if __name__ == "__main__":
    main()
