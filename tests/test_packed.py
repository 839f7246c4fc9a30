"""The packed (padding-free) forward equals the HF padded forward, in fp32 on CPU.

Models: the repo's tiny random BERT and XLM-R checkpoints (loaded from disk like a user's), and a
MiniLM-L6-H384-shaped BERT built in-process, every tensor perturbed so a dropped bias or norm would show.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from kernels.packed import (
    PackedCrossEncoder,
    UnsupportedArchitecture,
    cu_seqlens_for,
    hf_to_packed_name,
    pad_lengths,
    position_ids_for,
    supports,
)
from kernels import linear, packed_attention
from kernels.packed_attention import select_attention_backend

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_bert, tiny_xlmr):
    """The session's tiny checkpoints (tests/conftest.py, scripts.make_tiny_model), loaded from disk."""
    return {family: AutoModelForSequenceClassification.from_pretrained(path).eval()
            for family, path in (("bert", tiny_bert), ("xlmr", tiny_xlmr))}


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(1)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        num_labels=1, max_position_embeddings=512)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _pairs(config, lengths, seed=0):
    """Random `[CLS] q [SEP] d [SEP]`-shaped token rows of the given total lengths (no pad id inside)."""
    rng = np.random.default_rng(seed)
    pad = config.pad_token_id
    rows, types = [], []
    for n in lengths:
        ids = rng.integers(0, config.vocab_size, n)
        ids[ids == pad] = (pad + 1) % config.vocab_size
        q = max(1, (n - 3) // 2) if n > 3 else n  # query part; the rest (at least 1 token when n >= 4) is doc
        tt = (np.arange(n) > q).astype(np.int64) if config.type_vocab_size > 1 else np.zeros(n, np.int64)
        rows.append(ids)
        types.append(tt)
    return rows, types


def _hf_padded(model, rows, types):
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    tt = torch.zeros((B, L), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types)):
        ids[i, : len(r)] = torch.from_numpy(r)
        mask[i, : len(r)] = 1
        tt[i, : len(r)] = torch.from_numpy(t)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits


def _packed(packed, config, rows, types, lengths=None, max_seqlen=None, use_types=True):
    """Run the packed model; `lengths` may extend the real rows with padding / zero-length sequences."""
    real = np.array([len(r) for r in rows])
    lengths = real if lengths is None else lengths
    spare = int(lengths.sum() - real.sum())
    ids = np.concatenate(rows + [np.full(spare, config.pad_token_id)])
    tt = np.concatenate(types + [np.zeros(spare, np.int64)])
    with torch.no_grad():
        return packed(
            torch.from_numpy(ids),
            torch.from_numpy(tt) if use_types else None,
            position_ids_for(lengths, config),
            cu_seqlens_for(lengths),
            int(max_seqlen or lengths.max()),
        )


