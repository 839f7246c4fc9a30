"""Whole small files packed into shards: 20,000 files of 5,000 rows made 20,000 shards (and about a million key
and positions files at 100 query buckets). Packing must change nothing a user sees but the shard count:
the same scores and positions, rejects still traced to their file and row, reruns still resume."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_each_row_once, job_args, read_dir, shortlist_rows
from jobs.plan import make_plan
from jobs.rerank import main
from schemas.contract import ColumnMap


def _small_files(folder, sizes: list[int], prefix: str = "f") -> list[str]:
    """One file per size, each its own queries (5 candidates a query), named in input order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, n in enumerate(sizes):
        rows = shortlist_rows(max(1, n // 5), 5, prefix=f"{prefix}{i}q", seed=i)[:n]
        name = folder / f"{prefix}-{i:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), name, row_group_size=4)
        names.append(str(name))
    return names


_SCHEMA = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("doc_id", pa.string()),
                     ("doc", pa.string()), ("first_stage_score", pa.float64())])


def _files_of(plan) -> list[list[str]]:
    return [[os.path.basename(p.uri) for p in s.parts] for s in plan.shards]


def test_small_files_pack_whole_in_input_order(tmp_path):
    _small_files(tmp_path, [20] * 6 + [100] + [20, 0, 20])
    plan = make_plan([str(tmp_path)], ColumnMap(), 50)
    # 20+20 fits 50, a third would not; the 100-row file is cut on its own (row groups of 4 rows: 48+48+4);
    # the empty file packs with its neighbours
    assert _files_of(plan) == [["f-000.parquet", "f-001.parquet"], ["f-002.parquet", "f-003.parquet"],
                               ["f-004.parquet", "f-005.parquet"], ["f-006.parquet"], ["f-006.parquet"],
                               ["f-006.parquet"], ["f-007.parquet", "f-008.parquet", "f-009.parquet"]]
    assert [s.rows for s in plan.shards] == [40, 40, 40, 48, 48, 4, 40] and plan.total_rows == 260
    whole = {f["uri"]: f["rows"] for f in plan.files}
    assert all(p.row_start == 0 and p.row_end == whole[p.uri] for s in plan.shards if len(s.parts) > 1 for p in s.parts)
    assert [s.seq for s in plan.shards] == sorted(s.seq for s in plan.shards) and len({s.name for s in plan.shards}) == 7
    assert plan.shards[0].name.endswith("-p2") and not plan.shards[3].name.endswith(("-p1", "-p2"))
    # a file of exactly --shard-rows rows, or more, is never packed
    assert _files_of(make_plan([str(tmp_path)], ColumnMap(), 20))[:2] == [["f-000.parquet"], ["f-001.parquet"]]


def test_packing_stops_at_the_file_cap_and_at_schemas_that_do_not_combine(tmp_path, monkeypatch):
    """Files pack only when every column keeps its values: widenings without loss combine; int64 beside
    float64 (pandas writes an int column with a NaN as float), a column only one file has, or a dictionary
    beside plain strings each start a new shard."""
    import jobs.plan as plan_mod

    names = _small_files(tmp_path, [3] * 10)
    monkeypatch.setattr(plan_mod, "MAX_FILES_PER_SHARD", 3)
    assert [len(s.parts) for s in make_plan([str(tmp_path)], ColumnMap(), 1000).shards] == [3, 3, 3, 1]
    monkeypatch.undo()

    def rewrite(i, col, array):
        t = pq.read_table(names[i])
        t = t.set_column(t.column_names.index(col), col, array) if col in t.column_names else t.append_column(col, array)
        pq.write_table(t, names[i])

    rewrite(1, "first_stage_score", pq.read_table(names[1])["first_stage_score"].cast(pa.float32()))  # combines
    rewrite(2, "doc_id", pq.read_table(names[2])["doc_id"].cast(pa.large_string()))  # combines
    rewrite(3, "doc", pq.read_table(names[3])["doc"].dictionary_encode())  # beside plain: no
    rewrite(4, "n", pa.array([1, 2, 3], pa.int64()))
    rewrite(5, "n", pa.array([1.5, None, 3.0], pa.float64()))  # int64 then float64: no
    rewrite(6, "n", pa.array([7, 8, 9], pa.int32()))  # float64 then int32: no; 7 lacks n: no
    groups = [[os.path.basename(p.uri)[2:5] for p in s.parts] for s in make_plan([str(tmp_path)], ColumnMap(), 1000).shards]
    assert groups == [["000", "001", "002"], ["003"], ["004"], ["005"], ["006"], ["007", "008", "009"]]


