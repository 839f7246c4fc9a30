"""Report metrics checked against values computed by hand on fixtures whose scores are written by hand.

Each fixture is a fake rerank output: OUT/scores/part-0.parquet and part-1.parquet, with rerank_position set
by hand and one query split across the two files. No model runs here.
"""
from __future__ import annotations

import base64
import json
import math
import re
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import report_metrics as rm  # noqa: E402
from jobs.report import main, write_report  # noqa: E402
from scripts.make_example import build_frame, write_example  # noqa: E402

# Seed text's reranked scores for the renewal example, and the order they give (position 1 = best).
SEED_SCORES = {"D2": 0.94, "D1": 0.76, "D5": 0.58, "D4": 0.29, "D3": 0.21}
SEED_POSITIONS = {"D2": 1, "D1": 2, "D5": 3, "D4": 4, "D3": 5}
LOG2_3 = math.log2(3)


def _write_out(out: Path, rows: pl.DataFrame, part0_mask: pl.Expr, manifest: dict | None = None) -> Path:
    (out / "scores").mkdir(parents=True)
    rows = rows.with_columns(pl.col("score").cast(pl.Float32), pl.col("rerank_position").cast(pl.Int32),
                             pl.col("first_stage_rank").cast(pl.Int32))
    rows.filter(part0_mask).write_parquet(out / "scores" / "part-0.parquet")
    rows.filter(~part0_mask).write_parquet(out / "scores" / "part-1.parquet")
    if manifest is not None:
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def renewal_out(tmp_path: Path) -> Path:
    """The seed example: q1 of examples/, rescored with the seed scores; q1 split D1,D3,D2 | D5,D4."""
    q1 = build_frame().filter(pl.col("query_id") == "q1")
    rows = q1.with_columns(
        score=pl.col("doc_id").replace_strict(SEED_SCORES, return_dtype=pl.Float64),
        rescored=pl.lit(True),
        rerank_position=pl.col("doc_id").replace_strict(SEED_POSITIONS, return_dtype=pl.Int32),
    )
    return _write_out(tmp_path / "out", rows, pl.col("doc_id").is_in(["D1", "D3", "D2"]),
                      {"model": "cross-encoder/tiny-test", "model_revision": "0123abc"})


def _hand_rows() -> pl.DataFrame:
    """Six queries, positions and labels by hand; qe was reranked with depth 5 (E6 not rescored).

    qa: A1 A2* A3 A4   -> A3 A1 A2* A4     relevant A2 pushed down 2 -> 3 under A3 (label 0): nDCG down
    qb: B1 B2 B3*      -> B3* B1 B2        nDCG up
    qc: C1 C2          -> C2 C1            no relevant candidate (excluded from quality, counted)
    qd: D1             -> D1               single candidate (tau null)
    qe: E1..E5* E6     -> E5* E1 E2 E3 E4 | E6 (not rescored)   top-1 from first-stage rank 5; nDCG up
    qf: F1* F2 F3      -> F1* F3 F2        nDCG unchanged
    """
    spec = {  # query_id: [(doc_id, first_stage_rank, rerank_position, label, score or None)]
        "qa": [("A1", 1, 2, 0, 1.5), ("A2", 2, 3, 1, 1.0), ("A3", 3, 1, 0, 2.0), ("A4", 4, 4, 0, -0.5)],
        "qb": [("B1", 1, 2, 0, 0.2), ("B2", 2, 3, 0, 0.1), ("B3", 3, 1, 1, 3.0)],
        "qc": [("C1", 1, 2, 0, -1.0), ("C2", 2, 1, 0, 0.0)],
        "qd": [("D1", 1, 1, 0, 0.5)],
        "qe": [("E1", 1, 2, 0, 1.0), ("E2", 2, 3, 0, 0.9), ("E3", 3, 4, 0, 0.8), ("E4", 4, 5, 0, 0.7),
               ("E5", 5, 1, 1, 4.0), ("E6", 6, 6, 0, None)],
        "qf": [("F1", 1, 1, 1, 2.5), ("F2", 2, 3, 0, -2.0), ("F3", 3, 2, 0, 1.2)],
    }
    rows = []
    for qid, cands in spec.items():
        for doc_id, fs, rr, label, score in cands:
            rows.append({"query_id": qid, "query": f"question {qid}", "doc_id": doc_id, "doc": f"passage {doc_id}",
                         "first_stage_rank": fs, "label": label, "score": score, "rescored": score is not None,
                         "rerank_position": rr, "source": "wiki"})
    return pl.DataFrame(rows)


