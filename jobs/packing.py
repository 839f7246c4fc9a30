"""Which small input files may share a shard, and how their rows are put together.

Packing must leave every column as the user wrote it. So two files pack only when they have the same
columns and each column's types are equal or one widens the other without loss: a narrower integer of the
same sign, a narrower float, string beside large_string, binary beside large_binary, and a dictionary beside
a dictionary of the same values, and a column of nulls only beside any type. Anything else (int64 beside
float64, a timestamp's unit, decimal beside float, a column only one file has, an ordered dictionary) would
change values or fail on some of them, so such files get shards of their own. Dictionary indices widen to
int32 in every shard: two files (or row groups) of 100 categories each fit int8 alone, but not in one row
group together.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pt


def _wider(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type holding every value of both without loss, or None (both already through `_packed_type`)."""
    if a.equals(b):
        return a
    if pt.is_null(a) or pt.is_null(b):  # a column of nulls only (pandas' all-None object column)
        return b if pt.is_null(a) else a
    if pt.is_integer(a) and pt.is_integer(b) and pt.is_signed_integer(a) == pt.is_signed_integer(b):
        return a if a.bit_width >= b.bit_width else b
    if pt.is_floating(a) and pt.is_floating(b):
        return a if a.bit_width >= b.bit_width else b
    for small, large in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {str(a), str(b)} == {str(small), str(large)}:
            return large
    if pt.is_dictionary(a) and pt.is_dictionary(b) and a.value_type.equals(b.value_type):
        return a if a.index_type.bit_width >= b.index_type.bit_width else b
    return None


def _packed_type(t: pa.DataType) -> pa.DataType | None:
    """The type a column takes in a packed shard; None when it cannot be packed safely at all.

    Dictionary indices become int32 (int64 if they were 64-bit), signed or not before: a dictionary's indices
    are below its length. An ordered dictionary is not packed: two files may order the same categories
    differently, and one order would be lost. Nor is a dictionary inside a struct or list (not widened)."""
    if pt.is_dictionary(t):
        if t.ordered:
            return None
        return pa.dictionary(pa.int64() if t.index_type.bit_width == 64 else pa.int32(), t.value_type)
    if pt.is_nested(t) and any(_packed_type(t.field(i).type) is None or pt.is_dictionary(t.field(i).type)
                               for i in range(t.num_fields)):
        return None
    return t


def combined_schema(a: pa.Schema, b: pa.Schema) -> pa.Schema | None:
    """The schema of `a`'s and `b`'s rows in one shard (`a`'s column order and metadata), or None when they
    must not share one. Each side's types go through `_packed_type` first, so folding it over files gives the
    same schema whichever file comes first, at planning (footers) and at reading (tables) alike."""
    if len(set(a.names)) != len(a.names) or set(a.names) != set(b.names):
        return None
    fields = []
    for fa in a:
        fb = b.field(fa.name)
        ta, tb = _packed_type(fa.type), _packed_type(fb.type)
        t = _wider(ta, tb) if ta is not None and tb is not None else None
        if t is None:
            return None
        fields.append(pa.field(fa.name, t, fa.nullable or fb.nullable, fa.metadata))
    return pa.schema(fields, metadata=a.metadata)


def widen_dictionary_indices(table: pa.Table) -> pa.Table:
    """A shard's dictionary columns with int8/int16 (or unsigned) indices as int32: row groups written with
    different dictionaries of up to 127 values each overflow int8 once written as one row group, and the
    scored file could not be read back. Values are unchanged."""
    for i, f in enumerate(table.schema):
        if pt.is_dictionary(f.type) and f.type.index_type.bit_width < 32:
            wide = pa.dictionary(pa.int32(), f.type.value_type, f.type.ordered)
            table = table.set_column(i, pa.field(f.name, wide, f.nullable, f.metadata), table[f.name].cast(wide))
    return table


def concat_parts(tables: list[pa.Table], uris: list[str]) -> pa.Table:
    """Rows of a packed shard's files, in order, each cast to the schema they combine to (lossless: planning
    packed only files whose schemas combine)."""
    target = combined_schema(tables[0].schema, tables[0].schema)
    for t, uri in zip(tables[1:], uris[1:]):
        target = combined_schema(target, t.schema)
        if target is None:  # the file changed since planning
            raise OSError(f"{uri}: its columns no longer combine with {uris[0]}'s, as they did when the job was "
                          "planned: the file changed since")
    return pa.concat_tables([t.select(target.names).cast(target) for t in tables])
