"""The driver's storage round trips on an object store, simulated: local files behind a fixed latency per call
(scripts/latency_fs.py). Times the driver's metadata steps (plan the input, find committed shards, gather
stats, find key files) as the job does them now, beside the serial per-file / per-shard calls it made before.

    python -m scripts.bench_planning --files 400 --latency-ms 30
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import storage
from jobs.layout import OutputLayout
from jobs.plan import make_plan
from jobs.rerank import write_stats
from jobs.storage import Location, exists, list_dir, read_json, write_json, write_parquet
from schemas.contract import ColumnMap
from scripts.latency_fs import latency_fs


def _make_inputs(folder: Path, files: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        n = 50
        pq.write_table(pa.table({"query_id": [f] * n, "query": ["q"] * n, "doc_id": [f"d{i}" for i in range(n)],
                                 "doc": ["passage"] * n}), folder / f"part-{f:05d}.parquet")


def _make_output(layout: OutputLayout, names: list[str]) -> None:
    empty = pa.table({"x": pa.array([], pa.int64())})
    for i, name in enumerate(names):
        write_parquet(empty, layout.scored(name))
        write_json({"shard": name, "status": "ok", "rows_in": 50}, layout.shard_stats(name))
        for b in range(2):
            write_parquet(empty, layout.keys(name, b))


def _serial_plan(inp: str) -> None:
    """What planning did before: per file, a footer read, then a separate size lookup."""
    for loc in storage.list_parquet([inp]):
        with loc.fs.open_input_file(loc.path) as f:
            pq.ParquetFile(f).metadata
        loc.fs.get_file_info(loc.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=400, help="input files, one shard each")
    ap.add_argument("--latency-ms", type=float, default=30.0, help="added to every metadata call and open")
    args = ap.parse_args()
    fs, handler = latency_fs(args.latency_ms / 1000)
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in"
        _make_inputs(inp, args.files)
        storage.locate = lambda uri: Location(fs, os.path.abspath(uri), os.path.abspath(uri))
        plan = make_plan([str(inp)], ColumnMap(), 500_000)
        names = [s.name for s in plan.shards]
        out = Location(fs, f"{tmp}/out", f"{tmp}/out")
        layout = OutputLayout(out)
        _make_output(layout, names)

        steps = [
            ("plan the input (footers, sizes)", lambda: make_plan([str(inp)], ColumnMap(), 500_000),
             lambda: _serial_plan(str(inp))),
            ("find committed shards", layout.committed_shards,
             lambda: [exists(layout.scored(n)) for n in names]),
            ("gather per-shard stats", lambda: write_stats(layout, names, []),
             lambda: [read_json(layout.shard_stats(n)) for n in names if exists(layout.shard_stats(n))]),
            ("find key files", layout.key_files, lambda: [list_dir(layout.keys_dir(n)) for n in names]),
        ]
        print(f"{args.files} files / shards, {args.latency_ms:.0f} ms a call, {storage.IO_THREADS} I/O threads\n")
        print(f"{'step':<34} {'now s':>8} {'calls':>6} {'before s':>9} {'calls':>6} {'speed-up':>9}")
        total_now = total_before = 0.0
        for label, now, before in steps:
            times = []
            for fn in (now, before):
                handler.reset()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0, sum(handler.calls.values())))
            (t_now, c_now), (t_before, c_before) = times
            total_now += t_now
            total_before += t_before
            print(f"{label:<34} {t_now:>8.2f} {c_now:>6} {t_before:>9.2f} {c_before:>6} {t_before / t_now:>8.1f}x")
        print(f"{'total':<34} {total_now:>8.2f} {'':>6} {total_before:>9.2f} {'':>6} {total_before / total_now:>8.1f}x")


if __name__ == "__main__":
    main()