@pytest.fixture
def hand_out(tmp_path: Path) -> Path:
    """Hand fixture; qa is split across the two files (A1, A3 | A2, A4); no manifest."""
    mask = pl.col("doc_id").is_in(["A1", "A3", "B1", "B2", "B3", "C1", "C2"])
    return _write_out(tmp_path / "hand", _hand_rows(), mask)


def _metrics(out: Path) -> dict[str, dict]:
    df = pl.read_parquet(out / "report" / "metrics.parquet")
    return {r["metric"]: r for r in df.iter_rows(named=True)}


def _per_query(out: Path) -> dict[str, dict]:
    df = pl.read_parquet(out / "report" / "per_query.parquet")
    return {r["query_id"]: r for r in df.iter_rows(named=True)}


# ---------------------------------------------------------------- the renewal example (seed scores)

def test_renewal_winner_changes_and_quality_rises(renewal_out: Path) -> None:
    s = write_report(str(renewal_out), quiet=True)
    q = _per_query(renewal_out)["q1"]
    assert q["winner_changed"] is True
    assert (q["first_stage_winner"], q["new_winner"], q["new_winner_first_stage_rank"]) == ("D1", "D2", 3)
    # Gains 2^label - 1: D2 = 3, all others 0 (the checklist mentions renewals but does not answer).
    # First stage D1 D3 D2 D5 D4: the answer sits at rank 3; reranked D2 D1 D5 D4 D3: it is first.
    assert q["ndcg@1_before"] == 0.0
    assert q["ndcg@1_after"] == pytest.approx(1.0)
    assert q["ndcg@3_before"] == pytest.approx((3 / 2) / 3)  # DCG 3/log2(4) over IDCG 3/log2(2)
    assert q["ndcg@3_after"] == pytest.approx(1.0)
    assert q["ndcg@10_before"] == pytest.approx(0.5)
    assert q["ndcg@10_after"] == pytest.approx(1.0)
    assert (q["mrr@10_before"], q["mrr@10_after"]) == (pytest.approx(1 / 3), 1.0)
    assert (q["recall@1_before"], q["recall@1_after"]) == (0.0, 1.0)
    assert (q["recall@3_before"], q["recall@3_after"]) == (1.0, 1.0)
    assert q["outcome"] == "up"
    # The expiry report D3 is the biggest loser: first-stage rank 2 -> position 5.
    assert (q["most_demoted_doc_id"], q["most_demoted_first_stage_rank"], q["most_demoted_rerank_position"]) == (
        "D3", 2, 5)
    assert q["max_demotion"] == 3
    assert (q["most_promoted_doc_id"], q["max_promotion"]) == ("D2", 2)
    # reranked positions in first-stage order: [2, 5, 1, 3, 4] -> 4 discordant pairs of 10
    assert q["kendall_tau"] == pytest.approx(0.2)
    assert q["mean_abs_shift"] == pytest.approx(8 / 5)
    assert (q["promoted_into_top1"], q["demoted_out_of_top1"]) == (1, 1)
    assert (q["promoted_into_top3"], q["demoted_out_of_top3"]) == (1, 1)  # D5 in, D3 out
    assert (q["promoted_into_top10"], q["demoted_out_of_top10"]) == (0, 0)
    assert q["new_misordered_pairs"] == 0  # no relevant passage went below an irrelevant one

    assert s["winner_change_rate"] == 1.0
    assert s["ndcg@1_before"] == 0.0 and s["ndcg@1_after"] == pytest.approx(1.0)
    assert s["ndcg@10_delta"] == pytest.approx(0.5)
    assert s["mrr@10_delta"] == pytest.approx(2 / 3)
    assert s["top1_from_first_stage_rank_ge_4_share"] == 0.0  # D2 came from rank 3
    assert (s["model"], s["model_revision"]) == ("cross-encoder/tiny-test", "0123abc")

    m = _metrics(renewal_out)
    assert m["ndcg@3"]["before"] == pytest.approx(0.5)
    assert m["ndcg@3"]["after"] == pytest.approx(1.0)
    assert m["ndcg@3"]["delta"] == pytest.approx(0.5)
    assert m["mrr@10"]["before"] == pytest.approx(1 / 3) and m["mrr@10"]["after"] == 1.0
    assert m["ndcg@3"]["n"] == 1
    html = (renewal_out / "report" / "report.html").read_text(encoding="utf-8")
    assert "cross-encoder/tiny-test @ 0123abc" in html
    review = pl.read_parquet(renewal_out / "report" / "review.parquet")
    assert review.height == 0 and review.columns[:3] == ["rank", "query_id", "query"]
    assert "No labelled query has a relevant passage" in html