def test_a_packed_shard_keeps_every_value_and_fits_its_dictionaries(tmp_path):
    """Two pandas category columns of 100 values each (int8 codes) packed into one row group overflowed int8:
    the scored file was written but could not be read back. Widened types hold every value exactly."""
    from jobs.read_ahead import read_shard

    names = _small_files(tmp_path, [100, 100])
    for i, (name, ints) in enumerate(zip(names, (pa.int8(), pa.int32()))):
        t = pq.read_table(name)
        site = pa.array([f"site-{i}-{r}" for r in range(100)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string()))
        t = t.append_column("site", site).append_column("n", pa.array(range(100), ints))
        pq.write_table(t, name)
    shard = make_plan([str(tmp_path)], ColumnMap(), 1000).shards[0].to_dict()
    assert len(shard["parts"]) == 2
    table = read_shard(shard)
    assert table.schema.field("site").type == pa.dictionary(pa.int32(), pa.string()) and table.schema.field("n").type == pa.int32()
    pq.write_table(table, tmp_path / "scored.parquet")
    back = pq.read_table(tmp_path / "scored.parquet")
    assert back["site"].to_pylist() == [f"site-{i}-{r}" for i in range(2) for r in range(100)]
    assert back["n"].to_pylist() == list(range(100)) * 2


def test_a_mended_file_keeps_its_own_shard_so_the_rerun_resumes(tmp_path):
    """A file unreadable at the first run had a shard to itself. Mended, it would pack with its neighbours and
    change their shards, and the rerun would refuse to resume. Kept alone, nothing else changes."""
    _small_files(tmp_path, [20] * 4)
    broken = tmp_path / "f-001b.parquet"  # sorts between f-001 and f-002
    broken.write_bytes(b"PAR1 cut short")
    before = make_plan([str(tmp_path)], ColumnMap(), 100)
    assert _files_of(before) == [["f-000.parquet", "f-001.parquet"], ["f-001b.parquet"], ["f-002.parquet", "f-003.parquet"]]
    previous = json.loads(json.dumps(before.to_json()))
    committed = {s.name for s in before.shards if "f-001b" not in s.name}
    pq.write_table(pa.Table.from_pylist(shortlist_rows(4, 5, prefix="m"), schema=_SCHEMA), broken)

    naive = make_plan([str(tmp_path)], ColumnMap(), 100)  # without the earlier plan it packs everything
    assert _files_of(naive) == [["f-000.parquet", "f-001.parquet", "f-001b.parquet", "f-002.parquet", "f-003.parquet"]]
    assert naive.resume_problem(previous, committed.__contains__)

    after = make_plan([str(tmp_path)], ColumnMap(), 100, earlier=previous)  # packed as the earlier plan was
    assert _files_of(after) == _files_of(before) and after.resume_problem(previous, committed.__contains__) is None
    assert [s.to_dict() for s in after.shards if s.name in committed] == \
        [s.to_dict() for s in before.shards if s.name in committed]
    assert after.gone_shards(previous) == []
    # and in every run after that (a new --top-k, say): its plan.json keeps the mended file on its own
    later = make_plan([str(tmp_path)], ColumnMap(), 100, earlier=json.loads(json.dumps(after.to_json())))
    assert _files_of(later) == _files_of(before) and later.fingerprint() == after.fingerprint()


