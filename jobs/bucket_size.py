"""How many rows one ranking-pass bucket may hold: sized by the memory its task needs, which grows with the
length of the ids, not by rows alone.

Measured with scripts/bench_bucket_memory.py (500,000 rows, `rank_bucket` peak above its start): 677 bytes a
row with 8-byte ids, 890 with 64, 1,889 with 256, 4,622 with 1,024-byte query and doc ids: about 660 bytes
plus 2 per byte of id text. 2M rows of 1 KB ids would need 9 GB in one task; they get 320,000-row buckets.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BUCKET_BYTES = 1_500_000_000  # a ranking task's memory for its bucket, about
KEY_ROW_BYTES = 700  # a key row's memory in that task, its ids' text aside
ID_TEXT_COST = 2  # memory per byte of id text
MIN_BUCKET_ROWS = 50_000  # below this, more buckets cost more small key files than they save memory
SAMPLE_ABOVE_ROWS = 250_000  # smaller jobs fit one bucket even with 2 KB ids: no sample read
SAMPLE_FILES = 4
SAMPLE_ROWS = 10_000


def bucket_rows(id_text_bytes: float, cap: int) -> int:
    """Rows per bucket for ids of `id_text_bytes` a row (query id + doc id), at most `cap`."""
    fit = BUCKET_BYTES / (KEY_ROW_BYTES + ID_TEXT_COST * id_text_bytes)
    return int(min(cap, max(MIN_BUCKET_ROWS, fit)))


def sample_id_text_bytes(files: list, id_columns: tuple[str, str]) -> float:
    """Mean bytes of id text a row (both ids), from the first rows of up to SAMPLE_FILES files spread over
    the input (`files`: Locations of readable files); integer ids count none."""
    if not files:
        return 0.0
    step = max(1, len(files) // SAMPLE_FILES)
    total, rows = 0, 0
    for loc in files[::step][:SAMPLE_FILES]:
        try:
            with loc.fs.open_input_file(loc.path) as f:
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows == 0:
                    continue
                batch = next(pf.iter_batches(batch_size=SAMPLE_ROWS, columns=list(id_columns)))
        except Exception:  # an estimate: a file that fails here fails its shard, with its error, later
            continue
        rows += batch.num_rows
        for col in batch.columns:
            plain = col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
            if not pa.types.is_integer(plain.type):
                total += pc.sum(pc.binary_length(plain.cast(pa.large_binary()))).as_py() or 0
    return total / rows if rows else 0.0