# ---------------------------------------------------------------- hand fixture: many queries

def test_hand_per_query_values(hand_out: Path) -> None:
    write_report(str(hand_out), quiet=True)
    pq = _per_query(hand_out)
    assert list(pq) == ["qa", "qb", "qc", "qd", "qe", "qf"]
    # qa: relevant A2 at 2 -> 3. DCG uses 1/log2(pos + 1).
    qa = pq["qa"]
    assert qa["n_candidates"] == 4 and qa["n_relevant"] == 1
    assert qa["ndcg@1_before"] == 0.0 and qa["ndcg@1_after"] == 0.0
    assert qa["ndcg@3_before"] == pytest.approx(1 / LOG2_3)
    assert qa["ndcg@3_after"] == pytest.approx(0.5)
    assert qa["mrr@10_before"] == pytest.approx(1 / 2) and qa["mrr@10_after"] == pytest.approx(1 / 3)
    assert qa["outcome"] == "down" and qa["new_misordered_pairs"] == 1
    assert qa["kendall_tau"] == pytest.approx(1 / 3)  # [2, 3, 1, 4]: 2 discordant of 6
    # qb: B3 to the top
    qb = pq["qb"]
    assert qb["ndcg@3_before"] == pytest.approx(0.5) and qb["ndcg@3_after"] == 1.0
    assert (qb["recall@1_before"], qb["recall@1_after"]) == (0.0, 1.0)
    assert qb["mrr@10_before"] == pytest.approx(1 / 3) and qb["mrr@10_after"] == 1.0
    assert qb["kendall_tau"] == pytest.approx(-1 / 3)  # [2, 3, 1]: 2 discordant of 3
    # qc: no relevant candidate -> quality null; reversed order -> tau -1
    qc = pq["qc"]
    assert qc["n_relevant"] == 0 and qc["ndcg@10_before"] is None and qc["mrr@10_after"] is None
    assert qc["outcome"] is None and qc["kendall_tau"] == -1.0 and qc["winner_changed"] is True
    # qd: single candidate
    qd = pq["qd"]
    assert qd["kendall_tau"] is None and qd["winner_changed"] is False
    # qe: winner from first-stage rank 5; E6 kept below the rerank depth
    qe = pq["qe"]
    assert (qe["n_candidates"], qe["n_rescored"]) == (6, 5)
    assert qe["new_winner_first_stage_rank"] == 5 and qe["top1_from_deep"] is True
    assert qe["ndcg@3_before"] == 0.0 and qe["ndcg@10_before"] == pytest.approx(1 / math.log2(6))
    assert qe["ndcg@10_after"] == 1.0 and qe["mrr@10_before"] == pytest.approx(0.2)
    assert (qe["recall@3_before"], qe["recall@3_after"], qe["recall@10_before"]) == (0.0, 1.0, 1.0)
    assert qe["kendall_tau"] == pytest.approx(7 / 15)  # [2, 3, 4, 5, 1, 6]: 4 discordant of 15
    assert (qe["promoted_into_top3"], qe["demoted_out_of_top3"]) == (1, 1)  # E5 in, E3 out
    # qf: zero-label docs swapped below the relevant one: unchanged
    assert pq["qf"]["outcome"] == "unchanged" and pq["qf"]["kendall_tau"] == pytest.approx(1 / 3)


