"""Rerank report metrics, computed with polars from the rerank job's `OUT/scores/*.parquet`.

Memory stays bounded: only the small columns the metrics need are read (once, by jobs/report_source.py),
and when the run is large the queries are processed in hash buckets of about ROWS_PER_BUCKET rows (a
query's rows always land in the same bucket, whichever shard file they are in). What is kept across
buckets is one row per query plus small histograms. Passage text is read only for the rows on the review list.

Definitions (also shown in the report):
- Positions. first-stage position = `first_stage_rank` renumbered 1..n within the query (ties by doc_id);
  reranked position = `rerank_position` renumbered the same way. Both equal the stored columns when those
  are already 1..n, which is what the rerank job writes. The metrics use positions; columns named
  `*_first_stage_rank` and the depth share report the stored rank (given ranks may have gaps), which is
  what `--rerank-depth` filters on. Collapsed copies (`--dedupe-docs`, `duplicate_of` set) are left out.
- Shift = first-stage position - reranked position (positive = moved up).
- Kendall tau-b between the two orders, per query. Positions have no ties, so tau-b = tau-a =
  (concordant - discordant) / (n(n-1)/2). Null for single-candidate queries, which are left out of means.
- Relevant = label > 0 (null labels count as 0). Gain = 2^label - 1 (exponential gain), discount
  1/log2(position + 1); the ideal DCG is taken over the query's own candidates, so nDCG measures the
  ordering of the shortlist, not retrieval recall. MRR@10 = 1/position of the first relevant doc within the
  top 10 (0 when none). Recall@k = relevant docs in the top k / relevant docs in the shortlist.
  Queries with no relevant candidate are left out of nDCG/MRR/recall means and counted.
- Reranker win rate: share of labelled queries whose nDCG@10 went up / down / stayed (|delta| <= 1e-9).
- New misordered pair: a relevant doc R that reranking moved down, and a doc X with a lower label that was
  below R in first-stage order and is above R now. The review list shows, per query, the worst such pair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from jobs.report_pairs import kendall_tau, misordered

KS = (1, 3, 10)
MRR_K = 10
DEEP_RANK = 4  # "the final top-1 came from first-stage rank >= 4": what a too-shallow depth would miss
EPS = 1e-9
ROWS_PER_BUCKET = 1_000_000  # rows held at once (~200 MB peak per million); larger runs split into hash buckets
SCORE_BINS = 40

Q, DOC = "query_id", "doc_id"
REQUIRED = (Q, DOC, "first_stage_rank", "rerank_position", "score")
QUALITY = tuple(f"ndcg@{k}" for k in KS) + (f"mrr@{MRR_K}",) + tuple(f"recall@{k}" for k in KS)


class ScoresMissingError(FileNotFoundError):
    """OUT/scores is missing, empty or unusable."""


def prepare(df: pl.DataFrame, has_label: bool, has_rescored: bool) -> pl.DataFrame:
    """Add qc (integer query code, for fast joins), fs_pos, rr_pos, shift (and gain, ideal_pos when
    labelled) to one bucket's rows, grouped by qc (an integer sort, much cheaper than sorting strings)."""
    big = pl.lit(2**31 - 1, pl.Int64)  # a null rank sorts last
    codes = df.select(pl.col(Q).unique()).sort(Q).with_row_index("qc")
    # Rows grouped by an integer key: the self-joins below run ~15x faster on a sorted key than on a shuffled one.
    df = df.join(codes, on=Q, how="left").sort("qc", maintain_order=True).with_columns(
        pl.col("score").cast(pl.Float64),
        (pl.col("rescored").fill_null(False) if has_rescored else pl.col("score").is_not_null()).alias("rescored"),
    )
    ordinal = lambda col: (pl.struct(pl.col(col).cast(pl.Int64).fill_null(big), DOC)  # noqa: E731
                           .rank("ordinal").over("qc").cast(pl.Int32))
    df = df.with_columns(fs_pos=ordinal("first_stage_rank"), rr_pos=ordinal("rerank_position"),
                         fs_rank=pl.col("first_stage_rank").cast(pl.Int32))  # as stored: what depth filters on
    df = df.with_columns(shift=pl.col("fs_pos") - pl.col("rr_pos"))
    if has_label:
        lab = pl.col("label").cast(pl.Float64).fill_null(0.0).clip(lower_bound=0.0)
        df = df.with_columns(label=lab, gain=pl.lit(2.0).pow(lab) - 1.0)
        df = df.with_columns(ideal_pos=pl.col("label").rank("ordinal", descending=True).over("qc").cast(pl.Int32))
    return df


