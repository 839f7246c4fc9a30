"""The report on an output folder behind an object store: the same report as on a local disk, from one read
of the small columns plus the review's own row groups, never a download of every passage.

The store is simulated (scripts/latency_fs.py: a local disk that waits before every call and counts the
bytes it returns); tests/test_cluster.py runs the job and its report against an S3 server on loopback.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import report_metrics as rm  # noqa: E402
from jobs.report import write_report  # noqa: E402
from jobs.storage import Location  # noqa: E402
from scripts.bench_report import make_scores  # noqa: E402
from scripts.latency_fs import latency_fs  # noqa: E402

FILES, ROWS, ROW_GROUP = 3, 60_000, 1_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, int]:
    """The same scores twice: one folder read as a local disk, one through the simulated object store."""
    root = tmp_path_factory.mktemp("report_storage")
    size = make_scores(root / "local", ROWS, FILES, row_group_size=ROW_GROUP)
    shutil.copytree(root / "local", root / "remote")
    return root / "local", root / "remote", size


@pytest.mark.parametrize("rows_per_bucket", [rm.ROWS_PER_BUCKET, 7_000])
def test_same_report_through_an_object_store(runs, rows_per_bucket: int, monkeypatch) -> None:
    local, remote, size = runs
    monkeypatch.setattr(rm, "ROWS_PER_BUCKET", rows_per_bucket)
    write_report(str(local), quiet=True, max_review=5)
    fs, handler = latency_fs(0.002)
    summary = write_report(Location(fs, str(remote), "latency://remote"), quiet=True, max_review=5)

    assert summary["rows"] == ROWS and summary["report_dir"] == "latency://remote/report"
    for name in ("metrics.parquet", "per_query.parquet", "review.parquet"):
        assert pl.read_parquet(remote / "report" / name).equals(pl.read_parquet(local / "report" / name)), name
    review = pl.read_parquet(remote / "report" / "review.parquet")
    assert review.height == 5 and review["demoted_doc"].is_not_null().all() and review["query"].is_not_null().all()
    assert (remote / "report" / "report.html").stat().st_size > 10_000
    # Per shard file: its footer, then its small columns; then the review's files, once each.
    assert handler.calls["open"] <= 2 * FILES + FILES + 1 + 8  # + manifest.json + the report's own files
    # The passages are most of the bytes, and only the review's row groups of them are read.
    assert handler.bytes_read < 0.3 * size, (handler.bytes_read, size)


def test_missing_scores_through_an_object_store(tmp_path: Path) -> None:
    fs, _ = latency_fs(0.0)
    with pytest.raises(rm.ScoresMissingError, match="no scores directory at latency://x/scores"):
        write_report(Location(fs, str(tmp_path), "latency://x"), quiet=True)


# ---- what a scores folder may hold: each case once failed or gave a quietly weaker report ----------------

def _two_files(root: Path, first: pl.DataFrame, second: pl.DataFrame) -> Path:
    (root / "scores").mkdir(parents=True)
    first.write_parquet(root / "scores" / "part-0.parquet")
    second.write_parquet(root / "scores" / "part-1.parquet")
    return root


def _rows(queries: range, labelled: bool = True) -> pl.DataFrame:
    n = 6
    q = [f"q{i}" for i in queries for _ in range(n)]
    df = pl.DataFrame({"query_id": q, "query": [f"question {x}" for x in q],
                       "doc_id": [f"{x}-d{k}" for x in q[::n] for k in range(n)],
                       "doc": [f"passage {k}" for _ in queries for k in range(n)],
                       "score": pl.Series([float((k * 7) % n) for _ in queries for k in range(n)], dtype=pl.Float32),
                       "first_stage_rank": pl.Series([k + 1 for _ in queries for k in range(n)], dtype=pl.Int32)})
    df = df.with_columns(pl.col("score").rank("ordinal", descending=True).over("query_id").cast(pl.Int32)
                         .alias("rerank_position"))
    # the relevant passage (first-stage rank 2) falls to position 5: every query is on the review list
    return df.with_columns(label=(pl.col("first_stage_rank") == 2).cast(pl.Int32)) if labelled else df


def test_optional_column_in_some_files_only_names_them(tmp_path: Path) -> None:
    out = _two_files(tmp_path, _rows(range(0, 3)), _rows(range(3, 6), labelled=False))
    with pytest.raises(rm.ScoresMissingError, match=r"column 'label' is in .*part-0.parquet but not in .*part-1"):
        write_report(str(out), quiet=True)


def test_widths_and_extra_columns_may_differ_between_files(tmp_path: Path) -> None:
    """int32 ids in one file and int64 in the other, integer labels in one file and float in the other (the job
    takes both), a pass-through column in one file only, a folder named like a shard: the report is the one
    of the tidy folder."""
    ints = lambda df: df.with_columns(pl.col("query_id").str.slice(1).cast(pl.Int64))  # noqa: E731
    a, b = ints(_rows(range(0, 3))), ints(_rows(range(3, 6)))
    tidy = _two_files(tmp_path / "tidy", a, b)
    messy = _two_files(tmp_path / "messy", a.with_columns(pl.col("query_id").cast(pl.Int32)),
                       b.with_columns(tenant=pl.lit("t1"), label=pl.col("label").cast(pl.Float64)))
    (messy / "scores" / "stray.parquet").mkdir()
    want = write_report(str(tidy), quiet=True)
    got = write_report(str(messy), quiet=True)
    assert got["rows"] == want["rows"] == 36 and got["ndcg@10_after"] == want["ndcg@10_after"]
    for name in ("per_query.parquet", "review.parquet"):
        assert pl.read_parquet(messy / "report" / name).equals(pl.read_parquet(tidy / "report" / name)), name
    review = pl.read_parquet(messy / "report" / "review.parquet")
    assert review.height == 6 and review["demoted_doc"].is_not_null().all()


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    out = _two_files(tmp_path, _rows(range(0, 3)), _rows(range(3, 6)))
    (out / "scores" / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(rm.ScoresMissingError, match=r"part-1.parquet: not a readable Parquet file"):
        write_report(str(out), quiet=True)
