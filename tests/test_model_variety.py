"""Checkpoints users bring beyond the three tiny families: each scored as the Hugging Face model scores
`tokenizer(query, doc, truncation=True)` one pair at a time, or refused in one line. Found by a review against
CrossEncoder.predict: DeBERTa-v2 and MPNet could not load (no SDPA in transformers), data2vec's position table
overflowed on long pairs, `truncation_side="left"`, `split_special_tokens` and a literal `<pad>` in RoBERTa
text were scored differently, and a 3-label head was scored by its last column without a word."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

from kernels.engine import Engine, EngineConfig
from scripts.make_tiny_model import _bert_tokenizer, _corpus, _xlmr_tokenizer

SHAPE = dict(num_labels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LONG = " ".join(_corpus(40, seed=7))  # far past 128 tokens


def _save(tmp_path, name, model, tok, **tokenizer_config):
    """Save with perturbed weights; `tokenizer_config`: entries for tokenizer_config.json, as a hub folder has."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / name
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if tokenizer_config:
        path = out / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **tokenizer_config}))
    return out


def _reference(folder, queries, docs, max_length):
    """The HF model on each pair alone, encoded by the tokenizer itself."""
    tok = T.AutoTokenizer.from_pretrained(folder)
    model = T.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for q, d in zip(queries, docs):
            enc = tok(q, d, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits[0].float().numpy())
    return np.stack(out)


def _pairs():
    queries = ["what is the cfo approval threshold", LONG[:300], "renewal clause"]
    docs = [LONG, "the contract renewal needs cfo approval", LONG[500:]]
    return queries, docs


def _deberta_v2(tmp_path):
    tok = _bert_tokenizer(0)
    cfg = T.DebertaV2Config(vocab_size=len(tok), max_position_embeddings=128, relative_attention=True,
                            position_buckets=32, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                            type_vocab_size=0, pad_token_id=0, **SHAPE)
    return _save(tmp_path, "deberta", T.DebertaV2ForSequenceClassification(cfg), tok)


def test_deberta_v2_loads_with_its_own_attention_and_scores_like_hf(tmp_path):
    folder = _deberta_v2(tmp_path)
    queries, docs = _pairs()
    eng = Engine.from_pretrained(folder, EngineConfig(engine="auto"))
    assert eng.describe()["engine"] == "padded" and eng.describe()["attention"] == "eager"
    scores, _ = eng.score(queries, docs)
    np.testing.assert_allclose(scores, _reference(folder, queries, docs, eng.max_length)[:, 0], atol=1e-5)


def test_the_bench_loads_a_checkpoint_without_sdpa_as_the_job_does(tmp_path):
    """jobs.bench loaded a given folder with SDPA hard-coded, so a DeBERTa-v2 reranker ran in the job but not
    in the benchmark."""
    from jobs.bench import run_bench

    rows = run_bench(models=[str(_deberta_v2(tmp_path))], mixes=["msmarco"], n_pairs=24, candidates=6,
                     engines=["padded"], dtypes=["float32"], compile=[False], budgets=[1024], repeats=1,
                     device="cpu", tokenize=False, plots=False, verbose=False)
    assert [(r["kind"], r["status"]) for r in rows] == [("anchor", "ok"), ("engine", "ok")], rows
    engine = rows[1]
    assert engine["attention"] == "eager" and engine["score_max_abs_diff"] < 1e-4


def test_roberta_style_positions_of_other_families_fit_their_table(tmp_path):
    """data2vec-text numbers positions past the padding index like RoBERTa; with no tokenizer limit the engine
    took the whole table (130) as max_length and the first long pair indexed past it."""
    tok = _xlmr_tokenizer(0)
    tok.model_max_length = int(1e30)  # as many hub checkpoints ship
    cfg = T.Data2VecTextConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1, **SHAPE)
    folder = _save(tmp_path, "data2vec", T.Data2VecTextForSequenceClassification(cfg), tok)
    queries, docs = _pairs()
    eng = Engine.from_pretrained(folder, EngineConfig(engine="auto"))
    assert eng.max_length == 130 - tok.pad_token_id - 1
    scores, _ = eng.score(queries, docs)
    np.testing.assert_allclose(scores, _reference(folder, queries, docs, eng.max_length)[:, 0], atol=1e-5)