def _disc(pos: str) -> pl.Expr:
    return pl.col("gain") / (pl.col(pos).cast(pl.Float64) + 1.0).log(2)


def per_query(df: pl.DataFrame, has_label: bool) -> pl.DataFrame:
    """One row per query of a prepared bucket."""
    fs, rr = pl.col("fs_pos"), pl.col("rr_pos")
    aggs = [
        pl.len().cast(pl.Int32).alias("n_candidates"),
        pl.col("rescored").sum().cast(pl.Int32).alias("n_rescored"),
        pl.col(DOC).filter(fs == 1).first().alias("first_stage_winner"),
        pl.col(DOC).filter(rr == 1).first().alias("new_winner"),
        pl.col("fs_rank").filter(rr == 1).first().alias("new_winner_first_stage_rank"),
        pl.col("shift").abs().mean().alias("mean_abs_shift"),
        pl.col("shift").max().clip(lower_bound=0).cast(pl.Int32).alias("max_promotion"),
        (-pl.col("shift")).max().clip(lower_bound=0).cast(pl.Int32).alias("max_demotion"),
    ]
    # The doc that moved furthest up / down (ties: the better first-stage position); null when none moved.
    up, down = pl.col("shift").max() > 0, pl.col("shift").min() < 0
    by_up, by_down = [-pl.col("shift"), fs], [pl.col("shift"), fs]
    aggs += [
        pl.when(up).then(pl.col(DOC).sort_by(by_up).first()).alias("most_promoted_doc_id"),
        pl.when(up).then(pl.col("fs_rank").sort_by(by_up).first()).alias("most_promoted_first_stage_rank"),
        pl.when(up).then(rr.sort_by(by_up).first()).cast(pl.Int32).alias("most_promoted_rerank_position"),
        pl.when(down).then(pl.col(DOC).sort_by(by_down).first()).alias("most_demoted_doc_id"),
        pl.when(down).then(pl.col("fs_rank").sort_by(by_down).first()).alias("most_demoted_first_stage_rank"),
        pl.when(down).then(rr.sort_by(by_down).first()).cast(pl.Int32).alias("most_demoted_rerank_position"),
        ((pl.col("rerank_position").n_unique() != pl.len()) | (pl.col("rerank_position").min() != 1)
         | (pl.col("rerank_position").max() != pl.len())).alias("rerank_position_inconsistent"),
    ]
    for k in KS:
        aggs.append(((rr <= k) & (fs > k)).sum().cast(pl.Int32).alias(f"promoted_into_top{k}"))
        aggs.append(((fs <= k) & (rr > k)).sum().cast(pl.Int32).alias(f"demoted_out_of_top{k}"))
    if has_label:
        rel = pl.col("label") > 0
        aggs.append(rel.sum().cast(pl.Int32).alias("n_relevant"))
        for k in KS:
            aggs.append(_disc("fs_pos").filter(fs <= k).sum().alias(f"_dcg{k}_b"))
            aggs.append(_disc("rr_pos").filter(rr <= k).sum().alias(f"_dcg{k}_a"))
            aggs.append(_disc("ideal_pos").filter(pl.col("ideal_pos") <= k).sum().alias(f"_idcg{k}"))
            aggs.append((rel & (fs <= k)).sum().alias(f"_hit{k}_b"))
            aggs.append((rel & (rr <= k)).sum().alias(f"_hit{k}_a"))
        aggs.append((1.0 / fs.cast(pl.Float64)).filter(rel & (fs <= MRR_K)).max().fill_null(0.0).alias("_rr_b"))
        aggs.append((1.0 / rr.cast(pl.Float64)).filter(rel & (rr <= MRR_K)).max().fill_null(0.0).alias("_rr_a"))
    pq = df.group_by("qc").agg(pl.col(Q).first(), *aggs)
    pq = pq.with_columns(
        winner_changed=pl.col("first_stage_winner") != pl.col("new_winner"),
        top1_from_deep=pl.col("new_winner_first_stage_rank") >= DEEP_RANK,
    )
    pq = pq.join(kendall_tau(df), on="qc", how="left")
    if has_label:
        labelled = pl.col("n_relevant") > 0
        cols = []
        for k in KS:
            for side, tag in (("before", "b"), ("after", "a")):
                cols.append(pl.when(labelled).then(pl.col(f"_dcg{k}_{tag}") / pl.col(f"_idcg{k}"))
                            .alias(f"ndcg@{k}_{side}"))
                cols.append(pl.when(labelled).then(pl.col(f"_hit{k}_{tag}") / pl.col("n_relevant"))
                            .alias(f"recall@{k}_{side}"))
        for side, tag in (("before", "b"), ("after", "a")):
            cols.append(pl.when(labelled).then(pl.col(f"_rr_{tag}")).alias(f"mrr@{MRR_K}_{side}"))
        pq = pq.with_columns(cols)
        delta = pl.col("ndcg@10_after") - pl.col("ndcg@10_before")
        pq = pq.with_columns(delta.alias("ndcg@10_delta")).with_columns(
            pl.when(pl.col("ndcg@10_delta") > EPS).then(pl.lit("up"))
            .when(pl.col("ndcg@10_delta") < -EPS).then(pl.lit("down"))
            .when(pl.col("ndcg@10_delta").is_not_null()).then(pl.lit("unchanged"))
            .otherwise(pl.lit(None, dtype=pl.String)).alias("outcome"))
        counts = misordered(df).group_by("qc").agg(pl.col("n_pairs").sum().alias("new_misordered_pairs"))
        pq = pq.join(counts, on="qc", how="left").with_columns(
            pl.when(pl.col("n_relevant") > 0).then(pl.col("new_misordered_pairs").fill_null(0))
            .alias("new_misordered_pairs"))
    return pq.select(per_query_columns(has_label)).sort(Q)