def test_hand_global_metrics(hand_out: Path) -> None:
    s = write_report(str(hand_out), quiet=True)
    m = _metrics(hand_out)
    # win rate over the 4 queries with a relevant candidate: up qb, qe; down qa; unchanged qf
    assert (s["win_rate_up"], s["win_rate_down"], s["win_rate_unchanged"]) == (0.5, 0.25, 0.25)
    assert m["win_rate_up"]["n"] == 4
    assert s["queries_without_relevant"] == 2  # qc, qd
    assert s["ndcg@10_before"] == pytest.approx((1 / LOG2_3 + 0.5 + 1 / math.log2(6) + 1) / 4)
    assert s["ndcg@10_after"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert s["mrr@10_before"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 5 + 1) / 4)
    assert s["mrr@10_after"] == pytest.approx((1 / 3 + 1 + 1 + 1) / 4)
    assert s["recall@1_before"] == pytest.approx(1 / 4) and s["recall@1_after"] == pytest.approx(3 / 4)
    assert s["recall@3_before"] == pytest.approx(3 / 4) and s["recall@3_after"] == 1.0
    assert s["recall@10_before"] == 1.0 and s["recall@10_after"] == 1.0
    # movement
    assert s["winner_change_rate"] == pytest.approx(4 / 5)  # qa qb qc qe of the 5 multi-candidate queries
    assert m["winner_change_rate"]["n"] == 5
    assert s["kendall_tau_mean"] == pytest.approx((1 / 3 - 1 / 3 - 1 + 7 / 15 + 1 / 3) / 5)
    assert m["kendall_tau_mean"]["n"] == 5
    assert s["mean_shift"] == 0.0
    assert s["mean_abs_shift"] == pytest.approx(20 / 19)
    assert s["moved_share"] == pytest.approx(15 / 19)
    assert (s["max_promotion"], s["max_demotion"]) == (4, 1)
    assert s["promoted_into_top1"] == pytest.approx(4 / 6)
    assert s["promoted_into_top3"] == pytest.approx(1 / 6) and s["demoted_out_of_top3"] == pytest.approx(1 / 6)
    # rerank depth
    assert s["top1_from_first_stage_rank_ge_4_share"] == pytest.approx(1 / 6)
    assert s["rows_rescored_share"] == pytest.approx(18 / 19)
    assert s["queries_with_unrescored_rows_share"] == pytest.approx(1 / 6)
    # scores: the 18 rescored rows only
    assert m["score_max"]["value"] == pytest.approx(4.0) and m["score_min"]["value"] == pytest.approx(-2.0)
    assert m["score_max"]["n"] == 18
    assert s["queries_inconsistent_rerank_position"] == 0
    assert s["model"] is None  # no manifest: tolerated


def test_review_list_contents(hand_out: Path) -> None:
    write_report(str(hand_out), quiet=True)
    review = pl.read_parquet(hand_out / "report" / "review.parquet")
    assert review.height == 1
    r = review.row(0, named=True)
    assert (r["rank"], r["query_id"], r["query"]) == (1, "qa", "question qa")
    assert (r["demoted_doc_id"], r["demoted_doc"], r["demoted_label"]) == ("A2", "passage A2", 1.0)
    assert (r["demoted_first_stage_rank"], r["demoted_rerank_position"]) == (2, 3)
    assert r["demoted_score"] == pytest.approx(1.0)
    assert (r["above_doc_id"], r["above_doc"], r["above_label"]) == ("A3", "passage A3", 0.0)
    assert (r["above_first_stage_rank"], r["above_rerank_position"]) == (3, 1)
    assert r["above_score"] == pytest.approx(2.0)
    assert r["ndcg@10_delta"] == pytest.approx(0.5 - 1 / LOG2_3)
    html = (hand_out / "report" / "report.html").read_text(encoding="utf-8")
    assert "passage A2" in html and "passage A3" in html