def test_files_mended_or_added_since_change_no_committed_shard(tmp_path):
    """A file of a failed packed shard mended with more rows, and a file added at the end while the job was
    unfinished, used to repack their neighbours and refuse the resume. Only the failed shard is cut anew; what
    it left is deleted (gone_shards)."""
    names = _small_files(tmp_path, [30, 30, 30, 30, 30])
    before = make_plan([str(tmp_path)], ColumnMap(), 100)
    assert _files_of(before) == [["f-000.parquet", "f-001.parquet", "f-002.parquet"], ["f-003.parquet", "f-004.parquet"]]
    previous = json.loads(json.dumps(before.to_json()))
    committed = {before.shards[1].name}  # the first shard failed on a corrupt f-001
    pq.write_table(pa.Table.from_pylist(shortlist_rows(10, 5, prefix="m"), schema=_SCHEMA), names[1])  # 50 rows now
    _small_files(tmp_path, [20], prefix="g")  # g-000 sorts after every f file
    after = make_plan([str(tmp_path)], ColumnMap(), 100, earlier=previous)
    assert _files_of(after) == [["f-000.parquet", "f-001.parquet"], ["f-002.parquet"], ["f-003.parquet", "f-004.parquet"],
                                ["g-000.parquet"]]
    assert after.resume_problem(previous, committed.__contains__) is None
    assert after.gone_shards(previous) == [before.shards[0].name]
    # a committed shard that would be cut otherwise is still refused
    pq.write_table(pa.Table.from_pylist(shortlist_rows(10, 5, prefix="n"), schema=_SCHEMA), names[4])
    assert "changed since" in make_plan([str(tmp_path)], ColumnMap(), 100, earlier=previous).resume_problem(
        previous, committed.__contains__)


def test_a_plan_of_an_earlier_format_is_not_resumed(tmp_path):
    _small_files(tmp_path, [20, 20])
    plan = make_plan([str(tmp_path)], ColumnMap(), 100)
    old = {**json.loads(json.dumps(plan.to_json())), "format": None, "fingerprint": "old"}
    old["shards"] = [{"name": "f-000-0123abcd-r0000000000"}]  # format 1 named shards otherwise
    assert "earlier crossrank" in plan.resume_problem(old, lambda n: True)
    assert plan.resume_problem(old, lambda n: False) is None  # nothing committed: every shard runs again


