"""Models for the benchmark: real cross-encoder shapes with random weights, their FLOPs, and device peaks.

Shapes (num_labels=1, sequence classification, as rerankers are served):

    minilm-l6   BERT, hidden 384, 6 layers, 12 heads, FFN 1536, vocab 30522  (cross-encoder/ms-marco-MiniLM-L6-v2)
    bert-base   BERT, hidden 768, 12 layers, 12 heads, FFN 3072, vocab 30522
    xlmr-large  XLM-RoBERTa, hidden 1024, 24 layers, 16 heads, FFN 4096, vocab 250002 (BAAI/bge-reranker-v2-m3;
                its 8194-row position table is capped at 514 = 512 tokens + RoBERTa's offset of 2: same compute)
    modernbert-base  ModernBERT, hidden 768, 22 layers, 12 heads, GeGLU FFN 1152, vocab 50368, a global layer
                then two with a 128-token sliding window, rotary positions, mean pooling
                (Alibaba-NLP/gte-reranker-modernbert-base's encoder; its pooling is taken as mean here)
    tiny, tiny-xlmr, tiny-modernbert   2-3 layers, hidden 32: tests and smoke runs

Weights are random (seeded): `transformers`' own init with a per-shape `initializer_range` (`init_std`), then
every 1-D tensor (biases, LayerNorm gains and shifts) perturbed, so no LayerNorm is an identity and no bias is
zero. The usual 0.02 leaves attention flat and every pair with nearly the same score, against which no
low-precision ranking check means anything; the `init_std` values make scores vary across a shortlist as a
trained reranker's do (measured on CPU, bf16 vs fp32: mean per-query Spearman ~0.99). Scores are meaningless as
relevance; speed does not depend on the values.

FLOPs (`count_flops`), counted from the config, for pairs of real lengths L_i:

    FLOPs = sum_i [ 2 * P_enc * L_i  +  n_layers * 4 * L_i^2 * hidden  +  2 * P_head ]

    P_enc   non-embedding parameters of the encoder layers: per layer the Q, K, V, O projections
            (4 h^2 + 4 h), the FFN (2 h I + I + h) and two LayerNorms (4 h). Each multiplies-and-adds once per
            token: 2 FLOPs per parameter per token.
    4 L^2 h attention scores Q K^T (2 L^2 h) and the weighted sum A V (2 L^2 h), per layer per sequence.
    P_head  the pooler / classification head (h^2 + h + h * labels + labels), run on one token per sequence.

ModernBERT (`ModernBertFlopModel`): P_enc counts its bias-free fused QKV and output projections and its
GeGLU FFN (3 h I), and a sliding-window layer's attention term counts only the keys each query sees
(|i - j| <= local_attention / 2) instead of L^2.

Embedding lookups, softmax, GELU and norms' elementwise work are not counted (conventional; < 1%). Only real
tokens count: padding is work the device did, not work the model needed, so a padded engine's utilisation falls
with its padding efficiency. Engine and anchor are credited the same FLOPs for the same pairs: a standard
forward's, although the packed engine's last layer skips the output projection, MLP and queries of all but
each sequence's first token (about 12.7% of MiniLM-L6's FLOPs at ~150 tokens, 3% of XLM-R-large's), so its
MFU reads that much above the hardware's own utilisation. MFU here compares work done per second, like
pairs/s.

MFU = FLOPs / measured seconds / peak FLOP/s of the device in the run's dtype (`peak_flops`; dense, no
sparsity). None on CPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: dict[str, dict] = {
    "minilm-l6": dict(family="bert", hidden=384, layers=6, heads=12, intermediate=1536, vocab=30522, positions=512,
                      init_std=0.1),
    "bert-base": dict(family="bert", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522, positions=512,
                      init_std=0.04),
    "xlmr-large": dict(family="xlmr", hidden=1024, layers=24, heads=16, intermediate=4096, vocab=250002,
                       positions=514, init_std=0.03),
    "tiny": dict(family="bert", hidden=32, layers=2, heads=4, intermediate=64, vocab=30522, positions=512,
                 init_std=0.2),
    "tiny-xlmr": dict(family="xlmr", hidden=32, layers=2, heads=4, intermediate=64, vocab=250002, positions=514,
                      init_std=0.2),
    "modernbert-base": dict(family="modernbert", hidden=768, layers=22, heads=12, intermediate=1152, vocab=50368,
                            positions=8192, init_std=0.04, local_attention=128),
    "tiny-modernbert": dict(family="modernbert", hidden=32, layers=3, heads=4, intermediate=64, vocab=50368,
                            positions=8192, init_std=0.2, local_attention=16),
}
TOKENIZER_FOR_FAMILY = {"bert": "wordpiece", "xlmr": "unigram", "modernbert": "bpe"}

# Dense peak FLOP/s by device-name substring (longest match wins) and dtype. "tf32" applies to float32 runs
# when torch lets matmuls use TF32 (torch.get_float32_matmul_precision() != "highest").
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"float16": 2250e12, "bfloat16": 2250e12, "tf32": 1100e12, "float32": 80e12},
    "GH200": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "H200 NVL": {"float16": 835e12, "bfloat16": 835e12, "tf32": 418e12, "float32": 60e12},
    "H200": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "H100 PCIe": {"float16": 756e12, "bfloat16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H100 NVL": {"float16": 835e12, "bfloat16": 835e12, "tf32": 418e12, "float32": 60e12},
    "H100": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "H800": {"float16": 989e12, "bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},
    "A100": {"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "A800": {"float16": 312e12, "bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "A10G": {"float16": 70e12, "bfloat16": 70e12, "tf32": 35e12, "float32": 31.2e12},
    "A10": {"float16": 125e12, "bfloat16": 125e12, "tf32": 62.5e12, "float32": 31.2e12},
    "L40S": {"float16": 362e12, "bfloat16": 362e12, "tf32": 183e12, "float32": 91.6e12},
    "L40": {"float16": 181e12, "bfloat16": 181e12, "tf32": 90.5e12, "float32": 90.5e12},
    "L4": {"float16": 121e12, "bfloat16": 121e12, "tf32": 60e12, "float32": 30.3e12},
    "RTX 4090": {"float16": 165e12, "bfloat16": 165e12, "tf32": 82.6e12, "float32": 82.6e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
}
# What the project measured as achievable (large bf16 GEMMs) where known: MFU against it is reported too.
ACHIEVABLE_FLOPS: dict[str, dict[str, float]] = {"H200": {"float16": 790e12, "bfloat16": 790e12}}


def _lookup(table: dict, device_name: str | None, dtype: str) -> float | None:
    if not device_name or device_name == "cpu":
        return None
    key = dtype
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for sub in sorted(table, key=len, reverse=True):
        if sub.lower() in device_name.lower():
            return table[sub].get(key)
    return None


def peak_flops(device_name: str | None, dtype: str) -> float | None:
    """Dense peak FLOP/s of `device_name` (as torch.cuda.get_device_name says it) in `dtype`; None if unknown."""
    return _lookup(PEAK_FLOPS, device_name, dtype)


def achievable_flops(device_name: str | None, dtype: str) -> float | None:
    return _lookup(ACHIEVABLE_FLOPS, device_name, dtype)


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class FlopModel:
    hidden: int
    layers: int
    intermediate: int
    num_labels: int

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return (4 * h * h + 4 * h) + (2 * h * i + i + h) + 4 * h

    @property
    def encoder_params(self) -> int:
        """P_enc: non-embedding parameters of the encoder layers."""
        return self.layers * self.layer_params

    @property
    def head_params(self) -> int:
        """P_head: pooler + classifier (BERT) or dense + out_proj (RoBERTa): the same count."""
        h = self.hidden
        return h * h + h + h * self.num_labels + self.num_labels

    def attention_keys(self, L: np.ndarray) -> np.ndarray:
        """Per layer: sum over one sequence's queries of the keys each attends to, for each length in L."""
        return np.full(self.layers, 1.0)[:, None] * (L * L)[None, :]

    def flops(self, lengths) -> float:
        """Model FLOPs of one forward over pairs of real token `lengths` (see the module docstring)."""
        L = np.asarray(lengths, dtype=np.float64)
        return float(2.0 * self.encoder_params * L.sum() + 4.0 * self.hidden * self.attention_keys(L).sum()
                     + 2.0 * self.head_params * L.size)


