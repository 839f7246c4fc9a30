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

from jobs.layout import DamagedWork, OutputLayout
from jobs.storage import (
    delete_file, exists, list_dir, locate, parallel, read_json, write_json, write_parquet,
)
from schemas.contract import (
    DOC_HASH, DOC_ID, DUPLICATE_DOC_IDS, DUPLICATE_OF, FIRST_STAGE_RANK, FIRST_STAGE_SCORE, QUERY_ID,
    RERANK_POSITION, RESCORED, ROW, SCORE, SEQ,
)


def first_stage_rank(df: pl.DataFrame) -> pl.DataFrame:
    """Carry the given rank; else derive it from first_stage_score (desc), else from input order."""
    if FIRST_STAGE_RANK in df.columns:
        return df.with_columns(pl.col(FIRST_STAGE_RANK).cast(pl.Int32))
    keys, desc = ([FIRST_STAGE_SCORE, SEQ], [True, False]) if FIRST_STAGE_SCORE in df.columns else ([SEQ], [False])
    df = df.sort([QUERY_ID] + keys, descending=[False] + desc, nulls_last=True)
    return df.with_columns((pl.int_range(pl.len()).over(QUERY_ID) + 1).cast(pl.Int32).alias(FIRST_STAGE_RANK))


def collapse_duplicates(df: pl.DataFrame) -> pl.DataFrame:
    """--dedupe-docs: within a query, passages with identical text are one passage. The best first-stage
    ranked id is kept (and lists the others in duplicate_doc_ids); the others name it in duplicate_of and
    are ranked after every kept passage, never dropped."""
    df = df.sort([QUERY_ID, FIRST_STAGE_RANK, DOC_ID, SEQ])
    kept = pl.col(DOC_ID).first().over([QUERY_ID, DOC_HASH])
    # Rows repeating the kept id itself are duplicate (query_id, doc_id) rows, which stay side by side.
    df = df.with_columns(kept.alias("_kept_id"), (pl.col(DOC_ID) != kept).alias("_is_dup"))
    others = (df.filter(pl.col("_is_dup")).group_by([QUERY_ID, DOC_HASH], maintain_order=True)
              .agg(pl.col(DOC_ID).unique(maintain_order=True).alias(DUPLICATE_DOC_IDS)))
    df = df.join(others, on=[QUERY_ID, DOC_HASH], how="left", maintain_order="left")
    return df.with_columns(
        pl.when(pl.col("_is_dup")).then(pl.col("_kept_id")).otherwise(None).alias(DUPLICATE_OF),
        pl.when(pl.col("_is_dup")).then(None).otherwise(pl.col(DUPLICATE_DOC_IDS)).alias(DUPLICATE_DOC_IDS),
    ).drop("_kept_id")


def rerank_positions(df: pl.DataFrame) -> pl.DataFrame:
    """Position 1 = best: rescored rows by score (desc), ties by first-stage rank, then doc_id, then input
    order; rows below --rerank-depth (score null) after them in first-stage order; a NaN score after those;
    collapsed duplicates (--dedupe-docs) after all of those."""
    dup = pl.col("_is_dup") if "_is_dup" in df.columns else pl.lit(False)
    df = df.with_columns(pl.col(SCORE).fill_nan(None).alias("_sort_score"), dup.alias("_sort_dup"),
                         pl.col(SCORE).is_nan().fill_null(False).alias("_sort_nan"))
    df = df.sort([QUERY_ID, "_sort_dup", "_sort_nan", "_sort_score", FIRST_STAGE_RANK, DOC_ID, SEQ],
                 descending=[False, False, False, True, False, False, False], nulls_last=True)
    df = df.with_columns((pl.int_range(pl.len()).over(QUERY_ID) + 1).cast(pl.Int32).alias(RERANK_POSITION))
    return df.drop("_sort_score", "_sort_dup", "_sort_nan")


def activated(activation: str) -> pl.Expr:
    """The `score` column a user sees. Positions come from the raw logits: a float32 sigmoid is exactly 1.0
    above a logit of ~16.6, which would tie passages the model told apart (the order is the same otherwise)."""
    score = pl.col(SCORE)
    if activation == "sigmoid":
        score = (1.0 / (1.0 + (-score.cast(pl.Float64)).exp())).cast(pl.Float32)
    return score.alias(SCORE)


def shortlists(df: pl.DataFrame, top_k: int, activation: str = "identity") -> pl.DataFrame:
    """One row per query: ids, scores and first-stage ranks in reranked order, cut at top_k."""
    df = df.with_columns(activated(activation))
    if "_is_dup" in df.columns:
        df = df.filter(~pl.col("_is_dup"))
    top = df.filter(pl.col(RERANK_POSITION) <= top_k).sort([QUERY_ID, RERANK_POSITION])
    extra = [pl.col(DUPLICATE_DOC_IDS).alias("duplicate_doc_ids")] if DUPLICATE_DOC_IDS in df.columns else []
    return top.group_by(QUERY_ID, maintain_order=True).agg(
        pl.col(DOC_ID).alias("doc_ids"), pl.col(SCORE).alias("scores"),
        pl.col(FIRST_STAGE_RANK).alias("first_stage_ranks"), pl.col(RESCORED).alias("rescored"), *extra)


