"""Benchmark inputs that need no download: a synthetic language, tokenizers trained on it, reranking pairs.

The language: a fixed lexicon of pronounceable pseudo-words (short ones frequent, long ones rare, as in
English) drawn with a Zipf-Mandelbrot law, with commas, full stops and numbers sprinkled in. A tokenizer
trained on it with a ~30k vocabulary keeps the frequent words whole and cuts the rare ones into pieces, so
text tokenizes at ~1.3 tokens per word and ~5.7 characters per word, like English under BERT's WordPiece.
Every function is a pure function of its arguments and seed: same seed, same text, in any process.

Length mixes (token counts of the *passage*, as the bench's tokenizer counts them; a pair adds the query,
~6-10 tokens, and 3 special tokens):

    msmarco  ~70 tokens on average (MS MARCO passages; pairs ~80 tokens), 20-200
    nq       ~140 tokens (Natural Questions / DPR 100-word passages, ~620 characters), 100-200
    long     64-600 tokens (long documents; pairs past the model's limit are truncated to it)
    mixed    45% msmarco, 35% nq, 20% long, shuffled

Pairs come as shortlists: each query is repeated for `candidates` passages in a row, as a first-stage
retriever hands them over. No (query, passage) pair repeats, so nothing is deduplicated away.

Tokenizers are built in-process with the `tokenizers` library (a WordPiece trained on the language; the
XLM-R-style Unigram derived from it, see `build_tokenizer`) and cached under `.cache/bench_tokenizers/`
(keyed by their parameters; `CROSSRANK_BENCH_CACHE` moves it; the folder ignores itself in git): ~12 s for
both on 2 busy cores, then ~0.5 s to load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

LEXICON_SIZE = 120_000
ZIPF_EXPONENT = 1.1
ZIPF_SHIFT = 2.7  # Zipf-Mandelbrot: p(rank r) ~ 1 / (r + shift) ** exponent
# syllables per word by frequency rank: (ranks below, (fewest, most)); frequent words are short
SYLLABLE_BANDS = ((300, (1, 1)), (5000, (1, 2)), (None, (2, 3)))
TOKENS_PER_WORD = 1.3  # nominal, used only to turn a token target into a word count
COMMA_P, STOP_P, NUMBER_P = 0.05, 0.06, 0.02
CORPUS_LINES = 12_000  # tokenizer training text: ~540k words

# passage token targets per mix: (kind, params) with kind "normal" (mean, sd, lo, hi) or "bands" (weights, edges)
MIXES = {
    "msmarco": ("normal", (70.0, 25.0, 20, 200)),
    "nq": ("normal", (140.0, 14.0, 100, 200)),
    "long": ("bands", ((0.3, 0.4, 0.3), (64, 192, 384, 600))),
}
MIXED = (("msmarco", 0.45), ("nq", 0.35), ("long", 0.20))
MIX_NAMES = (*MIXES, "mixed")
QUERY_WORDS = (4, 7)  # inclusive range of words in a query: ~6-10 tokens

# syllable parts, repeated to weight them: plain consonants and vowels common, clusters and codas rarer
_ONSETS = ("",) * 3 + tuple(c for c in "bcdfghjklmnprstvwz" for _ in range(3)) + (
    "br", "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "sl", "sp", "st", "th", "tr")
_NUCLEI = tuple(v for v in "aeiou" for _ in range(4)) + ("ai", "ea", "ee", "ie", "oo", "ou", "y")
_CODAS = ("",) * 12 + ("n", "r", "s", "t", "l", "m") * 2 + ("nd", "st", "ng", "ck", "x")


# ---------------------------------------------------------------------------------------------- language
@lru_cache(maxsize=4)
def lexicon(size: int = LEXICON_SIZE, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """(words [size] object array, cumulative probabilities [size]); word k is the k-th most frequent."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    words: list[str] = []
    parts_n = np.asarray([len(_ONSETS), len(_NUCLEI), len(_CODAS)])
    for upto, (lo, hi) in SYLLABLE_BANDS:
        need = (size if upto is None else min(upto, size)) - len(words)
        while need > 0:
            m = 3 * need + 100
            n_syl = rng.integers(lo, hi + 1, m)
            parts = rng.integers(0, parts_n, size=(m, hi, 3))
            for k in range(m):
                w = "".join(_ONSETS[o] + _NUCLEI[v] + _CODAS[c] for o, v, c in parts[k, : n_syl[k]])
                if len(w) >= 2 and w not in seen:
                    seen.add(w)
                    words.append(w)
                    need -= 1
                    if need == 0:
                        break
    p = 1.0 / (np.arange(size) + ZIPF_SHIFT) ** ZIPF_EXPONENT
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return np.asarray(words, dtype=object), cdf


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    """n words of running text (object array), punctuation attached, numbers mixed in."""
    words, cdf = lexicon()
    out = words[np.searchsorted(cdf, rng.random(n), side="right").clip(max=len(words) - 1)].copy()
    u = rng.random(n)
    num = u < NUMBER_P
    if num.any():
        out[num] = rng.integers(1, 2030, int(num.sum())).astype(str).astype(object)
    v = rng.random(n)
    out[v < STOP_P] = out[v < STOP_P] + "."
    comma = (v >= STOP_P) & (v < STOP_P + COMMA_P)
    out[comma] = out[comma] + ","
    return out


