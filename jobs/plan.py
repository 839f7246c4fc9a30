"""Plan the job before any model loads: list input files, check their schemas, cut them into shards.

A shard is a run of whole row groups of one file, at most `shard_rows` rows (one row group larger than
that is a shard by itself). Its name comes from the file's name and path hash and its first row, never
from data values, so a rerun maps every shard to the same output file.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, asdict

import pyarrow.parquet as pq

from jobs.storage import Location, list_parquet
from schemas.contract import ColumnMap, InputSchemaError, check_consistency, check_file_schema

KEY_ROWS_PER_BUCKET = 2_000_000  # rows of (query_id, doc_id, score, ...) one finalize task holds at once


@dataclass(frozen=True)
class Shard:
    name: str
    seq: int  # position of this shard in the plan: orders rows globally (for input-order tie breaks)
    uri: str
    path: str  # inside the filesystem
    row_groups: tuple[int, ...]
    row_start: int
    row_end: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    shards: list[Shard]
    files: list[dict]  # uri, bytes, rows
    buckets: int  # queries are hashed into this many groups for the cross-shard ranking pass
    total_rows: int
    columns: dict  # file uri -> column names

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f['uri']}|{f['bytes']}|{f['rows']}\n".encode())
        for s in self.shards:
            h.update(f"{s.name}|{s.row_start}|{s.row_end}\n".encode())
        return h.hexdigest()[:16]


def shard_name(uri: str, row_start: int) -> str:
    stem = uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:48] or "input"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}-r{row_start:010d}"


def make_plan(inputs: list[str], cols: ColumnMap, shard_rows: int) -> Plan:
    files = list_parquet(inputs)
    problems: list[str] = []
    schemas = {}
    metas: dict[str, tuple[Location, pq.FileMetaData]] = {}
    for loc in files:
        try:
            with loc.fs.open_input_file(loc.path) as f:
                meta = pq.ParquetFile(f).metadata
        except Exception as e:  # unreadable footer: planned as one shard that fails when run, and is reported
            metas[loc.uri] = (loc, f"cannot read Parquet metadata ({type(e).__name__}: {e})")
            continue
        schema = meta.schema.to_arrow_schema()
        schemas[loc.uri] = schema
        metas[loc.uri] = (loc, meta)
        problems += check_file_schema(loc.uri, schema, cols)
    problems += check_consistency(schemas, cols)
    if problems:
        raise InputSchemaError("input does not match the contract:\n  " + "\n  ".join(problems))

    shards: list[Shard] = []
    file_rows = []
    for uri, (loc, meta) in metas.items():
        size = loc.fs.get_file_info(loc.path).size
        if isinstance(meta, str):  # unreadable: one shard that will fail with its error
            shards.append(Shard(shard_name(uri, 0), len(shards), uri, loc.path, (), 0, 0))
            file_rows.append({"uri": uri, "bytes": size, "rows": None, "error": meta})
            continue
        file_rows.append({"uri": uri, "bytes": size, "rows": meta.num_rows})
        start, groups, rows = 0, [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if groups and rows + n > shard_rows:
                shards.append(Shard(shard_name(uri, start), len(shards), uri, loc.path, tuple(groups), start, start + rows))
                start, groups, rows = start + rows, [], 0
            groups.append(g)
            rows += n
        if groups or meta.num_rows == 0:
            shards.append(Shard(shard_name(uri, start), len(shards), uri, loc.path, tuple(groups), start, start + rows))
    total = sum(s.rows for s in shards)
    buckets = max(1, min(1024, math.ceil(total / KEY_ROWS_PER_BUCKET)))
    return Plan(shards=shards, files=file_rows, buckets=buckets, total_rows=total,
                columns={u: s.names for u, s in schemas.items()})
