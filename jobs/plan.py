"""Plan the job before any model loads: list input files, check their schemas, cut them into shards.

A file of `shard_rows` rows or more is cut into runs of whole row groups of at most `shard_rows` rows (one
row group larger than that is a shard by itself). Smaller files are packed whole, consecutive in input
order, into shards of at most `shard_rows` rows and MAX_FILES_PER_SHARD files: 20,000 files of 5,000 rows
make 200 shards, not 20,000, each of which would write a key file per query bucket. A shard's name comes from
its first file's name and path hash and its first row, never from data values, so a rerun maps every shard
to the same output file.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, asdict

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import bucket_size
from jobs.packing import combined_schema
from jobs.storage import Location, list_parquet_mtimes, parallel
from schemas.contract import DOC_ID, QUERY_ID, ColumnMap, InputSchemaError, check_consistency, check_file_schema

KEY_ROWS_PER_BUCKET = 2_000_000  # at most, rows of (query_id, doc_id, score, ...) one ranking task holds at once
FILE_SEQ_BITS = 14  # shard seq = file index << 14 | shard within the file (see Shard.seq), where that fits
_ORIGIN = 32  # while planning, a shard's seq is file index << 32 | shard within the file (see number_shards)
# Files one shard may pack: each is a separate open (a round trip on an object store, run concurrently), and
# a file that fails to read fails the rows of the others in its shard until it is mended.
MAX_FILES_PER_SHARD = 256
PLAN_FORMAT = 3  # plan.json's shape: 3 = shards made of parts (packed files); 1 had one file per shard, 2 parts without errors


@dataclass(frozen=True)
class Part:
    """Whole row groups of one input file: rows [row_start, row_end) of it."""
    uri: str
    path: str  # inside the filesystem
    row_groups: tuple[int, ...]
    row_start: int
    row_end: int
    error: str | None = None  # its footer could not be read at planning: the shard fails, naming this


@dataclass(frozen=True)
class Shard:
    name: str
    # Orders rows globally (input-order tie breaks): first file's index << bits | shard index within that
    # file (number_shards), so fixing one file (an unreadable one is one shard until it is readable)
    # renumbers no other file's shards.
    seq: int
    parts: tuple[Part, ...]  # in input order; more than one only when packing whole small files

    @property
    def uri(self) -> str:
        return self.parts[0].uri

    @property
    def rows(self) -> int:
        return sum(p.row_end - p.row_start for p in self.parts)

    def to_dict(self) -> dict:
        return {"name": self.name, "seq": self.seq, "parts": [asdict(p) for p in self.parts]}


def shard_rows_of(shard: dict) -> int:
    """Rows of a shard as `Shard.to_dict` gives it."""
    return sum(p["row_end"] - p["row_start"] for p in shard["parts"])


def source_fields(shard: dict) -> dict:
    """A shard's stats columns saying where its rows come from: its first input file and how many files it
    reads; the row range within that file, or nulls for a shard of several whole files (plan.json has them)."""
    parts = shard["parts"]
    one = len(parts) == 1
    return {"input_path": parts[0]["uri"], "input_files": len(parts),
            "row_start": parts[0]["row_start"] if one else None, "row_end": parts[0]["row_end"] if one else None}


def describe_shard(shard: dict) -> str:
    """Where a shard's rows come from, for messages: "FILE rows A-B", or "N files from FIRST to LAST"."""
    parts = shard["parts"]
    if len(parts) == 1:
        return f"{parts[0]['uri']} rows {parts[0]['row_start']}-{parts[0]['row_end']}"
    return f"{len(parts)} whole files from {parts[0]['uri']} to {parts[-1]['uri']}"