def texts(rng: np.random.Generator, word_counts: np.ndarray) -> list[str]:
    """One text per entry of `word_counts` (each >= 1)."""
    word_counts = np.maximum(np.asarray(word_counts, dtype=np.int64), 1)
    flat = _words(rng, int(word_counts.sum())).tolist()
    ends = np.cumsum(word_counts).tolist()
    out, start = [], 0
    for end in ends:
        out.append(" ".join(flat[start:end]))
        start = end
    return out


def corpus(n_lines: int = CORPUS_LINES, seed: int = 7) -> list[str]:
    """Training text for the tokenizers (a seed of its own, so benchmark text is not its training text)."""
    rng = np.random.default_rng(seed)
    return texts(rng, rng.integers(10, 80, n_lines))


# ---------------------------------------------------------------------------------------------- pairs
@dataclass
class Pairs:
    queries: list[str]
    docs: list[str]
    query_ids: np.ndarray  # [N] int64: pairs of one shortlist share an id and sit next to each other
    mix: str
    seed: int

    def __len__(self) -> int:
        return len(self.queries)

    def fingerprint(self) -> str:
        """Short hash of the texts: two runs measured the same pairs iff their fingerprints match."""
        h = hashlib.sha256()
        for q, d in zip(self.queries, self.docs):
            h.update(q.encode())
            h.update(b"\x1f")
            h.update(d.encode())
            h.update(b"\x1e")
        return h.hexdigest()[:16]

    def head(self, n: int) -> "Pairs":
        return Pairs(self.queries[:n], self.docs[:n], self.query_ids[:n], self.mix, self.seed)


def passage_token_targets(rng: np.random.Generator, mix: str, n: int) -> np.ndarray:
    """Target token counts [n] of passages for a mix (see the module docstring)."""
    if mix == "mixed":
        names = [m for m, _ in MIXED]
        which = rng.choice(len(names), size=n, p=[w for _, w in MIXED])
        out = np.empty(n, dtype=np.int64)
        for k, name in enumerate(names):
            sel = which == k
            out[sel] = passage_token_targets(rng, name, int(sel.sum()))
        return out
    if mix not in MIXES:
        raise ValueError(f"unknown length mix {mix!r}; expected one of {MIX_NAMES}")
    kind, params = MIXES[mix]
    if kind == "normal":
        mean, sd, lo, hi = params
        return np.clip(np.rint(rng.normal(mean, sd, n)), lo, hi).astype(np.int64)
    weights, edges = params
    band = rng.choice(len(weights), size=n, p=weights)
    return rng.integers(np.asarray(edges[:-1])[band], np.asarray(edges[1:])[band]).astype(np.int64)


