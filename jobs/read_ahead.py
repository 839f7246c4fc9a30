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

from jobs.packing import concat_parts, widen_dictionary_indices
from jobs.storage import locate, parallel


def _one_line(text: str) -> str:
    """Arrow's messages may span lines, and a failed shard is reported by its error's last line: the file's
    name must be on it."""
    return " ".join(text.split())


def _read_part(part: dict) -> pa.Table:
    """One part's row groups (an empty table with the file's schema for an empty part). An error names the
    file (a shard may read hundreds), and so does a row count other than the plan's: the file changed since."""
    if part.get("error"):  # even if it reads now: planned as 0 rows, its rows would be lost
        raise OSError(f"{part['uri']}: {_one_line(part['error'])} when the job was planned; rerun once it is mended")
    try:
        loc = locate(part["uri"])
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            table = pf.read_row_groups(list(part["row_groups"])) if part["row_groups"] else pf.schema_arrow.empty_table()
    except Exception as e:
        raise OSError(f"{part['uri']}: {type(e).__name__}: {_one_line(str(e))}") from e
    if table.num_rows != part["row_end"] - part["row_start"]:
        raise OSError(f"{part['uri']}: {table.num_rows} rows in row groups {list(part['row_groups'])}, but "
                      f"{part['row_end'] - part['row_start']} when the job was planned: the file changed since")
    return table


def read_shard(shard: dict) -> pa.Table:
    """The shard's rows: its parts' row groups, read concurrently, in order, in the schema they combine to
    (jobs/packing.py: only widenings that change no value; dictionary indices int32 in every shard)."""
    tables = parallel(_read_part, shard["parts"])
    if len(tables) == 1:
        return widen_dictionary_indices(tables[0])
    return concat_parts(tables, [p["uri"] for p in shard["parts"]])


def _key(shard: dict) -> tuple:
    return shard["name"], tuple((p["uri"], tuple(p["row_groups"])) for p in shard["parts"])


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
            elif not future.cancel():  # the driver gave this actor another shard, and that read is under way:
                # it is left to finish on a thread of its own, so that if it hangs, later reads ahead do not
                # queue behind it (and this actor be taken for hung over a shard that is not its own)
                self._threads.shutdown(wait=False)
                self._threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossrank-read-ahead")
        return read_shard(shard), False

    def read_ahead(self, shard: dict | None) -> None:
        if shard is not None and self._ahead is None:
            self._ahead = (_key(shard), self._threads.submit(read_shard, shard))
