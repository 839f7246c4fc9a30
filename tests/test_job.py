"""The whole job on a real local Ray instance with two logical GPUs, real Parquet files, a real model."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.rerank import main
from kernels.engine import Engine
from scripts.make_tiny_model import _WORDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shortlist_dir(tmp_path_factory):
    """Three files; every query's candidates are spread over all of them; one file has several row groups."""
    rng = random.Random(7)

    def text(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    root = tmp_path_factory.mktemp("in")
    queries = {f"q{i}": text(rng.randint(2, 8)) for i in range(24)}
    rows = [[], [], []]
    for qid, q in queries.items():
        for d in range(9):
            rows[d % 3].append({"query_id": qid, "query": q, "doc_id": f"{qid}-d{d}", "doc": text(rng.randint(1, 90)),
                                "first_stage_score": rng.random(), "tenant": f"t{d % 2}",
                                "meta": {"source": "bm25", "k": d}})
    rows[0][5]["doc"] = "   "  # rejected: blank passage
    rows[1][2]["query"] = None  # rejected: null query
    for i, part in enumerate(rows):
        pq.write_table(pa.Table.from_pylist(part), root / f"part{i}.parquet", row_group_size=24 if i == 0 else 1000)
    return root


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def _reference_scores(model, inp) -> pl.DataFrame:
    """Scores computed independently (every accepted pair in-process, one call) and the first-stage rank
    derived from first_stage_score within each query, across files."""
    df = pl.read_parquet(inp / "*.parquet").filter(
        pl.col("query").is_not_null() & (pl.col("doc").str.strip_chars() != ""))
    scores, _ = Engine.from_pretrained(model).score(df["query"].to_list(), df["doc"].to_list())
    df = df.with_columns(pl.Series("expected_score", scores))
    return df.with_columns(pl.col("first_stage_score").rank("ordinal", descending=True).over("query_id").alias("fsr"))


def _assert_positions_follow_scores(got: pl.DataFrame) -> None:
    """Positions are the job's own scores sorted within each query, ties by first-stage rank then doc_id.
    (Checked against the job's scores, which match the in-process reference to 1e-5: their last bits depend on
    thread count and batch, so near-ties may order differently in a reference of their own.)"""
    ranked = got.sort(["query_id", "score", "fsr", "doc_id"], descending=[False, True, False, False])
    ranked = ranked.with_columns((pl.int_range(pl.len()).over("query_id") + 1).alias("want"))
    assert (ranked["rerank_position"] == ranked["want"]).all()


@pytest.mark.parametrize("ranking", ["driver", "ray tasks"])
def test_job_end_to_end(ray_local, tiny_bert, shortlist_dir, tmp_path, capsys, monkeypatch, ranking):
    """The whole job; the ranking pass both ways: in the driver as a small job runs it (one bucket), and as
    Ray tasks over several query buckets as a large job runs it (forced here by lowering both thresholds)."""
    import jobs.driver
    import jobs.plan

    if ranking == "ray tasks":
        monkeypatch.setattr(jobs.driver, "LOCAL_RANK_ROWS", 0)
        monkeypatch.setattr(jobs.plan, "KEY_ROWS_PER_BUCKET", 40)
    out = tmp_path / "out"
    code, err = _run(["--input", str(shortlist_dir), "--output", str(out), "--model", str(tiny_bert),
                      "--shard-rows", "30", "--top-k", "3", "--engine", "packed", "--no-report"], capsys)
    assert code == 0, err
    n_in = sum(pq.ParquetFile(p).metadata.num_rows for p in shortlist_dir.glob("*.parquet"))
    scores = pl.read_parquet(out / "scores" / "*.parquet")
    rejects = pl.read_parquet(out / "rejects" / "*.parquet")
    assert scores.height + rejects.height == n_in
    assert sorted(rejects["reject_reason"].to_list()) == ["doc is empty or whitespace", "query is null"]
    # Pass-through columns survive untouched, nested ones included.
    assert {"tenant", "meta"} <= set(scores.columns)
    assert scores.filter(pl.col("doc_id") == "q3-d4")["meta"].to_list() == [{"source": "bm25", "k": 4}]
    # Each (query, doc) exactly once.
    assert scores.select("query_id", "doc_id").is_unique().all()

    # rerank_position is right although every query's candidates are spread over three files.
    exp = _reference_scores(str(tiny_bert), shortlist_dir)
    got = scores.join(exp.select("doc_id", "expected_score", "fsr"), on="doc_id")
    assert got.height == scores.height
    np.testing.assert_allclose(got["score"].to_numpy(), got["expected_score"].to_numpy(), atol=1e-5)
    _assert_positions_follow_scores(got)
    assert (got["first_stage_rank"] == got["fsr"]).all()  # derived from first_stage_score across files

    stats = pl.read_parquet(out / "stats.parquet")
    plan = json.loads((out / "_work" / "plan.json").read_text())
    assert stats.height == len(plan["shards"]) >= 5  # part0 was cut into several row-group shards
    assert (stats["rows_scored"] + stats["rows_rejected"] == stats["rows_in"]).all()
    assert stats["status"].to_list() == ["ok"] * stats.height
    assert (stats["padding_efficiency"] > 0).all() and (stats["pairs_per_s"] > 0).all()
    assert set(stats["engine"].to_list()) == {"packed"}  # asked for by name: the padding-free path, end to end

    short = pl.read_parquet(out / "shortlists" / "*.parquet")
    assert short.height == 24
    row = short.filter(pl.col("query_id") == "q5").row(0, named=True)
    top = scores.filter(pl.col("query_id") == "q5").sort("rerank_position").head(3)
    assert row["doc_ids"] == top["doc_id"].to_list()
    assert row["first_stage_ranks"] == top["first_stage_rank"].to_list()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["engine"]["actors"] == 2  # one actor per logical GPU
    assert manifest["engine"]["actor_resources"]["num_gpus"] == 1
    assert manifest["model"]["weights_sha256"] and manifest["libraries"]["torch"]
    assert manifest["totals"]["rows_scored"] == scores.height
    assert manifest["totals"]["ranking_ran_in"] == ranking
    assert (manifest["totals"]["ranking_buckets"] > 3) == (ranking == "ray tasks") == (plan["buckets"] > 3)
    assert len(manifest["inputs"]) == 3 and all(f["bytes"] > 0 for f in manifest["inputs"])
    assert "pairs/s overall" in err and "% of its time on shards" in err
    assert 0 < manifest["totals"]["model_share"] <= 1


def test_modernbert_job(ray_local, tiny_modernbert, shortlist_dir, tmp_path, capsys):
    """A ModernBERT reranker through the whole job: auto picks the packed engine, records that, and every
    accepted pair gets the in-process engine's score and position."""
    out = tmp_path / "out"
    code, err = _run(["--input", str(shortlist_dir), "--output", str(out), "--model", str(tiny_modernbert),
                      "--no-report", "--quiet"], capsys)
    assert code == 0, err
    scores = pl.read_parquet(out / "scores" / "*.parquet")
    exp = _reference_scores(str(tiny_modernbert), shortlist_dir)
    got = scores.join(exp.select("doc_id", "expected_score", "fsr"), on="doc_id")
    assert got.height == scores.height == exp.height
    np.testing.assert_allclose(got["score"].to_numpy(), got["expected_score"].to_numpy(), atol=1e-5)
    _assert_positions_follow_scores(got)
    stats = pl.read_parquet(out / "stats.parquet")
    assert set(stats["engine"].to_list()) == {"packed"} and (stats["padding_efficiency"] == 1.0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["engine_config"]["engine"] == "auto"
    assert (manifest["engine"]["engine"], manifest["engine"]["model_type"]) == ("packed", "modernbert")


def test_resume_skips_committed_shards(ray_local, tiny_bert, shortlist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(shortlist_dir), "--output", str(out), "--model", str(tiny_bert), "--shard-rows", "30",
            "--no-report", "--quiet"]
    assert _run(args, capsys)[0] == 0
    first = pl.read_parquet(out / "scores" / "*.parquet").sort("doc_id")
    victim = sorted((out / "scores").iterdir())[1].name
    (out / "scores" / victim).unlink()
    (out / "_work" / "scored" / victim).unlink()  # as if the run died before committing this shard
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "_work" / "scored").iterdir()}
    (out / "_work" / "scored" / ".tmp-deadbeef-x.parquet").write_bytes(b"half")  # a killed writer's leftover
    code, err = _run(args, capsys)
    assert code == 0, err
    n = len(json.loads((out / "_work" / "plan.json").read_text())["shards"])
    assert f"resuming: {n - 1} of {n} shard(s) already committed" in err
    assert "removed 1 half-written file" in err
    assert not list((out / "_work" / "scored").glob(".tmp-*"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_work" / "scored").iterdir() if p.name in kept} == kept
    again = pl.read_parquet(out / "scores" / "*.parquet").sort("doc_id")
    assert again.select("doc_id", "rerank_position").equals(first.select("doc_id", "rerank_position"))


def test_changed_input_refused_without_overwrite(ray_local, tiny_bert, shortlist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--output", str(out), "--model", str(tiny_bert), "--no-report", "--quiet"]
    assert _run(["--input", str(shortlist_dir / "part1.parquet"), *base], capsys)[0] == 0
    code, err = _run(["--input", str(shortlist_dir / "part2.parquet"), *base], capsys)
    assert code == 2 and "error: " in err and "different inputs" in err, err
    assert _run(["--input", str(shortlist_dir / "part2.parquet"), "--overwrite", *base], capsys)[0] == 0


def test_rerank_depth_keeps_deep_rows_below(ray_local, tiny_bert, tmp_path, capsys):
    inp = tmp_path / "in.parquet"
    n = 8
    pq.write_table(pa.table({"query_id": ["q"] * n, "query": ["renewal approval"] * n,
                             "doc_id": [f"d{i}" for i in range(n)], "doc": [f"clause {i} cfo" for i in range(n)],
                             "first_stage_rank": pa.array(range(1, n + 1), pa.int32())}), inp)
    out = tmp_path / "out"
    code, err = _run(["--input", str(inp), "--output", str(out), "--model", str(tiny_bert), "--rerank-depth", "3",
                      "--no-report", "--quiet"], capsys)
    assert code == 0, err
    df = pl.read_parquet(out / "scores" / "*.parquet").sort("first_stage_rank")
    assert df["rescored"].to_list() == [True] * 3 + [False] * 5
    assert df["score"].null_count() == 5
    assert sorted(df["rerank_position"][:3].to_list()) == [1, 2, 3]
    assert df["rerank_position"][3:].to_list() == [4, 5, 6, 7, 8]  # first-stage order, never dropped


def test_bad_schema_fails_before_any_model_work(tmp_path, capsys):
    inp = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query_id": ["q"], "query": ["x"], "doc_id": ["d"], "doc": [1.5]}), inp)
    code = main(["--input", str(inp), "--output", str(tmp_path / "out"), "--model", "/nonexistent-model"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{inp}: column 'doc' has type double, expected string" in err
    assert not (tmp_path / "out").exists()


def test_dedupe_docs_collapses_identical_passages_across_files(ray_local, tiny_bert, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    same = "the cfo approves renewals above the threshold"
    pq.write_table(pa.table({"query_id": ["q", "q"], "query": ["who approves"] * 2, "doc_id": ["a", "b"],
                             "doc": [same, "expiry report"], "first_stage_rank": pa.array([3, 1], pa.int32())}),
                   inp / "f1.parquet")
    pq.write_table(pa.table({"query_id": ["q", "q"], "query": ["who approves"] * 2, "doc_id": ["c", "d"],
                             "doc": [same, "checklist"], "first_stage_rank": pa.array([2, 4], pa.int32())}),
                   inp / "f2.parquet")
    out = tmp_path / "out"
    code, err = _run(["--input", str(inp), "--output", str(out), "--model", str(tiny_bert), "--dedupe-docs",
                      "--top-k", "10", "--no-report", "--quiet"], capsys)
    assert code == 0, err
    df = pl.read_parquet(out / "scores" / "*.parquet").sort("doc_id")
    assert df.height == 4  # nothing dropped
    by_id = {r["doc_id"]: r for r in df.iter_rows(named=True)}
    assert by_id["a"]["duplicate_of"] == "c"  # c has the better first-stage rank (2 < 3): c is kept
    assert by_id["c"]["duplicate_of"] is None and by_id["c"]["duplicate_doc_ids"] == ["a"]
    assert by_id["a"]["rerank_position"] == 4  # collapsed rows rank after every kept passage
    short = pl.read_parquet(out / "shortlists" / "*.parquet").row(0, named=True)
    assert sorted(short["doc_ids"]) == ["b", "c", "d"]
    assert json.loads((out / "manifest.json").read_text())["totals"]["docs_collapsed"] == 1
    code, err = _run(["--input", str(inp), "--output", str(out), "--model", str(tiny_bert), "--no-report", "--quiet"],
                     capsys)
    assert code == 2 and "other settings: dedupe_docs" in err, err  # resuming without the flag would mix semantics
