"""What a rerun resumes and what it refuses: a model is known by its files (not by how its path is spelt), a
column mapping is a setting, a new --top-k recuts the shortlists, counts survive a resume, an interrupted
--overwrite leaves no stale "complete", and a fixed file keeps the bucket count."""
from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import job_args, read_dir, shortlist_rows, write_shortlists
from jobs.rerank import main


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _uncommit(out, shard: str) -> None:
    """As if the run had died before this shard's commit."""
    (out / "scores" / f"{shard}.parquet").unlink()
    (out / "_work" / "scored" / f"{shard}.parquet").unlink()


def test_a_model_is_known_by_its_files_and_columns_are_settings(ray_local, tiny_bert, tmp_path, capsys,
                                                                 monkeypatch):
    """Other weights copied under the same path once resumed and mixed two models' scores in one output, and the
    same folder under another spelling of its path was refused; a changed --doc-col resumed silently."""
    from scripts.make_tiny_model import make_tiny_model

    inp = tmp_path / "in"
    inp.mkdir()
    for f in range(2):
        t = pa.Table.from_pylist(shortlist_rows(9, 10, prefix=f"f{f}q", seed=f)).rename_columns(  # 90 rows: unpacked
            ["query_id", "query", "doc_id", "passage", "first_stage_score"])
        pq.write_table(t.append_column("passage_clean", pc.utf8_upper(t["passage"])), inp / f"part-{f}.parquet")
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    out = tmp_path / "out"
    assert _run(job_args(inp, out, model, "--doc-col", "passage"), capsys)[0] == 0
    shards = sorted(p.stem for p in (out / "scores").glob("*.parquet"))
    assert len(shards) == 2

    _uncommit(out, shards[0])
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model, tmp_path / "elsewhere" / "same")
    code, err = _run(job_args(inp, out, "elsewhere/same", "--doc-col", "passage"), capsys)  # relative, elsewhere
    assert code == 0, err
    assert "resuming: 1 of 2 shard(s) already committed" in err

    _uncommit(out, shards[0])
    shutil.rmtree(model)
    shutil.copytree(make_tiny_model(tmp_path / "other", "bert", seed=1), model)
    code, err = _run(job_args(inp, out, model, "--doc-col", "passage"), capsys)
    assert code == 2 and re.search(r"other settings: model: .*weights_sha256 \w{12} then, \w{12} now\.", err), err
    code, err = _run(job_args(inp, out, "elsewhere/same", "--doc-col", "passage_clean"), capsys)
    assert code == 2 and re.search(r"other settings: columns: .*\"passage\".* then, .*\"passage_clean\"", err), err
    code, err = _run(job_args(inp, out, "elsewhere/same", "--doc-col", "passage"), capsys)
    assert code == 0, err  # the original model and mapping finish the job


def _cwd() -> str:
    import os

    return os.getcwd()


_cwd.__module__ = "__main__"  # shipped to Ray workers by value: they cannot import this test module


