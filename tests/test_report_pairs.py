"""The report's pair counts (Kendall tau, new misordered pairs, the review's worst pair) against pair-by-pair
enumeration on random buckets: graded and tied labels, many queries at once, single-candidate queries. They
are computed without enumerating pairs because one 30,000-candidate query once took the report 77 s and
2.7 GB; a 100,000-candidate query here must cost about what its rows do."""
from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from jobs import report_metrics as rm
from jobs.report_pairs import earlier_greater, kendall_tau, misordered


def _bucket(seed: int, queries: int = 30, most: int = 25) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        n = int(rng.integers(1, most + 1))
        rr = rng.permutation(n) + 1
        labels = rng.choice([0.0, 0.0, 1.0, 2.0, 3.0], n) if seed % 2 else rng.random(n).round(1)
        for fs in range(1, n + 1):
            rows.append({"query_id": f"q{q:03d}", "doc_id": f"d{q}-{fs}", "first_stage_rank": fs,
                         "rerank_position": int(rr[fs - 1]), "label": float(labels[fs - 1]),
                         "score": float(-rr[fs - 1])})
    return rm.prepare(pl.DataFrame(rows), has_label=True, has_rescored=False)  # as the report does


def _pairs_by_hand(df: pl.DataFrame) -> dict:
    """Every (R, X) pair of every query, enumerated."""
    out = {}
    for _, g in df.group_by("qc"):
        rows = g.to_dicts()
        for r, x in itertools.permutations(rows, 2):
            if (r["label"] > 0 and r["rr_pos"] > r["fs_pos"] and x["fs_pos"] > r["fs_pos"]
                    and x["rr_pos"] < r["rr_pos"] and x["label"] < r["label"]):
                out.setdefault(r["doc_id"], []).append(x)
    return out


def test_earlier_greater_by_hand():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 3, 7, 64, 100):
        v, w = rng.integers(0, 20, n), rng.integers(0, 3, n)
        want = [sum(int(w[j]) for j in range(i) if v[j] > v[i]) for i in range(n)]
        assert earlier_greater(v, w).tolist() == want


@pytest.mark.parametrize("seed", range(6))
def test_kendall_and_misordered_match_pair_enumeration(seed):
    df = _bucket(seed)
    tau = dict(kendall_tau(df).iter_rows())
    for q, g in df.group_by("qc"):
        n = g.height
        if n < 2:
            assert q[0] not in tau
            continue
        r = g.sort("fs_pos")["rr_pos"].to_list()
        disc = sum(1 for i, j in itertools.combinations(range(n), 2) if r[i] > r[j])
        assert tau[q[0]] == pytest.approx(1 - 4 * disc / (n * (n - 1)))

    by_hand = _pairs_by_hand(df)
    got = misordered(df)
    assert set(got["doc_id"]) == set(df.filter((pl.col("label") > 0) & (pl.col("rr_pos") > pl.col("fs_pos")))["doc_id"])
    for row in got.iter_rows(named=True):
        pairs = by_hand.get(row["doc_id"], [])
        assert row["n_pairs"] == len(pairs)
        assert row["rr_pos_above"] == (min(x["rr_pos"] for x in pairs) if pairs else None)


@pytest.mark.parametrize("seed", [1, 2])
def test_the_review_shows_each_querys_worst_pair(seed):
    df = _bucket(seed)
    pq = rm.per_query(df, has_label=True)
    cands = rm.review_candidates(df, pq, limit=1000)
    by_hand = _pairs_by_hand(df)
    rows = {r["doc_id"]: r for r in df.iter_rows(named=True)}
    want = {}
    for doc, xs in by_hand.items():
        r = rows[doc]
        for x in xs:
            key = (-r["label"], -(r["rr_pos"] - r["fs_pos"]), x["rr_pos"], r["fs_pos"])
            if r["query_id"] not in want or key < want[r["query_id"]][0]:
                want[r["query_id"]] = (key, doc, x["doc_id"])
    assert cands is not None
    got = {r["query_id"]: (r["doc_id"], r["doc_id_above"]) for r in cands.iter_rows(named=True)}
    assert got == {q: (d, x) for q, (_, d, x) in want.items()}
    counts = dict(zip(pq["query_id"], pq["new_misordered_pairs"]))
    for q in counts:
        n_rel = df.filter((pl.col("query_id") == q) & (pl.col("label") > 0)).height
        want_n = sum(len(v) for d, v in by_hand.items() if rows[d]["query_id"] == q)
        assert counts[q] == (want_n if n_rel else None)


def test_one_huge_query_costs_what_its_rows_do():
    """100,000 candidates: 5e9 pairs, which the self-join could not hold; here a few seconds. The reversed
    order has every pair discordant, and each relevant doc in the lower half is overtaken by every
    lower-label doc of the upper half below it in first-stage order."""
    n = 100_000
    fs = np.arange(1, n + 1)
    df = pl.DataFrame({"qc": np.zeros(n, np.int64), "query_id": ["big"] * n, "doc_id": [f"d{i}" for i in fs],
                       "fs_pos": fs.astype(np.int32), "rr_pos": (n + 1 - fs).astype(np.int32), "fs_rank": fs,
                       "label": (fs % 10 == 0).astype(np.float64), "score": -fs.astype(np.float64)})
    assert kendall_tau(df)["kendall_tau"].item() == -1.0
    got = misordered(df)
    demoted = (fs % 10 == 0) & (n + 1 - fs > fs)
    assert got.height == int(demoted.sum())
    first = got.filter(pl.col("fs_pos") == 10).row(0, named=True)
    assert first["n_pairs"] == (n - 10) - (n // 10 - 1) and first["rr_pos_above"] == 2  # rr 1 is relevant too
    assert math.isfinite(got["n_pairs"].sum())


def test_shift_bars_stay_few_and_keep_every_row():
    from jobs.report_html import MAX_SHIFT_BARS, shift_bars

    small = pl.DataFrame({"shift": [-2, 0, 3], "count": [4, 5, 6]})
    assert shift_bars(small) == ([-2, 0, 3], [4, 5, 6], [-1, 0, 1], 1)
    wide = pl.DataFrame({"shift": list(range(-99_999, 100_000)), "count": [1] * 199_999})
    x, y, signs, step = shift_bars(wide)
    assert len(x) <= MAX_SHIFT_BARS + 1 and sum(y) == 199_999 and step == 1000
    assert y[signs.index(0)] == 1  # zero alone: no bar mixes signs
    assert all(c == step for c, k in zip(y[1:-1], signs[1:-1]) if k)  # the outermost bars hold the rest
