"""Cross-shard ranking: positions within each query, whichever files and shards its candidates came from.

Phase 1 (the workers) left, per shard, the scored rows and a small keys file per query bucket. Here:
  rank_bucket(b):  all keys of bucket b (every query in it, whole) -> first-stage rank where it was not
                   given, rerank position, and --top-k shortlists. Memory: one bucket, never the input.
  finish_shard(s): the shard's scored rows + its positions -> OUT/scores/<shard>.parquet.
Both are idempotent and commit atomically, so a killed run redoes only what is missing.
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from jobs.layout import OutputLayout
from jobs.storage import exists, list_dir, locate, read_parquet, write_json, write_parquet
from jobs.worker import ROW, SEQ
from schemas.contract import (
    DOC_ID, FIRST_STAGE_RANK, FIRST_STAGE_SCORE, QUERY_ID, RERANK_POSITION, RESCORED, SCORE,
)


def first_stage_rank(df: pl.DataFrame) -> pl.DataFrame:
    """Carry the given rank; else derive it from first_stage_score (desc), else from input order."""
    if FIRST_STAGE_RANK in df.columns:
        return df.with_columns(pl.col(FIRST_STAGE_RANK).cast(pl.Int32))
    keys, desc = ([FIRST_STAGE_SCORE, SEQ], [True, False]) if FIRST_STAGE_SCORE in df.columns else ([SEQ], [False])
    df = df.sort([QUERY_ID] + keys, descending=[False] + desc, nulls_last=True)
    return df.with_columns((pl.int_range(pl.len()).over(QUERY_ID) + 1).cast(pl.Int32).alias(FIRST_STAGE_RANK))


def rerank_positions(df: pl.DataFrame) -> pl.DataFrame:
    """Position 1 = best: rescored rows by score (desc), ties by first-stage rank, then doc_id, then input
    order; rows below --rerank-depth (score null) after them in first-stage order. A NaN score sorts last."""
    df = df.with_columns(pl.col(SCORE).fill_nan(None).alias("_sort_score"))
    df = df.sort([QUERY_ID, "_sort_score", FIRST_STAGE_RANK, DOC_ID, SEQ],
                 descending=[False, True, False, False, False], nulls_last=True)
    return df.with_columns((pl.int_range(pl.len()).over(QUERY_ID) + 1).cast(pl.Int32).alias(RERANK_POSITION)).drop("_sort_score")


def shortlists(df: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """One row per query: ids, scores and first-stage ranks in reranked order, cut at top_k."""
    top = df.filter(pl.col(RERANK_POSITION) <= top_k).sort([QUERY_ID, RERANK_POSITION])
    return top.group_by(QUERY_ID, maintain_order=True).agg(
        pl.col(DOC_ID).alias("doc_ids"), pl.col(SCORE).alias("scores"),
        pl.col(FIRST_STAGE_RANK).alias("first_stage_ranks"), pl.col(RESCORED).alias("rescored"))


def rank_bucket(output: str, bucket: int, key_files: list[str], shard_by_seq: dict[int, str], top_k: int | None) -> dict:
    layout = OutputLayout(locate(output))
    done = layout.bucket_done(bucket)
    if exists(done):
        return {"bucket": bucket, "skipped": True}
    tables = [read_parquet(locate(u)) for u in key_files]
    if not tables:
        write_json({"bucket": bucket, "rows": 0}, done)
        return {"bucket": bucket, "rows": 0}
    df = pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
    df = rerank_positions(first_stage_rank(df))
    df = df.with_columns((pl.col(SEQ) // (1 << 32)).alias("_shard_seq"))
    for (seq,), part in df.group_by("_shard_seq"):
        out = part.select(ROW, RERANK_POSITION, FIRST_STAGE_RANK).sort(ROW)
        write_parquet(out.to_arrow(), layout.positions(shard_by_seq[int(seq)], bucket))
    if top_k:
        write_parquet(shortlists(df, top_k).to_arrow(), layout.shortlist(bucket))
    write_json({"bucket": bucket, "rows": df.height}, done)  # the bucket's commit, written last
    return {"bucket": bucket, "rows": df.height}


def finish_shard(output: str, shard: str) -> dict:
    layout = OutputLayout(locate(output))
    final = layout.scores(shard)
    if exists(final):
        return {"shard": shard, "skipped": True}
    scored = read_parquet(layout.scored(shard))
    parts = [read_parquet(layout.positions_dir(shard).child(n)) for n in list_dir(layout.positions_dir(shard))]
    n = scored.num_rows
    pos = np.zeros(n, dtype=np.int32)
    fsr = np.zeros(n, dtype=np.int32)
    seen = np.zeros(n, dtype=np.int64)
    for p in parts:
        rows = p[ROW].to_numpy()
        pos[rows] = p[RERANK_POSITION].to_numpy()
        fsr[rows] = p[FIRST_STAGE_RANK].to_numpy()
        np.add.at(seen, rows, 1)
    if n and not (seen == 1).all():
        raise AssertionError(f"shard {shard}: {int((seen == 0).sum())} rows lack a position and "
                             f"{int((seen > 1).sum())} have several")
    out = scored.drop_columns([ROW])
    if FIRST_STAGE_RANK in out.column_names:
        out = out.set_column(out.column_names.index(FIRST_STAGE_RANK), FIRST_STAGE_RANK, pa.array(fsr))
    else:
        out = out.append_column(FIRST_STAGE_RANK, pa.array(fsr))
    out = out.append_column(RERANK_POSITION, pa.array(pos))
    write_parquet(out, final)
    return {"shard": shard, "rows": n}
