"""Batching policy: sort pairs by token length, cut batches by a token budget, restore order afterwards.

The cost rule is the whole policy (after text-embeddings-inference's queue):
  padded engine:  cost(batch) = count x padded_length(longest)   (every row is padded to the longest)
  packed engine:  cost(batch) = sum of real lengths               (padding-free)
A batch closes when adding the next pair would exceed `max_batch_tokens` or `max_batch_size`.
"""
from __future__ import annotations

import numpy as np

# Padded lengths are rounded up to these, so a compiled forward meets a handful of shapes, not hundreds.
LENGTH_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Compiled packed totals are rounded up to a multiple of this: few shapes, at most a sliver of padding.
PACKED_TOTAL_MULTIPLE = 256


def padded_length(n: int, buckets: tuple[int, ...] | None = LENGTH_BUCKETS) -> int:
    """Smallest bucket >= n; past the last bucket, the next multiple of 64. Without buckets (CPU, where a
    new shape costs nothing), n itself."""
    if buckets is None:
        return n
    for b in buckets:
        if b >= n:
            return b
    return -(-n // 64) * 64


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, *, padded: bool, max_batch_size: int = 1024,
                 sort: bool = True, buckets: tuple[int, ...] | None = LENGTH_BUCKETS) -> list[np.ndarray]:
    """Split pair indices into batches under the token budget.

    lengths: [N] token count of each pair. Returns index arrays into `lengths`; every index appears in
    exactly one batch. With `sort`, pairs go longest first (an out-of-memory error shows on the first batch,
    not the last) so each batch holds pairs of nearly equal length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    batches: list[np.ndarray] = []
    start = 0
    count = 0
    cost_sum = 0
    longest = 0
    for pos, i in enumerate(order):
        n = int(lengths[i])
        new_longest = max(longest, padded_length(n, buckets) if padded else n)
        new_cost = (count + 1) * new_longest if padded else cost_sum + n
        if count and (new_cost > max_batch_tokens or count >= max_batch_size):
            batches.append(order[start:pos])
            start, count, cost_sum = pos, 0, 0
            new_longest = padded_length(n, buckets) if padded else n
        count += 1
        cost_sum += n
        longest = new_longest
    if count:
        batches.append(order[start:])
    return batches


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray], *, padded: bool,
                       buckets: tuple[int, ...] | None = LENGTH_BUCKETS) -> tuple[int, int]:
    """(real tokens, computed tokens) of a batch plan, by the same cost rule (packed totals rounded up as
    the compiled packed engine rounds them)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    if not padded:
        computed = sum(-(-int(lengths[b].sum()) // PACKED_TOTAL_MULTIPLE) * PACKED_TOTAL_MULTIPLE for b in batches)
    else:
        computed = sum(len(b) * padded_length(int(lengths[b].max()), buckets) for b in batches)
    return real, computed


def padded_layout(enc, index: np.ndarray, length: int, pad_id: int, use_types: bool) -> dict:
    """Pairs `index` of `enc` (kernels.pairs.EncodedPairs) as `[B, length]` arrays for a Hugging Face model's
    padded forward: input_ids, attention_mask and (for models that take them) token_type_ids."""
    from kernels.pairs import scatter_segments

    lengths = enc.lengths[index]
    starts = enc.offsets[:-1][index]
    B = len(index)
    dst = np.arange(B, dtype=np.int64) * length
    ids = np.full(B * length, pad_id, dtype=np.int64)
    scatter_segments(ids, dst, enc.ids, starts, lengths)
    out = {"input_ids": ids.reshape(B, length),
           "attention_mask": (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)}
    if use_types:
        types = np.zeros(B * length, dtype=np.int64)
        scatter_segments(types, dst, enc.type_ids, starts, lengths)
        out["token_type_ids"] = types.reshape(B, length)
    return out