def test_review_list_ordering_and_limit(tmp_path: Path) -> None:
    rows = _hand_rows()
    # a second regression, milder than qa: qg G1* G2 G3 -> G2 G1* G3 (relevant 1 -> 2, under a label 0)
    extra = pl.DataFrame([
        {"query_id": "qg", "query": "question qg", "doc_id": d, "doc": f"passage {d}", "first_stage_rank": fs,
         "label": lab, "score": sc, "rescored": True, "rerank_position": rr, "source": "wiki"}
        for d, fs, rr, lab, sc in [("G1", 1, 2, 1, 0.4), ("G2", 2, 1, 0, 0.9), ("G3", 3, 3, 0, 0.1)]])
    out = _write_out(tmp_path / "o", pl.concat([rows, extra]), pl.col("query_id") != "qa")
    write_report(str(out), quiet=True)
    review = pl.read_parquet(out / "report" / "review.parquet")
    # qa: 0.5 - 0.631 = -0.131; qg: 1/log2(3) - 1 = -0.369 -> qg first
    assert review["query_id"].to_list() == ["qg", "qa"]
    write_report(str(out), max_review=1, quiet=True)
    assert pl.read_parquet(out / "report" / "review.parquet")["query_id"].to_list() == ["qg"]


def test_kendall_tau_hand_case() -> None:
    # first-stage order a b c d e; reranked positions 3 1 2 5 4 -> discordant (a,b) (a,c) (d,e): 3 of 10
    df = pl.DataFrame({"query_id": ["q"] * 5, "fs_pos": [1, 2, 3, 4, 5], "rr_pos": [3, 1, 2, 5, 4]})
    assert rm.kendall_tau(df, key="query_id")["kendall_tau"].item() == pytest.approx((10 - 2 * 3) / 10)
    rev = pl.DataFrame({"query_id": ["r"] * 4, "fs_pos": [1, 2, 3, 4], "rr_pos": [4, 3, 2, 1]})
    assert rm.kendall_tau(rev, key="query_id")["kendall_tau"].item() == -1.0


