"""Padding-free ("packed", varlen) forward for BERT and (XLM-)RoBERTa sequence-classification cross-encoders
(ModernBERT's is `kernels/packed_modernbert.py`; `from_hf` picks the one a model needs).

A batch is every pair's tokens laid end to end, with no batch dimension and no attention mask:

    input_ids       [T] int64      all pairs' tokens, concatenated
    token_type_ids  [T] int64      or None (RoBERTa/XLM-R: a single type, row 0 of its table)
    position_ids    [T] int64      `position_ids_for(lengths, config)`
    cu_seqlens      [B+1] int32    pair i owns tokens cu_seqlens[i]:cu_seqlens[i+1]; [0] = 0, [-1] = T
    max_seqlen      python int     an upper bound on every length, so it may be a fixed bucket under compile

and the result is logits `[B, num_labels]`, read off each pair's first token exactly as the HF head does.
Embeddings, projections, MLPs and norms run on the T real tokens only; attention alone sees sequence
boundaries (`kernels.packed_attention`).

Static shapes for torch.compile: the engine may pad T up to a fixed bucket with dummy sequences of pad
tokens, and B with zero-length sequences (repeated offsets). Every sequence, dummies included, must be at
most max_seqlen long: the fused kernels size their grids by it. Padding only costs its own rows: logits of
dummy and zero-length sequences are garbage (a zero-length one reads a neighbour's token) for the caller to
drop. `pad_lengths` builds such a length vector.

Weights come from an already loaded `transformers` model by name (`from_hf`): our modules keep the HF
checkpoint names, except that the base-model prefix ("bert." / "roberta.") is dropped and the query, key and
value projections are fused into one `attention.self.qkv` Linear at load time. `_HF_RENAMES` is the only place
names differ.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from kernels.linear import Linear
from kernels.packed_attention import FollowsWeights

# model_type -> head family. "bert": pooler (dense + tanh) then `classifier` Linear. "roberta": the
# RobertaClassificationHead (`classifier.dense` + tanh + `classifier.out_proj`), positions after padding_idx.
_FAMILIES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


class UnsupportedArchitecture(ValueError):
    """The model cannot run on the packed engine; the padded engine (plain HF forward) still can."""


@dataclass
class PackedConfig:
    family: str  # "bert" | "roberta", see _FAMILIES
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    num_labels: int
    layer_norm_eps: float
    hidden_act: object  # an ACT2FN name ("gelu", "gelu_new", ...) or a callable, as HF accepts
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        """First position id of every sequence: 0 for BERT, padding_idx + 1 for RoBERTa/XLM-R."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @classmethod
    def from_hf(cls, config) -> "PackedConfig":
        """Read a `transformers` config; UnsupportedArchitecture for anything this forward would get wrong."""
        model_type = getattr(config, "model_type", None)
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__

        def refuse(why: str) -> UnsupportedArchitecture:
            return UnsupportedArchitecture(
                f"{arch} (model_type={model_type!r}) is not supported by the packed engine: {why}; "
                f"supported model types: {sorted(_FAMILIES)}. Use the padded engine."
            )

        if model_type not in _FAMILIES:
            raise refuse("unknown model type")
        pos_type = getattr(config, "position_embedding_type", None) or "absolute"
        if pos_type != "absolute":
            raise refuse(f"position_embedding_type={pos_type!r} (only 'absolute')")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise refuse("decoder / cross-attention configuration")
        if config.hidden_size % config.num_attention_heads:
            raise refuse(f"hidden_size {config.hidden_size} not divisible by "
                         f"{config.num_attention_heads} heads")
        act = config.hidden_act
        if isinstance(act, str) and act not in ACT2FN:
            raise refuse(f"hidden_act={act!r}")
        pad = config.pad_token_id
        if _FAMILIES[model_type] == "roberta" and pad is None:
            raise refuse("RoBERTa positions need pad_token_id")
        return cls(
            family=_FAMILIES[model_type],
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            num_labels=config.num_labels,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=act,
            pad_token_id=0 if pad is None else pad,
        )


def supports(config) -> bool:
    """True when `config` (a `transformers` config) can run on the packed engine."""
    try:
        _as_packed_config(config)
    except (UnsupportedArchitecture, ValueError, AttributeError, TypeError, KeyError):
        return False  # a config this code cannot read runs on the padded path, not into a crash
    return True