def test_a_packed_shard_names_the_file_that_changed_under_it(tiny_model, tmp_path):
    """A shard reads hundreds of files: an error must say which one."""
    from jobs.rerank import job_spec, parse_args
    from jobs.worker import ShardWorker

    names = _small_files(tmp_path / "in", [10, 10, 10])
    shard = make_plan([str(tmp_path / "in")], ColumnMap(), 100).shards[0].to_dict()
    assert len(shard["parts"]) == 3
    worker = ShardWorker(job_spec(parse_args(job_args(tmp_path / "in", tmp_path / "out", tiny_model, "--device", "cpu"))))
    os.remove(names[2])
    with pytest.raises(OSError, match=r"f-002.parquet: FileNotFoundError"):
        worker.score_shard(shard)
    # data cut short under an intact footer: Arrow's message spans lines, and a failure is reported by its
    # last line, which must still name the file (one of up to 256)
    data = open(names[0], "rb").read()
    footer = data[-(int.from_bytes(data[-8:-4], "little") + 8):]
    open(names[0], "wb").write(data[: (len(data) - len(footer)) // 2] + footer)
    with pytest.raises(OSError) as cut:
        worker.score_shard(shard)
    assert "f-000.parquet" in str(cut.value).strip().splitlines()[-1], str(cut.value)
    open(names[0], "wb").write(data)
    # a file whose footer could not be read at planning was planned as 0 rows: readable by now, it must not
    # commit as 0 rows (its rows would be lost), but fail until the rerun plans it anew
    (tmp_path / "in" / "late.parquet").write_bytes(b"PAR1 still uploading")
    late = next(s for s in make_plan([str(tmp_path / "in")], ColumnMap(), 100).shards if "late" in s.name).to_dict()
    pq.write_table(pa.Table.from_pylist(shortlist_rows(2, 5, prefix="late"), schema=_SCHEMA), tmp_path / "in" / "late.parquet")
    with pytest.raises(OSError, match=r"late.parquet: cannot read Parquet metadata .* when the job was planned"):
        worker.score_shard(late)
    pq.write_table(pq.read_table(names[1]).slice(0, 7), names[1], row_group_size=2)  # groups 0-2 now hold 6 rows
    with pytest.raises(OSError, match=r"f-001.parquet: 6 rows in row groups \[0, 1, 2\], but 10 when the job was planned"):
        worker.score_shard(shard)


def _by_pair(out) -> dict[tuple, tuple]:
    t = read_dir(out / "scores")
    return {(q, d): (s, p, r) for q, d, s, p, r in zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(),
                                                        t["score"].to_pylist(), t["rerank_position"].to_pylist(),
                                                        t["first_stage_rank"].to_pylist())}


def test_packed_and_unpacked_jobs_agree_row_for_row(ray_local, tiny_model, tmp_path, capsys):
    """The same input with packing (--shard-rows 60: three or so files a shard) and without (--shard-rows 5:
    every file at least that long is cut on its own): the same scores, positions and first-stage ranks, and
    the same rejects, each with the file and row it came from. One query spans two files."""
    inp = tmp_path / "in"
    _small_files(inp, [20, 15, 0, 20, 10])
    split = pa.Table.from_pylist(shortlist_rows(2, 6, prefix="split", seed=9), schema=_SCHEMA)
    pq.write_table(split.slice(0, 7), inp / "f-002x.parquet")  # query split0's candidates 0-5, split1's 0
    bad = split.slice(7).to_pylist()
    bad[1]["query"], bad[3]["doc"] = None, "  "
    pq.write_table(pa.Table.from_pylist(bad, schema=_SCHEMA), inp / "f-002y.parquet")  # split1's 1-5, two bad

    packed_out, single_out = tmp_path / "packed", tmp_path / "single"
    assert main(job_args(inp, packed_out, tiny_model, "--shard-rows", "60")) == 0, capsys.readouterr().err
    assert main(job_args(inp, single_out, tiny_model, "--shard-rows", "5")) == 0, capsys.readouterr().err
    for out in (packed_out, single_out):
        assert_each_row_once(inp, out)

    stats = pq.read_table(packed_out / "stats.parquet").to_pylist()
    assert max(s["input_files"] for s in stats) >= 3 and len(stats) < len(pq.read_table(single_out / "stats.parquet"))
    assert all((s["row_start"] is None) == (s["input_files"] > 1) for s in stats)
    packed, single = _by_pair(packed_out), _by_pair(single_out)
    assert packed.keys() == single.keys() and len(packed) == 75
    for k in packed:
        np.testing.assert_allclose(packed[k][0], single[k][0], rtol=0, atol=1e-5)
        assert packed[k][1:] == single[k][1:], k
    assert sorted(p for (q, _), (_, p, _) in packed.items() if q == "split1") == [1, 2, 3, 4]  # across files

    rejects = read_dir(packed_out / "rejects")
    got = sorted(zip(rejects["source_file"].to_pylist(), rejects["source_row"].to_pylist(),
                     rejects["reject_reason"].to_pylist()))
    assert got == [(str(inp / "f-002y.parquet"), 1, "query is null"),
                   (str(inp / "f-002y.parquet"), 3, "doc is empty or whitespace")]
    single_rejects = read_dir(single_out / "rejects")
    assert sorted(zip(single_rejects["source_file"].to_pylist(), single_rejects["source_row"].to_pylist())) == \
        [(f, r) for f, r, _ in got]


def test_a_broken_file_among_small_ones_is_redone_alone(ray_local, tiny_model, tmp_path, capsys):
    """The job with an unreadable small file fails only that file's shard; once it is mended, the rerun scores
    just that file and leaves every packed shard as it was committed."""
    inp = tmp_path / "in"
    _small_files(inp, [10, 10, 10, 10])
    broken = inp / "f-001b.parquet"
    broken.write_bytes(b"PAR1 cut short")
    out = tmp_path / "out"
    assert main(job_args(inp, out, tiny_model, "--shard-rows", "100")) == 1
    err = capsys.readouterr().err
    assert "1 shard(s) failed" in err and "f-001b.parquet" in err, err
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "_work" / "scored").glob("*.parquet")}
    assert len(committed) == 2 and all(n.endswith("-p2.parquet") for n in committed)

    pq.write_table(pa.Table.from_pylist(shortlist_rows(2, 5, prefix="m"), schema=_SCHEMA), broken)
    code = main(job_args(inp, out, tiny_model, "--shard-rows", "100"))
    err = capsys.readouterr().err
    assert code == 0 and "resuming: 2 of 3 shard(s) already committed" in err, err
    assert all((out / "_work" / "scored" / n).stat().st_mtime_ns == t for n, t in committed.items())
    assert_each_row_once(inp, out)
    code = main(job_args(inp, out, tiny_model, "--shard-rows", "100", "--top-k", "2"))  # any later rerun resumes too
    assert code == 0, capsys.readouterr().err
    assert all((out / "_work" / "scored" / n).stat().st_mtime_ns == t for n, t in committed.items())