def test_buckets_give_the_same_answer(hand_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_report(str(hand_out), quiet=True)
    one = pl.read_parquet(hand_out / "report" / "per_query.parquet")
    m1 = pl.read_parquet(hand_out / "report" / "metrics.parquet")
    monkeypatch.setattr(rm, "ROWS_PER_BUCKET", 4)  # 19 rows -> 5 hash buckets of whole queries
    write_report(str(hand_out), quiet=True)
    assert pl.read_parquet(hand_out / "report" / "per_query.parquet").equals(one)
    assert pl.read_parquet(hand_out / "report" / "metrics.parquet").equals(m1)
    assert pl.read_parquet(hand_out / "report" / "review.parquet")["query_id"].to_list() == ["qa"]


def test_rank_gaps_are_renumbered(tmp_path: Path) -> None:
    # carried first-stage ranks with gaps (1, 5, 9) read as positions 1, 2, 3 for the metrics; columns named
    # *_first_stage_rank and the depth flag keep the stored rank, which --rerank-depth filters on (the new
    # winner, stored rank 5, did come from first-stage rank >= 4; it once read 2 and "not deep")
    rows = pl.DataFrame({"query_id": ["q"] * 3, "doc_id": ["a", "b", "c"], "first_stage_rank": [1, 5, 9],
                         "rerank_position": [2, 1, 3], "score": [0.1, 0.9, -0.3], "rescored": [True] * 3,
                         "label": [0, 1, 0]})
    out = _write_out(tmp_path / "g", rows, pl.col("doc_id") == "a")
    s = write_report(str(out), quiet=True)
    q = _per_query(out)["q"]
    assert q["new_winner_first_stage_rank"] == 5 and q["top1_from_deep"] and q["kendall_tau"] == pytest.approx(1 / 3)
    assert (q["most_promoted_first_stage_rank"], q["most_demoted_first_stage_rank"]) == (5, 1)
    assert s["ndcg@1_before"] == 0.0 and s["ndcg@1_after"] == 1.0


def test_collapsed_duplicates_are_left_out(tmp_path: Path) -> None:
    """--dedupe-docs ranks a passage's copies last by design; counted, the copy of a relevant passage read as
    the reranker demoting it (nDCG@10 1.0 -> 0.61 on a query the model ranked perfectly)."""
    rows = pl.DataFrame({"query_id": ["q"] * 4, "doc_id": ["a", "a2", "b", "c"], "first_stage_rank": [1, 2, 3, 4],
                         "rerank_position": [1, 4, 2, 3], "score": [2.0, None, 1.0, 0.5],
                         "rescored": [True] * 4, "label": [1, 1, 0, 0],
                         "duplicate_of": [None, "a", None, None]})
    out = _write_out(tmp_path / "d", rows, pl.col("doc_id") == "a")
    s = write_report(str(out), quiet=True)
    q = _per_query(out)["q"]
    assert q["n_candidates"] == 3 and q["outcome"] == "unchanged" and q["new_misordered_pairs"] == 0
    assert s["ndcg@10_before"] == s["ndcg@10_after"] == 1.0


def test_without_labels(tmp_path: Path) -> None:
    rows = _hand_rows().drop("label")
    out = _write_out(tmp_path / "nl", rows, pl.col("query_id") < "qc")
    s = write_report(str(out), quiet=True)
    assert "ndcg@10_before" not in s and "win_rate_up" not in s
    assert s["winner_change_rate"] == pytest.approx(4 / 5)
    assert "n_relevant" not in pl.read_parquet(out / "report" / "per_query.parquet").columns
    assert not (out / "report" / "review.parquet").exists()
    html = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "Quality before and after" not in html


# ---------------------------------------------------------------- files, layout, html, errors

def test_output_files_and_layout(hand_out: Path) -> None:
    write_report(str(hand_out), quiet=True)
    rep = hand_out / "report"
    names = sorted(p.name for p in rep.iterdir())
    assert names == sorted(["metrics.parquet", "per_query.parquet", "review.parquet", "report.html",
                            "score_histogram.png", "position_shifts.png", "winner_first_stage_rank.png",
                            "quality.png"])  # and no temporary files left behind
    metrics = pl.read_parquet(rep / "metrics.parquet")
    assert metrics.schema == pl.Schema({
        "section": pl.String, "metric": pl.String, "value": pl.Float64, "before": pl.Float64,
        "after": pl.Float64, "delta": pl.Float64, "n": pl.Int64, "description": pl.String})
    assert metrics["metric"].is_unique().all()
    assert set(metrics["section"]) == {"coverage", "movement", "quality", "depth", "scores"}
    paired = metrics.filter(pl.col("before").is_not_null())
    assert set(paired["metric"]) == set(rm.QUALITY)
    assert (paired["value"] == paired["after"]).all()
    assert ((paired["after"] - paired["before"] - paired["delta"]).abs() < 1e-12).all()
    pq = pl.read_parquet(rep / "per_query.parquet")
    assert pq.columns == rm.per_query_columns(True)
    assert pq.schema["kendall_tau"] == pl.Float64 and pq.schema["winner_changed"] == pl.Boolean
    for p in rep.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained(hand_out: Path) -> None:
    write_report(str(hand_out), quiet=True)
    html = (hand_out / "report" / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r"src='([^']*)'", html)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in html and "https://" not in html and "<link" not in html and "<script" not in html
    assert "ordering signals, not calibrated probabilities" in html
    assert "confidence" not in html.lower()
    assert html.index("ordering signals") > html.index("Score distribution")


def test_stdout_summary(hand_out: Path, capsys: pytest.CaptureFixture) -> None:
    write_report(str(hand_out))
    out = capsys.readouterr().out
    assert "winner changed in 80.0% of queries" in out and "not probabilities" in out
    write_report(str(hand_out), quiet=True)
    assert capsys.readouterr().out == ""


def test_cli(hand_out: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(hand_out), "--top-regressions", "0", "--quiet"]) == 0
    assert pl.read_parquet(hand_out / "report" / "review.parquet").height == 0  # N = 0: nothing to review
    assert capsys.readouterr().out == ""