def make_pairs(n_pairs: int, mix: str = "nq", candidates: int = 50, seed: int = 0) -> Pairs:
    """`n_pairs` (query, passage) pairs: shortlists of `candidates` passages per query, lengths per `mix`."""
    if n_pairs < 1 or candidates < 1:
        raise ValueError("n_pairs and candidates must be >= 1")
    rng = np.random.default_rng([seed, 0x5EED, MIX_NAMES.index(mix) if mix in MIX_NAMES else 99])
    n_queries = -(-n_pairs // candidates)
    q_words = rng.integers(QUERY_WORDS[0], QUERY_WORDS[1] + 1, n_queries)
    queries = texts(rng, q_words)
    targets = passage_token_targets(rng, mix, n_pairs)
    docs = texts(rng, np.maximum(1, np.rint(targets / TOKENS_PER_WORD)).astype(np.int64))
    qid = np.arange(n_pairs, dtype=np.int64) // candidates
    return Pairs([queries[i] for i in qid], docs, qid, mix, seed)


def load_pairs(path: str | os.PathLike, n_pairs: int | None = None) -> Pairs:
    """Pairs from a Parquet file with a `query` column and a `doc` (or `passage`/`text`) column."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cols = set(table.column_names)
    doc_col = next((c for c in ("doc", "passage", "text", "document") if c in cols), None)
    if "query" not in cols or doc_col is None:
        raise ValueError(f"{path}: needs a 'query' and a 'doc' column; found {sorted(cols)}")
    if n_pairs:
        table = table.slice(0, n_pairs)
    queries = [str(x) for x in table.column("query").to_pylist()]
    docs = [str(x) for x in table.column(doc_col).to_pylist()]
    _, qid = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    return Pairs(queries, docs, qid.astype(np.int64), f"file:{Path(path).name}", -1)


# ---------------------------------------------------------------------------------------------- tokenizers
TOKENIZER_KINDS = ("wordpiece", "unigram", "bpe")
CACHE_DIR = Path(os.environ.get("CROSSRANK_BENCH_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def _cache_root() -> Path:
    root = CACHE_DIR / "bench_tokenizers"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only checkout: cache in the temp folder instead
        import tempfile

        root = Path(tempfile.gettempdir()) / "crossrank_bench_tokenizers"
        root.mkdir(parents=True, exist_ok=True)
        return root
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        try:
            ignore.write_text("*\n")  # the cache ignores itself: no edit of the repository's .gitignore
        except OSError:
            pass
    return root


def tokenizer_key(kind: str, vocab_size: int, corpus_lines: int, max_length: int) -> str:
    params = {"kind": kind, "vocab": vocab_size, "lines": corpus_lines, "max_length": max_length,
              "lexicon": [LEXICON_SIZE, ZIPF_EXPONENT, ZIPF_SHIFT, SYLLABLE_BANDS, COMMA_P, STOP_P, NUMBER_P,
                          _ONSETS, _NUCLEI, _CODAS], "v": 3}
    return f"{kind}-{vocab_size}-" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def build_tokenizer(kind: str = "wordpiece", vocab_size: int = 30522, *, corpus_lines: int = CORPUS_LINES,
                    max_length: int = 512, cache: bool = True):
    """A fast tokenizer for the synthetic language, cached on disk:

    "wordpiece": BERT-style (lowercasing normalizer, BertPreTokenizer, WordPiece), trained here with the
        `tokenizers` WordPieceTrainer; wrapped in BertTokenizerFast. ~3-5 s to train on 2 cores.
    "bpe": ModernBERT-style (byte-level BPE, `[CLS] A [SEP] B [SEP]`, no token type ids), trained here with the
        `tokenizers` BpeTrainer; wrapped in PreTrainedTokenizerFast.
    "unigram": XLM-R-style (Metaspace pre-tokenizer, Unigram model, `<s> A </s></s> B </s>`), wrapped in
        XLMRobertaTokenizerFast. The UnigramTrainer needs minutes for 30k pieces, so the pieces are the
        trained WordPiece's (word-initial ones get the "\u2581" marker, "##" continuations lose their prefix)
        scored by their log frequency on the training corpus: one EM step from a good seed. Viterbi then
        keeps frequent words whole and cuts rare ones into syllables, as SentencePiece does.
    """
    from transformers import AutoTokenizer

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    folder = _cache_root() / tokenizer_key(kind, vocab_size, corpus_lines, max_length) if cache else None
    if folder is not None and (folder / "tokenizer.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            if getattr(tok, "is_fast", False):
                return tok
        except Exception:  # a half-written or incompatible cache: rebuild it
            pass
    if kind == "wordpiece":
        tok = _wrap_bert(_train_wordpiece(vocab_size, corpus_lines))
    elif kind == "bpe":
        tok = train_bpe(corpus(corpus_lines), vocab_size)
    else:  # derived from the (cached) WordPiece of the same size
        wordpiece = build_tokenizer("wordpiece", vocab_size, corpus_lines=corpus_lines, max_length=max_length,
                                    cache=cache).backend_tokenizer
        tok = _unigram_from(wordpiece, vocab_size, corpus_lines)
    tok.model_max_length = max_length
    if folder is not None:
        import shutil

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _train_wordpiece(vocab_size: int, corpus_lines: int):
    """A `tokenizers.Tokenizer` (no post-processor yet) trained on `corpus(corpus_lines)`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=_BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(corpus_lines), trainer)
    return tok