def test_what_a_shard_cut_otherwise_now_left_is_deleted_on_resume(tmp_path, capsys):
    """The failed shard's rejects and keys would otherwise stay beside the rows of the shards that replace it:
    its rows counted twice in OUT/rejects/ and in the ranking."""
    from jobs.layout import OutputLayout
    from jobs.rerank import prepare_output
    from jobs.storage import locate, write_json, write_parquet

    inp = tmp_path / "in"
    names = _small_files(inp, [30, 30, 30, 30, 30])
    before = make_plan([str(inp)], ColumnMap(), 100)
    failed, done = before.shards
    layout = OutputLayout(locate(str(tmp_path / "out")))
    write_json({**before.to_json(), "options": None}, layout.plan)
    empty = pa.table({"x": pa.array([], pa.int64())})
    for loc in (layout.scored(done.name), layout.rejects(failed.name), layout.keys(failed.name, 0),
                layout.rejects(done.name)):
        write_parquet(empty, loc)
    write_json({"shard": failed.name}, layout.shard_stats(failed.name))
    pq.write_table(pa.Table.from_pylist(shortlist_rows(10, 5, prefix="m"), schema=_SCHEMA), names[1])  # mended, 50 rows

    after = make_plan([str(inp)], ColumnMap(), 100, earlier=json.loads((tmp_path / "out" / "_work" / "plan.json").read_text()))
    prepare_output(layout, after, overwrite=False)
    assert "removed what 1 uncommitted shard(s) of the earlier plan left" in capsys.readouterr().err
    left = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet")}
    assert left == {f"_work/scored/{done.name}.parquet", f"rejects/{done.name}.parquet"}
    assert not (tmp_path / "out" / "_work" / "stats" / f"{failed.name}.json").exists()


def test_buckets_are_sized_by_the_memory_long_ids_take(tmp_path, monkeypatch):
    """A bucket was 2M rows whatever its ids: with 1 KB query and doc ids its ranking task needs ~9 GB
    (scripts/bench_bucket_memory.py). Buckets now shrink with the sampled id length; short ids are unchanged."""
    from jobs import bucket_size

    monkeypatch.setattr(bucket_size, "SAMPLE_ABOVE_ROWS", 0)
    monkeypatch.setattr(bucket_size, "MIN_BUCKET_ROWS", 1)
    monkeypatch.setattr(bucket_size, "BUCKET_BYTES", 200 * (bucket_size.KEY_ROW_BYTES + 2 * 20))  # ~200 rows of short ids

    def plan_for(id_len: int, folder):
        folder.mkdir()
        for f in range(3):
            rows = shortlist_rows(20, 10, prefix=f"f{f}q", seed=f)
            for r in rows:
                r["query_id"], r["doc_id"] = r["query_id"].rjust(id_len, "q"), r["doc_id"].rjust(id_len, "d")
            pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), folder / f"part-{f}.parquet")
        return make_plan([str(folder)], ColumnMap(), 1000)

    short, long = plan_for(10, tmp_path / "short"), plan_for(1000, tmp_path / "long")
    assert short.total_rows == long.total_rows == 600
    assert short.id_text_bytes == pytest.approx(20, abs=3) and long.id_text_bytes == pytest.approx(2000)
    assert short.buckets == 3 and long.buckets == math.ceil(600 / long.bucket_rows)
    assert long.bucket_rows < short.bucket_rows / 5 and long.buckets >= 5 * short.buckets
    assert json.loads(json.dumps(long.to_json()))["bucket_rows"] == long.bucket_rows


def _with_column(name, column):
    t = pq.read_table(name)
    pq.write_table(t.append_column("site", column), name)