@dataclass
class Plan:
    shards: list[Shard]
    files: list[dict]  # uri, bytes, rows
    buckets: int  # queries are hashed into this many groups for the cross-shard ranking pass
    total_rows: int
    columns: dict  # file uri -> column names
    bucket_rows: int = KEY_ROWS_PER_BUCKET  # the rows a bucket is sized for (fewer with long ids)
    seq_bits: int | None = FILE_SEQ_BITS  # low bits of a shard's seq for its place in its file (None: dense)
    id_text_bytes: float = 0.0  # sampled bytes of id text a row, which sized the buckets

    def to_json(self) -> dict:
        """What OUT/_work/plan.json holds: enough for a rerun to tell whether it may resume."""
        return {"format": PLAN_FORMAT, "fingerprint": self.fingerprint(), "buckets": self.buckets,
                "bucket_rows": self.bucket_rows, "id_text_bytes": self.id_text_bytes, "seq_bits": self.seq_bits,
                "files": self.files, "shards": [s.to_dict() for s in self.shards]}

    def small_shards_warning(self, shard_rows: int) -> str | None:
        """Small files are packed into shards, but at most MAX_FILES_PER_SHARD of them, and only files whose
        columns unify: past that, many small shards each write a key file per query bucket they touch (20,000
        shards at 100M rows: about a million key and positions files, and ranking a bucket 14x slower than from a
        few shards). Said once, before any work."""
        if len(self.shards) < 1000 or self.buckets < 2:
            return None
        mean = self.total_rows / len(self.shards)
        if mean * 10 > shard_rows:
            return None
        return (f"warning: {len(self.files):,} input files make {len(self.shards):,} shards of {mean:,.0f} rows on average "
                f"(--shard-rows {shard_rows:,}; a shard packs at most {MAX_FILES_PER_SHARD} whole files, and only "
                f"files whose column types agree); each writes a key file per query bucket ({self.buckets}), up to "
                f"{len(self.shards) * self.buckets:,} small files. Compacting the input into files of at least "
                "--shard-rows rows makes the ranking pass much faster")

    def keep_buckets(self, previous: dict) -> None:
        """Keep the earlier run's bucket count while its buckets stay under twice the usual size: committed keys
        are hashed by it, and the rows of a file fixed since (an unreadable file counts none) must not push the
        total past a multiple of the bucket size and so make every committed shard unusable."""
        before = previous.get("buckets")
        if before and before != self.buckets and self.total_rows <= 2 * self.bucket_rows * before:
            self.buckets = before

    def resume_problem(self, previous: dict, committed) -> str | None:
        """Why the work of `previous` (a plan.json) cannot be resumed under this plan; None when it can.

        `committed(name)` says whether a shard's scored output exists. Resuming is safe when every committed
        shard of the previous plan is still planned as the very same shard (same files with the same size and
        rows, same row groups, same place in the global order), queries hash into as many buckets, and shards
        are added only while some previous shard is still uncommitted (once all were, the cross-shard ranking
        may be done). Uncommitted shards may go (a mended file packs differently): `gone_shards` names them, and
        what they left is deleted. So a rerun after an unreadable file is fixed redoes only that file.
        """
        if previous.get("fingerprint") == self.fingerprint():
            return None
        now = {s.name: s.to_dict() for s in self.shards}
        files_before = {f["uri"]: f for f in previous.get("files") or []}
        files_now = {f["uri"]: f for f in self.files}
        old_shards = previous.get("shards") or []
        done = [s for s in old_shards if committed(s["name"])]
        if not done:
            return None  # nothing committed: every shard runs again and overwrites what it left
        if previous.get("format") != PLAN_FORMAT:
            return "it was planned by an earlier crossrank, whose shards never packed files"
        gone = [s["name"] for s in done if s["name"] not in now]
        if gone:
            return f"shard {gone[0]}, committed by the earlier run, is not in this plan"
        if previous.get("buckets") != self.buckets:
            return f"queries hashed into {previous.get('buckets')} buckets then, {self.buckets} now"
        for s in done:
            for part in s["parts"]:
                if not _same_file(files_before.get(part["uri"]), files_now.get(part["uri"])):
                    return (f"{part['uri']} changed since shard {s['name']} was committed (its size, rows, Parquet "
                            "footer or modification time differ; a re-upload of the same bytes counts too)")
            if json.loads(json.dumps(now[s["name"]])) != s:  # as plan.json holds it: lists, not tuples
                return f"shard {s['name']} covers other rows now"
        if len(done) == len(old_shards) and len(now) != len(old_shards):
            return "the earlier run had committed every shard, and this plan adds shards"
        return None

    def gone_shards(self, previous: dict) -> list[str]:
        """Shards of the previous plan that this one no longer has (uncommitted, once resume_problem allowed
        the resume): their leftovers (rejects of a failed attempt, keys, stats) must be deleted."""
        now = {s.name for s in self.shards}
        return [s["name"] for s in previous.get("shards") or [] if s["name"] not in now]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f['uri']}|{f['bytes']}|{f['rows']}|{f.get('footer')}|{f.get('mtime_ns')}\n".encode())
        h.update(f"format {PLAN_FORMAT}\n".encode())
        for s in self.shards:
            h.update((f"{s.name}|{s.seq}" + "".join(f"|{p.uri}:{p.row_start}-{p.row_end}" for p in s.parts) + "\n").encode())
        return h.hexdigest()[:16]


