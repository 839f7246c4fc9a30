"""Nothing lost: actors killed or crashing mid-shard, a driver killed mid-job, device memory running out,
unreadable input files, and a shard that fails every time. Each runs the real job on a real local Ray.

In-process jobs (`jobs.rerank.main`) join the session's `ray_local`; the driver-kill test runs the job as a
subprocess connected to that same Ray, so it can be SIGKILLed without taking the cluster down.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (
    PY, ROOT, assert_each_row_once, job_args, kill_session, plan_shards, read_dir, shortlist_rows,
    subprocess_env, write_shortlists,
)


def run_job(argv: list[str], capsys) -> tuple[int, str]:
    from jobs.rerank import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def stats_of(out: Path) -> dict[str, dict]:
    return {r["shard"]: r for r in pq.read_table(out / "stats.parquet").to_pylist()}


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def scores_of(out: Path) -> dict[tuple, float]:
    t = read_dir(out / "scores")
    return dict(zip(zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist()), t["score"].to_pylist()))


def assert_same_scores(out: Path, reference: dict[tuple, float]) -> None:
    got = scores_of(out)
    assert got.keys() == reference.keys()
    keys = sorted(got)
    np.testing.assert_allclose([got[k] for k in keys], [reference[k] for k in keys], rtol=0, atol=1e-5)


def shard_names(inp: Path) -> list[str]:
    return [s["name"] for s in plan_shards(inp)]


def shard_worker_pids(root_pid: int, method: str | None = None) -> list[int]:
    """ShardWorker actor processes under `root_pid` (this Ray's raylet is our child), by process title:
    `ray::ShardActor.<method>` while one runs that method (`__init__`: loading the model; `score_shard`: a
    shard). Never a DashboardAgent or RuntimeEnvAgent, whose loss takes the node down."""
    want = "ray::ShardActor" + (f".{method}" if method else "")
    pids = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            title = " ".join(p.cmdline()).strip()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith(want):
            pids.append(p.pid)
    return pids


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """2 files x 160 rows, row groups of 40: 4 shards of 80 rows."""
    return write_shortlists(tmp_path_factory.mktemp("faults") / "in", files=2, n_queries=8, per_query=20)


@pytest.fixture(scope="module")
def clean(ray_local, inputs, tiny_model, tmp_path_factory) -> dict[tuple, float]:
    """Scores of a run without faults: every faulty run must end with the very same scores."""
    out = tmp_path_factory.mktemp("clean") / "out"
    from jobs.rerank import main

    assert main(job_args(inputs, out, tiny_model)) == 0
    assert_each_row_once(inputs, out)
    assert all(r["attempts"] == 1 for r in stats_of(out).values())
    return scores_of(out)


@pytest.mark.slow
def test_actor_killed_from_outside_mid_shard(ray_local, inputs, tiny_model, clean, tmp_path, capsys, monkeypatch):
    """SIGKILL one actor while it loads its model, then one while it runs a shard: the shard reruns on a live
    actor, the pool replaces both dead ones, and a death during loading costs no shard an attempt."""
    out = tmp_path / "out"
    monkeypatch.setenv("CROSSRANK_FAULT_SLEEP_S", "3")  # every shard pauses 3 s before scoring: time to act
    killed: dict[str, int] = {}

    def killer() -> None:
        deadline = time.monotonic() + 240
        for method in ("__init__", "score_shard"):
            while time.monotonic() < deadline:
                pids = shard_worker_pids(os.getpid(), method)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed[method] = pids[0]
                    break
                time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rc, err = run_job(job_args(inputs, out, tiny_model), capsys)
    t.join(timeout=5)
    assert set(killed) == {"__init__", "score_shard"}, f"not every kill happened: {killed}"
    assert rc == 0, err
    assert_each_row_once(inputs, out)
    assert_same_scores(out, clean)
    stats = stats_of(out)
    retried = [s for s in stats.values() if s["attempts"] > 1]
    # Only the shard the actor was running is charged; the one reserved for it (read ahead) never started.
    assert len(retried) == 1 and retried[0]["attempts"] == 2, [(s["shard"], s["attempts"]) for s in stats.values()]
    assert all(not s["actor"].endswith(f":{killed['score_shard']}") for s in stats.values()), "a dead actor reported"
    totals = manifest_of(out)["totals"]
    assert totals["retries"] == 1 and totals["actors_replaced"] == 2, totals
    assert manifest_of(out)["status"] == "complete"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
@pytest.mark.parametrize("committer", ["commit task", "cpu actor"])
def test_process_dies_around_a_commit(ray_local, inputs, tiny_model, clean, tmp_path, capsys, monkeypatch, point,
                                      committer):
    """The committing process (a GPU actor's commit task, or a CPU actor itself) dies after writing the
    rejects and keys but before the commit: the retry redoes the shard, and the half-done attempt leaves
    nothing behind twice. It dies just after the commit, before its reply reaches the driver: the shard is
    done (its stats are read back from storage), nothing reruns, no attempt is charged. A commit task's death
    costs no actor; no other shard pays either way."""
    import jobs.driver

    if committer == "cpu actor":  # this Ray has logical GPUs: ask for a CPU actor as a GPU-less cluster would
        monkeypatch.setattr(jobs.driver, "actor_resources", lambda n, engine=None: (1, {"num_gpus": 0, "num_cpus": 1}))
    out = tmp_path / "out"
    victim = shard_names(inputs)[1]
    monkeypatch.setenv("CROSSRANK_FAULT_POINT", point)
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", victim)
    rc, err = run_job(job_args(inputs, out, tiny_model), capsys)
    assert rc == 0, err
    assert_each_row_once(inputs, out)
    assert_same_scores(out, clean)
    stats = stats_of(out)
    charged = 1 if point == "before_commit" else 0
    assert stats[victim]["attempts"] == 1 + charged, stats[victim]
    assert all(s["attempts"] == 1 for n, s in stats.items() if n != victim), "a shard that never failed was charged"
    totals = manifest_of(out)["totals"]
    assert totals["retries"] == charged, totals
    assert totals["actors_replaced"] == (1 if committer == "cpu actor" else 0), totals
    assert totals["shards_recovered_after_crash"] == 1 - charged, totals
    assert manifest_of(out)["engine"]["commits"] == ("in the actor" if committer == "cpu actor" else "apart"), \
        manifest_of(out)["engine"]


def run_with_a_slow_shard(model, tmp_path, capsys, monkeypatch, files: int, fault_env: str, seconds: float,
                          *extra) -> tuple[list[str], str, dict]:
    """A job over `files` inputs (2 shards of 80 rows each) whose first shard sleeps `seconds` at the fault
    point `fault_env` names; it must succeed with every row once. Returns shard names, the slow one, stats."""
    inp = write_shortlists(tmp_path / "in", files=files, n_queries=8, per_query=20)
    names = shard_names(inp)
    monkeypatch.setenv(fault_env, str(seconds))
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", names[0])
    out = tmp_path / "out"
    rc, err = run_job(job_args(inp, out, model, *extra), capsys)
    assert rc == 0, err
    assert_each_row_once(inp, out)
    return names, names[0], stats_of(out)


@pytest.mark.slow
def test_idle_actor_takes_over_a_shard_reserved_by_a_slow_one(ray_local, tiny_model, tmp_path, capsys,
                                                                monkeypatch):
    """Each actor has one shard reserved behind the one it runs; when the queue is empty, an idle actor takes
    the reserved shard of a busy one instead of waiting for it (2 actors, one shard 12 s slow)."""
    names, slow, stats = run_with_a_slow_shard(tiny_model, tmp_path, capsys, monkeypatch, 2,
                                               "CROSSRANK_FAULT_SLEEP_S", 12)  # 4 shards of 80 rows
    assert len({s["actor"] for s in stats.values()}) == 2, stats
    # The slow actor ran its one shard; the other three, including the one reserved to it, went elsewhere.
    assert all(stats[n]["actor"] != stats[slow]["actor"] for n in names if n != slow), \
        {n: s["actor"] for n, s in stats.items()}


@pytest.mark.slow
def test_actor_scores_on_while_a_commit_is_slow(ray_local, tiny_model, tmp_path, capsys, monkeypatch):
    """A shard's commit runs apart from its actor: with one actor and one shard whose commit (upload) takes 8 s,
    the actor scores the next shards meanwhile, and at most MAX_COMMITS_PER_ACTOR commits are in flight."""
    from jobs.pool import MAX_COMMITS_PER_ACTOR

    names, slow, stats = run_with_a_slow_shard(tiny_model, tmp_path, capsys, monkeypatch, 3,
                                               "CROSSRANK_FAULT_COMMIT_SLEEP_S", 8, "--num-actors", 1)  # 6 shards
    assert len({s["actor"] for s in stats.values()}) == 1 and all(s["attempts"] == 1 for s in stats.values())
    assert stats[slow]["committed_at"] - stats[slow]["scored_at"] >= 8
    # Scored while the slow commit was under way: the actor did not wait for it.
    during = [n for n in names if n != slow and stats[slow]["scored_at"] < stats[n]["scored_at"] < stats[slow]["committed_at"]]
    assert during, {n: (s["scored_at"], s["committed_at"]) for n, s in stats.items()}
    # ...but never more than the bound: a shard is scored only while fewer commits than that were pending.
    for n in names:
        pending = sum(1 for m in names if m != n and stats[m]["scored_at"] < stats[n]["scored_at"] - 0.05
                      and stats[m]["committed_at"] > stats[n]["scored_at"] - stats[n]["wall_s"] + 0.05)
        assert pending <= MAX_COMMITS_PER_ACTOR, (n, pending)


@pytest.mark.slow
def test_failing_shards_are_bounded_reported_and_finished_by_a_rerun(ray_local, tiny_model, tmp_path, capsys,
                                                                      monkeypatch):
    """Unreadable files (truncated, garbage, a broken page under a good footer) and a shard that kills its actor
    every time: the other shards commit, each bad shard is tried --max-shard-retries + 1 times and reported
    with its error, the job exits non-zero naming each one. Fix the files, drop the fault, rerun: only the
    missing shards run, and every row comes out once."""
    inp = tmp_path / "in"
    write_shortlists(inp, files=2, n_queries=8, per_query=20)  # part-0, part-1: 4 good shards
    good = {}  # the truncated file holds 2 shards once fixed (1 while unreadable): later files keep their seq
    for name, seed, n in (("part-00-truncated", 10, 8), ("part-02-garbage", 12, 4), ("part-01-badpage", 11, 4)):
        good[name] = pa.Table.from_pylist(shortlist_rows(n, 20, prefix=f"{name}-q", seed=seed))
    # Sorted names: the broken files sit between and before good ones, so fixing them must renumber nothing.
    pq.write_table(good["part-00-truncated"], inp / "part-00-truncated.parquet", row_group_size=40)
    data = (inp / "part-00-truncated.parquet").read_bytes()
    (inp / "part-00-truncated.parquet").write_bytes(data[: len(data) // 2])
    (inp / "part-02-garbage.parquet").write_bytes(np.random.default_rng(0).bytes(5000))
    pq.write_table(good["part-01-badpage"], inp / "part-01-badpage.parquet", row_group_size=80)
    meta = pq.ParquetFile(inp / "part-01-badpage.parquet").metadata.row_group(0).column(3)
    raw = bytearray((inp / "part-01-badpage.parquet").read_bytes())
    raw[meta.data_page_offset: meta.data_page_offset + 200] = b"\x5a" * 200  # footer still readable
    (inp / "part-01-badpage.parquet").write_bytes(bytes(raw))

    names = shard_names(inp)
    killer_shard = next(n for n in names if n.startswith("part-1-"))
    bad = {n for n in names if n.startswith(("part-00-", "part-01-", "part-02-"))}
    assert len(bad) == 3
    out = tmp_path / "out"
    # Dies on every attempt, after writing its rejects (the first file of its commit order).
    monkeypatch.setenv("CROSSRANK_FAULT_POINT", "before_commit")
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", killer_shard)
    monkeypatch.setenv("CROSSRANK_FAULT_ATTEMPTS", "1000")
    rc, err = run_job(job_args(inp, out, tiny_model, "--max-shard-retries", 1), capsys)
    assert rc == 1, err
    assert "4 shard(s) failed" in err
    stats = stats_of(out)
    for name in bad | {killer_shard}:
        assert name in err, f"summary does not name {name}:\n{err}"
        assert stats[name]["status"] == "failed" and stats[name]["attempts"] == 2, stats[name]
        assert stats[name]["error"]
    assert "commit process died" in stats[killer_shard]["error"]
    # A death is charged to the shard whose process died, never to one that failed on its own (whose error
    # reply could once be lost with the actor when two calls were queued on it).
    for name in bad:
        assert "died" not in stats[name]["error"], stats[name]
    ok = [n for n in names if n not in bad | {killer_shard}]
    assert ok and all(stats[n]["status"] == "ok" for n in ok)
    committed = {p.stem: p.stat().st_mtime_ns for p in (out / "_work" / "scored").glob("*.parquet")}
    assert set(committed) == set(ok)
    # No row of a failed shard is left half accounted for: its rejects went with it.
    assert {p.stem for p in (out / "rejects").glob("*.parquet")} == set(ok)
    manifest = manifest_of(out)
    assert manifest["status"] == "incomplete" and set(manifest["failed_shards"]) == bad | {killer_shard}

    # Fix the files (rewrite them correctly), lift the fault, rerun the same command.
    for name, table in good.items():
        pq.write_table(table, inp / f"{name}.parquet", row_group_size=40)
    monkeypatch.delenv("CROSSRANK_FAULT_POINT")
    rc, err = run_job(job_args(inp, out, tiny_model, "--max-shard-retries", 1), capsys)
    assert rc == 0, err
    assert f"resuming: {len(ok)} of {len(shard_names(inp))} shard(s) already committed" in err
    for p in (out / "_work" / "scored").glob("*.parquet"):
        if p.stem in committed:
            assert p.stat().st_mtime_ns == committed[p.stem], f"{p.stem} was committed yet scored again"
    assert_each_row_once(inp, out)
    assert manifest_of(out)["status"] == "complete"


@pytest.mark.slow
def test_out_of_memory_splits_and_loses_nothing(ray_local, inputs, tiny_model, clean, tmp_path, capsys,
                                                monkeypatch):
    """Batches over 300 computed tokens raise an injected torch.OutOfMemoryError: the engine splits them, lowers
    its budget, and the scores equal those of the run without the fault."""
    out = tmp_path / "out"
    monkeypatch.setenv("CROSSRANK_FAULT_OOM_ABOVE_TOKENS", "300")
    rc, err = run_job(job_args(inputs, out, tiny_model), capsys)
    assert rc == 0, err
    assert_each_row_once(inputs, out)
    assert_same_scores(out, clean)
    stats = stats_of(out)
    # The lowered budget holds for the actor's later shards, so only each actor's first shard splits.
    splits = {n: s["oom_splits"] for n, s in stats.items()}
    assert sum(splits.values()) > 0 and max(splits.values()) >= 3, splits  # 80 pairs: > 2400 tokens -> <= 300
    assert all(s["attempts"] == 1 for s in stats.values()), "an OOM split must not cost the shard an attempt"


def test_out_of_memory_is_logged(tiny_model, caplog):
    """The split is logged (a warning naming the batch and the new budget), and loses no pair."""
    import logging

    from kernels.config import EngineConfig
    from kernels.engine import Engine

    rows = shortlist_rows(4, 20)
    q, d = [r["query"] for r in rows], [r["doc"] for r in rows]
    ref, _ = Engine.from_pretrained(str(tiny_model), EngineConfig(device="cpu")).score(q, d)
    engine = Engine.from_pretrained(str(tiny_model), EngineConfig(device="cpu", extra={"oom_above_tokens": 300}))
    with caplog.at_level(logging.WARNING, logger="crossrank.engine"):
        got, st = engine.score(q, d)
    assert st.oom_splits > 0 and st.max_batch_tokens <= 300
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    msgs = [r.getMessage() for r in caplog.records if r.name == "crossrank.engine"]
    assert len(msgs) == st.oom_splits and all("out of memory" in m and "budget" in m for m in msgs), msgs


@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_resumes(ray_local, inputs, tiny_model, clean, tmp_path):
    """SIGKILL the driver once some shards are committed; the same command resumes: it says what it skips,
    removes half-written files (one planted), scores only the rest, and every row comes out once."""
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    cmd = [PY, "-m", "jobs.rerank", *job_args(inputs, out, tiny_model, "--address", address)]
    env = subprocess_env(CROSSRANK_FAULT_SLEEP_S="4")  # the shards after the first commit are far from done
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    scored = out / "_work" / "scored"
    total = len(shard_names(inputs))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if scored.is_dir() and any(p.suffix == ".parquet" for p in scored.iterdir()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_session(proc)
        log.close()
    # The dead driver's actors go with its job (one may still commit the shard it was in): wait for them.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and shard_worker_pids(os.getpid()):
        time.sleep(0.2)
    committed = {p.stem: p.stat().st_mtime_ns for p in scored.glob("*.parquet")}
    assert 1 <= len(committed) < total, committed
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # never a stale "complete"
    planted = scored / ".tmp-deadbeef0000-half-written.parquet"
    planted.write_bytes(b"PAR1 half a file")
    rerun = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"resuming: {len(committed)} of {total} shard(s) already committed" in rerun.stderr
    assert "half-written file(s)" in rerun.stderr
    assert not planted.exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    for p in scored.glob("*.parquet"):
        if p.stem in committed:
            assert p.stat().st_mtime_ns == committed[p.stem], f"{p.stem} was committed yet scored again"
    assert_each_row_once(inputs, out)
    assert_same_scores(out, clean)


def test_resume_rules(tmp_path):
    """What a rerun may resume (plan level, no Ray): fixing an unreadable file renumbers no other file's shards
    and resumes; a changed file with committed shards, a changed shard size, or shards added after every
    shard was committed are refused."""
    from jobs.plan import make_plan
    from schemas.contract import ColumnMap

    inp = write_shortlists(tmp_path / "in", files=2, n_queries=8, per_query=20)  # part-0, part-1: 2 shards each
    good = pa.Table.from_pylist(shortlist_rows(8, 20, prefix="m"))
    (inp / "part-00-broken.parquet").write_bytes(b"not parquet at all")  # sorts between part-0 and part-1
    before = make_plan([str(inp)], ColumnMap(), 80)
    pq.write_table(good, inp / "part-00-broken.parquet", row_group_size=40)
    after = make_plan([str(inp)], ColumnMap(), 80)
    assert len(after.shards) == len(before.shards) + 1
    seq_before = {s.name: s.seq for s in before.shards}
    assert all(seq_before[s.name] == s.seq for s in after.shards if s.uri.endswith(("part-0.parquet", "part-1.parquet")))
    assert len({s.seq for s in after.shards}) == len(after.shards)
    assert [s.seq for s in after.shards] == sorted(s.seq for s in after.shards)  # still the global input order

    prev = json.loads(json.dumps(before.to_json()))  # as read back from plan.json
    good_shards = {s.name for s in before.shards if "broken" not in s.name}
    assert after.resume_problem(prev, lambda n: n in good_shards) is None
    assert after.resume_problem(prev, lambda n: False) is None  # nothing committed: all runs again

    # a file whose shard was committed has changed
    pq.write_table(pa.Table.from_pylist(shortlist_rows(8, 20, prefix="z")), inp / "part-1.parquet", row_group_size=40)
    changed = make_plan([str(inp)], ColumnMap(), 80)
    assert "changed" in changed.resume_problem(prev, lambda n: n in good_shards)
    # another shard size
    other = make_plan([str(inp)], ColumnMap(), 40)
    assert other.resume_problem(json.loads(json.dumps(changed.to_json())), lambda n: True)
    # shards added once every shard of the earlier run was committed (its ranking pass may be done)
    full = json.loads(json.dumps(changed.to_json()))
    pq.write_table(good, inp / "part-2.parquet", row_group_size=40)
    grown = make_plan([str(inp)], ColumnMap(), 80)
    assert "adds shards" in grown.resume_problem(full, lambda n: True)
    assert grown.resume_problem(full, lambda n: not n.startswith("part-1")) is None
    # rewritten at the very same size and row count (plain encoding, no compression): told apart by its
    # footer, and by its modification time even when the footer is the same (same bytes re-uploaded)
    plain = dict(compression="none", use_dictionary=False, row_group_size=40)
    same = [dict(r, doc=r["doc"].replace("a", "b")) for r in shortlist_rows(8, 20, prefix="z")]
    pq.write_table(pa.Table.from_pylist(same), inp / "part-1.parquet", **plain)
    size = (inp / "part-1.parquet").stat().st_size
    before_rewrite = json.loads(json.dumps(make_plan([str(inp)], ColumnMap(), 80).to_json()))
    pq.write_table(pa.Table.from_pylist(shortlist_rows(8, 20, prefix="z")), inp / "part-1.parquet", **plain)
    assert (inp / "part-1.parquet").stat().st_size == size
    assert "part-1.parquet changed" in make_plan([str(inp)], ColumnMap(), 80).resume_problem(before_rewrite, lambda n: True)
    again = json.loads(json.dumps(make_plan([str(inp)], ColumnMap(), 80).to_json()))
    assert make_plan([str(inp)], ColumnMap(), 80).resume_problem(again, lambda n: True) is None  # untouched
    os.utime(inp / "part-1.parquet", ns=(time.time_ns(), time.time_ns() + 10**9))  # the same bytes, re-uploaded
    assert "part-1.parquet changed" in make_plan([str(inp)], ColumnMap(), 80).resume_problem(again, lambda n: True)


def test_attempt_over_changed_content_leaves_no_stale_keys(tiny_model, tmp_path):
    """Keys of a shard's earlier attempt over other content (buckets it no longer has) are removed once the new
    keys are written, so the ranking pass never sees a row twice. The worker runs here without Ray."""
    from jobs.plan import make_plan
    from jobs.rerank import job_spec, parse_args
    from jobs.layout import OutputLayout
    from jobs.storage import locate
    from jobs.worker import ShardWorker
    from schemas.contract import ColumnMap

    inp = write_shortlists(tmp_path / "in", files=1, n_queries=6, per_query=10)  # 60 rows: one shard
    spec = {**job_spec(parse_args(job_args(inp, tmp_path / "out", tiny_model, "--device", "cpu"))), "buckets": 4}
    shard = make_plan([str(inp)], ColumnMap(), 80).shards[0].to_dict()
    worker = ShardWorker(spec)
    layout = OutputLayout(locate(spec["output"]))
    stale = layout.keys(shard["name"], 999)
    Path(stale.path).parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), stale.path)
    stats = worker.process(shard)
    assert stats["rows_scored"] == 60
    keys_dir = Path(layout.keys_dir(shard["name"]).path)
    names = sorted(p.name for p in keys_dir.iterdir())
    assert stale.path.rsplit("/", 1)[-1] not in names and names, names
    assert sum(pq.read_metadata(keys_dir / n).num_rows for n in names) == 60


@pytest.mark.slow
@pytest.mark.parametrize("point, actor", [("hang_before_score", "gpu"), ("hang_before_commit", "cpu")])
def test_a_hung_shard_is_killed_and_retried(ray_local, tiny_model, tmp_path, capsys, monkeypatch, point, actor):
    """A call that never returns (a wedged GPU, a read or an upload that hangs) must not hold the job forever:
    past --shard-timeout the actor (scoring; a CPU actor also commits) or the commit task's process is killed,
    the shard charged an attempt and run again elsewhere, and every row still comes out once."""
    import jobs.driver

    if actor == "cpu":  # one CPU actor that scores and commits in one call
        monkeypatch.setattr(jobs.driver, "actor_resources", lambda n, engine=None: (1, {"num_gpus": 0, "num_cpus": 1}))
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=8, per_query=20)  # 2 shards of 80 rows
    names = shard_names(inp)
    monkeypatch.setenv("CROSSRANK_FAULT_POINT", point)
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", names[0])
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc, err = run_job(job_args(inp, out, tiny_model, "--shard-timeout", 6), capsys)
    assert rc == 0, err
    assert time.monotonic() - t0 < 120  # the hang lasts a day
    assert_each_row_once(inp, out)
    stats = stats_of(out)
    assert stats[names[0]]["attempts"] == 2 and stats[names[1]]["attempts"] == 1, stats
    totals = manifest_of(out)["totals"]
    assert totals["shard_timeouts"] == 1 and totals["retries"] == 1, totals
    assert totals["actors_replaced"] == 1, totals


@pytest.mark.slow
def test_a_commit_slower_than_the_limit_gets_through_on_a_longer_one(ray_local, tiny_model, tmp_path, capsys,
                                                                      monkeypatch):
    """A commit task cannot beat: past --shard-timeout it is killed (a hung upload), but each time a shard's
    call is taken for hung its limits double, so a commit that is merely slow (8 s against 5 s) lands on the
    retry instead of being killed on every attempt."""
    # One shard: no commit finishes before it to raise the limit (20x the slowest commit per row).
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=4, per_query=20)
    monkeypatch.setenv("CROSSRANK_FAULT_COMMIT_SLEEP_S", "8")  # every attempt of the commit
    out = tmp_path / "out"
    rc, err = run_job(job_args(inp, out, tiny_model, "--shard-timeout", 5, "--max-shard-retries", 1), capsys)
    assert rc == 0, err
    assert_each_row_once(inp, out)
    (stats,) = stats_of(out).values()
    assert stats["attempts"] == 2 and stats["committed_at"] - stats["scored_at"] >= 8, stats
    totals = manifest_of(out)["totals"]
    assert totals["shard_timeouts"] == 1 and totals["actors_replaced"] == 0, totals


@pytest.mark.slow
def test_a_hung_ranking_task_is_killed_and_run_again(ray_local, tiny_model, tmp_path, capsys, monkeypatch):
    """A large job ranks in Ray tasks, which cannot beat: one that never returns (a read from a store that
    hangs) is killed past --ranking-timeout and runs again with twice the limit, and the job completes."""
    import jobs.driver
    import jobs.plan
    import jobs.time_limits

    monkeypatch.setattr(jobs.driver, "LOCAL_RANK_ROWS", 0)  # rank as a large job does: Ray tasks, several buckets
    monkeypatch.setattr(jobs.plan, "KEY_ROWS_PER_BUCKET", 40)
    # A fresh worker's first bucket takes seconds (polars warming up): 20x that would stretch the test.
    monkeypatch.setattr(jobs.time_limits, "SLOWEST_FACTOR", 1)
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=8, per_query=20)
    monkeypatch.setenv("CROSSRANK_FAULT_POINT", "hang_in_ranking")
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", "ranking bucket 0")
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc, err = run_job(job_args(inp, out, tiny_model, "--ranking-timeout", 8, "--top-k", 3), capsys)
    assert rc == 0, err
    assert time.monotonic() - t0 < 120  # the hang lasts a day
    assert "ranking bucket 0 timed out" in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    manifest = manifest_of(out)
    assert manifest["buckets"] > 1 and manifest["totals"]["ranking_ran_in"] == "ray tasks"
    assert manifest["totals"]["ranking_timeouts"] >= 1 and manifest["totals"]["shard_timeouts"] == 0
    assert_each_row_once(inp, out)  # positions 1..n in every query included
    shortlists = read_dir(out / "shortlists")
    assert shortlists.num_rows == 8 and {len(d) for d in shortlists["doc_ids"].to_pylist()} == {3}


@pytest.mark.slow
def test_ranking_tasks_run_again_when_hung_and_stop_the_job_when_always_hung(ray_local, tmp_path):
    """jobs.watched_tasks on plain functions: results in call order; a task that hangs mid-write (its
    temporary file written, the rename never returning) is killed and runs again; one hung on every attempt
    raises an error that names it, after its limit doubled."""
    import operator

    from jobs.storage import locate, write_bytes
    from jobs.watched_tasks import RankingFailed, run_watched

    results, counts = run_watched(operator.mul, [(f"item {i}", (i, 3)) for i in range(5)], setting=5)
    assert results == [0, 3, 6, 9, 12] and (counts.timeouts, counts.deaths) == (0, 0)

    writes = [(f"item {i}", (f"payload {i}".encode(), locate(str(tmp_path / f"{i}.txt")))) for i in range(5)]
    once = {"point": "hang_in_ranking", "shard": "item 2", "attempts": 1}
    _, counts = run_watched(write_bytes, writes, setting=5, fault=once)
    assert (counts.timeouts, counts.deaths) == (1, 0)
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(5)] == [f"payload {i}" for i in range(5)]
    (left,) = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the killed write's: the job removes it
    assert left.endswith("-2.txt")

    t0 = time.monotonic()
    always = {**once, "shard": "item", "attempts": 9}  # both items (one per CPU), every attempt
    with pytest.raises(RankingFailed, match=r"item [01] failed on each of 2 attempts, the last time timed out "
                                             r"after \d+ s \(limit 4 s"):
        run_watched(write_bytes, writes[:2], setting=2, attempts=2, fault=always)
    assert 6 <= time.monotonic() - t0 < 60  # 2 s, then 4 s


def test_shard_timeout_limits():
    from jobs.time_limits import AUTO_TIMEOUT_S, commit_limit, ranking_limit, stall_limit

    assert stall_limit(None) == AUTO_TIMEOUT_S and stall_limit(6.0) == 6.0 and stall_limit(0.0) is None
    # A commit cannot beat: the stall limit from the first commit on (none may have finished when all hang),
    # or 20x the slowest commit per row when that is longer.
    assert commit_limit(None, None, 500_000) == AUTO_TIMEOUT_S
    assert commit_limit(None, 1e-5, 80) == AUTO_TIMEOUT_S
    assert commit_limit(None, 1e-3, 500_000) == 20 * 1e-3 * 500_000
    assert commit_limit(6.0, None, 80) == 6.0 and commit_limit(0.0, 1.0, 80) is None
    # A ranking task: the stall limit, or 20x the slowest of its kind so far.
    assert ranking_limit(None, 0.0) == AUTO_TIMEOUT_S and ranking_limit(6.0, 2.0) == 40.0
    assert ranking_limit(0.0, 9.0) is None


@pytest.mark.slow
def test_a_slow_shard_that_keeps_beating_is_not_taken_for_hung(ray_local, tiny_model, tmp_path, capsys,
                                                               monkeypatch):
    """Silence, not duration: a shard whose every batch is slow (long passages, a big model on a CPU) runs
    well past --shard-timeout and is left to finish, since its actor beats after each batch."""
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=4, per_query=20)  # 1 shard of 80 rows
    monkeypatch.setenv("CROSSRANK_FAULT_BATCH_SLEEP_S", "1.0")
    out = tmp_path / "out"
    rc, err = run_job(job_args(inp, out, tiny_model, "--shard-timeout", 4, "--max-batch-tokens", 512), capsys)
    assert rc == 0, err
    assert_each_row_once(inp, out)
    (stats,) = stats_of(out).values()
    assert stats["wall_s"] > 8 and stats["attempts"] == 1, stats  # twice the limit, in one attempt
    assert manifest_of(out)["totals"]["shard_timeouts"] == 0


@pytest.mark.slow
def test_a_hang_that_takes_its_device_along_leaves_the_job_to_the_other_actors(ray_local, tiny_model, tmp_path,
                                                                               capsys, monkeypatch):
    """After a hang the replacement actor lands on the same device; when that device is gone it cannot start.
    The model loaded elsewhere, so this is not a model that cannot load: the job goes on with one actor."""
    inp = write_shortlists(tmp_path / "in", files=1, n_queries=8, per_query=20)  # 2 shards of 80 rows
    names = shard_names(inp)
    monkeypatch.setenv("CROSSRANK_FAULT_POINT", "hang_before_score")
    monkeypatch.setenv("CROSSRANK_FAULT_SHARD", names[0])
    monkeypatch.setenv("CROSSRANK_FAULT_BREAK_DEVICE_FILE", str(tmp_path / "device-gone"))
    # Every batch slow (the other actor beats on): the job is still running when the replacement fails.
    monkeypatch.setenv("CROSSRANK_FAULT_BATCH_SLEEP_S", "0.5")
    out = tmp_path / "out"
    rc, err = run_job(job_args(inp, out, tiny_model, "--shard-timeout", 5, "--max-batch-tokens", 256), capsys)
    assert rc == 0, err
    assert "a replacement actor failed to start" in err and "device is gone" in err
    assert_each_row_once(inp, out)
    stats = stats_of(out)
    assert stats[names[0]]["attempts"] == 2 and stats[names[0]]["actor"] == stats[names[1]]["actor"], stats
    totals = manifest_of(out)["totals"]
    assert totals["shard_timeouts"] == 1 and totals["actors_replaced"] == 1, totals
