"""Which small input files may share a shard, and how their rows are put together.

Packing must leave every column as the user wrote it. So two files pack only when they have the same
columns and each column's types are equal or one widens the other without loss: a narrower integer of the
same sign, a narrower float, string beside large_string, binary beside large_binary, and a dictionary beside
a dictionary of the same values. Anything else (int64 beside float64, a timestamp's unit, decimal beside
float, a column only one file has) would change values or fail on some of them, so such files get shards of
their own. Dictionary indices always widen to int32 in a packed shard: two files of 100 categories each fit
int8 alone, but not in one row group together.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pt


def _wider(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type holding every value of both without loss, or None."""
    if a.equals(b):
        return a
    if pt.is_integer(a) and pt.is_integer(b) and pt.is_signed_integer(a) == pt.is_signed_integer(b):
        return a if a.bit_width >= b.bit_width else b
    if pt.is_floating(a) and pt.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    for small, large in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {str(a), str(b)} == {str(small), str(large)}:
            return large
    if pt.is_dictionary(a) and pt.is_dictionary(b) and a.value_type.equals(b.value_type) and a.ordered == b.ordered:
        return a if a.index_type.bit_width >= b.index_type.bit_width else b
    return None


def _packed_type(t: pa.DataType) -> pa.DataType | None:
    """The type a column takes in a packed shard; None when it cannot be packed safely at all."""
    if pt.is_dictionary(t):
        if pt.is_unsigned_integer(t.index_type):
            return None
        index = t.index_type if t.index_type.bit_width >= 32 else pa.int32()
        return pa.dictionary(index, t.value_type, t.ordered)
    if pt.is_nested(t) and any(_packed_type(t.field(i).type) is None or pt.is_dictionary(t.field(i).type)
                               for i in range(t.num_fields)):
        return None  # a dictionary inside a struct or list: not widened here, so not packed
    return t


def combined_schema(a: pa.Schema, b: pa.Schema) -> pa.Schema | None:
    """The schema of `a`'s and `b`'s rows in one shard (`a`'s column order and metadata), or None when they
    must not share one."""
    if len(set(a.names)) != len(a.names) or set(a.names) != set(b.names):
        return None
    fields = []
    for fa in a:
        fb = b.field(fa.name)
        t = _wider(fa.type, fb.type)
        t = _packed_type(t) if t is not None else None
        if t is None:
            return None
        fields.append(pa.field(fa.name, t, fa.nullable or fb.nullable, fa.metadata))
    return pa.schema(fields, metadata=a.metadata)


def packable(schema: pa.Schema) -> bool:
    return combined_schema(schema, schema) is not None


def concat_parts(tables: list[pa.Table], uris: list[str]) -> pa.Table:
    """Rows of a packed shard's files, in order, each cast to the schema they combine to (lossless: planning
    packed only files whose schemas combine)."""
    target = tables[0].schema
    for t, uri in zip(tables[1:], uris[1:]):
        target = combined_schema(target, t.schema)
        if target is None:  # the file changed since planning
            raise OSError(f"{uri}: its columns no longer combine with {uris[0]}'s, as they did when the job was "
                          "planned: the file changed since")
    target = combined_schema(target, target)
    return pa.concat_tables([t.select(target.names).cast(target) for t in tables])