def per_query_columns(has_label: bool) -> list[str]:
    """Column order of per_query.parquet."""
    cols = [Q, "n_candidates", "n_rescored", "winner_changed", "first_stage_winner", "new_winner",
            "new_winner_first_stage_rank", "top1_from_deep", "kendall_tau", "mean_abs_shift", "max_promotion",
            "max_demotion", "most_promoted_doc_id", "most_promoted_first_stage_rank",
            "most_promoted_rerank_position", "most_demoted_doc_id", "most_demoted_first_stage_rank",
            "most_demoted_rerank_position"]
    cols += [f"{m}_top{k}" for k in KS for m in ("promoted_into", "demoted_out_of")]
    if has_label:
        cols.append("n_relevant")
        cols += [f"{name}_{side}" for name in QUALITY for side in ("before", "after")]
        cols += ["ndcg@10_delta", "outcome", "new_misordered_pairs"]
    cols.append("rerank_position_inconsistent")
    return cols


REVIEW_ORDER = (["ndcg@10_delta", "label", "drop", Q], [False, True, True, False])


def review_candidates(df: pl.DataFrame, pq: pl.DataFrame, limit: int) -> pl.DataFrame | None:
    """The worst regressions of one bucket: per query, its worst misordered pair; at most `limit` queries.

    Within a query the worst pair is the relevant doc with the highest label, then the largest drop, and,
    above it, the highest-placed lower-label doc that overtook it.
    """
    if limit <= 0:
        return None
    demoted = misordered(df).filter(pl.col("n_pairs") > 0)
    if demoted.is_empty():
        return None
    demoted = demoted.with_columns(drop=(pl.col("rr_pos") - pl.col("fs_pos")).cast(pl.Int32))
    worst = (demoted.sort(Q, "label", "drop", "rr_pos_above", "fs_pos", descending=[False, True, True, False, False])
             .group_by(Q, maintain_order=True).first())
    above = df.select("qc", pl.col("rr_pos").alias("rr_pos_above"),
                      *[pl.col(c).alias(f"{c}_above") for c in (DOC, "label", "fs_pos", "score", "fs_rank")])
    worst = worst.join(above, on=["qc", "rr_pos_above"], how="left")
    worst = worst.join(pq.select(Q, "ndcg@10_before", "ndcg@10_after", "ndcg@10_delta"), on=Q, how="left")
    by, desc = REVIEW_ORDER
    return worst.sort(by, descending=desc).head(limit)