def _read_marker(done) -> dict | None:
    """A bucket's marker, or None when absent or unreadable (truncated by hand): the bucket is ranked again."""
    if not exists(done):
        return None
    try:
        return read_json(done)
    except ValueError:
        return None


def rank_bucket(output: str, bucket: int, key_files: list[str], shard_by_seq: dict[int, str], top_k: int | None,
                activation: str = "identity") -> dict:
    layout = OutputLayout(locate(output))
    done = layout.bucket_done(bucket)
    marker = _read_marker(done)
    if marker is not None:
        # Positions never change on a rerun, shortlists do when --top-k does: an earlier cut that is no longer
        # wanted goes, another cut ranks the bucket again.
        if marker.get("top_k") != top_k and not top_k:
            delete_file(layout.shortlist(bucket))
            marker["top_k"] = top_k
            write_json(marker, done)
        if marker.get("top_k") == top_k:
            return {**marker, "skipped": True}
    # One small file per shard with rows in this bucket (thousands on a big job): read and written concurrently.
    tables = parallel(lambda u: layout.read_work(locate(u), layout.shard_of_key(u)), key_files)
    if not tables:
        marker = {"bucket": bucket, "rows": 0, "docs_collapsed": 0, "top_k": top_k}
        write_json(marker, done)
        return marker
    df = pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
    df = first_stage_rank(df)
    if DOC_HASH in df.columns:
        df = collapse_duplicates(df)
    df = rerank_positions(df)
    df = df.with_columns((pl.col(SEQ) // (1 << 32)).alias("_shard_seq"))
    carried = [ROW, RERANK_POSITION, FIRST_STAGE_RANK] + [c for c in (DUPLICATE_OF, DUPLICATE_DOC_IDS) if c in df.columns]
    parts = [(shard_by_seq[int(seq)], part.select(carried).sort(ROW).to_arrow())
             for (seq,), part in df.group_by("_shard_seq")]
    parallel(lambda p: write_parquet(p[1], layout.positions(p[0], bucket)), parts)
    if top_k:
        write_parquet(shortlists(df, top_k, activation).to_arrow(), layout.shortlist(bucket))
    collapsed = int(df["_is_dup"].sum()) if "_is_dup" in df.columns else 0
    marker = {"bucket": bucket, "rows": df.height, "docs_collapsed": collapsed, "top_k": top_k}
    write_json(marker, done)  # the bucket's commit, last
    return marker


def finish_shard(output: str, shard: str, activation: str = "identity") -> dict:
    layout = OutputLayout(locate(output))
    final = layout.scores(shard)
    if exists(final):
        return {"shard": shard, "skipped": True}
    scored = layout.read_work(layout.scored(shard), shard)  # logits: the activation is applied here, last
    if activation != "identity":
        sig = pl.from_arrow(scored.select([SCORE])).select(activated(activation)).to_arrow()[SCORE]
        scored = scored.set_column(scored.column_names.index(SCORE), SCORE, sig)
    parts = parallel(lambda loc: layout.read_work(loc, shard),
                     [layout.positions_dir(shard).child(n) for n in list_dir(layout.positions_dir(shard))])
    n = scored.num_rows
    if parts:
        pos = pa.concat_tables(parts, promote_options="permissive")
        pos = pos.take(pa.array(np.argsort(pos[ROW].to_numpy(), kind="stable")))
    else:
        pos = pa.table({ROW: pa.array([], pa.int64()), RERANK_POSITION: pa.array([], pa.int32()),
                        FIRST_STAGE_RANK: pa.array([], pa.int32())})
    if not np.array_equal(pos[ROW].to_numpy(), np.arange(n)):  # each row exactly once, or refuse to commit
        raise DamagedWork(layout, shard, f"{n} scored rows but positions for rows "
                                         f"{pos[ROW].to_numpy()[:10].tolist()}... ({pos.num_rows} in all)")
    out = scored.drop_columns([ROW])
    if FIRST_STAGE_RANK in out.column_names:
        out = out.set_column(out.column_names.index(FIRST_STAGE_RANK), FIRST_STAGE_RANK, pos[FIRST_STAGE_RANK])
    else:
        out = out.append_column(FIRST_STAGE_RANK, pos[FIRST_STAGE_RANK])
    out = out.append_column(RERANK_POSITION, pos[RERANK_POSITION])
    for col in (DUPLICATE_OF, DUPLICATE_DOC_IDS):
        if col in pos.column_names:
            out = out.append_column(col, pos[col])
    write_parquet(out, final)
    return {"shard": shard, "rows": n}
