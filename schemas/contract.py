"""The data contract, as data: input columns, what the job adds, the stats and rejects layouts.

Validation happens in two places, both before any model runs:
  - `check_file_schema`: a missing or mistyped column fails the whole job, naming file, column, expected
    and found type (a wrong type in a column is a bug upstream, not a bad row).
  - `split_rejects`: row-level problems (null ids, null/empty/blank text, non-finite first-stage scores)
    send those rows to OUT/rejects/ with a reason naming the column and row; the rest are scored.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Canonical column names. `--query-col` etc. map a user's names onto these; outputs use these names.
QUERY_ID, QUERY, DOC_ID, DOC = "query_id", "query", "doc_id", "doc"
FIRST_STAGE_SCORE, FIRST_STAGE_RANK, LABEL = "first_stage_score", "first_stage_rank", "label"
REQUIRED = (QUERY_ID, QUERY, DOC_ID, DOC)
OPTIONAL = (FIRST_STAGE_SCORE, FIRST_STAGE_RANK, LABEL)

# Columns the job adds to every scored row.
SCORE = "score"  # float32 raw logit (or sigmoid of it with --activation sigmoid): an ordering signal, not a probability
RESCORED = "rescored"  # False for rows below --rerank-depth, kept under the rescored ones in first-stage order
RERANK_POSITION = "rerank_position"  # 1 = best within its query
OUTPUT_ADDED = pa.schema([
    pa.field(SCORE, pa.float32()),
    pa.field(RESCORED, pa.bool_()),
    pa.field(RERANK_POSITION, pa.int32()),
    pa.field(FIRST_STAGE_RANK, pa.int32()),
])
DUPLICATE_OF = "duplicate_of"  # --dedupe-docs: the kept doc_id this passage's identical text collapsed into
DUPLICATE_DOC_IDS = "duplicate_doc_ids"  # --dedupe-docs: on the kept row, the ids collapsed into it
REJECT_REASON = "reject_reason"
SOURCE_FILE = "source_file"  # the input file a reject came from (a shard may pack several files)
SOURCE_ROW = "source_row"  # row index within that file, so a reject can be found at its source
REJECTS_ADDED = pa.schema([pa.field(REJECT_REASON, pa.string()), pa.field(SOURCE_FILE, pa.string()),
                           pa.field(SOURCE_ROW, pa.int64())])
# Working columns on rows between the job's phases, never in its outputs; prefixed so that no plausible
# pass-through column is overwritten, and refused in the input like the columns above.
ROW = "_crossrank_row"  # row index within the shard's scored file
SEQ = "_crossrank_seq"  # global input order: shard seq << 32 | row in shard (tie break of last resort)
DOC_HASH = "_crossrank_doc_hash"  # 64-bit hash of the passage text (--dedupe-docs)

STATS_SCHEMA = pa.schema([
    # Where a shard's rows come from: its first input file, how many files it reads (more than one when whole
    # small files are packed together), and its row range within input_path when it reads one file (else null).
    ("shard", pa.string()), ("input_path", pa.string()), ("input_files", pa.int32()),
    ("row_start", pa.int64()), ("row_end", pa.int64()),
    ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32()),
    ("rows_in", pa.int64()), ("rows_scored", pa.int64()), ("rows_rejected", pa.int64()),
    ("rows_not_rescored", pa.int64()), ("duplicate_pairs", pa.int64()), ("truncated_pairs", pa.int64()),
    # distinct pairs whose fp16/bf16 score overflowed to NaN/inf and were scored again in float32
    ("float32_rescored", pa.int64()),
    ("real_tokens", pa.int64()), ("computed_tokens", pa.int64()), ("padding_efficiency", pa.float64()),
    ("batches", pa.int64()), ("oom_splits", pa.int64()),
    ("read_s", pa.float64()), ("tokenize_s", pa.float64()), ("model_s", pa.float64()), ("write_s", pa.float64()),
    ("wall_s", pa.float64()), ("pairs_per_s", pa.float64()), ("tokens_per_s", pa.float64()),
    ("scored_at", pa.float64()), ("committed_at", pa.float64()),  # unix s; committed_at: stats written, scored file next
    ("actor", pa.string()), ("node", pa.string()), ("device_name", pa.string()), ("dtype", pa.string()),
    ("engine", pa.string()), ("attention", pa.string()), ("compiled", pa.bool_()),
])


class InputSchemaError(ValueError):
    """The input cannot be scored as given; raised before any model is loaded."""


@dataclass
class ColumnMap:
    """User column name -> canonical name, for the five renameable columns."""

    query_id: str = QUERY_ID
    query: str = QUERY
    doc_id: str = DOC_ID
    doc: str = DOC
    first_stage_score: str = FIRST_STAGE_SCORE
    renames: dict = field(init=False)

    def __post_init__(self) -> None:
        self.renames = {u: c for c, u in [(QUERY_ID, self.query_id), (QUERY, self.query), (DOC_ID, self.doc_id),
                                          (DOC, self.doc), (FIRST_STAGE_SCORE, self.first_stage_score)] if u != c}

    def user_name(self, canonical: str) -> str:
        return getattr(self, canonical, canonical)

    def canonical(self, names: list[str]) -> list[str]:
        return [self.renames.get(n, n) for n in names]


def _plain(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column (pandas category, Polars Categorical) as the type of its values."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t: pa.DataType) -> bool:
    t = _plain(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)


def _is_id(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(_plain(t))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


_EXPECTED = {
    QUERY_ID: (_is_id, "string or integer"), DOC_ID: (_is_id, "string or integer"),
    QUERY: (_is_text, "string"), DOC: (_is_text, "string"),
    FIRST_STAGE_SCORE: (_is_number, "float"), FIRST_STAGE_RANK: (pa.types.is_integer, "integer"),
    LABEL: (_is_number, "number"),
}
_OURS = {SCORE, RESCORED, RERANK_POSITION, REJECT_REASON, SOURCE_FILE, SOURCE_ROW, DUPLICATE_OF, DUPLICATE_DOC_IDS, ROW, SEQ, DOC_HASH}


def check_file_schema(path: str, schema: pa.Schema, cols: ColumnMap) -> list[str]:
    """Problems with one file's columns, each a sentence naming file, column, expected and found type."""
    problems = []
    names = set(schema.names)
    for canonical in REQUIRED + OPTIONAL:
        user = cols.user_name(canonical)
        if user not in names:
            if canonical in REQUIRED:
                flag = {QUERY_ID: "--query-id-col", QUERY: "--query-col", DOC_ID: "--doc-id-col", DOC: "--doc-col"}
                problems.append(f"{path}: required column '{user}' is missing (found: {', '.join(schema.names)}); "
                                f"map another column with {flag[canonical]}")
            continue
        check, expected = _EXPECTED[canonical]
        found = schema.field(user).type
        if not check(found):
            problems.append(f"{path}: column '{user}' has type {found}, expected {expected}")
    for clash in sorted(names & _OURS):
        problems.append(f"{path}: column '{clash}' is one crossrank writes; rename it in the input")
    canon = cols.canonical(schema.names)
    if len(set(canon)) != len(canon):
        problems.append(f"{path}: mapping columns onto {REQUIRED + (FIRST_STAGE_SCORE,)} makes duplicate names {canon}")
    return problems


