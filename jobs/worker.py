"""One shard on whichever process holds the model: read, validate, score; the commit (jobs/commit.py) follows.

`ShardWorker` is plain Python (tests and scripts use it without Ray); `jobs/pool.py` wraps it in a Ray
actor that owns one model on one GPU. The worker reads its shard straight from storage. Under Ray,
`score_shard` hands its output to a commit task through the object store and takes the next shard at once;
`process` scores and commits in this process, for callers without Ray.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.commit import commit_shard, maybe_fail
from jobs.plan import source_fields
from jobs.read_ahead import ShardReader
from schemas.contract import (
    DOC, FIRST_STAGE_RANK, QUERY, RESCORED, ROW, SCORE, ColumnMap, split_rejects, to_canonical,
    with_reasons,
)


def model_source(spec: dict) -> str:
    """The model as the user named it; but a relative folder this process does not see (its working directory
    is not the driver's) is the absolute folder the driver resolved it to. A hub id stays as it is."""
    given, resolved = spec["model"], spec.get("model_path")
    if resolved and not os.path.isdir(given) and os.path.isdir(resolved):
        return resolved
    return given


def _loaded_identity(spec: dict, engine) -> dict:
    """`kernels.loading.model_identity` of the model this process loaded: a local folder's file hashes, or the
    hub commit its config came from (no second hub call)."""
    from kernels.loading import model_identity, model_provenance

    source = model_source(spec)
    if os.path.isdir(source):
        return model_identity(model_provenance(source, trust_remote_code=spec.get("trust_remote_code", False)))
    return model_identity({"model": spec["model"], "requested_revision": spec.get("revision"),
                           "resolved_revision": getattr(engine.config, "_commit_hash", None)})


class ShardWorker:
    def __init__(self, spec: dict, engine=None):
        """Loads spec["model"] with spec["engine"] settings, or takes a ready `engine` (benchmarks)."""
        from kernels.config import EngineConfig
        from kernels.engine import Engine

        self.spec = spec
        broken = (spec.get("fault") or {}).get("break_device_file")
        if broken and os.path.exists(broken):  # fault injection: the device an earlier actor hung on is gone
            raise RuntimeError("CUDA error: unspecified launch failure (injected: the device is gone)")
        t0 = time.perf_counter()
        self.model_identity = None
        if engine is None:
            # Logits, whatever --activation says: positions come from them, and the activation is applied when
            # the final files are written (jobs.finalize.activated).
            settings = EngineConfig(**{**spec["engine"], "activation": "identity"})
            self.engine = Engine.from_pretrained(model_source(spec), settings, revision=spec.get("revision"),
                                                 trust_remote_code=spec.get("trust_remote_code", False))
            # What this process actually loaded, for the driver to hold against what it checked: a node with
            # another copy under the same path, or a folder changed since, must not score into the same output.
            self.model_identity = _loaded_identity(spec, self.engine)
        else:
            self.engine = engine
        self.load_s = time.perf_counter() - t0
        self.warmup_s = self.engine.warmup() if self.engine.compiled and engine is None else 0.0
        self.cols = ColumnMap(**spec["columns"])
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.reader = ShardReader()
        self.last_beat = time.monotonic()
        self.engine.heartbeat = self.beat

    def beat(self) -> None:
        """Proof of life: each phase of a shard and each batch the engine runs. The pool asks for its age
        (jobs/pool.py) and takes an actor silent past --shard-timeout for hung."""
        self.last_beat = time.monotonic()

    def beat_age(self) -> float:
        return time.monotonic() - self.last_beat

    def describe(self) -> dict:
        return {**self.engine.describe(), "actor": self.name, "load_s": self.load_s, "warmup_s": self.warmup_s,
                "compile_cache": getattr(self.engine, "compile_cache", None),
                "node_id": _ray_node_id(), "model_identity": self.model_identity}

    def score_shard(self, shard: dict, attempt: int = 1, read_ahead: dict | None = None) -> tuple[dict, dict]:
        """Read, validate and score one shard; start reading `read_ahead` (the next shard the driver has
        reserved for this actor) once this shard's rows are in hand. Returns its stats so far and what its
        commit needs: {"scored": table, "rejected": table}."""
        t0 = time.perf_counter()
        self.beat()
        stats = {"shard": shard["name"], **source_fields(shard), "attempts": attempt, "actor": self.name,
                 "node": socket.gethostname(), **{k: v for k, v in self.engine.describe().items()
                                                  if k in ("device_name", "dtype", "engine", "attention", "compiled")}}
        table, _ = self.reader.read(shard)
        self.beat()
        stats["read_s"] = time.perf_counter() - t0  # the wait for rows: near 0 when read ahead
        self.reader.read_ahead(read_ahead)
        stats["rows_in"] = table.num_rows
        # Each row's file and row within it (read_shard checked each part's row count against the plan)
        part_of = np.repeat(np.arange(len(shard["parts"]), dtype=np.int32),
                            [p["row_end"] - p["row_start"] for p in shard["parts"]])
        source_row = np.concatenate([np.arange(p["row_start"], p["row_end"], dtype=np.int64) for p in shard["parts"]])
        files = [p["uri"] for p in shard["parts"]]
        accepted, rejected, keep = split_rejects(to_canonical(table, self.cols), source_row, (part_of, files))

        depth = self.spec.get("rerank_depth")
        rescore = np.ones(accepted.num_rows, dtype=bool)
        if depth:
            rescore = np.asarray(pc.less_equal(accepted[FIRST_STAGE_RANK], depth).to_numpy(zero_copy_only=False), bool)
        queries = accepted[QUERY].to_pylist()
        docs = accepted[DOC].to_pylist()
        idx = np.flatnonzero(rescore)
        self.beat()
        maybe_fail(self.spec, shard, attempt, "before_score")
        scores, st = self.engine.score([queries[i] for i in idx], [docs[i] for i in idx])
        maybe_fail(self.spec, shard, attempt, "after_score")
        self.beat()
        full = np.zeros(accepted.num_rows, dtype=np.float32)
        full[idx] = scores
        broken = ~np.isfinite(full)
        if broken.any():  # NaN/inf even in float32 (kernels/overflow.py): a NaN would sort anywhere
            reasons = np.full(len(full), None, dtype=object)
            reasons[broken] = [f"score is {v} even in float32: the model overflows on this pair" for v in full[broken]]
            rejected = pa.concat_tables([rejected, with_reasons(accepted, broken, reasons, source_row[keep],
                                                                (part_of[keep], files))])
            accepted, full, rescore = accepted.filter(pa.array(~broken)), full[~broken], rescore[~broken]
        score_col = pa.array(full, pa.float32(), mask=~rescore)

        scored = accepted.append_column(SCORE, score_col).append_column(RESCORED, pa.array(rescore))
        scored = scored.append_column(ROW, pa.array(np.arange(scored.num_rows, dtype=np.int64)))
        wall = time.perf_counter() - t0  # the actor's time on this shard; the commit runs apart
        stats.update(
            status="ok", error=None, rows_scored=accepted.num_rows, rows_rejected=rejected.num_rows,
            rows_not_rescored=int((~rescore).sum()), duplicate_pairs=st.duplicate_pairs,
            truncated_pairs=st.truncated_pairs, float32_rescored=st.float32_rescored, real_tokens=st.real_tokens,
            computed_tokens=st.computed_tokens,
            padding_efficiency=st.padding_efficiency, batches=st.batches, oom_splits=st.oom_splits,
            tokenize_s=st.tokenize_s, model_s=st.model_s, wall_s=wall, scored_at=time.time(),
            pairs_per_s=len(idx) / wall if wall else 0.0, tokens_per_s=st.real_tokens / wall if wall else 0.0,
        )
        if stats["rows_scored"] + stats["rows_rejected"] != stats["rows_in"]:
            raise AssertionError(f"shard {shard['name']}: {stats['rows_in']} rows in but "
                                 f"{stats['rows_scored']} scored + {stats['rows_rejected']} rejected")
        return stats, {"scored": scored, "rejected": rejected}

    def process(self, shard: dict, attempt: int = 1, read_ahead: dict | None = None) -> dict:
        """Score one shard and commit it in this process; returns its stats."""
        stats = commit_shard(self.spec, shard, attempt, *self.score_shard(shard, attempt, read_ahead))
        self.beat()
        return stats


def _ray_node_id() -> str | None:
    """The Ray node this actor runs on (its commits are scheduled there), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None
