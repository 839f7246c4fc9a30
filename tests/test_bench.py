"""The benchmark harness (jobs/bench*.py), on CPU in well under a minute.

FLOPs against a hand count; synthetic pairs deterministic and in their length ranges; a smoke `run_bench` on a
tiny shape whose rows carry every field, with engine and sentence-transformers anchor scoring the same pairs to
within 1e-4 in fp32; failures and the time budget turn into rows, not exceptions; no ray / polars imported.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import bench_data as bd  # noqa: E402
from jobs import bench_models as bm  # noqa: E402
from jobs import bench_report as br  # noqa: E402
from jobs.bench import Bench, BenchTimeout, EngineSpec, agreement, deadline, run_bench  # noqa: E402


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flops_hand_count():
    # hidden 4, 2 layers, FFN 8, 1 label; pairs of 3 and 5 tokens.
    # per layer: QKVO 4*16+4*4 = 80, FFN 2*4*8+8+4 = 76, two LayerNorms 4*4 = 16 -> 172; encoder 344
    # head: 16+4 (pooler / dense) + 4+1 (classifier) = 25
    # 2*344*(3+5) + 2 layers*4*hidden 4*(9+25) + 2*25*2 pairs = 5504 + 1088 + 100 = 6692
    fm = bm.FlopModel(hidden=4, layers=2, intermediate=8, num_labels=1)
    assert fm.layer_params == 172
    assert fm.encoder_params == 344
    assert fm.head_params == 25
    assert fm.flops([3, 5]) == 6692.0
    assert bm.count_flops({"hidden": 4, "layers": 2, "intermediate": 8}, [3, 5]) == 6692.0


@pytest.mark.parametrize("shape", ["tiny", "tiny-xlmr"])
def test_flop_parameter_split_matches_the_real_model(shape):
    cfg = bm.hf_config(shape)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(cfg)
    counts = bm.param_counts(model)
    fm = bm.flop_model(cfg)
    assert counts["encoder"] == fm.encoder_params
    assert counts["head"] == fm.head_params


@pytest.mark.parametrize("biases", [False, True])
def test_modernbert_flop_model_matches_the_real_model(biases):
    from transformers import AutoModelForSequenceClassification, ModernBertConfig

    cfg = ModernBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=256, local_attention=16, num_labels=2,
                           attention_bias=biases, mlp_bias=biases, norm_bias=biases, classifier_bias=biases,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = AutoModelForSequenceClassification.from_config(cfg)
    counts, fm = bm.param_counts(model), bm.flop_model(cfg)
    assert isinstance(fm, bm.ModernBertFlopModel)
    assert (counts["encoder"], counts["head"]) == (fm.encoder_params, fm.head_params)
    # Keys per query, counted one by one: layers 0 and 3 global, 1 and 2 within +-8 tokens.
    for n in (1, 8, 9, 10, 30, 200):
        brute = sum(min(n - 1, i + 8) - max(0, i - 8) + 1 for i in range(n))
        assert fm.attention_keys(np.array([n], float))[:, 0].tolist() == [n * n, brute, brute, n * n]


def test_minilm_shape_numbers():
    fm = bm.flop_model(bm.SHAPES["minilm-l6"])
    assert fm.encoder_params == 6 * (4 * 384 * 384 + 4 * 384 + 2 * 384 * 1536 + 1536 + 384 + 4 * 384)
    cfg = bm.hf_config("xlmr-large")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.max_position_embeddings) == (1024, 24, 16, 4096, 250002, 514)
    mb = bm.hf_config("modernbert-base")
    assert (mb.hidden_size, mb.num_hidden_layers, mb.num_attention_heads, mb.intermediate_size, mb.vocab_size,
            mb.local_attention, mb.classifier_pooling) == (768, 22, 12, 1152, 50368, 128, "mean")
    assert [i for i, t in enumerate(mb.layer_types) if t == "full_attention"] == list(range(0, 22, 3))
    assert bm.flop_model(mb).global_layers == tuple(range(0, 22, 3))


def test_peak_table_lookup():
    assert bm.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert bm.peak_flops("NVIDIA H100 PCIe", "float16") == 756e12
    assert bm.peak_flops("NVIDIA A100-SXM4-80GB", "float16") == 312e12  # A100 before A10
    assert bm.peak_flops("NVIDIA A10G", "float16") == 70e12
    assert bm.peak_flops("cpu", "float32") is None
    assert bm.peak_flops("Some Future GPU", "float16") is None
    assert bm.achievable_flops("NVIDIA H200", "float16") == 790e12


# ---------------------------------------------------------------------------------------------- data
def test_pairs_deterministic_and_shaped():
    a = bd.make_pairs(300, "mixed", candidates=25, seed=3)
    b = bd.make_pairs(300, "mixed", candidates=25, seed=3)
    c = bd.make_pairs(300, "mixed", candidates=25, seed=4)
    assert a.queries == b.queries and a.docs == b.docs and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert len(a) == 300 and len(set(a.queries)) == 12
    assert all(len(set(a.queries[i : i + 25])) == 1 for i in range(0, 300, 25))  # shortlists are contiguous
    assert np.array_equal(a.query_ids, np.arange(300) // 25)
    assert len(set(zip(a.queries, a.docs))) == 300  # nothing for the engine to deduplicate
    assert bd.make_pairs(10, "nq").head(4).queries == bd.make_pairs(10, "nq").queries[:4]


@pytest.fixture(scope="module")
def wordpiece():
    return bd.build_tokenizer("wordpiece")


def test_tokenizer_is_realistic_and_cached(wordpiece):
    assert type(wordpiece).__name__.startswith("BertTokenizer") and wordpiece.is_fast
    assert 29000 <= len(wordpiece) <= 30522
    t = time.perf_counter()
    again = bd.build_tokenizer("wordpiece")
    assert time.perf_counter() - t < 5 and again.get_vocab() == wordpiece.get_vocab()
    uni = bd.build_tokenizer("unigram")
    assert type(uni).__name__.startswith("XLMRobertaTokenizer") and uni.pad_token_id == 1
    stats = bd.token_stats(uni, bd.make_pairs(400, "msmarco", seed=1), 512)
    assert 1.15 <= stats["tokens_per_word"] <= 1.45


@pytest.mark.parametrize("mix, doc_lo, doc_hi", [("msmarco", 60, 80), ("nq", 130, 150), ("long", 250, 400)])
def test_length_mixes(wordpiece, mix, doc_lo, doc_hi):
    stats = bd.token_stats(wordpiece, bd.make_pairs(600, mix, candidates=30, seed=0), max_length=512)
    assert 6 <= stats["query_tokens_mean"] <= 10
    assert doc_lo <= stats["doc_tokens_mean"] <= doc_hi
    assert 1.2 <= stats["tokens_per_word"] <= 1.4
    assert stats["pair_tokens_max"] <= 512
    if mix == "nq":
        assert 560 <= stats["doc_chars_mean"] <= 680  # ~620 characters, as NQ/DPR passages
    if mix == "long":
        assert stats["pair_tokens_max"] == 512  # some pairs reach the model's limit and are truncated


def test_mixed_mix_spans_all_lengths(wordpiece):
    stats = bd.token_stats(wordpiece, bd.make_pairs(1000, "mixed", seed=0), max_length=512)
    assert stats["doc_tokens_p5"] < 60 and stats["doc_tokens_p95"] > 300


def test_load_pairs_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["q1", "q1", "q2"], "passage": ["a", "b", "c"]}), tmp_path / "p.parquet")
    p = bd.load_pairs(tmp_path / "p.parquet")
    assert p.docs == ["a", "b", "c"] and list(p.query_ids) == [0, 0, 1]
    with pytest.raises(ValueError):
        pq.write_table(pa.table({"q": ["x"]}), tmp_path / "bad.parquet")
        bd.load_pairs(tmp_path / "bad.parquet")


# ---------------------------------------------------------------------------------------------- helpers
def test_agreement_metrics():
    ref = np.array([0.1, 0.5, 0.3, 0.9, 0.2, 0.4], dtype=np.float32)
    qid = np.array([0, 0, 0, 1, 1, 1])
    same = agreement(ref.copy(), ref, qid)
    assert same["score_max_abs_diff"] == 0 and same["spearman"] == 1.0 and same["top1_agree"] == 1.0
    flipped = agreement(-ref, ref, qid)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["top1_agree"] == 0.0


def test_deadline_interrupts():
    with pytest.raises(BenchTimeout):
        with deadline(0.05):
            time.sleep(2)
    with deadline(None):
        pass


# ---------------------------------------------------------------------------------------------- run_bench
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    rows = run_bench(models=["tiny"], mixes=["msmarco"], n_pairs=48, candidates=12, engines=["padded", "packed"],
                     dtypes=["float32"], compile=[False], budgets=[1024], repeats=2, device="cpu",
                     tokenize_pairs=300, out_dir=str(out), verbose=False)
    return rows, out


def test_run_bench_rows(smoke):
    rows, out = smoke
    kinds = [r["kind"] for r in rows]
    assert kinds.count("tokenize") == 2 and kinds.count("anchor") == 1 and kinds.count("engine") == 2
    for r in rows:
        assert set(r) == set(br.ROW_FIELDS)
        assert r["status"] == "ok", (r["label"], r["error"])
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert r["model"] == "tiny" and r["torch"]
    engines = {r["engine"]: r for r in rows if r["kind"] == "engine"}
    assert set(engines) == {"padded", "packed"}
    anchor = next(r for r in rows if r["kind"] == "anchor")
    assert anchor["engine"] == "st.CrossEncoder" and anchor["batch_size"] == 32
    assert anchor["computed_tokens"] >= anchor["real_tokens"] > 0  # read off the shapes the model received
    for r in engines.values():
        assert r["real_tokens"] == anchor["real_tokens"]  # same pairs, same tokenization
        assert r["vs"] == "anchor fp32"
        assert r["score_max_abs_diff"] < 1e-4  # engine and sentence-transformers agree in fp32
        assert r["top1_agree"] == 1.0 and r["spearman"] > 0.999
        assert 0 < r["padding_efficiency"] <= 1 and r["max_batch_tokens"] == 1024
        assert r["flops_per_pass"] == pytest.approx(anchor["flops_per_pass"])
        assert r["mfu"] is None and r["peak_mem_gb"] is None and r["rss_gb"] > 0  # CPU: no peak, no MFU
        assert r["speedup_vs_anchor"] == pytest.approx(r["pairs_per_s"] / anchor["pairs_per_s"])
        assert len(r["wall_s_all"]) == 2
    assert engines["packed"]["padding_efficiency"] >= engines["padded"]["padding_efficiency"] - 0.05
    tok = next(r for r in rows if r["kind"] == "tokenize" and r["engine"] == "crossrank.PairEncoder")
    assert tok["vs"] == "tokenizer(q, d)" and tok["pairs_per_s_per_core"] > 0 and tok["cores"] >= 1


def test_run_bench_files(smoke):
    rows, out = smoke
    import pyarrow.parquet as pq

    assert json.loads((out / "runs.json").read_text()) == rows
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(rows)
    table = pq.read_table(out / "runs.parquet")
    assert table.num_rows == len(rows) and table.column_names == list(br.ROW_FIELDS)
    text = br.table(rows)
    assert "st.CrossEncoder fp32 bs32" in text and "padded fp32 eager 1k" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "throughput_vs_budget_tiny_msmarco.png").stat().st_size > 1000


def test_failures_and_budget_become_rows(tmp_path):
    bench = Bench(device="cpu", repeats=1, out_dir=str(tmp_path), verbose=False)
    bundle = bench.model("tiny")
    pairs = bench.pairs("msmarco", 8, 4)
    bad = bench.run_engine(bundle, pairs, EngineSpec(engine="padded", max_batch_tokens=8))  # the engine refuses it
    assert bad["status"] == "error" and "max_batch_tokens must be >= 16" in bad["error"]
    bench.budget_s = 0.0
    skipped = bench.run_engine(bundle, pairs, EngineSpec(engine="padded"), est_s=5)
    assert skipped["status"] == "skipped" and "time budget" in skipped["error"]
    skipped = bench.run_anchor(bundle, pairs, est_s=5)
    assert skipped["status"] == "skipped"
    bench.finish(plots=False)
    assert [r["status"] for r in json.loads((tmp_path / "runs.json").read_text())] == ["error", "skipped", "skipped"]


def test_precision_rows(tmp_path):
    bench = Bench(device="cpu", repeats=1, verbose=False)
    bundle = bench.model("tiny")
    rows = bench.precision(bundle, bench.pairs("msmarco", 24, 8), ("bfloat16",), ("padded",))
    assert [r["label"] for r in rows] == ["padded fp32 eager 4k", "padded bf16 eager 4k", "st.CrossEncoder bf16"]
    assert all(r["status"] == "ok" and r["kind"] == "precision" for r in rows)
    assert rows[0]["score_max_abs_diff"] < 1e-4  # fp32 engine vs the fp32 reference
    assert 0 < rows[1]["score_rel_l2"] < 0.2 and rows[1]["spearman"] > 0.8  # bf16: close, not equal
    bench.finish(plots=False)


# ---------------------------------------------------------------------------------------------- imports
_NO_RAY = ("import sys; {imp}; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'polars')); "
           "assert not bad, bad")


def test_bench_imports_neither_ray_nor_polars():
    code = _NO_RAY.format(imp="import jobs.bench, jobs.bench_data, jobs.bench_models, jobs.bench_report")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_gpu_check_imports_neither_ray_nor_polars():
    code = _NO_RAY.format(imp="sys.path.insert(0, 'scripts'); import gpu_check; gpu_check._import_bench()")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_shard_pipeline_bench_runs_every_runner_and_commits_every_row(tmp_path):
    """The pipeline bench (gpu_check step 8) times the three runners on one engine, and every pass's committed
    shards hold every pair (it raises otherwise); its modules import no Ray and no polars."""
    from kernels.config import EngineConfig
    from kernels.engine import Engine
    from scripts.bench_shard_pipeline import measure, table

    tok = bd.build_tokenizer("wordpiece")
    eng = Engine.from_model(bm.build_model("tiny", tok), tok, EngineConfig(device="cpu"))
    pairs = bd.make_pairs(240, mix="msmarco")
    rows = measure(eng, pairs.queries, pairs.docs, pairs.query_ids, 60, tmp_path, rounds=2)
    assert [r["runner"] for r in rows] == ["engine", "commit inline", "commit apart"]
    assert all(r["pairs_per_s"] > 0 and len(r["rounds"]) == 2 and r["shards"] == 4 for r in rows)
    assert rows[0]["x_engine"] == 1.0 and "commit apart" in table(rows)
    code = _NO_RAY.format(imp="import scripts.bench_shard_pipeline")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_gpu_check_summary_survives_every_status(smoke):
    rows, _ = smoke
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    extra = [br.clean(br.new_row(kind="precision", status="ok", model="tiny", label="packed bf16 eager 4k",
                                 dtype="bfloat16", score_rel_l2=0.01, spearman=None, top1_agree=1.0)),
             br.clean(br.new_row(kind="engine", status="error", model="tiny", label="packed fp16", error="boom")),
             br.clean(br.new_row(kind="engine", status="skipped", model="xlmr-large", label="padded fp16",
                                 error="time budget"))]
    text = gpu_check.summary(rows + extra)
    assert "tiny msmarco: best" in text and "tokenize+assemble" in text and "error: tiny packed fp16: boom" in text
    assert f"{len(rows) + 3} rows" in text
    assert "precision vs fp32" in br.table(rows + extra) or "score agreement" in br.table(rows + extra)


def test_interleaved_bench_times_every_runner_in_every_round(tmp_path):
    out = tmp_path / "passes.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_interleaved", "--model", "tiny", "--mix", "msmarco",
                           "--pairs", "24", "--candidates", "6", "--rounds", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    passes = json.loads(out.read_text())["passes"]
    assert sorted((p["round"], p["runner"]) for p in passes) == sorted(
        (r, name) for r in range(2) for name in ("anchor", "packed", "padded"))
    assert all(p["pairs_per_s"] > 0 for p in passes)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("anchor", "packed", "padded")}
    assert rows["anchor"][2] == "1.00x"
    for name in ("packed", "padded"):  # the same scores as the anchor, up to fp32 rounding
        assert float(rows[name][-1]) < 1e-4, rows[name]