def _same_file(before: dict | None, now: dict | None) -> bool:
    """Same size, rows, Parquet footer and modification time (what an earlier plan.json recorded of them)."""
    if before is None or now is None:
        return before is now
    keys = ("bytes", "rows") + tuple(k for k in ("footer", "mtime_ns") if before.get(k) is not None)
    return all(before.get(k) == now.get(k) for k in keys)


def footer_digest(meta: pq.FileMetaData) -> str:
    """A hash of a file's Parquet footer (no extra read): its row groups' byte sizes and column statistics
    change with most rewrites at the same size and row count, though not with every one (two equal-length
    values swapped), which is why the modification time is compared too."""
    sink = pa.BufferOutputStream()
    meta.write_metadata_file(sink)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def shard_name(uri: str, row_start: int) -> str:
    stem = uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:48] or "input"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}-r{row_start:010d}"


class _Packer:
    """Packs whole small files, consecutive in input order, into shards of at most `shard_rows` rows and
    MAX_FILES_PER_SHARD files, while their schemas combine without changing a value (jobs/packing.py), and,
    when resuming, only files that shared a shard in the earlier plan (`group`): a file mended or added since
    then changes no other shard, so no committed one."""

    def __init__(self, shards: list[Shard], shard_rows: int):
        self.shards, self.shard_rows = shards, shard_rows
        self.run: list[tuple[int, Part]] = []
        self.rows = 0
        self.schema: pa.Schema | None = None
        self.group: str | None = None

    def add(self, file_index: int, part: Part, schema: pa.Schema, group: str | None) -> None:
        combined = combined_schema(self.schema, schema) if self.run else None
        if self.run and (combined is None or group != self.group or self.rows + part.row_end > self.shard_rows
                         or len(self.run) >= MAX_FILES_PER_SHARD):
            self.flush()
        if not self.run:
            combined = combined_schema(schema, schema)
        self.run.append((file_index, part))
        self.rows += part.row_end
        self.schema, self.group = combined, group
        if combined is None:  # a column that cannot be packed safely (see jobs/packing.py): a shard of its own
            self.flush()

    def flush(self) -> None:
        if not self.run:
            return
        file_index, first = self.run[0]
        name = shard_name(first.uri, 0) + (f"-p{len(self.run)}" if len(self.run) > 1 else "")
        self.shards.append(Shard(name, file_index << _ORIGIN, tuple(p for _, p in self.run)))
        self.run, self.rows, self.schema, self.group = [], 0, None, None