@dataclass(frozen=True)
class ModernBertFlopModel(FlopModel):
    """ModernBERT: fused bias-free QKV and output projections, a GeGLU FFN (its input projection 2x wide),
    bias-free LayerNorms (the first layer has no attention norm), and attention that is global in the
    `global_layers` and a sliding window of +-window/2 tokens elsewhere."""

    window: int = 128
    global_layers: tuple[int, ...] = ()
    biases: bool = False  # attention_bias / mlp_bias
    head_bias: bool = True  # classifier_bias (the head's dense layer)
    norm_bias: bool = False

    @property
    def layer_params(self) -> int:
        h, i, n = self.hidden, self.intermediate, 2 if self.norm_bias else 1
        bias = (3 * h + h + 2 * i + h) if self.biases else 0
        return 4 * h * h + 3 * h * i + bias + 2 * n * h

    @property
    def encoder_params(self) -> int:
        return self.layers * self.layer_params - (2 if self.norm_bias else 1) * self.hidden  # layer 0: no attn norm

    @property
    def head_params(self) -> int:
        """Final norm, head dense (+ bias), head norm, classifier."""
        h, n = self.hidden, 2 if self.norm_bias else 1
        return n * h + h * h + (h if self.head_bias else 0) + n * h + h * self.num_labels + self.num_labels

    def attention_keys(self, L: np.ndarray) -> np.ndarray:
        half = self.window // 2
        rows = []
        for layer in range(self.layers):
            if layer in self.global_layers:
                rows.append(L * L)
            else:  # query i sees keys max(0, i-half)..min(L-1, i+half): L(2h+1) less what falls off each end
                edge = np.minimum(L, half)
                cut = 2 * (edge * half - edge * (edge - 1) / 2)  # keys the first/last `half` queries lose
                rows.append(np.where(L <= half + 1, L * L, L * (2 * half + 1) - cut))
        return np.stack(rows)


