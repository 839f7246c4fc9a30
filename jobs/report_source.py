"""The report's one read of OUT/scores, on any filesystem the job writes to (local, s3://, gs://, hdfs://).

Each shard file is read once, and only the few small columns the metrics need (ids, ranks, score, label:
tens of bytes a row, against the ~1 KB the texts take), then split by query hash into local bucket files
under a scratch folder. The metrics read one bucket at a time from there: one pass over the storage
whatever the number of buckets, where filtering the shards once per bucket re-read them all each time.
Query and passage text is fetched last, for the few rows on the review list only, from the row groups
that hold them.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs import report_metrics as rm
from jobs.storage import Location, exists, list_files, parallel
from schemas.contract import DUPLICATE_OF

FILE, ROW = "_file", "_row"  # where a staged row came from: index into StagedScores.files, row in that file
TEXT = ("query", "doc")
OPTIONAL = ("rescored", "label")
STAGE_THREADS = 8  # files read at once: each holds its small columns in memory (~20 MB per 500k rows)


def metric_columns(has_rescored: bool, has_label: bool) -> list[str]:
    return list(rm.REQUIRED) + [c for c, on in zip(OPTIONAL, (has_rescored, has_label)) if on]


@dataclass
class StagedScores:
    files: list[Location]  # the shard files, sorted by name
    folder: Path  # local scratch: b{bucket:05d}/f{file:06d}.parquet
    n_rows: int
    n_buckets: int
    has_label: bool
    has_rescored: bool
    text_columns: list[str]  # of TEXT, those the shards have
    schema: pl.Schema  # of the staged files
    score_moments: list[dict]  # per file, rm.score_moments

    @property
    def columns(self) -> list[str]:
        """The metric columns each bucket frame holds."""
        return metric_columns(self.has_rescored, self.has_label)

    def _staged(self, bucket: int | None = None) -> list[str]:
        folders = [self.folder / f"b{bucket:05d}"] if bucket is not None else sorted(self.folder.glob("b*"))
        return [str(p) for d in folders if d.is_dir() for p in sorted(d.glob("*.parquet"))]

    def bucket(self, b: int) -> pl.DataFrame:
        """Bucket b's rows (whole queries), metric columns only; empty when no query hashed there."""
        paths = self._staged(b)
        if not paths:
            return pl.DataFrame(schema={c: self.schema[c] for c in self.columns})
        return pl.read_parquet(paths, columns=self.columns)

    def scan(self) -> pl.LazyFrame:
        """Every staged row, with FILE and ROW."""
        return pl.scan_parquet(self._staged(), schema=self.schema)

    def texts(self, queries: pl.Series) -> pl.DataFrame:
        """query_id, doc_id, query, doc of every row of `queries`, in shard order (null text where the
        shards have none). Reads only the shards that hold those queries; on a remote filesystem only the
        row groups that hold them, and only their text columns."""
        where = (self.scan().filter(pl.col(rm.Q).is_in(queries.implode())).select(rm.Q, rm.DOC, FILE, ROW)
                 .collect().sort(FILE, ROW))
        groups = where.group_by(FILE, maintain_order=True).agg(pl.col(ROW)).rows()
        if self.text_columns and groups and isinstance(self.files[0].fs, pafs.LocalFileSystem):
            # polars filters on the id column first and decodes text only for matching rows: ~15x faster
            # than decoding whole row groups, which is what the bytes an object store bills would cost.
            cols = [rm.Q, rm.DOC, *self.text_columns]  # per file: other columns may differ between files
            texts = pl.concat([pl.scan_parquet(self.files[f].path).select(cols) for f, _ in groups],
                              how="vertical_relaxed")
            texts = _widen(texts.filter(pl.col(rm.Q).is_in(queries.implode())).collect())
            where = where.join(texts.unique([rm.Q, rm.DOC], keep="first", maintain_order=True),
                               on=[rm.Q, rm.DOC], how="left", maintain_order="left")
        elif self.text_columns and groups:
            parts = parallel(lambda g: _read_rows(self.files[g[0]], g[0], g[1], self.text_columns), groups,
                             threads=STAGE_THREADS)
            where = where.join(pl.concat(parts), on=[FILE, ROW], how="left", maintain_order="left")
        missing = [pl.lit(None, pl.String).alias(c) for c in TEXT if c not in self.text_columns]
        return where.with_columns(missing).select(rm.Q, rm.DOC, *(pl.col(c).cast(pl.String) for c in TEXT))


def _read_rows(loc: Location, file: int, rows: list[int], columns: list[str]) -> pl.DataFrame:
    """Rows `rows` of one Parquet file (FILE, ROW, columns), reading only the row groups that hold them,
    one at a time (a text column's row group is tens of MB; only the wanted rows are kept)."""
    parts = []
    with loc.fs.open_input_file(loc.path) as f:
        meta = pq.ParquetFile(f)
        starts = [0]
        for g in range(meta.metadata.num_row_groups):
            starts.append(starts[-1] + meta.metadata.row_group(g).num_rows)
        by_group: dict[int, list[int]] = {}
        for r in rows:
            by_group.setdefault(bisect.bisect_right(starts, r) - 1, []).append(r)
        for g, wanted in sorted(by_group.items()):
            table = meta.read_row_group(g, columns=columns)
            picked = pl.from_arrow(table.take(pa.array([r - starts[g] for r in wanted], pa.int64())))
            parts.append(picked.with_columns(pl.lit(file, pl.UInt32).alias(FILE), pl.Series(ROW, wanted, pl.UInt32)))
            del table
    return pl.concat(parts)