def test_missing_or_empty_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(rm.ScoresMissingError, match="no scores directory"):
        write_report(str(tmp_path), quiet=True)
    (tmp_path / "scores").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet shard files"):
        write_report(str(tmp_path), quiet=True)
    assert main([str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    pl.DataFrame(schema={"query_id": pl.String, "doc_id": pl.String, "first_stage_rank": pl.Int32,
                         "rerank_position": pl.Int32, "score": pl.Float32}).write_parquet(
        tmp_path / "scores" / "part-0.parquet")
    with pytest.raises(rm.ScoresMissingError, match="no rows"):
        write_report(str(tmp_path), quiet=True)
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------- the example files

def test_example_data(tmp_path: Path) -> None:
    df = build_frame()
    assert df.schema == pl.Schema({"query_id": pl.String, "query": pl.String, "doc_id": pl.String,
                                   "doc": pl.String, "first_stage_score": pl.Float64,
                                   "first_stage_rank": pl.Int32, "label": pl.Int32, "source": pl.String})
    q1 = df.filter(pl.col("query_id") == "q1")
    assert q1["query"][0] == "Which contracts expiring next quarter require CFO approval for renewal?"
    assert dict(zip(q1["doc_id"], q1["first_stage_rank"])) == {"D1": 1, "D3": 2, "D2": 3, "D5": 4, "D4": 5}
    assert dict(zip(q1["doc_id"], q1["first_stage_score"])) == {"D1": 0.88, "D3": 0.85, "D2": 0.83,
                                                                  "D5": 0.80, "D4": 0.79}
    assert dict(zip(q1["doc_id"], q1["label"])) == {"D1": 0, "D3": 0, "D2": 2, "D5": 0, "D4": 0}
    sizes = df.group_by("query_id").agg(n=pl.len(), u=pl.col("doc_id").n_unique())
    assert sizes.height == 6 and (sizes["n"] == sizes["u"]).all()
    assert sizes.filter(pl.col("query_id") != "q1")["n"].is_between(4, 8).all()
    # ranks follow scores within each query
    check = df.with_columns(r=pl.col("first_stage_score").rank("ordinal", descending=True).over("query_id"))
    assert (check["r"] == check["first_stage_rank"]).all()
    # deterministic, and the JSONL holds the same rows as the Parquet
    p1, j1 = write_example(tmp_path / "a")
    p2, j2 = write_example(tmp_path / "b")
    assert p1.read_bytes() == p2.read_bytes() and j1.read_bytes() == j2.read_bytes()
    assert pl.read_parquet(p1).equals(df)
    assert pl.read_ndjson(j1, schema=df.schema).equals(df)
    repo = Path(__file__).resolve().parents[1] / "examples"
    if (repo / "renewal_shortlist.parquet").exists():  # the committed copy matches the script
        assert pl.read_parquet(repo / "renewal_shortlist.parquet").equals(df)
        assert (repo / "renewal_shortlist.jsonl").read_bytes() == j1.read_bytes()


def test_manifest_shapes(hand_out: Path) -> None:
    # the job's manifest nests the model's provenance under "model"
    (hand_out / "manifest.json").write_text(json.dumps({
        "status": "incomplete", "model": {"model": "BAAI/bge-reranker-base", "requested_revision": None,
                                          "resolved_revision": "2cfc18c9"}, "rerank_depth": 5, "inputs": ["a"]}))
    s = write_report(str(hand_out), quiet=True)
    assert (s["model"], s["model_revision"]) == ("BAAI/bge-reranker-base", "2cfc18c9")
    html = (hand_out / "report" / "report.html").read_text(encoding="utf-8")
    assert "<title>crossrank rerank report: BAAI/bge-reranker-base @ 2cfc18c9</title>" in html
    assert "run status: incomplete" in html and "rerank_depth" in html
    (hand_out / "manifest.json").write_text("{not json")
    assert write_report(str(hand_out), quiet=True)["model"] is None