def file_indices(uris: list[str], earlier: dict | None) -> dict[str, int]:
    """Each input file's index, the high bits of its shards' seqs: its place in input order, but on a resume
    the index the earlier plan gave it. A file removed since (a corrupt one given up) then leaves a gap
    instead of renumbering every later file's committed shards; a file new since takes the next index after
    all earlier ones, so its rows come last in the global order (which only breaks exact score ties)."""
    before = {f["uri"]: f.get("index", i) for i, f in enumerate((earlier or {}).get("files") or [])}
    if not before:
        return {uri: i for i, uri in enumerate(uris)}
    nxt = max(before.values()) + 1
    out = {}
    for uri in uris:
        if uri in before:
            out[uri] = before[uri]
        else:
            out[uri], nxt = nxt, nxt + 1
    return out


def number_shards(shards: list[Shard], files: int, earlier_bits: int | None) -> tuple[list[Shard], int | None]:
    """Final seqs, and the low bits they give the shard within its file (`files`: one past the highest file
    index). A row's global order is seq << 32 | row, so seq has 31 bits: file index above, shard within the
    file below. The split is the
    earlier plan's where it still fits (a resume then numbers every shard as before), else FILE_SEQ_BITS,
    else as many as the file count leaves (room for a mended file to grow more shards). Only when the file
    with most shards needs more than that are shards numbered densely, which a mended file renumbers (so its
    rerun cannot resume)."""
    per_file = max(Counter(s.uri for s in shards).values(), default=1)
    need = (per_file - 1).bit_length()
    spare = 31 - (max(files, 1) - 1).bit_length()
    for bits in ([earlier_bits] if earlier_bits is not None else []) + [FILE_SEQ_BITS, spare]:
        if need <= bits <= 31 and files <= 1 << (31 - bits):
            low = (1 << _ORIGIN) - 1
            shards = [Shard(s.name, (s.seq >> _ORIGIN) << bits | (s.seq & low), s.parts) for s in shards]
            return sorted(shards, key=lambda s: s.seq), bits  # in the global order (new files come last)
    return [Shard(s.name, i, s.parts) for i, s in enumerate(sorted(shards, key=lambda s: s.seq))], None


def earlier_groups(earlier: dict | None) -> dict[str, str]:
    """Each input file's shard in an earlier plan.json (its first, for a file cut into several)."""
    groups: dict[str, str] = {}
    for shard in (earlier or {}).get("shards") or []:
        for part in shard["parts"]:
            groups.setdefault(part["uri"], shard["name"])
    return groups


@dataclass(frozen=True)
class Footer:
    """What planning needs of a file's Parquet footer. The footer itself is dropped at once: 20,000 wide
    files' footers held 2.4 GB of the driver, these 0.36 GB."""
    num_rows: int
    group_rows: tuple[int, ...]
    schema: pa.Schema
    digest: str