def review_schema(schema: pl.Schema) -> dict:
    """Columns and types of review.parquet (query_id and doc_id keep their input types)."""
    side = lambda p: {f"{p}_doc_id": schema[DOC], f"{p}_doc": pl.String, f"{p}_label": pl.Float64,  # noqa: E731
                      f"{p}_first_stage_rank": pl.Int32, f"{p}_rerank_position": pl.Int32, f"{p}_score": pl.Float64}
    return {"rank": pl.Int32, Q: schema[Q], "query": pl.String, "ndcg@10_before": pl.Float64,
            "ndcg@10_after": pl.Float64, "ndcg@10_delta": pl.Float64, **side("demoted"), **side("above")}


def finish_review(cands: list[pl.DataFrame | None], staged, limit: int) -> pl.DataFrame:
    """Merge the buckets' review candidates, keep the worst `limit`, and fetch their query/passage text
    (`staged`: report_source.StagedScores). Empty (with the review.parquet schema) when no query has a
    relevant passage pushed down."""
    out_schema = review_schema(staged.schema)
    cands = [c for c in cands if c is not None and c.height]
    if not cands or limit <= 0:
        return pl.DataFrame(schema=out_schema)
    by, desc = REVIEW_ORDER
    top = pl.concat(cands, how="vertical_relaxed").sort(by, descending=desc).head(limit)
    text = staged.texts(top[Q]).unique([Q, DOC], keep="first", maintain_order=True)
    top = top.join(text.select(Q, "query").unique(Q, keep="first", maintain_order=True), on=Q, how="left")
    docs = text.select(Q, DOC, "doc")
    top = (top.join(docs, on=[Q, DOC], how="left")
           .join(docs.rename({DOC: "doc_id_above", "doc": "doc_above"}), on=[Q, "doc_id_above"], how="left"))
    top = top.with_row_index("rank", offset=1).select(
        "rank", Q, "query", "ndcg@10_before", "ndcg@10_after", "ndcg@10_delta",
        pl.col(DOC).alias("demoted_doc_id"), pl.col("doc").alias("demoted_doc"),
        pl.col("label").alias("demoted_label"), pl.col("fs_rank").alias("demoted_first_stage_rank"),
        pl.col("rr_pos").alias("demoted_rerank_position"), pl.col("score").alias("demoted_score"),
        pl.col("doc_id_above").alias("above_doc_id"), pl.col("doc_above").alias("above_doc"),
        pl.col("label_above").alias("above_label"), pl.col("fs_rank_above").alias("above_first_stage_rank"),
        pl.col("rr_pos_above").alias("above_rerank_position"), pl.col("score_above").alias("above_score"),
    )
    return top.cast(out_schema)