# Mixed lengths: a lone [CLS], a 4-token pair with a single-token doc, short/medium ones, and max-length ones.
def _mixed_lengths(max_len):
    return [5, 1, max_len, 4, 17, 4, 33, max_len, 2, 64, max_len - 1, 9]


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_parity_tiny(tiny, family):
    hf = tiny[family]
    packed = PackedCrossEncoder.from_hf(hf)
    assert packed.attention_backend == "sdpa_padded"
    max_len = 128  # make_tiny_model's default max_length: BERT's table is 128 rows, XLM-R's 130 (offset 2)
    rows, types = _pairs(hf.config, _mixed_lengths(max_len))
    ref = _hf_padded(hf, rows, types)
    out = _packed(packed, hf.config, rows, types)
    assert out.shape == ref.shape == (len(rows), 1)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if family == "xlmr":  # a single token type: None means row 0, like HF's default
        no_types = _packed(packed, hf.config, rows, types, use_types=False)
        torch.testing.assert_close(no_types, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_last_layer_runs_its_mlp_on_first_tokens_only(tiny, family):
    """The head reads first tokens, so the last layer's MLP sees one row per sequence (and stays exact:
    the parity tests above run through this path); every earlier layer sees every token."""
    hf = tiny[family]
    packed = PackedCrossEncoder.from_hf(hf)
    rows, types = _pairs(hf.config, [7, 30, 1, 12])
    seen = []
    hooks = [layer.intermediate.dense.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
             for layer in packed.encoder.layer]
    try:
        _packed(packed, hf.config, rows, types)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [50] * (len(packed.encoder.layer) - 1) + [4]


def test_parity_minilm_shape(minilm):
    packed = PackedCrossEncoder.from_hf(minilm)
    rows, types = _pairs(minilm.config, [150, 4, 1, 57, 200, 23], seed=3)
    ref = _hf_padded(minilm, rows, types)
    torch.testing.assert_close(_packed(packed, minilm.config, rows, types), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_dummy_sequences_do_not_disturb_real_ones(tiny, family):
    """The engine's static-shape padding: zero-length sequences (repeated offsets), anywhere, and trailing
    pad tokens in dummy sequences, over a fixed max_seqlen bucket larger than any real length."""
    hf = tiny[family]
    packed = PackedCrossEncoder.from_hf(hf)
    rows, types = _pairs(hf.config, _mixed_lengths(128), seed=1)
    ref = _hf_padded(hf, rows, types)
    real = np.array([len(r) for r in rows])

    # Zero-length sequences between real ones, then trailing pad tokens in one dummy sequence.
    n = len(rows)
    lengths = np.concatenate([real[:3], [0, 0], real[3:], [0, 50, 0, 0]])
    keep = np.r_[0:3, 5 : 5 + n - 3]
    z_rows = rows[:3] + rows[3:]
    out = _packed(packed, hf.config, z_rows, types[:3] + types[3:], lengths=lengths, max_seqlen=128)
    assert out.shape == (len(lengths), 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[keep], ref, atol=ATOL, rtol=0)

    # pad_lengths: fixed total tokens and sequence count, padding cut into pieces <= max_seqlen.
    total, num_seqs, bucket = 1024, 24, 128
    lengths = pad_lengths(real, total, num_seqs, bucket)
    assert lengths.sum() == total and len(lengths) == num_seqs and lengths.max() <= bucket
    assert (lengths[:n] == real).all() and (lengths[n:] == 0).any()
    out = _packed(packed, hf.config, rows, types, lengths=lengths, max_seqlen=bucket)
    assert out.shape == (num_seqs, 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:n], ref, atol=ATOL, rtol=0)


def test_max_seqlen_is_checked_eagerly(tiny):
    hf = tiny["bert"]
    packed = PackedCrossEncoder.from_hf(hf)
    rows, types = _pairs(hf.config, [10, 20])
    with pytest.raises(ValueError, match="max_seqlen"):
        _packed(packed, hf.config, rows, types, max_seqlen=15)


def test_position_ids(tiny):
    bert, xlmr = tiny["bert"].config, tiny["xlmr"].config
    lengths = np.array([3, 0, 2])
    assert position_ids_for(lengths, bert).tolist() == [0, 1, 2, 0, 1]
    pad = xlmr.pad_token_id
    assert position_ids_for(lengths, xlmr).tolist() == [pad + 1, pad + 2, pad + 3, pad + 1, pad + 2]
    as_tensor = position_ids_for(torch.from_numpy(lengths), xlmr)
    assert as_tensor.dtype == torch.int64 and as_tensor.tolist() == position_ids_for(lengths, xlmr).tolist()
    with pytest.raises(ValueError, match="position table"):
        position_ids_for(np.array([129]), xlmr)  # 130 rows, positions start at pad + 1 = 2


def test_every_hf_weight_is_mapped(tiny, minilm):
    for hf in (tiny["bert"], tiny["xlmr"], minilm):
        packed = PackedCrossEncoder.from_hf(hf)
        ours = dict(packed.named_parameters())
        used = set()
        for hf_name, tensor in list(hf.named_parameters()) + list(hf.named_buffers()):
            name, shard = hf_to_packed_name(hf_name)
            if name is None:
                assert hf_name.endswith(("embeddings.position_ids", "embeddings.token_type_ids")), hf_name
                continue
            assert name in ours, hf_name
            used.add(name)
            got = ours[name] if shard is None else ours[name].chunk(3, dim=0)[shard]
            assert torch.equal(got, tensor), hf_name  # the fused QKV holds q, k, v in that order
        assert used == set(ours)  # nothing of ours is left at its init
        # load_weights reports exactly what it set.
        with torch.device("meta"):
            fresh = PackedCrossEncoder(packed.config)
        assert fresh.load_weights(list(hf.named_parameters()) + list(hf.named_buffers())) == set(ours)


def test_unmapped_or_missing_weights_raise(tiny):
    hf = tiny["bert"]
    weights = list(hf.named_parameters())
    with torch.device("meta"):
        fresh = PackedCrossEncoder(PackedCrossEncoder.from_hf(hf).config)
    with pytest.raises(KeyError, match="bert.extra.weight"):
        fresh.load_weights(weights + [("bert.extra.weight", torch.zeros(1))])
    with torch.device("meta"):
        fresh = PackedCrossEncoder(PackedCrossEncoder.from_hf(hf).config)
    with pytest.raises(KeyError, match="pooler.dense.bias"):
        fresh.load_weights([(n, t) for n, t in weights if n != "bert.pooler.dense.bias"])


def test_unsupported_architectures():
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, ElectraConfig,
                              ElectraForSequenceClassification)

    tiny_shape = dict(vocab_size=50, max_position_embeddings=32)
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, **tiny_shape))
    electra = ElectraForSequenceClassification(
        ElectraConfig(embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, **tiny_shape))
    for model, name in ((distil, "distilbert"), (electra, "electra")):
        assert not supports(model.config)
        with pytest.raises(UnsupportedArchitecture, match=name) as info:
            PackedCrossEncoder.from_hf(model)
        assert isinstance(info.value, ValueError)
    relative = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, position_embedding_type="relative_key")
    assert not supports(relative)
    assert supports(BertConfig())