def test_an_actor_that_loads_other_weights_stops_the_job(ray_local, tiny_bert, tmp_path, capsys, monkeypatch):
    """The model's path names other files where the actors run (another node's copy, another working folder):
    the job stops before scoring anything, rather than write a second model's scores under the manifest's."""
    import os
    from pathlib import Path

    from scripts.make_tiny_model import make_tiny_model

    actors_cwd = Path(ray_local.get(ray_local.remote(_cwd).remote()))
    name = f"_crossrank_test_model_{os.getpid()}"
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=2, per_query=5)
    shutil.copytree(tiny_bert, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert actors_cwd != tmp_path
    try:
        make_tiny_model(actors_cwd / name, "bert", seed=1)  # what the same relative path means over there
        code, err = _run(job_args(inp, tmp_path / "out", name), capsys)
    finally:
        shutil.rmtree(actors_cwd / name, ignore_errors=True)
    assert code == 2, err
    assert "loaded another model than the driver checked" in err and "weights_sha256" in err, err
    assert not list((tmp_path / "out").glob("scores/*.parquet"))


def test_top_k_recuts_shortlists_and_counts_survive_a_resume(ray_local, tiny_bert, tmp_path, capsys):
    """A new --top-k was ignored by a rerun (shortlists kept the old cut while the manifest named the new one),
    and a rerun reported docs_collapsed 0."""
    rows = shortlist_rows(4, 8)
    for i in range(0, len(rows), 8):
        rows[i + 1]["doc"] = rows[i]["doc"]  # one duplicate passage under another id, per query
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = tmp_path / "out"

    def run(*extra) -> tuple[dict, list[int] | None]:
        code, err = _run(job_args(inp, out, tiny_bert, "--dedupe-docs", *extra), capsys)
        assert code == 0, err
        manifest = json.loads((out / "manifest.json").read_text())
        lists = read_dir(out / "shortlists") if (out / "shortlists").exists() else None
        return manifest, None if lists is None else sorted(len(ids) for ids in lists["doc_ids"].to_pylist())

    for extra, cut in ((("--top-k", "2"), [2] * 4), (("--top-k", "2"), [2] * 4), (("--top-k", "5"), [5] * 4),
                       ((), None), (("--top-k", "20"), [7] * 4)):  # 8 candidates, one collapsed
        manifest, lengths = run(*extra)
        assert manifest["totals"]["docs_collapsed"] == 4, extra
        assert manifest["top_k"] == (int(extra[1]) if extra else None)
        assert lengths == cut, extra


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_run_forgets_the_last_runs_complete_before_anything_else(tmp_path, overwrite):
    """A redo killed early once left the previous run's manifest saying "complete" over an emptied output; a
    resume killed while recutting shortlists left it beside lists of two different cuts."""
    from jobs.layout import OutputLayout
    from jobs.plan import make_plan
    from jobs.rerank import prepare_output
    from jobs.storage import locate
    from schemas.contract import ColumnMap

    inp = write_shortlists(tmp_path / "in", files=1)
    out = tmp_path / "out"
    layout = OutputLayout(locate(str(out)))
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, {})  # the last run's plan.json
    (out / "manifest.json").write_text(json.dumps({"status": "complete"}))
    pq.write_table(pa.table({"shard": ["x"]}), out / "stats.parquet")
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), overwrite, {})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    # a resume keeps the last run's record until it ends (a rerun that then fails must not lose it)
    assert manifest.get("previous") == (None if overwrite else {"status": "complete"})
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), overwrite, {})  # interrupted, run again
    assert json.loads((out / "manifest.json").read_text()).get("previous") == manifest.get("previous")
    assert (out / "stats.parquet").exists() != overwrite
    assert (out / "_work" / "plan.json").exists()


def test_committed_shards_without_their_plan_are_refused(tmp_path):
    """plan.json lost (deleted, or an --overwrite killed between its deletes): its committed shards were
    resumed unchecked, and a run with another --rerank-depth reused shards scored without one."""
    from jobs.layout import OutputLayout
    from jobs.plan import make_plan
    from jobs.rerank import OutputConflict, prepare_output
    from jobs.storage import locate
    from schemas.contract import ColumnMap

    inp = write_shortlists(tmp_path / "in", files=1)
    layout = OutputLayout(locate(str(tmp_path / "out")))
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, {})
    (tmp_path / "out" / "_work" / "plan.json").unlink()
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, {})  # nothing committed: fine
    (tmp_path / "out" / "_work" / "plan.json").unlink()
    (tmp_path / "out" / "_work" / "scored").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "_work" / "scored" / "part-0.parquet")
    with pytest.raises(OutputConflict, match="committed shards but no .*plan.json"):
        prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, {})


def _final(out) -> list[tuple]:
    t = read_dir(out / "scores")
    return sorted(zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(), t["rerank_position"].to_pylist(),
                      t["score"].to_pylist()))


