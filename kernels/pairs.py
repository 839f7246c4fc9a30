"""Pair assembly: tokenize each distinct query and passage once, then build `[CLS] q [SEP] d [SEP]`
(or the model family's own variant) with the tokenizer's own longest-first truncation, vectorised in numpy
(a pair cut on both sides is cut by the tokenizer library itself: kernels/truncation.py).

Why not `tokenizer(queries, docs)`: a shortlist repeats each query 20-100 times, and the tokenizer would
encode it again for every pair. Here every distinct text is encoded once (in Rust, in parallel), and the
pairs are cut and stitched with array arithmetic. `tests/test_pairs.py` proves the result equal to
`tokenizer(query, doc, truncation=True, max_length=...)` on thousands of fuzzed pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kernels.truncation import PairTruncation


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around the two segments: prefix + A + middle + B + suffix, with token type ids."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    type_a: int  # token type of prefix, A and middle (0 for BERT)
    type_b: int  # token type of B and suffix (1 for BERT, 0 for RoBERTa)
    uses_token_types: bool

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


@dataclass
class EncodedPairs:
    """All pairs of a chunk as one flat token array; pair i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # [T] int32
    type_ids: np.ndarray  # [T] int8
    offsets: np.ndarray  # [N+1] int64
    truncated: np.ndarray  # [N] bool, True where longest-first truncation cut the pair

    @property
    def lengths(self) -> np.ndarray:  # [N]
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _find(hay: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(hay) - len(needle) + 1):
        if hay[i : i + len(needle)] == needle:
            return i
    raise ValueError("cannot locate segment in the tokenizer's pair encoding")


def derive_template(tokenizer) -> PairTemplate:
    """Read the pair template off the tokenizer itself, so any family's post-processor is honoured."""
    a, b = "alpha", "omega"
    ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
    ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
    enc = tokenizer(a, b, return_token_type_ids=True)
    ids = list(enc["input_ids"])
    ia = _find(ids, ids_a)
    ib = _find(ids, ids_b, ia + len(ids_a))
    types = enc.get("token_type_ids") or [0] * len(ids)
    return PairTemplate(
        prefix=tuple(ids[:ia]),
        middle=tuple(ids[ia + len(ids_a) : ib]),
        suffix=tuple(ids[ib + len(ids_b) :]),
        type_a=int(types[ia]),
        type_b=int(types[ib]),
        uses_token_types="token_type_ids" in tokenizer.model_input_names,
    )


def scatter_segments(dst: np.ndarray, dst_start: np.ndarray, src: np.ndarray, src_start: np.ndarray,
                      count: np.ndarray) -> None:
    """dst[dst_start[i] + j] = src[src_start[i] + j] for j < count[i], for all i, without a Python loop."""
    total = int(count.sum())
    if total == 0:
        return
    seg_start = np.cumsum(count) - count  # [N]
    within = np.arange(total, dtype=np.int64) - np.repeat(seg_start, count)  # [total]
    dst[np.repeat(dst_start, count) + within] = src[np.repeat(src_start, count) + within]


class _Flat:
    """Token ids of distinct texts, flattened: text k is ids[starts[k]:starts[k]+lengths[k]]."""

    def __init__(self, encodings: list[list[int]]):
        self.lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        self.starts = np.cumsum(self.lengths) - self.lengths
        flat = [t for e in encodings for t in e]
        self.ids = np.asarray(flat, dtype=np.int32) if flat else np.zeros(0, dtype=np.int32)


class PairEncoder:
    """Encodes (query, passage) pairs exactly as `tokenizer([q], [d], truncation=True, max_length=L)` would
    (the batch call: a single-pair call drops an empty passage)."""

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer  # ships with transformers

        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; crossrank needs one")
        self.template = derive_template(tokenizer)
        self.max_length = int(max_length)
        # truncation_side="left" (tokenizer_config.json) keeps each segment's tail, as tokenizer(q, d, ...) does
        self.keep_tail = getattr(tokenizer, "truncation_side", "right") == "left"
        if self.max_length <= self.template.num_special:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        # A private copy of the Rust tokenizer without truncation or padding: segments are cut here.
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()
        # split_special_tokens=True lives on the backend, not in its JSON: carry it over
        self._rust.encode_special_tokens = tokenizer.backend_tokenizer.encode_special_tokens
        self._encode = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)

        def cutter():
            """Another copy that cuts pairs as tokenizer(q, d, truncation=True) does, for the pairs whose cut
            `tokenizers` releases disagree on; built only if the installed one disagrees (kernels/truncation.py)."""
            tok = Tokenizer.from_str(self._rust.to_str())  # padding off already; truncation set here
            tok.enable_truncation(self.max_length, stride=0, strategy="longest_first",
                                  direction="left" if self.keep_tail else "right")
            tok.encode_special_tokens = self._rust.encode_special_tokens
            return tok

        self.truncation = PairTruncation(cutter, self.max_length, self.template, self.keep_tail)

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def encode(self, queries: list[str], docs: list[str]) -> EncodedPairs:
        if len(queries) != len(docs):
            raise ValueError(f"{len(queries)} queries but {len(docs)} passages")
        q_uniq, q_idx = _unique(queries)
        d_uniq, d_idx = _unique(docs)
        q = _Flat(self.encode_texts(q_uniq))
        d = _Flat(self.encode_texts(d_uniq))
        return self.assemble(q, q_idx, d, d_idx, lambda idx: [(q_uniq[q_idx[i]], d_uniq[d_idx[i]]) for i in idx])

    def assemble(self, q: _Flat, q_idx: np.ndarray, d: _Flat, d_idx: np.ndarray,
                 texts: Callable[[np.ndarray], list[tuple[str, str]]]) -> EncodedPairs:
        """The pairs, cut as `self.truncation` says; `texts(indices)`: the strings of pairs it must ask about."""
        t = self.template
        la, lb = q.lengths[q_idx], d.lengths[d_idx]
        ka, kb = self.truncation.kept(la, lb, texts)
        lengths = ka + kb + t.num_special  # [N]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        ids = np.empty(total, dtype=np.int32)
        types = np.full(total, t.type_b, dtype=np.int8)
        start = offsets[:-1]
        a_start = start + len(t.prefix)
        mid_start = a_start + ka
        b_start = mid_start + len(t.middle)
        suf_start = b_start + kb
        for k, tok in enumerate(t.prefix):
            ids[start + k] = tok
        for k, tok in enumerate(t.middle):
            ids[mid_start + k] = tok
        for k, tok in enumerate(t.suffix):
            ids[suf_start + k] = tok
        skip_a, skip_b = (la - ka, lb - kb) if self.keep_tail else (0, 0)
        scatter_segments(ids, a_start, q.ids, q.starts[q_idx] + skip_a, ka)
        scatter_segments(ids, b_start, d.ids, d.starts[d_idx] + skip_b, kb)
        if t.type_a != t.type_b:
            a_span = ka + len(t.prefix) + len(t.middle)
            scatter_segments(types, start, np.full(int(a_span.max(initial=0)), t.type_a, dtype=np.int8),
                              np.zeros_like(start), a_span)
        return EncodedPairs(ids=ids, type_ids=types, offsets=offsets, truncated=(ka < la) | (kb < lb))


def _unique(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order and, for each input, its index among them."""
    index: dict[str, int] = {}
    idx = np.fromiter((index.setdefault(s, len(index)) for s in texts), dtype=np.int64, count=len(texts))
    return list(index), idx