def _footer(loc: Location) -> tuple[int, pa.Schema]:
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f)
            return meta.metadata.num_rows, meta.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise rm.ScoresMissingError(f"{loc.uri}: not a readable Parquet file: {e}") from e


def _kind(t: pa.DataType, column: str | None = None) -> str:
    """What a column holds, whatever its width or encoding: staging widens each kind to one polars type.
    A label is a graded relevance, integer in one file and float in another alike (the job accepts both)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if column == "label" and (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return "float"
    for kind, test in (("integer", pa.types.is_integer), ("float", pa.types.is_floating),
                       ("boolean", pa.types.is_boolean)):
        if test(t):
            return kind
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    return str(t)


_WIDE = {"integer": pl.Int64, "float": pl.Float64, "string": pl.String}


def _widen(df: pl.DataFrame) -> pl.DataFrame:
    """int32 in one file and int64 in another (both valid job outputs) must stack: every integer column
    becomes Int64, float Float64 (a label too, whatever it was), string or categorical String."""
    casts = []
    for name, dtype in df.schema.items():
        kind = ("float" if name == "label" and dtype.is_numeric()
                else "integer" if dtype.is_integer() else "float" if dtype.is_float()
                else "string" if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum) else None)
        if kind and dtype != _WIDE[kind]:
            casts.append(pl.col(name).cast(_WIDE[kind]))
    return df.with_columns(casts) if casts else df


def _check_columns(files: list[Location], schemas: list[pa.Schema]) -> None:
    """Every shard has the required columns, and the optional and text ones all or none, of one type each:
    the job writes them so; a folder put together otherwise gets an error naming the file, not a quietly
    weaker report (a `label` missing from one file would drop the quality section)."""
    first, ref = files[0], schemas[0]
    for loc, schema in zip(files, schemas):
        lacking = [c for c in rm.REQUIRED if c not in schema.names]
        if lacking:
            raise rm.ScoresMissingError(f"{loc.uri} lacks required column(s) {lacking}")
        for c in (*rm.REQUIRED, *OPTIONAL, *TEXT):
            if (c in schema.names) != (c in ref.names):
                has, lacks = (loc, first) if c in schema.names else (first, loc)
                raise rm.ScoresMissingError(f"column {c!r} is in {has.uri} but not in {lacks.uri}: "
                                            "the report needs it in every scores file or in none")
            if c in schema.names and _kind(schema.field(c).type, c) != _kind(ref.field(c).type, c):
                raise rm.ScoresMissingError(f"{loc.uri}: column {c!r} holds {_kind(schema.field(c).type, c)} "
                                            f"values, but {_kind(ref.field(c).type, c)} in {first.uri}")


def score_files(out: Location) -> list[Location]:
    scores = out.child("scores")
    if not exists(scores):
        raise rm.ScoresMissingError(
            f"no scores directory at {scores.uri}: run the rerank job first (it writes OUT/scores/*.parquet)")
    names = [n for n in list_files(scores).get("", []) if n.endswith(".parquet") and not n.startswith((".", "_"))]
    if not names:
        raise rm.ScoresMissingError(f"{scores.uri} holds no *.parquet shard files: the rerank job wrote nothing yet")
    return [scores.child(n) for n in names]


def stage(out: Location, folder: Path, rows_per_bucket: int | None = None) -> StagedScores:
    """Read OUT/scores once into local hash buckets of about `rows_per_bucket` rows (rm.ROWS_PER_BUCKET)."""
    files = score_files(out)
    footers = parallel(_footer, files)
    _check_columns(files, [s for _, s in footers])
    first = footers[0][1]
    n_rows = sum(n for n, _ in footers)
    if n_rows == 0:
        raise rm.ScoresMissingError("the score shards hold no rows")
    n_buckets = max(1, math.ceil(n_rows / (rows_per_bucket or rm.ROWS_PER_BUCKET)))
    has_label, has_rescored = "label" in first.names, "rescored" in first.names
    columns = metric_columns(has_rescored, has_label)

    def stage_file(i: int) -> tuple[pl.Schema, dict]:
        # --dedupe-docs: a collapsed copy is the kept passage again, ranked last by design; it is left out of
        # the metrics, which would otherwise count it as the reranker demoting a relevant passage.
        dup = [DUPLICATE_OF] if DUPLICATE_OF in footers[i][1].names else []
        try:
            with files[i].fs.open_input_file(files[i].path) as f:
                df = pl.from_arrow(pq.read_table(f, columns=columns + dup))
        except (OSError, pa.ArrowException) as e:
            raise rm.ScoresMissingError(f"{files[i].uri}: cannot read columns {columns + dup}: {e}") from e
        df = _widen(df).with_columns(pl.lit(i, pl.UInt32).alias(FILE),
                                     pl.int_range(pl.len(), dtype=pl.UInt32).alias(ROW))  # before any filter
        if dup:
            df = df.filter(pl.col(DUPLICATE_OF).is_null()).drop(DUPLICATE_OF)
        bucket = (pl.col(rm.Q).hash(seed=17) % n_buckets).alias("_bucket")
        for (b,), part in df.with_columns(bucket).partition_by("_bucket", as_dict=True).items():
            target = folder / f"b{b:05d}" / f"f{i:06d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            part.drop("_bucket").write_parquet(target, compression="lz4")
        return df.schema, rm.score_moments(df, has_rescored)

    done = parallel(stage_file, list(range(len(files))), threads=STAGE_THREADS)
    return StagedScores(files, folder, n_rows, n_buckets, has_label=has_label, has_rescored=has_rescored,
                        text_columns=[c for c in TEXT if c in first.names], schema=done[0][0],
                        score_moments=[m for _, m in done])
