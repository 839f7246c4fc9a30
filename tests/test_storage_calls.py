"""The driver's storage calls scale with listings, not with files or shards: on an object store each call is
a round trip of tens of milliseconds, and a 100M-pair job has thousands of files and shards. Counted on a
local filesystem that answers with an object store's latency (scripts/latency_fs.py)."""
from __future__ import annotations

import os

import pytest

from jobs import storage
from jobs.layout import OutputLayout
from jobs.plan import make_plan
from jobs.rerank import write_stats
from jobs.storage import Location, write_json, write_parquet
from schemas.contract import ColumnMap
from scripts.latency_fs import latency_fs
from tests.conftest import write_shortlists

import pyarrow as pa

FILES = 12


def use_latency_fs(monkeypatch):
    """From here on every local path resolves to the latency filesystem (as an s3:// URI would to S3)."""
    fs, handler = latency_fs(0.01)

    def locate(uri: str) -> Location:
        path = os.path.abspath(uri)
        return Location(fs, path, path)

    monkeypatch.setattr(storage, "locate", locate)
    return fs, handler


@pytest.fixture
def slow(monkeypatch):
    return use_latency_fs(monkeypatch)


def test_footers_are_read_concurrently_one_open_per_file(tmp_path, monkeypatch):
    inp = write_shortlists(tmp_path / "in", files=FILES, n_queries=2, per_query=10)
    local = make_plan([str(inp)], ColumnMap(), 80)
    fs, handler = use_latency_fs(monkeypatch)
    plan = make_plan([str(inp)], ColumnMap(), 80)
    assert len(plan.files) == FILES and plan.total_rows == FILES * 20
    # Sizes, rows and names (what the resume checks compare) are those the plain local filesystem gives.
    assert plan.fingerprint() == local.fingerprint() and plan.files == local.files
    assert handler.calls.get("open") == FILES  # size and footer from the same open
    assert handler.calls.get("info", 0) + handler.calls.get("list", 0) <= 2  # the input listing, not per file
    assert handler.max_in_flight > 1, "footers were read one after another"


def test_unreadable_footer_is_planned_as_a_failing_shard(tmp_path, slow):
    inp = write_shortlists(tmp_path / "in", files=3, n_queries=2, per_query=10)
    (inp / "part-1.parquet").write_bytes(b"not parquet at all")
    plan = make_plan([str(inp)], ColumnMap(), 80)
    bad = [f for f in plan.files if f.get("error")]
    assert len(bad) == 1 and bad[0]["uri"].endswith("part-1.parquet") and bad[0]["bytes"] == 18
    assert "cannot read Parquet metadata" in bad[0]["error"]


def test_committed_shards_stats_and_keys_each_take_one_listing(tmp_path, slow):
    fs, handler = slow
    layout = OutputLayout(Location(fs, str(tmp_path / "out"), str(tmp_path / "out")))
    names = [f"part-{i}-r{i:010d}" for i in range(FILES)]
    empty = pa.table({"x": pa.array([], pa.int64())})
    for i, name in enumerate(names):
        if i % 3:  # two thirds committed
            write_parquet(empty, layout.scored(name))
        write_json({"shard": name, "status": "ok", "rows_in": i}, layout.shard_stats(name))
        for b in range(i % 4):
            write_parquet(empty, layout.keys(name, b))

    handler.reset()
    assert layout.committed_shards() == {n for i, n in enumerate(names) if i % 3}
    assert handler.calls == {"list": 1}

    handler.reset()
    keys = layout.key_files()
    assert handler.calls == {"list": 1}
    assert {s: sorted(v) for s, v in keys.items()} == {n: list(range(i % 4)) for i, n in enumerate(names) if i % 4}
    assert all(loc.path == layout.keys(s, b).path for s, v in keys.items() for b, loc in v.items())

    handler.reset()
    failed = [{"shard": names[0], "status": "failed", "rows_in": 0}]
    table = write_stats(layout, names, failed)
    assert sorted(table.column("shard").to_pylist()) == sorted(names)
    assert table.column("rows_in").to_pylist()[-1] == 0  # the failed row replaces the shard's own stats
    assert handler.calls.get("list") == 1 and handler.calls.get("info", 0) <= 2
    assert handler.calls["open"] == FILES + 1  # each stats file read once, then the stats table written
    assert handler.max_in_flight > 1, "stats were read one after another"


def test_commit_and_ranking_on_a_slow_store_write_concurrently_and_lose_nothing(tiny_model, tmp_path, monkeypatch):
    """Phase 1 (the worker, here without Ray) and the ranking pass through the latency filesystem: a shard's
    key files (one per bucket) are written concurrently, a bucket's key files read and its positions files
    written concurrently, and every input row comes out once with its position."""
    import pyarrow.parquet as pq

    from jobs import commit, finalize, read_ahead
    from jobs.rerank import job_spec, parse_args
    from jobs.worker import ShardWorker
    from tests.conftest import job_args

    inp = write_shortlists(tmp_path / "in", files=1, n_queries=12, per_query=10, row_group_size=40)
    out = tmp_path / "out"
    fs, handler = use_latency_fs(monkeypatch)
    for module in (commit, finalize, read_ahead):
        monkeypatch.setattr(module, "locate", storage.locate)
    plan = make_plan([str(inp)], ColumnMap(), 40)  # 3 shards of 40 rows
    buckets = 6
    spec = {**job_spec(parse_args(job_args(inp, out, tiny_model, "--device", "cpu"))), "buckets": buckets}
    w = ShardWorker(spec)
    handler.reset()
    for shard in plan.shards:
        assert w.process(shard.to_dict())["rows_scored"] == 40
    assert handler.max_in_flight > 1, "a shard's key files were written one after another"

    layout = OutputLayout(storage.locate(str(out)))
    key_files = layout.key_files()
    assert set(key_files) == {s.name for s in plan.shards}
    names = {s.seq: s.name for s in plan.shards}
    handler.reset()
    for b in range(buckets):
        files = [shard[b].uri for shard in key_files.values() if b in shard]
        finalize.rank_bucket(str(out), b, files, names, None)
    assert handler.max_in_flight > 1, "a bucket's files were read or written one after another"
    for s in plan.shards:
        finalize.finish_shard(str(out), s.name)

    scores = pa.concat_tables([pq.read_table(p) for p in sorted((out / "scores").glob("*.parquet"))])
    assert scores.num_rows == 120
    by_query: dict = {}
    for q, pos in zip(scores["query_id"].to_pylist(), scores["rerank_position"].to_pylist()):
        by_query.setdefault(q, []).append(pos)
    assert len(by_query) == 12 and all(sorted(p) == list(range(1, 11)) for p in by_query.values())