def _footer(loc: Location) -> tuple[int | None, Footer | str]:
    """A file's size and Parquet footer, from one open; an unreadable footer comes back as its error, and the
    file is planned as one shard that fails when run, and is reported."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f).metadata
            size = f.size()
        return size, Footer(meta.num_rows, tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups)),
                            meta.schema.to_arrow_schema(), footer_digest(meta))
    except Exception as e:
        try:
            size = loc.fs.get_file_info(loc.path).size
        except Exception:
            size = None
        return size, f"cannot read Parquet metadata ({type(e).__name__}: {e})"


def make_plan(inputs: list[str], cols: ColumnMap, shard_rows: int, exclude: Location | None = None,
              earlier: dict | None = None) -> Plan:
    """`exclude`: the job's output folder, never read as input (it may sit inside an input folder).
    `earlier`: the plan.json of the run this one resumes; only files that shared a shard in it share one now.
    One of another format cannot be resumed (resume_problem says so) and is not followed."""
    if earlier and earlier.get("format") != PLAN_FORMAT:
        earlier = None
    listed = list_parquet_mtimes(inputs, exclude)
    files = [loc for loc, _ in listed]
    mtimes = {loc.uri: mtime for loc, mtime in listed}
    problems: list[str] = []
    schemas = {}
    metas: dict[str, tuple[Location, Footer | str]] = {}
    sizes: dict[str, int | None] = {}
    for loc, (size, meta) in zip(files, parallel(_footer, files)):
        metas[loc.uri] = (loc, meta)
        sizes[loc.uri] = size
        if isinstance(meta, str):
            # A `.parquet` file that cannot be read is planned as a shard that fails (a partial upload, fixed
            # and rerun); a file named otherwise (a CSV given by name or glob) is a mistake to stop at now.
            if not loc.path.endswith(".parquet"):
                problems.append(f"{loc.uri}: not a Parquet file ({meta})")
            continue
        schema = meta.schema
        schemas[loc.uri] = schema
        problems += check_file_schema(loc.uri, schema, cols)
    problems += check_consistency(schemas, cols)
    if problems:
        raise InputSchemaError("input does not match the contract:\n  " + "\n  ".join(problems))

    shards: list[Shard] = []
    file_rows = []
    packer = _Packer(shards, shard_rows)
    packed_before = earlier_groups(earlier)
    indices = file_indices(list(metas), earlier)
    for uri, (loc, meta) in metas.items():
        size, file_index = sizes[uri], indices[uri]
        if isinstance(meta, str):  # unreadable: one shard that will fail with its error
            packer.flush()
            shards.append(Shard(shard_name(uri, 0), file_index << _ORIGIN, (Part(uri, loc.path, (), 0, 0, meta),)))
            file_rows.append({"uri": uri, "index": file_index, "bytes": size, "rows": None, "error": meta})
            continue
        file_rows.append({"uri": uri, "index": file_index, "bytes": size, "rows": meta.num_rows,
                          "footer": meta.digest, "mtime_ns": mtimes.get(uri)})
        if meta.num_rows < shard_rows:
            whole = Part(uri, loc.path, tuple(range(len(meta.group_rows))), 0, meta.num_rows)
            packer.add(file_index, whole, meta.schema, packed_before.get(uri))
            continue
        packer.flush()
        first = len(shards)

        def add(start: int, groups: list[int], rows: int) -> None:
            seq = (file_index << _ORIGIN) + len(shards) - first
            shards.append(Shard(shard_name(uri, start), seq, (Part(uri, loc.path, tuple(groups), start, start + rows),)))

        start, groups, rows = 0, [], 0
        for g, n in enumerate(meta.group_rows):
            if groups and rows + n > shard_rows:
                add(start, groups, rows)
                start, groups, rows = start + rows, [], 0
            groups.append(g)
            rows += n
        if groups or meta.num_rows == 0:
            add(start, groups, rows)
    packer.flush()
    shards, seq_bits = number_shards(shards, max(indices.values(), default=-1) + 1, (earlier or {}).get("seq_bits"))
    total = sum(s.rows for s in shards)
    id_bytes = 0.0
    if earlier and earlier.get("id_text_bytes") is not None:  # a resume sizes buckets as its earlier run did
        id_bytes = float(earlier["id_text_bytes"])
    elif total > bucket_size.SAMPLE_ABOVE_ROWS:  # long ids make a bucket's rows cost more memory
        readable = [loc for loc, meta in metas.values() if not isinstance(meta, str)]
        id_bytes = bucket_size.sample_id_text_bytes(readable, (cols.user_name(QUERY_ID), cols.user_name(DOC_ID)))
    rows_each = bucket_size.bucket_rows(id_bytes, KEY_ROWS_PER_BUCKET)
    buckets = max(1, min(1024, math.ceil(total / rows_each)))
    return Plan(shards=shards, files=file_rows, buckets=buckets, total_rows=total,
                columns={u: s.names for u, s in schemas.items()}, bucket_rows=rows_each, id_text_bytes=id_bytes,
                seq_bits=seq_bits)
