"""The worker's read ahead: the next shard's rows are read in the background and handed over when its turn
comes; a read ahead of another shard is dropped, and a failed one is repeated so the error is the shard's own."""
from __future__ import annotations

import threading

import pyarrow.parquet as pq
import pytest

from conftest import plan_shards, write_shortlists


def test_read_ahead_hands_over_the_same_rows(tmp_path):
    from jobs.read_ahead import ShardReader, read_shard

    shards = plan_shards(write_shortlists(tmp_path / "in", files=2))  # 4 shards of 80 rows
    reader = ShardReader()
    first, ahead = reader.read(shards[0])
    assert not ahead and first.num_rows == 80
    reader.read_ahead(shards[1])
    second, ahead = reader.read(shards[1])
    assert ahead and second.equals(read_shard(shards[1]))
    # A read ahead of a shard that is then not asked for is dropped; the asked one is read now.
    reader.read_ahead(shards[2])
    third, ahead = reader.read(shards[3])
    assert not ahead and third.equals(read_shard(shards[3]))
    fourth, ahead = reader.read(shards[2])
    assert not ahead and fourth.equals(read_shard(shards[2]))


def test_read_ahead_runs_in_the_background(tmp_path):
    from jobs import read_ahead

    shards = plan_shards(write_shortlists(tmp_path / "in", files=1))
    gate, started = threading.Event(), threading.Event()
    real = read_ahead.read_shard

    def slow_read(shard):
        started.set()
        assert gate.wait(10), "the reader did not return before the read finished"
        return real(shard)

    reader = read_ahead.ShardReader()
    read_ahead.read_shard = slow_read
    try:
        reader.read_ahead(shards[1])  # returns at once although the read is blocked
        assert started.wait(10)
        gate.set()
        table, ahead = reader.read(shards[1])
    finally:
        read_ahead.read_shard = real
    assert ahead and table.num_rows == 80


def test_failed_read_ahead_raises_in_the_shards_own_read(tmp_path):
    from jobs.read_ahead import ShardReader

    folder = write_shortlists(tmp_path / "in", files=1)
    shards = plan_shards(folder)
    path = folder / "part-0.parquet"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated while the read ahead runs
    reader = ShardReader()
    reader.read_ahead(shards[1])
    with pytest.raises(Exception) as first:
        reader.read(shards[1])
    path.write_bytes(good)  # fixed: a new read succeeds (nothing cached from the failure)
    reader.read_ahead(shards[1])
    table, ahead = reader.read(shards[1])
    assert ahead and table.equals(pq.read_table(path).slice(80, 80))
    assert first.value is not None


def test_a_dropped_read_ahead_that_hangs_holds_up_no_later_read(tmp_path):
    """A read ahead of a shard another actor took over, stuck on storage that never answers (here a FIFO no
    one writes to): later reads ahead must not queue behind it, or this actor would stall on a shard that
    reads fine, and be taken for hung over it."""
    import os
    import shutil

    from jobs.read_ahead import ShardReader, read_shard

    folder = write_shortlists(tmp_path / "in", files=2)
    shards = plan_shards(folder)  # 4 shards of 80 rows; the first two read part-0
    stuck_file = tmp_path / "stuck.parquet"
    os.mkfifo(stuck_file)
    stuck = {**shards[0], "name": "stuck", "parts": [{**p, "uri": str(stuck_file), "path": str(stuck_file)}
                                                       for p in shards[0]["parts"]]}
    reader = ShardReader()
    reader.read_ahead(stuck)  # blocks opening the FIFO
    try:
        got, ahead = reader.read(shards[1])  # another shard: the stuck read is dropped, this one read now
        assert not ahead and got.equals(read_shard(shards[1]))
        reader.read_ahead(shards[2])
        done = threading.Event()
        result = {}

        def read_next():
            result["table"], result["ahead"] = reader.read(shards[2])
            done.set()

        threading.Thread(target=read_next, daemon=True).start()
        assert done.wait(30), "the read ahead queued behind the stuck one"
        assert result["ahead"] and result["table"].equals(read_shard(shards[2]))
    finally:  # unblock the stuck thread: a writer opens the FIFO (the read then fails, as it may)
        try:
            with open(stuck_file, "wb") as w:
                shutil.copyfileobj(open(folder / "part-0.parquet", "rb"), w)
        except BrokenPipeError:
            pass