def _as_packed_config(config):
    """PackedConfig, or for ModernBERT its own config (both carry position_offset and the position limit)."""
    from kernels.packed_modernbert import ModernBertPackedConfig

    if isinstance(config, (PackedConfig, ModernBertPackedConfig)):
        return config
    if getattr(config, "model_type", None) == "modernbert":
        return ModernBertPackedConfig.from_hf(config)
    return PackedConfig.from_hf(config)


def from_hf(hf_model: nn.Module, attention: str = "auto") -> nn.Module:
    """The packed twin of a loaded `transformers` classifier: PackedCrossEncoder (BERT, RoBERTa, XLM-R) or
    PackedModernBert; UnsupportedArchitecture for anything else."""
    if getattr(hf_model.config, "model_type", None) == "modernbert":
        from kernels.packed_modernbert import PackedModernBert

        return PackedModernBert.from_hf(hf_model, attention)
    return PackedCrossEncoder.from_hf(hf_model, attention)


def position_ids_for(lengths: np.ndarray | torch.Tensor, config, input_ids: np.ndarray | None = None) -> torch.Tensor:
    """Position ids `[T]` (int64) for packed sequences of `lengths` (`[B]`, zeros allowed), concatenated.

    Each sequence counts from the family's first position: 0..L-1 for BERT, and padding_idx+1 ..
    padding_idx+L for RoBERTa/XLM-R, which is what HF derives from input_ids when a sequence holds no pad
    token. Given the flat `input_ids` (numpy path), RoBERTa/XLM-R follow HF exactly: a pad id inside the text
    (a literal "<pad>") stays at padding_idx and the tokens after it count on from the last real one.
    `config` is a `transformers` config or a PackedConfig.

    numpy in (the engine's CPU batch builder): a CPU tensor sharing the numpy result, no copy.
    Tensor in: a tensor on the same device. Raises ValueError if a position overflows the position table,
    i.e. some sequence (a padding one included) is longer than the model can embed.
    """
    cfg = _as_packed_config(config)
    offset = cfg.position_offset
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.long()
        total = int(lengths.sum())
        starts = torch.cumsum(lengths, 0) - lengths  # [B]
        pos = torch.arange(total, device=lengths.device)
        pos = pos - torch.repeat_interleave(starts, lengths, output_size=total)
        longest = int(lengths.max()) if lengths.numel() else 0
    else:
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths  # [B]
        pos = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
        longest = int(lengths.max()) if lengths.size else 0
        pad = cfg.pad_token_id
        if input_ids is not None and getattr(cfg, "family", None) == "roberta" and (input_ids == pad).any():
            keep = (input_ids != pad).astype(np.int64)
            run = np.concatenate([[0], np.cumsum(keep)])  # non-pad tokens up to each flat position
            counted = run[1:] - np.repeat(run[starts], lengths)  # ... within its sequence, itself included
            pos = np.where(keep == 1, counted - 1, -1)  # + offset below: padding_idx + count; a pad: padding_idx
        pos = torch.from_numpy(pos)
    if longest + offset > cfg.max_position_embeddings:
        raise ValueError(f"a sequence of {longest} tokens overflows {cfg.model_type}'s "
                         f"{cfg.max_position_embeddings}-row position table (first position {offset})")
    return pos + offset  # [T]


def pad_lengths(lengths: np.ndarray, total_tokens: int, num_seqs: int, max_seqlen: int) -> np.ndarray:
    """`lengths` extended to exactly `num_seqs` sequences summing to `total_tokens`, for static shapes.

    The padding tokens go into dummy sequences of at most `max_seqlen` tokens each (so every backend's bound
    holds and positions stay inside the table), then zero-length sequences fill up to `num_seqs`. Feed the
    result to `position_ids_for` and `np.cumsum` for cu_seqlens; fill the padding tokens with pad ids.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    spare = total_tokens - int(lengths.sum())
    if spare < 0:
        raise ValueError(f"{int(lengths.sum())} tokens do not fit in {total_tokens}")
    full, rest = divmod(spare, max_seqlen)
    dummies = [max_seqlen] * full + ([rest] if rest else [])
    if len(lengths) + len(dummies) > num_seqs:
        raise ValueError(f"{len(lengths)} sequences + {len(dummies)} padding ones exceed num_seqs={num_seqs}")
    out = np.zeros(num_seqs, dtype=np.int64)
    out[: len(lengths)] = lengths
    out[len(lengths) : len(lengths) + len(dummies)] = dummies
    return out


def cu_seqlens_for(lengths: np.ndarray) -> torch.Tensor:
    """`[B+1]` int32 cumulative offsets, starting at 0, as the attention kernels want them."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return torch.from_numpy(cu)