def train_bpe(texts, vocab_size: int):
    """A ModernBERT-style tokenizer (byte-level BPE, `[CLS] A [SEP] B [SEP]`, no token type ids) trained on
    `texts`; also what scripts/make_tiny_model.py builds its tiny ModernBERT's tokenizer with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_BERT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "attention_mask"])


def _wrap_bert(tok):
    from tokenizers import processors
    from transformers import BertTokenizerFast

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def _unigram_from(wordpiece, vocab_size: int, corpus_lines: int):
    import math
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    counts: Counter = Counter()
    for enc in wordpiece.encode_batch(corpus(corpus_lines), add_special_tokens=False):
        counts.update(enc.tokens)
    pieces: Counter = Counter()
    for token in wordpiece.get_vocab():
        if token in _BERT_SPECIALS:
            continue
        c = counts.get(token, 0) + 1
        if token.startswith("##"):
            pieces[token[2:]] = max(pieces[token[2:]], c)
        else:
            pieces["\u2581" + token] = max(pieces["\u2581" + token], c)
            if len(token) == 1:  # single characters (punctuation, digits, letters) also inside a word
                pieces[token] = max(pieces[token], c)
    pieces["\u2581"] = max(pieces["\u2581"], 1)
    ranked = sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0]))[: max(100, vocab_size - len(_XLMR_SPECIALS))]
    total = sum(c for _, c in ranked)
    vocab = [(s, 0.0) for s in _XLMR_SPECIALS] + [(p, math.log(c / total)) for p, c in ranked]
    tok = Tokenizer(models.Unigram(vocab, unk_id=_XLMR_SPECIALS.index("<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def token_stats(tokenizer, pairs: Pairs, max_length: int | None = None) -> dict:
    """Token counts of queries, passages and pairs (as the model sees them, truncated to `max_length`)."""
    q = [len(x) for x in tokenizer(sorted(set(pairs.queries)), add_special_tokens=False)["input_ids"]]
    d = np.asarray([len(x) for x in tokenizer(pairs.docs, add_special_tokens=False)["input_ids"]])
    n_words = np.asarray([len(x.split()) for x in pairs.docs])
    special = tokenizer.num_special_tokens_to_add(pair=True)
    qmap = dict(zip(sorted(set(pairs.queries)), q))
    pair = np.asarray([qmap[x] for x in pairs.queries]) + d + special
    if max_length:
        pair = np.minimum(pair, max_length)
    return {
        "query_tokens_mean": float(np.mean(q)), "doc_tokens_mean": float(d.mean()),
        "doc_tokens_p5": float(np.percentile(d, 5)), "doc_tokens_p95": float(np.percentile(d, 95)),
        "pair_tokens_mean": float(pair.mean()), "pair_tokens_max": int(pair.max()),
        "tokens_per_word": float(d.sum() / max(1, n_words.sum())),
        "doc_chars_mean": float(np.mean([len(x) for x in pairs.docs])),
    }