def score_moments(df: pl.DataFrame, has_rescored: bool) -> dict:
    """n, min, max, mean and m2 (sum of squared deviations) of one frame's rescored, finite scores."""
    keep = pl.col("score").is_not_null()
    if has_rescored:
        keep = keep & pl.col("rescored").fill_null(False)
    s = pl.col("score").cast(pl.Float64)
    return (df.lazy().filter(keep & s.is_finite())
            .select(n=pl.len(), min=s.min(), max=s.max(), mean=s.mean(), m2=((s - s.mean()) ** 2).sum())
            .collect().row(0, named=True))


def score_range(parts: list[dict]) -> dict:
    """Min/max/mean/std/count of the rescored scores from per-file moments (score_moments), merged in
    file order (Chan et al.'s pairwise update): the same figures however the rows are later bucketed."""
    n, mean, m2, lo, hi = 0, 0.0, 0.0, None, None
    for p in parts:
        if not p["n"]:
            continue
        total = n + p["n"]
        delta = p["mean"] - mean
        mean += delta * p["n"] / total
        m2 += p["m2"] + delta * delta * n * p["n"] / total
        n = total
        lo = p["min"] if lo is None else min(lo, p["min"])
        hi = p["max"] if hi is None else max(hi, p["max"])
    return {"n": n, "min": lo, "max": hi, "mean": mean if n else None,
            "std": math.sqrt(m2 / (n - 1)) if n > 1 else None}


def score_bins(df: pl.DataFrame, lo: float | None, hi: float | None, n_bins: int = SCORE_BINS) -> pl.DataFrame:
    """Counts of one bucket's rescored scores in n_bins equal-width bins over [lo, hi]."""
    if lo is None or hi is None:
        return pl.DataFrame(schema={"bin": pl.Int32, "count": pl.UInt32})
    width = (hi - lo) / n_bins if hi > lo else 1.0
    s = pl.col("score")
    return (df.filter(pl.col("rescored") & s.is_not_null() & s.is_finite())
            .select(((s - lo) / width).floor().clip(0, n_bins - 1).cast(pl.Int32).alias("bin"))
            .group_by("bin").agg(pl.len().alias("count")))


def score_histogram(parts: list[pl.DataFrame], lo: float | None, hi: float | None,
                    n_bins: int = SCORE_BINS) -> pl.DataFrame:
    """Sum the buckets' bin counts into bin_start, bin_end, count (every bin present)."""
    if lo is None or hi is None:
        return pl.DataFrame(schema={"bin_start": pl.Float64, "bin_end": pl.Float64, "count": pl.Int64})
    width = (hi - lo) / n_bins if hi > lo else 1.0
    counts = pl.concat(parts).group_by("bin").agg(pl.col("count").sum().cast(pl.Int64))
    grid = pl.DataFrame({"bin": pl.int_range(0, n_bins, dtype=pl.Int32, eager=True)})
    return (grid.join(counts, on="bin", how="left")
            .select(bin_start=lo + pl.col("bin") * width, bin_end=lo + (pl.col("bin") + 1) * width,
                    count=pl.col("count").fill_null(0)).sort("bin_start"))


def shift_counts(df: pl.DataFrame) -> pl.DataFrame:
    return df.group_by("shift").agg(pl.len().cast(pl.Int64).alias("count"))


def shift_histogram(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts).group_by("shift").agg(pl.col("count").sum()).sort("shift")


def _weighted_quantile(hist: pl.DataFrame, q: float) -> float | None:
    total = hist["count"].sum()
    if not total:
        return None
    target = q * total
    cum = hist.with_columns(cum=pl.col("count").cum_sum())
    return float(cum.filter(pl.col("cum") >= target)["shift"][0])