def test_dictionaries_of_every_index_type_pack_and_read_back(tmp_path):
    """pandas writes int8 category codes, polars uint32 (Categorical): the plan packed them, reading refused
    ("no longer combine"); unsigned indices never packed at all. A file whose row groups carry different int8
    dictionaries wrote a scored file that could not be read back. An ordered dictionary is kept apart."""
    from jobs.read_ahead import read_shard

    names = _small_files(tmp_path / "mixed", [100, 100, 100])
    for i, (name, index) in enumerate(zip(names, (pa.int8(), pa.uint32(), pa.uint8()))):
        values = pa.array([f"s{i}-{r}" for r in range(100)]).dictionary_encode()
        _with_column(name, values.cast(pa.dictionary(index, pa.string())))
    (shard,) = [s.to_dict() for s in make_plan([str(tmp_path / "mixed")], ColumnMap(), 1000).shards]
    table = read_shard(shard)
    assert table.schema.field("site").type == pa.dictionary(pa.int32(), pa.string())
    pq.write_table(table, tmp_path / "back.parquet")
    assert pq.read_table(tmp_path / "back.parquet")["site"].to_pylist() == [f"s{i}-{r}" for i in range(3) for r in range(100)]

    one = tmp_path / "one" / "one.parquet"
    one.parent.mkdir()
    rows = pa.Table.from_pylist(shortlist_rows(40, 5, seed=3), schema=_SCHEMA)
    with pq.ParquetWriter(one, rows.schema.append(pa.field("site", pa.dictionary(pa.int8(), pa.string())))) as w:
        for g in range(2):  # two row groups, each its own 100-value int8 dictionary
            part = rows.slice(g * 100, 100)
            site = pa.array([f"g{g}-{r}" for r in range(100)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string()))
            w.write_table(part.append_column("site", site))
    (shard,) = [s.to_dict() for s in make_plan([str(one.parent)], ColumnMap(), 1000).shards]
    pq.write_table(read_shard(shard), tmp_path / "one-back.parquet")
    assert pq.read_table(tmp_path / "one-back.parquet")["site"].to_pylist() == [f"g{g}-{r}" for g in range(2) for r in range(100)]

    names = _small_files(tmp_path / "ordered", [10, 10, 10])
    for name, cats in zip(names, (["low", "high"], ["high", "low"], ["low", "high"])):
        ordered = pa.DictionaryArray.from_arrays(pa.array([0, 1] * 5, pa.int8()), pa.array(cats), ordered=True)
        _with_column(name, ordered)
    assert [len(s.parts) for s in make_plan([str(tmp_path / "ordered")], ColumnMap(), 1000).shards] == [1, 1, 1]


def test_a_column_of_nulls_only_packs_beside_any_type(tmp_path):
    """pandas writes an all-None object column as type null: lossless beside a typed one."""
    from jobs.read_ahead import read_shard

    names = _small_files(tmp_path, [10, 10])
    _with_column(names[0], pa.array([None] * 10, pa.null()))
    _with_column(names[1], pa.array([f"x{i}" for i in range(10)]))
    (shard,) = [s.to_dict() for s in make_plan([str(tmp_path)], ColumnMap(), 1000).shards]
    assert read_shard(shard)["site"].to_pylist() == [None] * 10 + [f"x{i}" for i in range(10)]


def test_numbering_stays_stable_past_131072_files(tmp_path, monkeypatch):
    """Past 2^17 files the shards were numbered densely, so a mended file that split its failed shard
    renumbered every later committed one and the resume was refused. Now the earlier plan's split of a seq's
    31 bits is kept (here FILE_SEQ_BITS is raised so that 10 files are already too many for it)."""
    import jobs.plan as plan_mod

    monkeypatch.setattr(plan_mod, "FILE_SEQ_BITS", 29)
    names = _small_files(tmp_path, [20] * 10)
    before = make_plan([str(tmp_path)], ColumnMap(), 50)
    assert before.seq_bits == 27 and [len(s.parts) for s in before.shards] == [2] * 5
    previous = json.loads(json.dumps(before.to_json()))
    committed = {s.name for s in before.shards[1:]}  # the first shard failed
    pq.write_table(pa.Table.from_pylist(shortlist_rows(12, 5, prefix="m"), schema=_SCHEMA), names[1], row_group_size=20)
    after = make_plan([str(tmp_path)], ColumnMap(), 50, earlier=previous)  # f-001 now 60 rows: cut in 2 (40 + 20)
    assert [len(s.parts) for s in after.shards] == [1, 1, 1, 2, 2, 2, 2] and after.seq_bits == 27
    assert after.resume_problem(previous, committed.__contains__) is None
    assert {s.name: s.seq for s in after.shards if s.name in committed} == \
        {s.name: s.seq for s in before.shards if s.name in committed}
    assert [s.seq for s in after.shards] == sorted(s.seq for s in after.shards) and all(s.seq < 1 << 31 for s in after.shards)


