"""Longest-first pair truncation exactly as the installed `tokenizers` does it.

`tokenizer(q, d, truncation=True, max_length=L)` cuts a pair in Rust, and releases differ. 0.23.3 shares
the budget by lengths alone (`longest_first` below). 0.23.2, the GPU box's release, first cuts each
segment longer than L to L tokens, rounded up to the end of a word, then shares the budget: when both
segments pass L, which one takes the odd token of an odd budget depends on where their words end (seen on
1 pair in 8 of the fuzz tests at L=16; at L=512 only a pair whose query passes 512 tokens). So:

- a pair with both segments at least L long is cut by the library itself, on the pair's own texts (rare
  in reranking, and the one case known to depend on more than lengths: two segments cut back to L or
  a little over compare by where their words end);
- every other pair is cut by `longest_first`, vectorised, once a probe at start has seen the installed
  library agree with it on a grid of lengths and word sizes around the budget and L (a throwaway
  word-piece tokenizer: the cut depends on tokens and words, not on what they spell);
- if the probe disagrees anywhere (a release with yet another rule), every pair that needs a cut is
  handed to the library. Exact, and slower.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np


def longest_first(la: np.ndarray, lb: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths kept of segments A and B under the LongestFirst rule, vectorised.

    The shorter segment is kept whole when the longer can absorb the cut; else both are cut to half the
    budget, the longer one (or B on a tie) taking the odd token.
    """
    la = la.astype(np.int64)
    lb = lb.astype(np.int64)
    swap = la > lb
    short = np.where(swap, lb, la)
    long_ = np.where(swap, la, lb)
    new_short = short.copy()
    new_long = np.where(short > budget, short, np.maximum(short, budget - short))
    both = new_short + new_long > budget
    new_short = np.where(both, budget // 2, new_short)
    new_long = np.where(both, budget // 2 + budget % 2, new_long)
    new_short = np.minimum(new_short, short)
    new_long = np.minimum(new_long, long_)
    fits = la + lb <= budget
    ka = np.where(fits, la, np.where(swap, new_long, new_short))
    kb = np.where(fits, lb, np.where(swap, new_short, new_long))
    return ka, kb


def kept_by(truncating_tokenizer, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of A and of B that a `tokenizers.Tokenizer` with truncation on keeps of each pair."""
    encode = getattr(truncating_tokenizer, "encode_batch_fast", truncating_tokenizer.encode_batch)
    ka = np.empty(len(pairs), dtype=np.int64)
    kb = np.empty(len(pairs), dtype=np.int64)
    # In slices: the library also builds every pair's overflowing pieces, which for long texts and a
    # short max_length ran to gigabytes in one call (tests/test_pairs.py)
    for s in range(0, len(pairs), 256):
        for i, e in enumerate(encode(pairs[s:s + 256]), start=s):
            seq = e.sequence_ids
            ka[i], kb[i] = seq.count(0), seq.count(1)
    return ka, kb


def _probe_tokenizer(max_length: int, shape: tuple[int, int, int], keep_tail: bool):
    """A word-piece tokenizer truncating pairs as the model's would: `a`/`b` start a word, `##a`/`##b`
    continue it, and the model's special tokens sit where its template puts them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "[S]": 1, "a": 2, "##a": 3, "b": 4, "##b": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=1 << 30))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    prefix, middle, suffix = shape
    pair = " ".join(["[S]"] * prefix + ["$A"] + ["[S]"] * middle + ["$B"] + ["[S]"] * suffix)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair=pair, special_tokens=[("[S]", 1)])
    tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction="left" if keep_tail else "right")
    return tok


def _words(letter: str, tokens: int, word: int) -> str:
    """`tokens` tokens in words of `word` tokens each (the last one shorter)."""
    whole, rest = divmod(tokens, word)
    return ((letter * word + " ") * whole + letter * rest).rstrip()


@functools.lru_cache(maxsize=64)
def library_agrees(max_length: int, shape: tuple[int, int, int], keep_tail: bool) -> bool:
    """Whether the installed `tokenizers` cuts as `longest_first` every probe pair with a segment shorter
    than max_length. Once per process and setting: tens of ms at max_length 512, ~0.6 s at 8,192."""
    budget = max_length - sum(shape)
    h = budget // 2
    lengths = sorted({n for n in (1, 2, h, h + 1, budget - 1, budget, budget + 1, max_length, max_length + 1,
                                  max_length + 2) if n >= 1})
    grid = [(x, y, w, w) for x in lengths for y in lengths for w in (1, 3) if min(x, y) < max_length]
    la = np.array([g[0] for g in grid], dtype=np.int64)
    lb = np.array([g[1] for g in grid], dtype=np.int64)
    got = kept_by(_probe_tokenizer(max_length, shape, keep_tail), [(_words("a", x, wx), _words("b", y, wy))
                                                                   for x, y, wx, wy in grid])
    want = longest_first(la, lb, budget)
    return bool(np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]))


class PairTruncation:
    """Segment lengths kept of each pair: `kept(la, lb, texts)`, with `texts(indices)` giving the
    (query, passage) strings of the pairs the library must cut itself.

    `rule` says how: "longest_first" (the library agreed on the probe; only pairs with both segments
    at least max_length long are asked) or "asked" (it did not; every pair that needs a cut is asked).
    """

    def __init__(self, truncating_tokenizer, max_length: int, template, keep_tail: bool = False):
        self.max_length = int(max_length)
        self.budget = self.max_length - template.num_special
        self._tok = truncating_tokenizer
        shape = (len(template.prefix), len(template.middle), len(template.suffix))
        self.rule = "longest_first" if library_agrees(self.max_length, shape, keep_tail) else "asked"

    def kept(self, la: np.ndarray, lb: np.ndarray,
             texts: Callable[[np.ndarray], list[tuple[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
        ka, kb = longest_first(la, lb, self.budget)
        if self.rule == "longest_first":
            asked = np.flatnonzero((la >= self.max_length) & (lb >= self.max_length))
        else:
            asked = np.flatnonzero(la + lb > self.budget)
        if len(asked):
            ka[asked], kb[asked] = kept_by(self._tok, texts(asked))
        return ka, kb
