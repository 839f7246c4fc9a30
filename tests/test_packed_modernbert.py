"""The packed ModernBERT forward equals `transformers`' ModernBertForSequenceClassification, in fp32 on CPU:
rotary positions with two bases, sliding-window layers (a 16-token window here, so pairs run far past it),
cls and mean pooling, with and without biases, and padding / empty sequences that must not leak in."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, ModernBertConfig, ModernBertForSequenceClassification

from kernels.packed import UnsupportedArchitecture, cu_seqlens_for, from_hf, pad_lengths, position_ids_for, supports
from kernels.packed_attention import select_attention_backend
from kernels.packed_modernbert import PackedModernBert

ATOL = 1e-4
LENGTHS = [5, 1, 128, 4, 17, 9, 33, 128, 2, 64, 127, 18]  # a lone [CLS], window edges (8, 9, 17), max length


def _model(pooling: str, biases: bool, layers: int = 4, seed: int = 0) -> ModernBertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = ModernBertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=128, local_attention=16,
                           global_attn_every_n_layers=3, classifier_pooling=pooling, num_labels=2,
                           attention_bias=biases, mlp_bias=biases, norm_bias=biases, classifier_bias=biases,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = ModernBertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # no identity norms, no zero biases: a dropped one would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, n) for n in lengths]


def _hf(model, rows):
    B, L = len(rows), max(len(r) for r in rows)
    ids, mask = torch.zeros((B, L), dtype=torch.long), torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.from_numpy(r), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _packed(packed, config, rows, lengths=None):
    real = np.array([len(r) for r in rows])
    lengths = real if lengths is None else lengths
    ids = np.concatenate(rows + [np.zeros(int(lengths.sum() - real.sum()), np.int64)])
    with torch.no_grad():
        return packed(torch.from_numpy(ids), None, position_ids_for(lengths, config), cu_seqlens_for(lengths),
                      int(lengths.max()))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("biases", [False, True])
def test_parity_with_transformers(pooling, biases):
    hf = _model(pooling, biases)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    packed = from_hf(hf)
    assert isinstance(packed, PackedModernBert) and packed.attention_backend == "sdpa_padded"
    rows = _rows(LENGTHS)
    ref = _hf(hf, rows)
    out = _packed(packed, hf.config, rows)
    assert out.shape == ref.shape == (len(rows), 2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # Each pair alone gives the same logits: nothing leaks between the sequences of a batch.
    torch.testing.assert_close(_packed(packed, hf.config, rows[2:3]), ref[2:3], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_static_shape_padding_leaves_real_rows_alone(pooling):
    """Dummy pad sequences and zero-length ones (the engine's fixed shapes) change no real row."""
    hf = _model(pooling, biases=False, layers=3)
    packed = from_hf(hf)
    rows = _rows([7, 40, 1, 25])
    ref = _hf(hf, rows)
    lengths = pad_lengths(np.array([len(r) for r in rows]), total_tokens=200, num_seqs=12, max_seqlen=64)
    out = _packed(packed, hf.config, rows, lengths)
    assert out.shape == (12, 2)
    torch.testing.assert_close(out[:4], ref, atol=ATOL, rtol=0)


def test_the_tiny_checkpoint_loads_from_disk(tiny_modernbert):
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_modernbert).eval()
    assert supports(hf.config)
    rows = _rows([3, 50, 128, 16])
    torch.testing.assert_close(_packed(from_hf(hf), hf.config, rows), _hf(hf, rows), atol=ATOL, rtol=0)


def test_window_needs_a_backend_that_has_one():
    from kernels import packed_attention

    # On CPU only the padded fallback runs (it masks a band); asking for a GPU kernel by name says why not.
    assert select_attention_backend("cpu", torch.float32, 8, windowed=True).name == "sdpa_padded"
    with pytest.raises(ValueError, match="CUDA"):
        select_attention_backend("cpu", torch.float32, 8, "torch_varlen", windowed=True)
    assert isinstance(packed_attention._VARLEN_WINDOW, bool)


def test_unsupported_modernbert_variants_are_refused_clearly():
    hf = _model("cls", biases=False, layers=2)
    hf.config.rope_parameters["sliding_attention"]["rope_type"] = "linear"  # scaled rotary: not implemented here
    assert not supports(hf.config)
    with pytest.raises(UnsupportedArchitecture, match="rope_type='linear'"):
        from_hf(hf)


class _ShiftedWindow:
    """A backend whose windows are off by `shift` tokens (None: ignored), as a kernel misread would be."""

    def __init__(self, shift):
        from kernels.packed_attention import PaddedSDPA

        self.inner, self.shift, self.name = PaddedSDPA(), shift, "shifted"

    def _w(self, window):
        return None if window is None or self.shift is None else window + self.shift

    def prepare(self, *args):
        return self.inner.prepare(*args)

    def attend(self, qkv, ctx, window=None):
        return self.inner.attend(qkv, ctx, window=self._w(window))

    def attend_first(self, qkv, ctx, first, window=None):
        return self.inner.attend_first(qkv, ctx, first, window=self._w(window))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_check_catches_ignored_and_shifted_windows(dtype):
    """What a GPU actor runs on its kernel before trusting a windowed model: the logits alone cannot show a
    window bug (attention spread over many keys hides which were allowed)."""
    from kernels.packed_attention import PaddedSDPA, check_window

    for window in (8, 64):
        assert check_window(PaddedSDPA(), 4, 16, window, "cpu", dtype) is None
        for shift in (None, 1, -1):
            problem = check_window(_ShiftedWindow(shift), 4, 16, window, "cpu", dtype)
            assert problem is not None and "against the band mask" in problem, (window, shift)


def test_engine_self_check_rejects_a_window_bug(tiny_modernbert):
    from kernels.config import EngineConfig
    from kernels.engine import Engine

    eng = Engine.from_pretrained(tiny_modernbert, EngineConfig(engine="packed"))
    assert eng._self_check(eng.packed) is None
    eng.packed.attn = _ShiftedWindow(None)
    assert "window" in eng._self_check(eng.packed)
