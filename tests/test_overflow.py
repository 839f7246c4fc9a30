"""Scores that come out NaN or infinite: rescored in float32 when half precision overflowed, rejected with their
reason when the model itself gives NaN, never written as scores (a NaN sorts anywhere).

The model is the tiny BERT with two words rewired, saved with `save_pretrained` and loaded as users load theirs:
  - "refund" carries an outlier feature that a large first-layer MLP weight lifts to ~84,000: past fp16's
    65,504 (inf, then NaN after the next norm), finite in float32. Every other token's feature is zero there.
  - "latency" has a NaN embedding: NaN in every dtype (a broken checkpoint, or an overflow float32 shares).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import assert_each_row_once, job_args

OVERFLOWS, BROKEN = "refund", "latency"


@pytest.fixture(scope="module")
def overflow_model(tiny_bert, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    (spike,), (nan,) = (tok(w, add_special_tokens=False)["input_ids"] for w in (OVERFLOWS, BROKEN))
    emb = model.bert.embeddings
    with torch.no_grad():
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, 0] = 0
        emb.word_embeddings.weight[spike, 0] = 1000  # ~5.6 after the embedding norm; every other token ~0
        model.bert.encoder.layer[0].intermediate.dense.weight[:, 0] = 1.5e4  # 5.6 x 15,000 > 65,504
        emb.word_embeddings.weight[nan] = float("nan")
    out = tmp_path_factory.mktemp("models") / "overflow-bert"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _pairs(n: int = 60):
    words = "contract review budget deal vendor ticket support policy memo owner".split()
    rng = np.random.default_rng(0)
    queries, docs = [], []
    for i in range(n):
        doc = list(rng.choice(words, size=int(rng.integers(3, 30))))
        if i % 5 == 1:
            doc.insert(len(doc) // 2, OVERFLOWS)
        if i % 7 == 3:
            doc.append(BROKEN)
        queries.append(" ".join(rng.choice(words, size=3)))
        docs.append(" ".join(doc))
    return queries, docs


@pytest.mark.parametrize("engine", ["packed", "padded"])
def test_half_precision_overflow_is_rescored_in_float32(overflow_model, engine):
    from kernels.config import EngineConfig
    from kernels.engine import Engine

    queries, docs = _pairs()
    broken = np.array([BROKEN in d for d in docs])
    overflows = np.array([OVERFLOWS in d for d in docs]) & ~broken
    reference, _ = Engine.from_pretrained(str(overflow_model), EngineConfig(device="cpu", dtype="float32",
                                                                           engine=engine)).score(queries, docs)
    half = Engine.from_pretrained(str(overflow_model), EngineConfig(device="cpu", dtype="float16", engine=engine))
    assert half.dtype == torch.float16
    assert half.rescorer is None  # made on first need only
    # The overflow is real: the half-precision model alone gives NaN on exactly these pairs.
    with torch.inference_mode():
        hf = half.model(**{k: v for k, v in half.tokenizer(queries, docs, padding=True, return_tensors="pt").items()})
    assert np.array_equal(~torch.isfinite(hf.logits[:, 0]).numpy(), overflows | broken)

    beats = []
    half.heartbeat = lambda: beats.append(1)  # the job's proof of life: per batch, rescoring batches included
    scores, stats = half.score(queries, docs)
    assert len(beats) > stats.batches
    assert np.isfinite(scores[~broken]).all()
    assert np.isnan(scores[broken]).all() and np.isnan(reference[broken]).all()
    assert stats.float32_rescored == int(overflows.sum()) and stats.nonfinite == int(broken.sum())
    # Rescored pairs get the float32 score of the same (fp16-rounded) weights; the rest are fp16 scores.
    np.testing.assert_allclose(scores[overflows], reference[overflows], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(scores[~overflows & ~broken], reference[~overflows & ~broken], rtol=2e-2, atol=2e-3)
    assert half.rescorer is not None and half.rescorer.model is not None  # kept for the next call

    # Out of device memory on the way (injected above 64 tokens a batch): both paths split and still agree.
    tight = Engine.from_pretrained(str(overflow_model), EngineConfig(device="cpu", dtype="float16", engine=engine,
                                                                     extra={"oom_above_tokens": 64}))
    again, st = tight.score(queries, docs)
    assert st.oom_splits > 0 and st.float32_rescored == stats.float32_rescored
    np.testing.assert_allclose(again[overflows], scores[overflows], rtol=1e-5, atol=1e-6)


def test_float32_scores_that_are_nan_are_counted(overflow_model):
    from kernels.config import EngineConfig
    from kernels.engine import Engine

    queries, docs = _pairs()
    broken = np.array([BROKEN in d for d in docs])
    engine = Engine.from_pretrained(str(overflow_model), EngineConfig(device="cpu"))
    scores, stats = engine.score(queries, docs)
    assert engine.dtype == torch.float32 and engine.rescorer is None  # nothing wider to try
    assert np.array_equal(~np.isfinite(scores), broken)
    assert stats.float32_rescored == 0 and stats.nonfinite == int(broken.sum())


def test_job_rescores_overflow_and_rejects_nan_scores(ray_local, overflow_model, tmp_path):
    """The job in float16: overflowing pairs are scored (in float32), NaN pairs go to the rejects with their
    reason, file and row, and every other row is ranked as usual."""
    from jobs.rerank import main

    queries, docs = _pairs(90)
    inp = tmp_path / "in"
    inp.mkdir()
    rows = [{"query_id": f"q{i // 10}", "query": queries[i // 10 * 10], "doc_id": f"d{i}", "doc": d,
             "first_stage_score": float(-i)} for i, d in enumerate(docs)]
    pq.write_table(pa.Table.from_pylist(rows), inp / "shortlists.parquet", row_group_size=30)
    out = tmp_path / "out"
    assert main(job_args(inp, out, overflow_model, "--dtype", "float16")) == 0
    scored, rejected = assert_each_row_once(inp, out)

    broken = {f"d{i}" for i, d in enumerate(docs) if BROKEN in d}
    overflowed = {f"d{i}" for i, d in enumerate(docs) if OVERFLOWS in d} - broken
    assert broken and overflowed
    assert set(rejected["doc_id"].to_pylist()) == broken
    assert set(rejected["reject_reason"].to_pylist()) == {"score is nan even in float32: the model overflows on "
                                                          "this pair"}
    assert set(rejected["source_file"].to_pylist()) == {str(inp / "shortlists.parquet")}
    assert sorted(rejected["source_row"].to_pylist()) == sorted(int(d[1:]) for d in broken)
    assert np.isfinite(scored["score"].to_numpy()).all()
    assert overflowed <= set(scored["doc_id"].to_pylist())

    stats = pq.read_table(out / "stats.parquet").to_pylist()
    distinct = len({(queries[int(d[1:]) // 10 * 10], docs[int(d[1:])]) for d in overflowed})
    assert sum(s["float32_rescored"] for s in stats) == distinct
    assert all(s["dtype"] == "float16" for s in stats)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["totals"]["float32_rescored"] == distinct


def test_auto_dtype_follows_a_bfloat16_checkpoint(tiny_bert, tmp_path):
    """vLLM's rule: a checkpoint saved in bf16 (trained in it: fp16 may overflow) runs in bf16 on a GPU that
    has it, any other in fp16; CPU stays float32. The config is read as the engine reads it, from the folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kernels.loading import native_bf16, resolve_dtype, saved_dtype

    bf16 = tmp_path / "bf16-bert"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(bf16)
    assert saved_dtype(str(bf16)) == torch.bfloat16 and saved_dtype(str(tiny_bert)) == torch.float32
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", gpu, saved_dtype(str(bf16))) == (torch.bfloat16 if native_bf16(gpu) else torch.float16)
    assert native_bf16(gpu) == (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0))
    assert resolve_dtype("auto", gpu, saved_dtype(str(tiny_bert))) == torch.float16
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_dtype("float16", cpu, torch.bfloat16) == torch.float16  # asked for: runs, with a warning
