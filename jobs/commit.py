"""A scored shard's commit: its rejects, its keys for the ranking pass, its stats, then its scored file.

It runs apart from the actor that scored the shard (a Ray task on the same node, fed the actor's output
through the object store), so the device scores the next shard while this one is compressed and uploaded:
measured on 500,000 natural-questions rows, the commit alone takes 1.5 s before any upload, against the
12.5 s an H200 at the 40,000 pairs/s target would need to score them (a projection, not measured on a GPU). Being its own process, a commit that crashes is charged to its own shard.

Commit order (each write atomic): rejects, keys, stats, then the scored file last. The scored file's
existence is the shard's commit: a rerun skips exactly the shards that have it.
"""
from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.layout import OutputLayout
from jobs.storage import list_dir, locate, parallel, write_json, write_parquet
from schemas.contract import (
    DOC, DOC_HASH, DOC_ID, FIRST_STAGE_RANK, FIRST_STAGE_SCORE, LABEL, QUERY_ID, RESCORED, ROW, SCORE, SEQ,
)


def _text_hashes(texts: list[str]) -> np.ndarray:
    """A stable 64-bit hash of each text (blake2b), the same in every process and every run."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                        for t in texts), np.int64, len(texts))


def query_buckets(query_ids: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    """Stable hash of each query id into [0, buckets): the same id lands in the same bucket in every shard."""
    if buckets == 1:
        return np.zeros(len(query_ids), dtype=np.int32)
    uniq = pc.unique(query_ids)
    codes = np.asarray(pc.index_in(query_ids, value_set=uniq).to_numpy(zero_copy_only=False), dtype=np.int64)
    per_id = np.fromiter((zlib.crc32(str(v).encode()) % buckets for v in uniq.to_pylist()), np.int32, len(uniq))
    return per_id[codes]


def commit_shard(spec: dict, shard: dict, attempt: int, stats: dict, output: dict) -> dict:
    """Write a scored shard's outputs ({"scored": table, "rejected": table}, from ShardWorker.score_shard) in
    commit order; returns its finished stats (as written)."""
    layout = OutputLayout(locate(spec["output"]))
    scored, rejected = output["scored"], output["rejected"]
    t0 = time.perf_counter()
    write_parquet(rejected, layout.rejects(shard["name"]))
    key_buckets = _write_keys(spec, layout, shard, scored)
    maybe_fail(spec, shard, attempt, "before_commit")
    # key_buckets: which key files the ranking pass must find (the driver checks before it ranks)
    stats = {**stats, "write_s": time.perf_counter() - t0, "committed_at": time.time(), "key_buckets": key_buckets}
    write_json(stats, layout.shard_stats(shard["name"]))
    write_parquet(scored, layout.scored(shard["name"]))
    maybe_fail(spec, shard, attempt, "after_commit")
    return stats


def _write_keys(spec: dict, layout: OutputLayout, shard: dict, scored: pa.Table) -> list[int]:
    """The few columns the cross-shard ranking pass needs, split by query bucket; returns the buckets."""
    names = [QUERY_ID, DOC_ID, SCORE, RESCORED] + [c for c in (FIRST_STAGE_SCORE, FIRST_STAGE_RANK, LABEL)
                                                  if c in scored.column_names]
    keys = scored.select(names + [ROW])
    if spec.get("dedupe_docs"):  # passage identity by text, for collapsing duplicates within a query
        keys = keys.append_column(DOC_HASH, pa.array(_text_hashes(scored[DOC].to_pylist()), pa.int64()))
    keys = keys.append_column(SEQ, pa.array((np.int64(shard["seq"]) << 32) + np.arange(keys.num_rows, dtype=np.int64)))
    b = query_buckets(keys[QUERY_ID], spec["buckets"])
    # One file per bucket the shard has queries in (up to one per ~2M rows of the job), written concurrently:
    # on an object store each is a round trip.
    # One stable sort by bucket, then a slice per bucket (a filter per bucket scanned the shard once each:
    # 3.3 s instead of 1.8 s for 500 buckets on 500,000 rows).
    if spec["buckets"] > 1:
        order = np.argsort(b, kind="stable")
        keys, b = keys.take(pa.array(order)), b[order]
    buckets, starts = np.unique(b, return_index=True)
    ends = np.append(starts[1:], len(b))
    files = [(int(k), layout.keys(shard["name"], int(k)), int(lo), int(hi)) for k, lo, hi in zip(buckets, starts, ends)]
    parallel(lambda f: write_parquet(keys.slice(f[2], f[3] - f[2]), f[1]), files)
    written = {f[1].path.rsplit("/", 1)[-1] for f in files}
    # An attempt over other content (a since-fixed input file) may have left keys for other buckets: they
    # go, after the new ones are in place (an attempt still running elsewhere writes the same files).
    keys_dir = layout.keys_dir(shard["name"])
    for name in list_dir(keys_dir):
        if name not in written:
            keys_dir.fs.delete_file(keys_dir.child(name).path)
    return [f[0] for f in files]


def maybe_fail(spec: dict, shard: dict, attempt: int, point: str) -> None:
    """Fault injection for tests: die like a crashed process at a chosen point (or hang there, at point
    `hang_<point>`), on the first `attempts` attempts; with `sleep_s`, first pause that long before scoring (so a test can act mid-shard), and with
    `commit_sleep_s` before committing (a slow upload)."""
    fault = spec.get("fault") or {}
    if fault.get("shard", "") in shard["name"]:
        pause = {"before_score": fault.get("sleep_s"), "before_commit": fault.get("commit_sleep_s")}.get(point)
        if pause:
            time.sleep(float(pause))
    chosen = fault.get("shard", "") in shard["name"] and attempt <= fault.get("attempts", 1)
    if fault.get("point") == point and chosen:
        os._exit(fault.get("exit_code", 17))
    if fault.get("point") == f"hang_{point}" and chosen:  # a wedged GPU or a call that never returns
        if fault.get("break_device_file"):  # ...that takes the device with it: no actor starts there again
            Path(fault["break_device_file"]).touch()
        time.sleep(24 * 3600)
