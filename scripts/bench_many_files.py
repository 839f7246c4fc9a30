"""Many small input files: what packing them into shards saves, beside code that made one shard per file.

Writes `--files` Parquet files of `--rows` rows each (a Spark job's part files, say), then runs
`python -m jobs.rerank` on them from this checkout and from `--old-root` (another checkout, e.g. a git
worktree of an earlier commit), alternating, on the same input and the same tiny model. Reports per run:
shards, files the job wrote under OUT, the scoring and ranking phases, and the whole command's wall time.

    git worktree add /tmp/crossrank-old 6c7879d
    python -m scripts.bench_many_files --files 1000 --rows 20 --old-root /tmp/crossrank-old

The model is the tiny random test model (scripts/make_tiny_model.py), so what is timed is the job's
per-shard work (scheduling, reads, commits, key and positions files), not the forward pass.
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

ROOT = Path(__file__).resolve().parents[1]


def _inputs(folder: Path, files: int, rows: int) -> None:
    from jobs.bench_data import make_pairs

    pairs = make_pairs(files * rows, mix="msmarco")
    folder.mkdir(parents=True)
    for f in range(files):
        lo, hi = f * rows, (f + 1) * rows
        pq.write_table(pa.table({"query_id": pairs.query_ids[lo:hi], "query": pairs.queries[lo:hi],
                                 "doc_id": list(range(lo, hi)), "doc": pairs.docs[lo:hi]}),
                       folder / f"part-{f:05d}.parquet")


def _run(root: Path, inp: Path, out: Path, model: Path, shard_rows: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.rerank", "--input", str(inp), "--output", str(out), "--model",
                    str(model), "--no-report", "--quiet", "--shard-rows", str(shard_rows)],
                   check=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    written = sum(1 for p in out.rglob("*") if p.is_file())
    return {"shards": manifest["shards"], "files_written": written, "scoring_s": totals["score_after_ready_s"],
            "ranking_s": totals["finalize_s"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=20, help="rows per file")
    ap.add_argument("--shard-rows", type=int, default=500_000)
    ap.add_argument("--old-root", type=Path, help="another checkout to run beside this one")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from scripts.make_tiny_model import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="crossrank-many-files-"))
    try:
        model = make_tiny_model(work / "model", "bert")
        inp = work / "in"
        _inputs(inp, args.files, args.rows)
        sides = {"this checkout": ROOT, **({"old root": args.old_root.resolve()} if args.old_root else {})}
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        for r in range(args.repeats):
            for name, root in sides.items():
                out = work / f"out-{len(runs[name])}-{name.split()[0]}"
                runs[name].append(_run(root, inp, out, model, args.shard_rows))
                shutil.rmtree(out)
                print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda rs, k: float(np.median([x[k] for x in rs]))  # noqa: E731
    print(f"\n{args.files:,} files x {args.rows} rows = {args.files * args.rows:,} pairs, --shard-rows "
          f"{args.shard_rows:,}; medians of {args.repeats}")
    print(f"{'code':<14} {'shards':>7} {'files written':>14} {'scoring s':>10} {'ranking s':>10} {'wall s':>8}")
    for name, rs in runs.items():
        print(f"{name:<14} {med(rs, 'shards'):>7,.0f} {med(rs, 'files_written'):>14,.0f} {med(rs, 'scoring_s'):>10.1f} "
              f"{med(rs, 'ranking_s'):>10.1f} {med(rs, 'wall_s'):>8.1f}")
    if len(runs) == 2:
        new, old = runs.values()
        print(f"wall, old / this: {med(old, 'wall_s') / med(new, 'wall_s'):.2f}x")


if __name__ == "__main__":
    main()