def flop_model(config) -> FlopModel:
    """From a `transformers` config (or a SHAPES entry)."""
    if isinstance(config, dict):
        return FlopModel(config["hidden"], config["layers"], config["intermediate"], config.get("num_labels", 1))
    if getattr(config, "model_type", None) == "modernbert":
        from kernels.packed_modernbert import global_layers

        return ModernBertFlopModel(
            config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_labels,
            window=config.local_attention, global_layers=global_layers(config),
            biases=bool(config.attention_bias), head_bias=bool(config.classifier_bias),
            norm_bias=bool(config.norm_bias))
    return FlopModel(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_labels)


def count_flops(config, lengths) -> float:
    return flop_model(config).flops(lengths)


# ---------------------------------------------------------------------------------------------- models
def hf_config(shape: str | dict, tokenizer=None):
    """A `transformers` config of a SHAPES entry (dropout off). The tokenizer's special ids go in when given."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    common = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  intermediate_size=s["intermediate"], max_position_embeddings=s["positions"], num_labels=1,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  initializer_range=s.get("init_std", 0.02))
    vocab = s["vocab"]
    if tokenizer is not None and len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the {shape} shape only {vocab} embeddings")
    if s["family"] == "bert":
        from transformers import BertConfig

        pad = tokenizer.pad_token_id if tokenizer is not None else 0
        cfg = BertConfig(vocab_size=vocab, pad_token_id=pad, **common)
        cfg.architectures = ["BertForSequenceClassification"]
    elif s["family"] == "xlmr":
        from transformers import XLMRobertaConfig

        ids = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
        if tokenizer is not None:
            ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
        cfg = XLMRobertaConfig(vocab_size=vocab, type_vocab_size=1, layer_norm_eps=1e-5, **ids, **common)
        cfg.architectures = ["XLMRobertaForSequenceClassification"]
    elif s["family"] == "modernbert":
        from transformers import ModernBertConfig

        ids = dict(pad_token_id=0, cls_token_id=2, sep_token_id=3)  # _BERT_SPECIALS order in bench_data
        if tokenizer is not None:
            ids = dict(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                       sep_token_id=tokenizer.sep_token_id)
        cfg = ModernBertConfig(
            vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["intermediate"], max_position_embeddings=s["positions"], num_labels=1,
            local_attention=s["local_attention"], global_attn_every_n_layers=3, classifier_pooling="mean",
            initializer_range=s.get("init_std", 0.02), bos_token_id=ids["cls_token_id"],
            eos_token_id=ids["sep_token_id"], **ids)
        cfg.architectures = ["ModernBertForSequenceClassification"]
    else:
        raise ValueError(f"unknown family {s['family']!r}")
    return cfg


def build_model(shape: str | dict, tokenizer=None, *, seed: int = 0, init_device: str | torch.device = "cpu"):
    """A random-weight `*ForSequenceClassification` of `shape`, fp32, eval mode, returned on the CPU.

    `init_device="cuda"` runs the (slow on CPU) random init on the GPU and brings the weights back.
    """
    from transformers import AutoModelForSequenceClassification

    cfg = hf_config(shape, tokenizer)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    init_device = torch.device(init_device)
    with torch.device(init_device):
        model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")
    g = torch.Generator(device=init_device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # biases, LayerNorm weight/bias: transformers inits them to constants
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * 0.02)
    return model.to("cpu").eval().requires_grad_(False)


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A private copy: Engine.from_model casts and moves the model it is given in place."""
    return copy.deepcopy(model)


def param_counts(model: torch.nn.Module) -> dict:
    """Actual parameter counts, split as the FLOP model splits them (for checking it)."""
    emb = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in f".{n}")
    enc = sum(p.numel() for n, p in model.named_parameters() if ".encoder." in f".{n}" or ".layers." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    return {"embedding": emb, "encoder": enc, "head": total - emb - enc, "total": total}
