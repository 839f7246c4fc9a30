"""One shard, start to finish, on whichever process holds the model: read, validate, score, write.

`ShardWorker` is plain Python (tests and scripts use it without Ray); `jobs/pool.py` wraps it in a Ray
actor that owns one model on one GPU. The worker reads its shard straight from storage and writes its
own outputs; the driver only gets the small stats dict back.

Commit order (each write atomic): rejects, keys, stats, then the scored file last. The scored file's
existence is the shard's commit: a rerun skips exactly the shards that have it.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.layout import OutputLayout
from jobs.read_ahead import ShardReader
from jobs.storage import list_dir, locate, parallel, write_json, write_parquet
from schemas.contract import (
    DOC, DOC_ID, FIRST_STAGE_RANK, FIRST_STAGE_SCORE, LABEL, QUERY, QUERY_ID, RESCORED, SCORE, ColumnMap,
    split_rejects, to_canonical,
)

ROW = "_row"  # row index within the shard's scored file
SEQ = "_seq"  # global input order: shard seq << 32 | row in shard (tie break of last resort)
DOC_HASH = "_doc_hash"  # 64-bit hash of the passage text (--dedupe-docs)


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


class ShardWorker:
    def __init__(self, spec: dict):
        from kernels.config import EngineConfig
        from kernels.engine import Engine

        self.spec = spec
        t0 = time.perf_counter()
        self.engine = Engine.from_pretrained(spec["model"], EngineConfig(**spec["engine"]),
                                             revision=spec.get("revision"),
                                             trust_remote_code=spec.get("trust_remote_code", False))
        self.load_s = time.perf_counter() - t0
        self.warmup_s = self.engine.warmup() if self.engine.compiled else 0.0
        self.layout = OutputLayout(locate(spec["output"]))
        self.cols = ColumnMap(**spec["columns"])
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.reader = ShardReader()

    def describe(self) -> dict:
        return {**self.engine.describe(), "actor": self.name, "load_s": self.load_s, "warmup_s": self.warmup_s}

    def process(self, shard: dict, attempt: int = 1, read_ahead: dict | None = None) -> dict:
        """Score one shard and commit its outputs; start reading `read_ahead` (the next shard the driver has
        reserved for this actor) once this shard's rows are in hand."""
        t0 = time.perf_counter()
        stats = {"shard": shard["name"], "input_path": shard["uri"], "row_start": shard["row_start"],
                 "row_end": shard["row_end"], "attempts": attempt, "actor": self.name,
                 "node": socket.gethostname(), **{k: v for k, v in self.engine.describe().items()
                                                  if k in ("device_name", "dtype", "engine", "attention", "compiled")}}
        table, _ = self.reader.read(shard)
        stats["read_s"] = time.perf_counter() - t0  # the wait for rows: near 0 when read ahead
        self.reader.read_ahead(read_ahead)
        stats["rows_in"] = table.num_rows
        source_row = np.arange(shard["row_start"], shard["row_start"] + table.num_rows, dtype=np.int64)
        accepted, rejected, _ = split_rejects(to_canonical(table, self.cols), source_row)

        depth = self.spec.get("rerank_depth")
        rescore = np.ones(accepted.num_rows, dtype=bool)
        if depth:
            rescore = np.asarray(pc.less_equal(accepted[FIRST_STAGE_RANK], depth).to_numpy(zero_copy_only=False), bool)
        queries = accepted[QUERY].to_pylist()
        docs = accepted[DOC].to_pylist()
        idx = np.flatnonzero(rescore)
        self._maybe_fail(shard, attempt, "before_score")
        scores, st = self.engine.score([queries[i] for i in idx], [docs[i] for i in idx])
        self._maybe_fail(shard, attempt, "after_score")
        full = np.zeros(accepted.num_rows, dtype=np.float32)
        full[idx] = scores
        score_col = pa.array(full, pa.float32(), mask=~rescore)

        scored = accepted.append_column(SCORE, score_col).append_column(RESCORED, pa.array(rescore))
        scored = scored.append_column(ROW, pa.array(np.arange(scored.num_rows, dtype=np.int64)))
        tw = time.perf_counter()
        write_parquet(rejected, self.layout.rejects(shard["name"]))
        self._write_keys(shard, scored)
        self._maybe_fail(shard, attempt, "before_commit")
        stats["write_s"] = time.perf_counter() - tw  # the scored file below is the commit; timed by the driver
        wall = time.perf_counter() - t0
        stats.update(
            status="ok", error=None, rows_scored=accepted.num_rows, rows_rejected=rejected.num_rows,
            rows_not_rescored=int((~rescore).sum()), duplicate_pairs=st.duplicate_pairs,
            truncated_pairs=st.truncated_pairs, real_tokens=st.real_tokens, computed_tokens=st.computed_tokens,
            padding_efficiency=st.padding_efficiency, batches=st.batches, oom_splits=st.oom_splits,
            tokenize_s=st.tokenize_s, model_s=st.model_s, wall_s=wall,
            pairs_per_s=len(idx) / wall if wall else 0.0, tokens_per_s=st.real_tokens / wall if wall else 0.0,
        )
        if stats["rows_scored"] + stats["rows_rejected"] != stats["rows_in"]:
            raise AssertionError(f"shard {shard['name']}: {stats['rows_in']} rows in but "
                                 f"{stats['rows_scored']} scored + {stats['rows_rejected']} rejected")
        write_json(stats, self.layout.shard_stats(shard["name"]))
        write_parquet(scored, self.layout.scored(shard["name"]))
        self._maybe_fail(shard, attempt, "after_commit")
        return stats

    def _write_keys(self, shard: dict, scored: pa.Table) -> None:
        """The few columns the cross-shard ranking pass needs, split by query bucket."""
        buckets = self.spec["buckets"]
        names = [QUERY_ID, DOC_ID, SCORE, RESCORED] + [c for c in (FIRST_STAGE_SCORE, FIRST_STAGE_RANK, LABEL)
                                                      if c in scored.column_names]
        keys = scored.select(names + [ROW])
        if self.spec.get("dedupe_docs"):  # passage identity by text, for collapsing duplicates within a query
            keys = keys.append_column(DOC_HASH, pa.array(_text_hashes(scored[DOC].to_pylist()), pa.int64()))
        keys = keys.append_column(SEQ, pa.array((np.int64(shard["seq"]) << 32) + np.arange(keys.num_rows, dtype=np.int64)))
        b = query_buckets(keys[QUERY_ID], buckets)
        # One file per bucket the shard has queries in (up to --buckets), written concurrently: on an object
        # store each is a round trip, and the device waits for this commit.
        files = [(int(bucket), self.layout.keys(shard["name"], int(bucket))) for bucket in np.unique(b)]
        parallel(lambda f: write_parquet(keys.filter(pa.array(b == f[0])), f[1]), files)
        written = {loc.path.rsplit("/", 1)[-1] for _, loc in files}
        # An attempt over other content (a since-fixed input file) may have left keys for other buckets: they
        # go, after the new ones are in place (an attempt still running elsewhere writes the same files).
        keys_dir = self.layout.keys_dir(shard["name"])
        for name in list_dir(keys_dir):
            if name not in written:
                keys_dir.fs.delete_file(keys_dir.child(name).path)

    def _maybe_fail(self, shard: dict, attempt: int, point: str) -> None:
        """Fault injection for tests: die like a crashed process at a chosen point, on the first `attempts`
        attempts; with `sleep_s`, first pause that long before scoring (so a test can act mid-shard)."""
        fault = self.spec.get("fault") or {}
        if point == "before_score" and fault.get("sleep_s") and fault.get("shard", "") in shard["name"]:
            time.sleep(float(fault["sleep_s"]))
        if fault.get("point") == point and fault.get("shard", "") in shard["name"] and attempt <= fault.get("attempts", 1):
            os._exit(fault.get("exit_code", 17))