def check_consistency(schemas: dict[str, pa.Schema], cols: ColumnMap) -> list[str]:
    """Problems across files: queries may span files, so ids must compare equal and optional columns agree."""
    problems = []
    for canonical in (QUERY_ID, DOC_ID):
        user = cols.user_name(canonical)
        kinds = {}
        for path, s in schemas.items():
            if user in s.names:
                kinds.setdefault("integer" if pa.types.is_integer(_plain(s.field(user).type)) else "string", []).append(path)
        if len(kinds) > 1:
            problems.append(f"column '{user}' is integer in {kinds['integer'][0]} but string in "
                            f"{kinds['string'][0]}: ids must have one type across files (cast one side)")
    for canonical in (FIRST_STAGE_SCORE, FIRST_STAGE_RANK, LABEL):
        user = cols.user_name(canonical)
        have = [p for p, s in schemas.items() if user in s.names]
        if have and len(have) != len(schemas):
            holders = set(have)  # a set: 20,000 files took 4 s through the list
            lack = next(p for p in schemas if p not in holders)
            problems.append(f"column '{user}' is in {have[0]} but missing in {lack}: "
                            "a query's candidates must all carry it, or none")
    return problems


def to_canonical(table: pa.Table, cols: ColumnMap) -> pa.Table:
    table = table.rename_columns(cols.canonical(table.column_names))
    # Dictionary-encoded and string_view id/text columns become plain arrays: the row checks' compute
    # kernels (and most readers of the output) take only those.
    for name in REQUIRED:
        t = table.schema.field(name).type if name in table.column_names else None
        if t is not None and (pa.types.is_dictionary(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)):
            plain = _plain(t)
            target = pa.large_string() if _is_text(plain) else plain
            table = table.set_column(table.column_names.index(name), name, table[name].cast(target))
    return table