def test_a_resume_sizes_buckets_as_its_earlier_run(tmp_path, monkeypatch):
    """The sampled id length changed when a sampled file was mended, and with it the bucket size: the resume
    was refused ("hashed into N buckets then, M now"). A resume reuses the earlier estimate."""
    from jobs import bucket_size

    monkeypatch.setattr(bucket_size, "SAMPLE_ABOVE_ROWS", 0)
    monkeypatch.setattr(bucket_size, "MIN_BUCKET_ROWS", 1)
    monkeypatch.setattr(bucket_size, "BUCKET_BYTES", 50 * (bucket_size.KEY_ROW_BYTES + 2 * 20))
    names = _small_files(tmp_path, [100, 100, 100])
    (tmp_path / "f-000.parquet").write_bytes(b"PAR1 partial upload")
    before = make_plan([str(tmp_path)], ColumnMap(), 100)
    previous = json.loads(json.dumps(before.to_json()))
    rows = shortlist_rows(20, 5, prefix="m")
    for r in rows:
        r["query_id"], r["doc_id"] = r["query_id"] * 100, r["doc_id"] * 100  # long ids now
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), names[0])
    fresh = make_plan([str(tmp_path)], ColumnMap(), 100)
    assert fresh.id_text_bytes > 3 * before.id_text_bytes and fresh.buckets > before.buckets
    resumed = make_plan([str(tmp_path)], ColumnMap(), 100, earlier=previous)
    resumed.keep_buckets(previous)
    assert resumed.id_text_bytes == before.id_text_bytes and resumed.buckets == before.buckets
    assert resumed.resume_problem(previous, lambda n: "f-000" not in n) is None


def test_a_file_removed_or_inserted_since_keeps_committed_shards(tmp_path):
    """A corrupt file given up (deleted) shifted every later file's index, so every later committed shard
    "covered other rows" and only --overwrite (all scoring again) got past it. Files keep their earlier index;
    a file inserted since comes after all earlier ones."""
    names = _small_files(tmp_path, [30] * 5)
    before = make_plan([str(tmp_path)], ColumnMap(), 30)  # one shard a file
    previous = json.loads(json.dumps(before.to_json()))
    committed = {s.name for s in before.shards if "f-001" not in s.name}
    os.remove(names[1])
    _small_files(tmp_path / "x", [30], prefix="f-002a")  # then moved in: sorts between f-002 and f-003
    os.replace(tmp_path / "x" / "f-002a-000.parquet", tmp_path / "f-002a.parquet")
    after = make_plan([str(tmp_path)], ColumnMap(), 30, earlier=previous)
    assert after.resume_problem(previous, committed.__contains__) is None
    assert after.gone_shards(previous) == [s.name for s in before.shards if "f-001" in s.name]
    seqs = {s.name: s.seq for s in after.shards}
    assert all(seqs[s.name] == s.seq for s in before.shards if s.name in committed)
    assert [os.path.basename(s.uri) for s in after.shards] == \
        ["f-000.parquet", "f-002.parquet", "f-003.parquet", "f-004.parquet", "f-002a.parquet"]  # in seq order
    assert [f["index"] for f in after.files] == [0, 2, 5, 3, 4]  # listing order; the new file after all
    again = make_plan([str(tmp_path)], ColumnMap(), 30, earlier=json.loads(json.dumps(after.to_json())))
    assert again.fingerprint() == after.fingerprint()
    fresh = make_plan([str(tmp_path)], ColumnMap(), 30)  # no earlier plan: plain input order
    assert [f["index"] for f in fresh.files] == [0, 1, 2, 3, 4] and fresh.fingerprint() != after.fingerprint()


def test_a_broken_file_given_up_lets_the_rest_resume(ray_local, tiny_model, tmp_path, capsys):
    """Deleting the corrupt file instead of mending it renumbered every later file's committed shards: the
    rerun was refused, and only --overwrite (every shard scored again) got past it."""
    inp = tmp_path / "in"
    _small_files(inp, [10, 10, 10, 10])
    broken = inp / "f-001b.parquet"
    broken.write_bytes(b"PAR1 cut short")
    out = tmp_path / "out"
    assert main(job_args(inp, out, tiny_model, "--shard-rows", "10")) == 1  # one shard a file
    capsys.readouterr()
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "_work" / "scored").glob("*.parquet")}
    assert len(committed) == 4

    broken.unlink()
    code = main(job_args(inp, out, tiny_model, "--shard-rows", "10"))
    err = capsys.readouterr().err
    assert code == 0 and "resuming: 4 of 4 shard(s) already committed" in err, err
    assert all((out / "_work" / "scored" / n).stat().st_mtime_ns == t for n, t in committed.items())
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert_each_row_once(inp, out)