# ---------------------------------------------------------------------------------------------- modules
# Module and parameter names follow the HF checkpoint (BertEmbeddings, BertLayer, ...), minus dropout.


class Embeddings(nn.Module):
    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [T, C]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # [T, C], HF's all-zero default
        else:
            x = x + self.token_type_embeddings(token_type_ids)  # [T, C]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    """HF `attention.self` with query/key/value fused into one Linear [C -> 3C] (rows q, then k, then v)."""

    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)

    def forward(self, x, attn, ctx, first=None) -> torch.Tensor:
        """[T, C] -> [T, C]; with `first` ([B] token rows), only those rows' outputs: [B, C]."""
        T = x.shape[0]
        qkv = self.qkv(x).view(T, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        out = attn.attend(qkv, ctx) if first is None else attn.attend_first(qkv, ctx, first)  # [T|B, H, D]
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)  # [T|B, C]


class DenseAddNorm(nn.Module):
    """HF BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseAddNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, attn, ctx, first=None) -> torch.Tensor:
        residual = x if first is None else x[first]  # [T|B, C]
        return self.output(self.self(x, attn, ctx, first), residual)  # [T|B, C]


class Intermediate(nn.Module):
    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act] if isinstance(cfg.hidden_act, str) else cfg.hidden_act

    def forward(self, x) -> torch.Tensor:
        return self.act(self.dense(x))  # [T, I]


class Layer(nn.Module):
    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseAddNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, attn, ctx, first=None) -> torch.Tensor:
        """Every token's new state [T, C]; with `first` ([B] token rows), those rows' only [B, C]."""
        x = self.attention(x, attn, ctx, first)  # [T|B, C]
        return self.output(self.intermediate(x), x)  # [T|B, C]


class Encoder(nn.Module):
    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(first token))."""

    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class RobertaHead(nn.Module):
    """RobertaClassificationHead: out_proj(tanh(dense(<s> token)))."""

    def __init__(self, cfg: PackedConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, x) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


# ---------------------------------------------------------------------------------------------- loading
# The one name table, HF -> ours, first match wins; a None target is ignored on purpose. Names that match
# nothing keep their HF name. Ours: no base-model prefix, and query/key/value become shards of one qkv.
_HF_RENAMES: tuple[tuple[re.Pattern, str | None, int | None], ...] = tuple(
    (re.compile(pattern), target, shard)
    for pattern, target, shard in (
        # index buffers (arange / zeros) that HF keeps for its own padded inputs; we get ids per batch
        (r"^(?:bert|roberta)\.embeddings\.(?:position_ids|token_type_ids)$", None, None),
        (r"^(?:bert|roberta)\.(.+)\.attention\.self\.query\.(weight|bias)$", r"\1.attention.self.qkv.\2", 0),
        (r"^(?:bert|roberta)\.(.+)\.attention\.self\.key\.(weight|bias)$", r"\1.attention.self.qkv.\2", 1),
        (r"^(?:bert|roberta)\.(.+)\.attention\.self\.value\.(weight|bias)$", r"\1.attention.self.qkv.\2", 2),
        (r"^(?:bert|roberta)\.(.+)$", r"\1", None),
    )
)
_QKV_SHARDS = 3


def hf_to_packed_name(hf_name: str) -> tuple[str | None, int | None]:
    """Our parameter name for an HF state name, and the QKV shard it fills (None: the whole tensor).

    (None, None) means the HF tensor is deliberately not used.
    """
    for pattern, target, shard in _HF_RENAMES:
        m = pattern.match(hf_name)
        if m:
            return (m.expand(target) if target is not None else None), shard
    return hf_name, None