def split_rejects(table: pa.Table, source_row: np.ndarray, source_file: tuple[np.ndarray, list[str]] | None = None
                  ) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(accepted rows, rejected rows with reason, source file and source row, bool mask of the accepted rows).

    `table` has canonical names; `source_file` is each row's index into a list of file names (one file when
    not given). Every row lands in exactly one of the two tables.
    """
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask, reason: str) -> None:
        mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        reasons[(reasons == None) & mask] = reason  # noqa: E711 — elementwise on an object array

    for col in (QUERY_ID, DOC_ID):
        flag(pc.is_null(table[col]), f"{col} is null")
    for col in (QUERY, DOC):
        flag(pc.is_null(table[col]), f"{col} is null")
        flag(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(table[col])), 0), f"{col} is empty or whitespace")
    if FIRST_STAGE_SCORE in table.column_names and pa.types.is_floating(table[FIRST_STAGE_SCORE].type):
        s = table[FIRST_STAGE_SCORE]
        flag(pc.or_(pc.is_nan(s), pc.is_inf(s)), f"{FIRST_STAGE_SCORE} is NaN or infinite")
    for col in (FIRST_STAGE_SCORE, FIRST_STAGE_RANK):
        if col in table.column_names:
            flag(pc.is_null(table[col]), f"{col} is null")
    if FIRST_STAGE_RANK in table.column_names:
        flag(pc.less(table[FIRST_STAGE_RANK], 1), f"{FIRST_STAGE_RANK} is below 1")
    bad = reasons != None  # noqa: E711
    return table.filter(pa.array(~bad)), with_reasons(table, bad, reasons, source_row, source_file), ~bad


def with_reasons(table: pa.Table, bad: np.ndarray, reasons: np.ndarray, source_row: np.ndarray,
                 source_file: tuple[np.ndarray, list[str]] | None = None) -> pa.Table:
    """The rows of `table` where `bad`, as rejects: each with its reason (`reasons`, one per row of `table`),
    the file it came from and its row there."""
    rejected = table.filter(pa.array(bad))
    rejected = rejected.append_column(REJECT_REASON, pa.array(reasons[bad].tolist(), pa.string()))
    codes, names = source_file if source_file is not None else (np.zeros(table.num_rows, np.int32), [None])
    files = pa.DictionaryArray.from_arrays(pa.array(codes[bad], pa.int32()), pa.array(names, pa.string()))
    rejected = rejected.append_column(SOURCE_FILE, files.cast(pa.string()))
    return rejected.append_column(SOURCE_ROW, pa.array(source_row[bad], pa.int64()))