@pytest.mark.parametrize("ranking", ["driver", "ray tasks"])
def test_damaged_work_files_are_named_and_the_named_remedy_restores_the_output(ray_local, tiny_bert, tmp_path,
                                                                              capsys, monkeypatch, ranking):
    """Work files lost or truncated after their shard committed: a missing key file once ranked its queries
    without those rows and wrote wrong final files that no rerun replaced; a truncated scored file or a missing
    stats file failed every rerun with an error naming no file. Ranked as Ray tasks (big jobs), the error once
    came back as an unpicklable traceback."""
    import jobs.driver

    if ranking == "ray tasks":
        monkeypatch.setattr(jobs.driver, "LOCAL_RANK_ROWS", 0)
    inp = write_shortlists(tmp_path / "in", files=2, n_queries=6, per_query=15)  # 4 shards of 45
    out = tmp_path / "out"
    code, err = _run(job_args(inp, out, tiny_bert, "--shard-rows", "60"), capsys)
    assert code == 0, err
    want = _final(out)
    shards = sorted(p.stem for p in (out / "_work" / "scored").glob("*.parquet"))
    assert len(shards) >= 3  # one stays committed through every remedy
    work = out / "_work"

    def damaged(shard: str, what: str) -> None:
        code, err = _run(job_args(inp, out, tiny_bert, "--shard-rows", "60"), capsys)
        assert code == 1 and f"shard {shard}: " in err and what in err, err
        assert f"Delete {work / 'scored' / shard}.parquet and rerun" in err, err
        assert "Traceback" not in err, err
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    def remedy(*damaged_shards: str) -> None:
        for shard in damaged_shards:
            (work / "scored" / f"{shard}.parquet").unlink()
        code, err = _run(job_args(inp, out, tiny_bert, "--shard-rows", "60"), capsys)
        assert code == 0 and f"resuming: {len(shards) - len(damaged_shards)} of {len(shards)}" in err, err
        got = _final(out)
        assert [g[:3] for g in got] == [w[:3] for w in want]
        assert all(abs(g[3] - w[3]) < 1e-6 for g, w in zip(got, want))

    (out / "scores" / f"{shards[1]}.parquet").unlink()  # as if killed before its final file
    scored = work / "scored" / f"{shards[1]}.parquet"
    scored.write_bytes(scored.read_bytes()[: scored.stat().st_size // 2])
    damaged(shards[1], "cannot be read")  # found while ranking: in a Ray task for a big job
    remedy(shards[1])
    if ranking == "ray tasks":
        return  # the rest is found by the driver before ranking, whichever way ranking then runs

    (work / "keys" / shards[0] / "b00000.parquet").unlink()
    damaged(shards[0], "b00000.parquet are missing")
    remedy(shards[0])

    (work / "stats" / f"{shards[0]}.json").write_text('{"shard": ')  # truncated
    damaged(shards[0], "stats")
    remedy(shards[0])

    for shard in shards[:2]:  # two at once: one error names both, so one round of deletes mends them
        (work / "keys" / shard / "b00000.parquet").unlink()
    code, err = _run(job_args(inp, out, tiny_bert, "--shard-rows", "60"), capsys)
    assert code == 1 and "2 shards have damaged work files" in err and all(s in err for s in shards[:2]), err
    remedy(*shards[:2])


def test_a_fixed_file_keeps_the_bucket_count(tmp_path, monkeypatch):
    """An unreadable file counts no rows; once fixed, its rows pushed the total past a multiple of the bucket
    size and the rerun was refused ("hashed into 4 buckets then, 5 now"), though it should redo just that file."""
    import jobs.plan as plan_mod
    from schemas.contract import ColumnMap

    monkeypatch.setattr(plan_mod, "KEY_ROWS_PER_BUCKET", 100)
    inp = write_shortlists(tmp_path / "in", files=2, n_queries=8, per_query=20)  # 320 rows
    broken = inp / "part-00-broken.parquet"
    broken.write_bytes(b"PAR1 truncated")
    before = plan_mod.make_plan([str(inp)], ColumnMap(), 80)
    previous = json.loads(json.dumps(before.to_json()))
    committed = {s.name for s in before.shards if "broken" not in s.name}
    pq.write_table(pa.Table.from_pylist(shortlist_rows(8, 20, prefix="b")), broken)  # +160 rows
    after = plan_mod.make_plan([str(inp)], ColumnMap(), 80)
    assert (before.buckets, after.buckets) == (4, 5)
    assert "buckets" in after.resume_problem(previous, committed.__contains__)
    after.keep_buckets(previous)
    assert after.buckets == 4 and after.resume_problem(previous, committed.__contains__) is None

    pq.write_table(pa.Table.from_pylist(shortlist_rows(30, 20, prefix="b")), broken)  # 920 rows: buckets too big
    grown = plan_mod.make_plan([str(inp)], ColumnMap(), 80)
    grown.keep_buckets(previous)
    assert grown.buckets == 10


def test_a_new_score_rule_is_a_setting(tmp_path):
    """Shards committed before the scoring rule changed (two-class margin, left truncation, pad positions) were
    resumed beside shards scored under the new one: queries spanning both got scores on two scales."""
    from jobs.layout import OutputLayout
    from jobs.plan import make_plan
    from jobs.rerank import OutputConflict, parse_args, prepare_output, scoring_options
    from jobs.storage import locate
    from kernels import SCORE_RULE
    from schemas.contract import ColumnMap

    inp = write_shortlists(tmp_path / "in", files=1)
    args = parse_args(["--input", str(inp), "--output", str(tmp_path / "out"), "--model", "m"])
    now = scoring_options(args, {"model": "m", "resolved_revision": "abc"})
    assert now["score_rule"] == SCORE_RULE
    layout = OutputLayout(locate(str(tmp_path / "out")))
    before = {k: v for k, v in now.items() if k != "score_rule"}  # a plan.json written before the rule existed
    prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, before)
    (tmp_path / "out" / "_work" / "scored").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "_work" / "scored" / "part-0.parquet")
    with pytest.raises(OutputConflict, match=f"score_rule: null then, {SCORE_RULE} now"):
        prepare_output(layout, make_plan([str(inp)], ColumnMap(), 80), False, now)