@pytest.mark.parametrize("engine", ["packed", "padded"])
def test_tokenizer_options_are_kept(tmp_path, engine):
    """truncation_side="left" keeps each segment's tail; split_special_tokens=True reads "[SEP]" typed in a
    query as text."""
    tok = _bert_tokenizer(0)
    cfg = T.BertConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0, **SHAPE)
    left = _save(tmp_path, "left", T.BertForSequenceClassification(cfg), tok, truncation_side="left")
    assert T.AutoTokenizer.from_pretrained(left).truncation_side == "left"
    queries, docs = _pairs()
    eng = Engine.from_pretrained(left, EngineConfig(engine=engine))
    np.testing.assert_allclose(eng.score(queries, docs)[0], _reference(left, queries, docs, 128)[:, 0], atol=1e-5)

    split = _save(tmp_path, "split", T.BertForSequenceClassification(cfg), tok, split_special_tokens=True)
    assert T.AutoTokenizer.from_pretrained(split).backend_tokenizer.encode_special_tokens
    queries = ["is [SEP] here [CLS] or [PAD]", "plain query"]
    docs = ["a passage with [SEP] in it", "another passage"]
    eng = Engine.from_pretrained(split, EngineConfig(engine=engine))
    np.testing.assert_allclose(eng.score(queries, docs)[0], _reference(split, queries, docs, 128)[:, 0], atol=1e-5)


def test_a_pad_token_typed_in_roberta_text_keeps_hf_positions(tmp_path):
    """HF RoBERTa numbers only non-pad tokens, so "<pad>" in a passage shifts every token after it; the packed
    engine once numbered them 0..L-1 and moved such a score by up to 1.6."""
    tok = _xlmr_tokenizer(0)
    cfg = T.XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1, **SHAPE)
    folder = _save(tmp_path, "xlmr", T.XLMRobertaForSequenceClassification(cfg), tok)
    queries = ["renewal clause", "cfo approval", "plain"]
    docs = ["the <pad> contract renewal <pad> needs cfo approval", "<pad>" + LONG[:200], "no pad here"]
    assert tok.pad_token_id in tok(queries[0], docs[0])["input_ids"][1:-1]
    want = _reference(folder, queries, docs, 128)[:, 0]
    for engine in ("packed", "padded"):
        eng = Engine.from_pretrained(folder, EngineConfig(engine=engine))
        np.testing.assert_allclose(eng.score(queries, docs)[0], want, atol=1e-5)


def test_a_two_class_head_is_scored_by_its_margin_and_more_classes_are_refused(tmp_path):
    from kernels.loading import model_provenance

    tok = _bert_tokenizer(0)
    two = _save(tmp_path, "two", T.BertForSequenceClassification(
        T.BertConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0, **{**SHAPE, "num_labels": 2})), tok)
    queries, docs = _pairs()
    logits = _reference(two, queries, docs, 128)
    for engine in ("packed", "padded"):
        scores, _ = Engine.from_pretrained(two, EngineConfig(engine=engine)).score(queries, docs)
        np.testing.assert_allclose(scores, logits[:, 1] - logits[:, 0], atol=1e-5)  # sigmoid of it: softmax[:, 1]

    nli = _save(tmp_path, "nli", T.BertForSequenceClassification(
        T.BertConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0,
                     **{**SHAPE, "num_labels": 3}, id2label={0: "entailment", 1: "neutral", 2: "contradiction"})), tok)
    for load in (lambda: Engine.from_pretrained(nli, EngineConfig()), lambda: model_provenance(str(nli))):
        with pytest.raises(ValueError, match="3 labels \\(entailment, neutral, contradiction\\)"):
            load()

    multi = _save(tmp_path, "multi", T.BertForSequenceClassification(
        T.BertConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0,
                     **{**SHAPE, "num_labels": 2}, problem_type="multi_label_classification")), tok)
    with pytest.raises(ValueError, match="two independent outputs"):  # two sigmoids: no one score to take
        model_provenance(str(multi))