@dataclass
class MetricTable:
    rows: list[dict] = field(default_factory=list)

    def single(self, section: str, metric: str, value, n, description: str) -> None:
        self.rows.append({"section": section, "metric": metric, "value": _f(value), "before": None,
                          "after": None, "delta": None, "n": _i(n), "description": description})

    def paired(self, section: str, metric: str, before, after, n, description: str) -> None:
        b, a = _f(before), _f(after)
        d = a - b if a is not None and b is not None else None
        self.rows.append({"section": section, "metric": metric, "value": a, "before": b, "after": a,
                          "delta": d, "n": _i(n), "description": description})

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema={
            "section": pl.String, "metric": pl.String, "value": pl.Float64, "before": pl.Float64,
            "after": pl.Float64, "delta": pl.Float64, "n": pl.Int64, "description": pl.String})


def _f(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _i(v) -> int | None:
    return None if v is None else int(v)


def summarize(pq: pl.DataFrame, shifts: pl.DataFrame, scores: dict, has_label: bool,
              n_rows: int) -> pl.DataFrame:
    """The long metrics table: one row per metric (see report.py's docstring for the layout)."""
    t = MetricTable()
    nq = pq.height
    multi = pq.filter(pl.col("n_candidates") >= 2)
    g = pq.select(
        n_rows_rescored=pl.col("n_rescored").sum(),
        q_unrescored=(pl.col("n_rescored") < pl.col("n_candidates")).sum(),
        deep=pl.col("top1_from_deep").sum(),
        min_resc=pl.col("n_rescored").min(), max_resc=pl.col("n_rescored").max(),
        bad_rr=pl.col("rerank_position_inconsistent").sum(),
        single=(pl.col("n_candidates") < 2).sum(),
    ).row(0, named=True)

    t.single("coverage", "queries", nq, nq, "queries in the run")
    t.single("coverage", "rows", n_rows, n_rows, "candidate rows in the run")
    t.single("coverage", "single_candidate_queries", g["single"], nq,
             "queries with one candidate (nothing to reorder; left out of tau and winner-change means)")

    m = multi.select(
        wc=pl.col("winner_changed").mean(), tau=pl.col("kendall_tau").mean(),
        tau_med=pl.col("kendall_tau").median(), n_tau=pl.col("kendall_tau").is_not_null().sum(),
    ).row(0, named=True) if multi.height else {"wc": None, "tau": None, "tau_med": None, "n_tau": 0}
    t.single("movement", "winner_change_rate", m["wc"], multi.height,
             "share of queries (2+ candidates) whose top-1 document changed")
    for k in KS:
        r = pq.select(p=pl.col(f"promoted_into_top{k}").mean(), d=pl.col(f"demoted_out_of_top{k}").mean(),
                      c=(pl.col(f"promoted_into_top{k}") > 0).mean()).row(0)
        t.single("movement", f"promoted_into_top{k}", r[0], nq,
                 f"mean docs per query that entered the top {k} from below it")
        t.single("movement", f"demoted_out_of_top{k}", r[1], nq,
                 f"mean docs per query that left the top {k} (equals promotions: the top {k} keeps its size)")
        t.single("movement", f"top{k}_changed_share", r[2], nq, f"share of queries whose top-{k} set changed")
    n_shift = int(shifts["count"].sum()) if shifts.height else 0
    sh = shifts.select(
        mean=(pl.col("shift") * pl.col("count")).sum() / pl.col("count").sum(),
        mean_abs=(pl.col("shift").abs() * pl.col("count")).sum() / pl.col("count").sum(),
        moved=pl.col("count").filter(pl.col("shift") != 0).sum() / pl.col("count").sum(),
        up=pl.col("shift").max(), down=-pl.col("shift").min(),
    ).row(0, named=True) if n_shift else dict.fromkeys(("mean", "mean_abs", "moved", "up", "down"))
    t.single("movement", "mean_shift", sh["mean"], n_shift,
             "mean of first-stage position - reranked position over all rows (0 by construction)")
    t.single("movement", "mean_abs_shift", sh["mean_abs"], n_shift, "mean |shift| over all rows")
    t.single("movement", "moved_share", sh["moved"], n_shift, "share of rows whose position changed")
    for q in (0.05, 0.5, 0.95):
        t.single("movement", f"shift_p{round(q * 100):02d}", _weighted_quantile(shifts, q), n_shift,
                 f"{round(q * 100)}th percentile of shift (positive = moved up)")
    t.single("movement", "max_promotion", sh["up"], n_shift, "largest upward move of one row, in positions")
    t.single("movement", "max_demotion", sh["down"], n_shift, "largest downward move of one row, in positions")
    t.single("movement", "kendall_tau_mean", m["tau"], m["n_tau"],
             "mean per-query Kendall tau-b between first-stage and reranked order (1 = unchanged)")
    t.single("movement", "kendall_tau_median", m["tau_med"], m["n_tau"], "median per-query Kendall tau-b")

    if has_label:
        lab = pq.filter(pl.col("n_relevant") > 0)
        nl = lab.height
        for name in QUALITY:
            b, a = (lab.select(pl.col(f"{name}_before").mean(), pl.col(f"{name}_after").mean()).row(0)
                    if nl else (None, None))
            t.paired("quality", name, b, a, nl, _QUALITY_DESC[name.split("@")[0]].format(k=name.split("@")[1]))
        for outcome in ("up", "down", "unchanged"):
            share = (lab["outcome"] == outcome).mean() if nl else None
            t.single("quality", f"win_rate_{outcome}", share, nl,
                     f"share of labelled queries whose nDCG@10 went {outcome}" if outcome != "unchanged"
                     else "share of labelled queries whose nDCG@10 did not change")
        t.single("quality", "queries_without_relevant", nq - nl, nq,
                 "queries with no label > 0 candidate (left out of nDCG, MRR and recall)")
        t.single("quality", "queries_with_new_misordered_pairs", (lab["new_misordered_pairs"] > 0).sum(), nl,
                 "labelled queries where a relevant doc was pushed below a less relevant doc it used to outrank")

    t.single("depth", "rows_rescored_share", g["n_rows_rescored"] / n_rows if n_rows else None, n_rows,
             "share of rows the cross-encoder scored (the rest sat below --rerank-depth)")
    t.single("depth", "queries_with_unrescored_rows_share", g["q_unrescored"] / nq if nq else None, nq,
             "share of queries with rows kept in first-stage order below the rerank depth")
    t.single("depth", "rescored_per_query_min", g["min_resc"], nq, "fewest rescored candidates in a query")
    t.single("depth", "rescored_per_query_max", g["max_resc"], nq, "most rescored candidates in a query")
    t.single("depth", f"top1_from_first_stage_rank_ge_{DEEP_RANK}_share", g["deep"] / nq if nq else None, nq,
             f"share of queries whose final top-1 sat at first-stage rank >= {DEEP_RANK}: winners a shallow "
             "rerank depth would never see")

    t.single("scores", "score_min", scores.get("min"), scores.get("n"), "lowest raw score (rescored rows)")
    t.single("scores", "score_max", scores.get("max"), scores.get("n"), "highest raw score (rescored rows)")
    t.single("scores", "score_mean", scores.get("mean"), scores.get("n"), "mean raw score (rescored rows)")
    t.single("scores", "score_std", scores.get("std"), scores.get("n"), "standard deviation of raw scores")
    t.single("coverage", "queries_inconsistent_rerank_position", g["bad_rr"], nq,
             "queries whose rerank_position is not exactly 1..n (renumbered for the metrics; should be 0)")
    return t.frame()


_QUALITY_DESC = {
    "ndcg": "nDCG@{k}, gain 2^label - 1, ideal order over the query's candidates",
    "mrr": "MRR@{k}: 1 / position of the first label > 0 doc in the top {k}",
    "recall": "Recall@{k}: relevant docs (label > 0) in the top {k} / relevant docs in the shortlist",
}