class PackedCrossEncoder(FollowsWeights, nn.Module):
    """BERT / (XLM-)RoBERTa sequence classifier over packed tokens; see the module docstring for inputs.

    `attention_backend` names the kernel in use; it is chosen again whenever the model moves
    (`.to(device, dtype)`, `.cuda()`, `.half()`), from the device and dtype of its weights.
    """

    def __init__(self, cfg: PackedConfig, attention: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if cfg.family == "bert":
            self.pooler = Pooler(cfg)
            self.classifier = Linear(cfg.hidden_size, cfg.num_labels)
        else:
            self.pooler = None
            self.classifier = RobertaHead(cfg)
        self._attention_choice = attention
        self._select_kernels()

    def _attention_weight(self) -> torch.Tensor:
        return self.embeddings.word_embeddings.weight

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        T = input_ids.shape[0]
        ctx = self.attn.prepare(cu_seqlens, max_seqlen, T)  # once per forward, shared by every layer
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # [T, C]
        *layers, last = self.encoder.layer
        for layer in layers:
            x = layer(x, self.attn, ctx)  # [T, C]
        # The head reads each sequence's first token only, so the last layer needs every token's keys and
        # values but the queries, output projection and MLP of first tokens alone: exact, and it saves ~3/4
        # of that layer. A zero-length sequence at the very end points past the last token: clamp, its row
        # is discarded.
        first = last(x, self.attn, ctx, cu_seqlens[:-1].long().clamp(max=T - 1))  # [B, C]
        if self.pooler is not None:
            first = self.pooler(first)  # [B, C]
        return self.classifier(first)  # [B, num_labels]

    # -- weights ------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, attention: str = "auto") -> "PackedCrossEncoder":
        """Build from a loaded `transformers` model (Bert/Roberta/XLMRoberta ForSequenceClassification).

        Weights keep the source's dtype and device; unfused ones share its storage (no copy). Raises
        UnsupportedArchitecture for another model type, or when the HF names do not map one to one.
        """
        cfg = PackedConfig.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(cfg, attention="sdpa_padded")
        weights = list(hf_model.named_parameters()) + list(hf_model.named_buffers())
        try:
            model.load_weights(weights)
        except KeyError as e:
            arch = type(hf_model).__name__
            raise UnsupportedArchitecture(
                f"{arch} (model_type={cfg.model_type!r}) does not have the module layout of "
                f"{cfg.model_type} ForSequenceClassification: {e.args[0]}"
            ) from None
        model._attention_choice = attention
        model._select_kernels()
        return model.eval().requires_grad_(False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors through `_HF_RENAMES` (see `load_hf_weights`)."""
        return load_hf_weights(self, weights, hf_to_packed_name)


def load_hf_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], rename) -> set[str]:
    """Set `module`'s parameters from HF-named tensors; return the names of ours that were set.

    `rename(hf_name) -> (our name | None, QKV shard | None)`: None ignores the tensor on purpose; a shard
    index collects query/key/value pieces and concatenates them into one fused tensor. KeyError if an HF
    tensor has no home here, on a shape mismatch, or if any parameter is left unset: every parameter is
    replaced, none keeps its init. Unfused tensors are shared with the source (no copy).
    """
    params = dict(module.named_parameters())
    shards: dict[str, list[torch.Tensor | None]] = {}
    loaded: set[str] = set()
    unused: list[str] = []
    for hf_name, tensor in weights:
        name, shard = rename(hf_name)
        if name is None:
            continue
        if name not in params:
            unused.append(hf_name)
            continue
        if shard is not None:
            shards.setdefault(name, [None] * _QKV_SHARDS)[shard] = tensor.detach()
            if any(s is None for s in shards[name]):
                continue
            tensor = torch.cat(shards.pop(name), dim=0)  # [3C, C] or [3C]
        if tuple(tensor.shape) != tuple(params[name].shape):
            want = tuple(params[name].shape)
            raise KeyError(f"{hf_name}: shape {tuple(tensor.shape)}, expected {want}")
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = nn.Parameter(tensor.detach(), requires_grad=False)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if unused or missing:
        raise KeyError(f"HF weights with no packed home: {unused}; packed weights left unset: {missing}")
    return loaded
