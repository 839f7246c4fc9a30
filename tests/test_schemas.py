"""Input validation: what users read when their input is wrong, and the rejects split."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.plan import make_plan
from schemas.contract import ColumnMap, InputSchemaError, split_rejects


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_missing_column_names_file_and_flag(tmp_path):
    f = _write(tmp_path / "a.parquet", query_id=["q"], query=["x"], doc_id=["d"], passage=["y"])
    with pytest.raises(InputSchemaError) as e:
        make_plan([f], ColumnMap(), 100)
    msg = str(e.value)
    assert f in msg and "'doc'" in msg and "--doc-col" in msg


def test_wrong_type_names_expected_and_found(tmp_path):
    f = _write(tmp_path / "a.parquet", query_id=["q"], query=["x"], doc_id=["d"], doc=[3])
    with pytest.raises(InputSchemaError, match=r"a\.parquet: column 'doc' has type int64, expected string"):
        make_plan([f], ColumnMap(), 100)


def test_renamed_columns_are_accepted(tmp_path):
    f = _write(tmp_path / "a.parquet", qid=[1], question=["x"], pid=[2], passage=["y"], bm25=[0.3])
    plan = make_plan([f], ColumnMap(query_id="qid", query="question", doc_id="pid", doc="passage",
                                    first_stage_score="bm25"), 100)
    assert plan.total_rows == 1


def test_id_type_must_agree_across_files(tmp_path):
    a = _write(tmp_path / "a.parquet", query_id=[1], query=["x"], doc_id=["d"], doc=["y"])
    b = _write(tmp_path / "b.parquet", query_id=["1"], query=["x"], doc_id=["d"], doc=["y"])
    with pytest.raises(InputSchemaError, match="query_id' is integer in .*a.parquet but string in .*b.parquet"):
        make_plan([a, b], ColumnMap(), 100)


def test_shards_split_files_by_row_groups(tmp_path):
    f = tmp_path / "big.parquet"
    pq.write_table(pa.table({"query_id": list(range(100)), "query": ["q"] * 100, "doc_id": list(range(100)),
                             "doc": ["d"] * 100}), f, row_group_size=10)
    plan = make_plan([str(tmp_path)], ColumnMap(), 25)
    assert [s.rows for s in plan.shards] == [20, 20, 20, 20, 20]
    assert plan.shards[1].parts[0].row_start == 20 and len({s.name for s in plan.shards}) == 5


def test_split_rejects_reasons_and_rows():
    t = pa.table({
        "query_id": ["a", None, "c", "d", "e", "f"],
        "query": ["q", "q", " \t", "q", "q", None],
        "doc_id": ["1", "2", "3", "4", "5", "6"],
        "doc": ["x", "x", "x", "", "x", "x"],
        "first_stage_score": [1.0, 2.0, 3.0, 4.0, float("nan"), 1.0],
    })
    ok, rej, keep = split_rejects(t, np.arange(10, 16))
    assert ok.num_rows + rej.num_rows == t.num_rows
    assert ok["query_id"].to_pylist() == ["a"] and keep.tolist() == [True] + [False] * 5
    assert dict(zip(rej["source_row"].to_pylist(), rej["reject_reason"].to_pylist())) == {
        11: "query_id is null", 12: "query is empty or whitespace", 13: "doc is empty or whitespace",
        14: "first_stage_score is NaN or infinite", 15: "query is null"}


def test_many_small_files_are_called_out_before_any_work():
    """Shards that stay small (files that cannot pack): 20,000 of them at 100M rows meant ~1M key files."""
    from jobs.plan import Part, Plan, Shard

    def plan(files: int, rows_each: int, buckets: int) -> Plan:
        shards = [Shard(f"f{i}-r0", i << 20, (Part(f"/in/f{i}.parquet", f"/in/f{i}.parquet", (0,), 0, rows_each),))
                  for i in range(files)]
        return Plan(shards=shards, files=[{"uri": s.uri, "bytes": 1, "rows": rows_each} for s in shards],
                    buckets=buckets, total_rows=files * rows_each, columns={})

    message = plan(20_000, 5_000, 50).small_shards_warning(500_000)
    assert message and "20,000 input files make 20,000 shards of 5,000 rows" in message and "1,000,000" in message
    assert plan(200, 500_000, 50).small_shards_warning(500_000) is None  # few, full shards
    assert plan(20_000, 5_000, 1).small_shards_warning(500_000) is None  # one bucket: one key file a shard
    assert plan(20_000, 5_000, 50).small_shards_warning(20_000) is None  # shards a quarter full: fine