def test_bert_layout_with_another_head_is_refused(tiny):
    from transformers import BertForTokenClassification  # bert.* names, but no pooler: per-token head

    model = BertForTokenClassification(tiny["bert"].config)
    with pytest.raises(UnsupportedArchitecture, match="pooler"):
        PackedCrossEncoder.from_hf(model)


def test_dtype_and_backend_follow_the_weights(tiny):
    hf = tiny["bert"]
    packed = PackedCrossEncoder.from_hf(hf)
    assert {p.dtype for p in packed.parameters()} == {torch.float32}
    # Unfused weights are shared with the source model, not copied.
    word = packed.embeddings.word_embeddings.weight
    assert word.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    half = PackedCrossEncoder.from_hf(copy.deepcopy(hf).to(torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.attention_backend == "sdpa_padded"  # CPU: the fused kernels are CUDA-only
    # Selection rule, independent of a GPU being present.
    assert select_attention_backend("cpu", torch.float32, 64).name == "sdpa_padded"
    assert select_attention_backend("cuda", torch.float32, 64).name == "sdpa_padded"
    fused = "torch_varlen" if packed_attention._torch_varlen_attn is not None else None
    fused = fused or ("flash_attn" if packed_attention._flash_attn_varlen_qkvpacked() else "sdpa_padded")
    assert select_attention_backend("cuda", torch.float16, 64).name == fused  # torch_varlen on torch >= 2.10
    assert select_attention_backend("cuda", torch.float16, 12).name == "sdpa_padded"  # head_dim % 8 != 0
    with pytest.raises(ValueError):
        select_attention_backend("cpu", torch.float32, 64, prefer="torch_varlen")


@pytest.mark.skipif(not (linear._X86 and linear._onednn_ops()), reason="needs oneDNN on x86")
def test_linear_layers_prepack_on_cpu_and_follow_the_weights(minilm):
    """kernels/linear.py: on an x86 CPU the MiniLM-shaped layers run prepacked for oneDNN (the parity test
    above runs through them); the plain F.linear path agrees, and a copy or a move chooses again."""
    packed = PackedCrossEncoder.from_hf(minilm)
    rows, types = _pairs(minilm.config, [150, 4, 1, 57, 200, 23], seed=4)
    assert packed.linear_backend == "onednn"
    fast = _packed(packed, minilm.config, rows, types)
    plain = _packed(packed.set_linear_backend("aten"), minilm.config, rows, types)
    assert packed.linear_backend == "aten" and packed.encoder.layer[0].intermediate.dense.prepacked is None
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    packed.set_linear_backend("auto")

    # A copy (deepcopy, pickle) cannot carry a oneDNN tensor, which has no storage: it prepacks its own.
    for twin in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert twin.linear_backend == "onednn" and twin.encoder.layer[0].intermediate.dense.prepacked is not None
        torch.testing.assert_close(_packed(twin, minilm.config, rows, types), fast, atol=0, rtol=0)
    assert not any("prepacked" in name for name in packed.state_dict())

    # New weight values (load_state_dict copies into the old tensors): prepacked again from the new ones.
    twin = copy.deepcopy(packed)
    state = {k: v * 1.5 if k.endswith("dense.weight") else v for k, v in packed.state_dict().items()}
    twin.load_state_dict(state)
    assert twin.linear_backend == "onednn" and all(
        m.fresh() for m in twin.modules() if isinstance(m, linear.Linear) and m.prepacked is not None)
    moved = _packed(twin, minilm.config, rows, types)
    assert not torch.allclose(moved, fast, atol=1e-3)
    torch.testing.assert_close(moved, _packed(twin.set_linear_backend("aten"), minilm.config, rows, types),
                               atol=1e-5, rtol=0)

    # A move chooses again: float64 has no prepacked path, bf16 has (where the CPU has bf16), float32 again.
    wide = copy.deepcopy(packed).to(torch.float64)
    assert wide.linear_backend == "aten" and wide.encoder.layer[0].attention.self.qkv.prepacked is None
    with pytest.raises(ValueError, match="cannot run here"):
        wide.set_linear_backend("onednn")  # refused, and not left pinned: the next move still works
    bf16 = "onednn" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "aten"
    assert copy.deepcopy(packed).to(torch.bfloat16).linear_backend == bf16
    assert wide.to(torch.float32).linear_backend == "onednn"
