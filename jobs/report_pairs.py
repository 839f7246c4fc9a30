"""The report's pair metrics without enumerating pairs: Kendall tau and new misordered pairs per query.

Both count pairs of candidates within a query. A self-join enumerates n^2/2 pairs: fine for shortlists of a
hundred, but one query with 30,000 candidates took 77 s and 2.7 GB, and 1M would not fit. Here each is a
dominance count done by a bottom-up merge sort whose every level is a few vectorised numpy calls:
O(n log^2 n) for a whole bucket at once, queries kept apart by offsetting each query's values.
"""
from __future__ import annotations

import numpy as np
import polars as pl


def earlier_greater(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """For each i, the sum of weights[j] (1 if not given) over j < i with values[j] > values[i].

    Merge sort, bottom up: at width w the array is sorted runs of w; each right run is counted against its left
    partner with searchsorted (every pair of runs at once: a run pair's values are offset so that one sorted
    array holds all left runs), then each pair of runs is merged by one stable argsort."""
    n = len(values)
    out = np.zeros(n, dtype=np.int64)
    if n < 2:
        return out
    v = np.asarray(values, dtype=np.int64)
    v = v - v.min()
    span = int(v.max()) + 1
    w = np.ones(n, dtype=np.int64) if weights is None else np.asarray(weights, dtype=np.int64)
    ids = np.arange(n)
    at = np.arange(n)
    width = 1
    while width < n:
        block = at // width
        pair = block >> 1
        left = (block & 1) == 0
        key = v + pair * span
        left_keys = key[left]  # sorted: sorted runs, offset by their pair
        cum = np.concatenate(([0], np.cumsum(w[left])))
        right_pair = pair[~left]
        end = np.searchsorted(left_keys, (right_pair + 1) * span, "left")  # past the partner run
        first_greater = np.searchsorted(left_keys, key[~left], "right")
        out[ids[~left]] += cum[end] - cum[first_greater]
        perm = np.argsort(key, kind="stable")  # pairs keep their places: their keys do not overlap
        v, w, ids = v[perm], w[perm], ids[perm]
        width *= 2
    return out


def kendall_tau(df: pl.DataFrame, key: str = "qc") -> pl.DataFrame:
    """Per-query Kendall tau-b between first-stage and reranked positions (no ties, so tau-b = tau-a):
    discordant pairs are, in first-stage order, the earlier candidates now placed lower. Returns `key`,
    kendall_tau for queries with 2+ candidates."""
    d = df.select(key, "fs_pos", "rr_pos").sort([key, "fs_pos"])
    code = d[key].rank("dense").to_numpy().astype(np.int64)  # 1..k in sorted order: the per-query offset
    rr = d["rr_pos"].to_numpy().astype(np.int64)
    span = int(rr.max()) + 1 if len(rr) else 1
    # An earlier query's values are all smaller, so no pair across queries counts.
    disc = earlier_greater(code * span + rr)
    per = (d.select(key).with_columns(pl.Series("disc", disc)).group_by(key, maintain_order=True)
           .agg(n=pl.len().cast(pl.Float64), disc=pl.col("disc").sum().cast(pl.Float64)))
    n_pairs = pl.col("n") * (pl.col("n") - 1) / 2.0
    return per.filter(pl.col("n") > 1).select(key, ((n_pairs - 2.0 * pl.col("disc")) / n_pairs).alias("kendall_tau"))


def misordered(df: pl.DataFrame) -> pl.DataFrame:
    """Each relevant candidate R that reranking moved down (label > 0, rr_pos > fs_pos), with how many
    candidates X of a lower label were below it in first-stage order and are above it now (`n_pairs`), and the
    highest placed of them (`rr_pos_above`, null when none). Columns: those of `df` for R, plus those two.

    A candidate's label threshold depends on R, so the counts run once per level of R's label within its
    query (graded labels 0-3: at most 3 passes), each over the queries that have that level."""
    d = df.sort(["qc", "fs_pos"], descending=[False, True]).with_row_index("_i")  # first-stage order, reversed
    is_r = (pl.col("label") > 0) & (pl.col("rr_pos") > pl.col("fs_pos"))
    levels = (d.filter(is_r).select("qc", "label").unique()
              .with_columns(_level=pl.col("label").rank("dense").over("qc").cast(pl.Int32)))
    n_pairs = np.zeros(d.height, dtype=np.int64)
    best = np.full(d.height, np.iinfo(np.int64).max, dtype=np.int64)
    span = int(d["rr_pos"].max()) + 1 if d.height else 1
    for level in range(1, int(levels["_level"].max() or 0) + 1):
        cut = levels.filter(pl.col("_level") == level).select("qc", pl.col("label").alias("_cut"))
        part = d.join(cut, on="qc", how="inner", maintain_order="left")  # the queries with this level
        i = part["_i"].to_numpy()
        lower = (part["label"] < part["_cut"]).to_numpy()
        target = (is_r & (pl.col("label") == pl.col("_cut"))).alias("t")
        target = part.select(target)["t"].to_numpy()
        code = part["qc"].rank("dense").to_numpy().astype(np.int64)
        rr = part["rr_pos"].to_numpy().astype(np.int64)
        # Earlier here = a later first-stage position; "greater" value = a smaller (better) reranked position.
        counts = earlier_greater(code * span + (span - 1 - rr), lower)
        n_pairs[i[target]] = counts[target]
        # The best placed lower-label candidate after R in first-stage order: a running minimum per query.
        eligible = pl.Series(np.where(lower, rr, np.iinfo(np.int64).max))
        running = (part.select("qc").with_columns(e=eligible)
                   .select(pl.col("e").cum_min().shift(1).over("qc"))["e"].fill_null(np.iinfo(np.int64).max).to_numpy())
        best[i[target]] = running[target]
    out = d.with_columns(n_pairs=pl.Series(n_pairs), _best=pl.Series(best)).filter(is_r)
    return out.with_columns(
        rr_pos_above=pl.when(pl.col("n_pairs") > 0).then(pl.col("_best")).otherwise(None).cast(pl.Int32)
    ).drop("_i", "_best")
