"""Build tiny random-weight cross-encoders on disk, with no download.

Each model is a real `transformers` sequence-classification checkpoint (num_labels=1) and a real fast
tokenizer built here from a small synthetic corpus, both written with `save_pretrained`, so the job loads
them through the same `--model PATH` code path a user's Hugging Face checkpoint takes.

Random weights give meaningless scores: these models exist to exercise code paths, never to rank.

    python -m scripts.make_tiny_model OUT_DIR [--family bert|xlmr|modernbert] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import random
import string
from collections import Counter
from pathlib import Path

_WORDS = (
    "contract renewal approval cfo finance clause enterprise threshold expiry report quarter procurement "
    "policy exception memo checklist deal vendor budget legal review signature owner region emea apac "
    "refund invoice customer support ticket incident runbook dashboard deploy config service latency "
    "query passage document retrieval rerank score rank model search answer question evidence the a of "
    "to in for on with by is are was be this that which when who what where how new next last over under"
).split()


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    extra = ["Ünïcödé", "naïve", "café", "日本語", "مرحبا", "emoji🙂", "x" * 25, "1234", "3.14"]
    vocab = _WORDS + extra
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30))) for _ in range(n_lines)]


def _word_counts(tok, lines: list[str]) -> Counter:
    """Words of `lines` as `tok`'s normalizer and pre-tokenizer cut them, with their counts."""
    counts: Counter = Counter()
    for line in lines:
        normal = tok.normalizer.normalize_str(line) if tok.normalizer else line
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(normal))
    return counts


def _frequent_first(counts: Counter) -> list[str]:
    return sorted(counts, key=lambda w: (-counts[w], w))  # ties by text: the same vocabulary every process


def _pieces(counts: Counter, head: str, n_words: int) -> tuple[list[str], Counter]:
    """Characters (ASCII included), the `n_words` most frequent words whole, then the words' 2-4 character
    starts and ends with their frequencies, so the other words split into subwords as in a real vocabulary.
    `head` marks a word-initial piece (Unigram's "▁") or "" when continuations carry the mark (WordPiece)."""
    chars = sorted({c for word in counts for c in word} | set(string.ascii_letters + string.digits + string.punctuation))
    whole = [w for w in _frequent_first(counts) if len(w) > 1][:n_words]
    parts: Counter = Counter()
    for word, n in counts.items():
        core = word[len(head):] if head and word.startswith(head) else word
        for k in (2, 3, 4):
            if len(core) > k:
                parts[head + core[:k]] += n
                parts["\0" + core[-k:]] += n  # "\0": a continuation, spelt by each model below
    return chars + whole, parts


# The vocabularies are built from counts rather than by the `tokenizers` trainers, whose tie-breaking
# follows Rust's per-process hash seed: a trained vocabulary (so every score) changed between sessions.
def _bert_tokenizer(seed: int, vocab_size: int = 400):
    """WordPiece: characters (word-initial and `##`), frequent words, then frequent word starts and ends."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    probe = Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    probe.normalizer = normalizers.BertNormalizer(lowercase=True)
    probe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = _word_counts(probe, _corpus(2000, seed))
    base, parts = _pieces(counts, "", n_words=60)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + base + ["##" + c for c in base if len(c) == 1]
    vocab += [w.replace("\0", "##") for w in _frequent_first(parts) if w.replace("\0", "##") not in vocab]
    vocab = list(dict.fromkeys(vocab))[:vocab_size]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = probe.normalizer, probe.pre_tokenizer, decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=128)


def _xlmr_tokenizer(seed: int, vocab_size: int = 400):
    """Unigram over Metaspace words: characters, frequent words, then word starts and ends, scored by log
    frequency so the Viterbi cut prefers whole words, then long pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    probe = Tokenizer(models.Unigram([("<unk>", 0.0)], unk_id=0))
    probe.pre_tokenizer = pre_tokenizers.Metaspace()
    counts = _word_counts(probe, _corpus(2000, seed))
    total = sum(counts.values())
    base, parts = _pieces(counts, "\u2581", n_words=60)
    scored = {**{w.replace("\0", ""): math.log(n / total) - 2.0 for w, n in parts.items()},
              **{w: math.log(counts[w] / total) for w in base if len(w) > 1}}
    pieces = [(s, 0.0) for s in specials] + [(c, -20.0) for c in base if len(c) == 1]  # a char as a last resort
    known = {p for p, _ in pieces}
    pieces += [(w, scored[w]) for w in sorted(scored, key=lambda w: (-scored[w], w)) if w not in known]
    tok = Tokenizer(models.Unigram(pieces[:vocab_size], unk_id=specials.index("<unk>")))
    tok.pre_tokenizer, tok.decoder = probe.pre_tokenizer, decoders.Metaspace()
    return XLMRobertaTokenizerFast(tokenizer_object=tok, model_max_length=128)


def _modernbert_tokenizer(seed: int):
    """ModernBERT's kind: byte-level BPE, `[CLS] A [SEP] B [SEP]`, no token type ids."""
    from jobs.bench_data import train_bpe

    tok = train_bpe(_corpus(2000, seed), vocab_size=400)
    tok.model_max_length = 128
    return tok


FAMILIES = ("bert", "xlmr", "modernbert")


def make_tiny_model(out_dir: str | Path, family: str = "bert", seed: int = 0, max_length: int = 128) -> Path:
    """Write a tiny random cross-encoder of `family` (one of FAMILIES) to `out_dir` and return the path."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ModernBertConfig,
        ModernBertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    out = Path(out_dir)
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    if family == "bert":
        tokenizer = _bert_tokenizer(seed)
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length,
                            pad_token_id=tokenizer.pad_token_id, **shape)
        model = BertForSequenceClassification(config)
    elif family == "xlmr":
        tokenizer = _xlmr_tokenizer(seed)
        # RoBERTa positions start after the padding index, so the table holds max_length + pad + 1 rows.
        config = XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_length + 2,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, type_vocab_size=1, **shape)
        model = XLMRobertaForSequenceClassification(config)
    elif family == "modernbert":
        tokenizer = _modernbert_tokenizer(seed)
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        # Rotary positions, a global layer then two sliding-window ones; a 16-token window (real: 128) so
        # the test pairs run past it, and mean pooling, which reads every token (padding must not leak in).
        config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=max_length,
                                  local_attention=16, global_attn_every_n_layers=3, classifier_pooling="mean",
                                  pad_token_id=tokenizer.pad_token_id, cls_token_id=cls, sep_token_id=sep,
                                  bos_token_id=cls, eos_token_id=sep, num_labels=1)
        model = ModernBertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")
    tokenizer.model_max_length = max_length
    # Random init leaves LayerNorm at identity and biases at zero; perturb every tensor so parity tests
    # would catch a dropped bias or a swapped norm.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=FAMILIES, default="bert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    print(make_tiny_model(args.out_dir, args.family, args.seed, args.max_length))


if __name__ == "__main__":
    main()
