"""Scheduling and clean-up rules of the pool and driver, checked on their own (no Ray job needed)."""
from __future__ import annotations

import pyarrow as pa

from jobs.driver import _withdraw_rejects
from jobs.layout import OutputLayout
from jobs.pool import MAX_COMMITS_PER_ACTOR, ActorPool, _Slot
from jobs.storage import exists, locate, write_parquet


def _pool(*slots: _Slot) -> ActorPool:
    pool = object.__new__(ActorPool)  # the rules read only the slots; no actors are started
    pool.slots = list(slots)
    return pool


def _slot(**kw) -> _Slot:
    return _Slot(handle=None, ready_ref=None, created=0.0, ready=True, **kw)


def test_idle_actor_steals_from_one_scoring_or_held_back_by_its_commits():
    shard = ({"name": "s"}, 1)
    scoring = _slot(running=("ref", None, {"name": "r"}, 1), reserved=shard)
    assert _pool(scoring, _slot())._steal() == shard and scoring.reserved is None
    held_back = _slot(commits=MAX_COMMITS_PER_ACTOR, reserved=shard)
    assert _pool(held_back, _slot())._steal() == shard and held_back.reserved is None
    # An actor about to start its reserved shard keeps it: taking it would only move the wait.
    free = _slot(commits=MAX_COMMITS_PER_ACTOR - 1, reserved=shard)
    assert _pool(free, _slot())._steal() is None and free.reserved == shard


def test_rejects_of_failed_shards_go_but_a_committed_shard_keeps_its_own(tmp_path):
    layout = OutputLayout(locate(str(tmp_path / "out")))
    rows = pa.table({"query_id": [1], "reject_reason": ["query is null"]})
    for name in ("failed", "committed-anyway", "ok"):
        write_parquet(rows, layout.rejects(name))
    # Its call failed after the commit landed (a copy-then-delete rename that failed on its delete).
    write_parquet(pa.table({"x": [1]}), layout.scored("committed-anyway"))
    _withdraw_rejects(layout, [{"shard": "failed"}, {"shard": "committed-anyway"}])
    assert not exists(layout.rejects("failed"))
    assert exists(layout.rejects("committed-anyway")) and exists(layout.rejects("ok"))
