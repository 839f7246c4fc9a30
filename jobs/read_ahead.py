"""Reading a shard's rows, with the next shard's read started in the background while this one scores.

On a GPU node the device outruns storage: a 500,000-row shard takes seconds to fetch and decode from object
storage, which would otherwise sit between two shards with the GPU idle. Parquet decoding runs in Arrow's
own threads without the GIL, so one background thread is enough. A read ahead that failed is simply
repeated when its shard's turn comes, so its error surfaces where it belongs, in that shard's own call.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.storage import locate


def read_shard(shard: dict) -> pa.Table:
    """The shard's row groups of its input file (an empty table with the file's schema for an empty shard)."""
    loc = locate(shard["uri"])
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        if not shard["row_groups"]:
            return pf.schema_arrow.empty_table()
        return pf.read_row_groups(list(shard["row_groups"]))


def _key(shard: dict) -> tuple:
    return shard["name"], shard["uri"], tuple(shard["row_groups"])


class ShardReader:
    """At most one read ahead at a time: memory holds the shard being scored plus the next one."""

    def __init__(self):
        self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-read-ahead")
        self._ahead: tuple[tuple, Future] | None = None

    def read(self, shard: dict) -> tuple[pa.Table, bool]:
        """The shard's rows, and whether they came from the read ahead."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            key, future = ahead
            if key == _key(shard):
                try:
                    return future.result(), True
                except Exception:
                    pass  # read again below: the error is raised by this shard's own read
            else:
                future.cancel()  # the driver gave this actor another shard; a running read is left to finish
        return read_shard(shard), False

    def read_ahead(self, shard: dict | None) -> None:
        if shard is not None and self._ahead is None:
            self._ahead = (_key(shard), self._threads.submit(read_shard, shard))
