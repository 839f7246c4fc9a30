"""Longest-first pair truncation exactly as the installed `tokenizers` does it.

`tokenizer([q], [d], truncation=True, max_length=L)` cuts a pair in Rust, and releases differ. 0.23.3 shares
the budget by lengths alone (`longest_first` below). 0.23.2, the GPU box's release, first cuts each
segment longer than L back to L tokens, rounded up to the end of a word, then shares the budget: when both
segments reach L, which one takes the odd token of an odd budget depends on where their words end (seen on
1 pair in 8 of the fuzz tests at L=16; at L=512 only where both query and passage reach 512 tokens).

So the rule is not assumed. At start, `probe` puts a grid of pairs (a throwaway word-piece tokenizer: the
cut depends on tokens and words, not on what they spell) to the installed library and compares:

- it agrees everywhere: every cut is `longest_first`'s, vectorised (0.23.3; 0.23.2 with an even budget,
  where a pair cut on both sides keeps half the budget of each);
- it agrees wherever a segment stays whole: a pair that loses tokens from both segments, where only the
  odd token's owner, and with it any tie-break or word rule, can differ, is cut by the library itself on
  the pair's own texts (0.23.2 with an odd budget; at L=512, pairs whose query passes ~254 tokens);
- it disagrees even there (a release with yet another rule): every pair over the budget is handed to the
  library. Exact, and slower.
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


def kept_by(truncating_tokenizer, pairs: list[tuple[str, str]], pieces: np.ndarray,
            max_tokens: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of A and of B that a `tokenizers.Tokenizer` with truncation on keeps of each pair.

    The library also builds each cut pair's overflowing pieces, up to the product of both segments'
    leftover chunks (0.23.3: 42,899 encodings for one pair of 300 and 6,000 tokens cut at 16; ~85 bytes a
    token), so pairs go in slices of at most `max_tokens` by the estimate `pieces` (encodings of at most
    max_length tokens each; one pair a slice at worst).
    """
    encode = getattr(truncating_tokenizer, "encode_batch_fast", truncating_tokenizer.encode_batch)
    max_length = truncating_tokenizer.truncation["max_length"]
    ka = np.empty(len(pairs), dtype=np.int64)
    kb = np.empty(len(pairs), dtype=np.int64)
    total = np.concatenate([[0], np.cumsum(np.maximum(pieces, 1) * max_length)])  # tokens before pair i
    start = 0
    while start < len(pairs):
        end = max(start + 1, int(np.searchsorted(total, total[start] + max_tokens, side="right")) - 1)
        for i, e in enumerate(encode(pairs[start:end]), start=start):
            seq = e.sequence_ids
            ka[i], kb[i] = seq.count(0), seq.count(1)
        start = end
    return ka, kb


def overflow_pieces(la: np.ndarray, lb: np.ndarray, ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Encodings the library builds for pairs of lengths (la, lb) kept to (ka, kb), at most."""
    return np.maximum(-(-la // np.maximum(ka, 1)), 1) * np.maximum(-(-lb // np.maximum(kb, 1)), 1)


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


# What `PairTruncation` asks the library about, by what the probe found
LONGEST_FIRST = "longest_first"  # nothing: the library agreed on every probe pair
BOTH_CUT_ASKED = "longest_first, both-cut pairs asked"  # pairs cut on both sides (tokenizers 0.23.2)
ALL_ASKED = "asked"  # every pair over the budget


@functools.lru_cache(maxsize=64)
def probe(max_length: int, shape: tuple[int, int, int], keep_tail: bool) -> str:
    """How far the installed `tokenizers` cuts pairs as `longest_first` does, on a grid of lengths around
    half the budget, the budget and max_length, in words of 1 and 3 tokens: everywhere (LONGEST_FIRST),
    wherever a segment stays whole (BOTH_CUT_ASKED), or not even there (ALL_ASKED). Once per process and
    setting: ~0.2 s at max_length 512, ~1.5 s at 8,192."""
    budget = max_length - sum(shape)
    h = budget // 2
    lengths = sorted({n for n in (0, 1, 2, h - 1, h, h + 1, *range(budget - 1, max_length + 3)) if n >= 0})
    la, lb = (g.ravel() for g in np.meshgrid(lengths, lengths))
    words = [(1, 1), (3, 1), (1, 3), (3, 3)][: 4 if max_length <= 1024 else 2]  # long probes cost: fewer
    texts = [(_words("a", x, wa), _words("b", y, wb)) for wa, wb in words for x, y in zip(la.tolist(), lb.tolist())]
    la, lb = np.tile(la, len(words)), np.tile(lb, len(words))
    want = longest_first(la, lb, budget)
    got = kept_by(_probe_tokenizer(max_length, shape, keep_tail), texts, overflow_pieces(la, lb, *want))
    agree = (got[0] == want[0]) & (got[1] == want[1])
    whole = (want[0] == la) | (want[1] == lb)
    return LONGEST_FIRST if agree.all() else BOTH_CUT_ASKED if agree[whole].all() else ALL_ASKED


class PairTruncation:
    """Segment lengths kept of each pair: `kept(la, lb, texts)`, with `texts(indices)` giving the
    (query, passage) strings of the pairs the library must cut itself; `rule` says which (see `probe`).
    """

    def __init__(self, make_truncating_tokenizer: Callable, max_length: int, template, keep_tail: bool = False):
        self.max_length = int(max_length)
        self.budget = self.max_length - template.num_special
        self._make_tok = make_truncating_tokenizer  # called on the first pair asked: most releases never need it
        shape = (len(template.prefix), len(template.middle), len(template.suffix))
        self.rule = probe(self.max_length, shape, keep_tail)  # through the module: a test stands in another library

    def kept(self, la: np.ndarray, lb: np.ndarray,
             texts: Callable[[np.ndarray], list[tuple[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
        ka, kb = longest_first(la, lb, self.budget)
        if self.rule == LONGEST_FIRST:
            return ka, kb
        if self.rule == BOTH_CUT_ASKED:
            asked = np.flatnonzero((ka < la) & (kb < lb))
        else:
            asked = np.flatnonzero(la + lb > self.budget)
        if len(asked):
            pieces = overflow_pieces(la[asked], lb[asked], ka[asked], kb[asked])
            ka[asked], kb[asked] = kept_by(self._tok, texts(asked), pieces)
        return ka, kb

    @functools.cached_property
    def _tok(self):
        return self._make_tok()
