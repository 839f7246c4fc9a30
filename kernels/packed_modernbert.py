"""Padding-free forward for ModernBERT sequence-classification cross-encoders (gte-reranker-modernbert-base
and the like), on the same packed inputs as `kernels.packed.PackedCrossEncoder`:

    input_ids [T], token_type_ids (ignored: ModernBERT has none), position_ids [T] (0..L-1 per sequence),
    cu_seqlens [B+1] int32, max_seqlen  ->  logits [B, num_labels]

What differs from BERT, each matched to `transformers`' ModernBertForSequenceClassification:
- no position table: rotary embeddings on queries and keys, computed in fp32 from each token's position,
  with one base (theta) for global layers and another for sliding-window ones;
- pre-norm layers with LayerNorms that may have no bias; the first layer has no attention norm;
- fused QKV (`attn.Wqkv`, as in the checkpoint), a GeGLU MLP (`mlp.Wi` gives input and gate halves);
- attention global in some layers, and in the others a sliding window: token i sees j with |i - j| <= w,
  w = local_attention / 2, inside its own sequence (the backends take `window=w`);
- a final norm, then the head on each sequence's first token ("cls" pooling) or on the mean of its tokens
  ("mean"), then dense, activation, norm, classifier.

Parameter names are the checkpoint's minus the `model.` prefix, so weights load one to one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from kernels.packed import UnsupportedArchitecture, load_hf_weights
from kernels.linear import Linear
from kernels.packed_attention import FollowsWeights


def global_layers(config) -> tuple[int, ...]:
    """Indices of a ModernBERT config's global-attention layers (the rest use the sliding window)."""
    types = getattr(config, "layer_types", None)  # transformers 5; 4.x says global_attn_every_n_layers
    if types:
        return tuple(i for i, t in enumerate(types) if t == "full_attention")
    return tuple(range(0, config.num_hidden_layers, config.global_attn_every_n_layers))


@dataclass
class ModernBertPackedConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_labels: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    classifier_bias: bool
    hidden_act: str
    classifier_act: str
    pooling: str  # "cls" | "mean"
    window: int  # sliding-window layers: |i - j| <= window
    global_layers: tuple[int, ...]
    global_theta: float
    local_theta: float
    pad_token_id: int

    position_offset = 0  # rotary positions count from 0 in every sequence

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config) -> "ModernBertPackedConfig":
        """Read a `transformers` ModernBertConfig (4.x or 5.x field names); UnsupportedArchitecture for what
        this forward would get wrong."""
        n = config.num_hidden_layers
        rope = getattr(config, "rope_parameters", None) or {}
        global_theta = _theta(rope, "full_attention", getattr(config, "global_rope_theta", None))
        local_theta = _theta(rope, "sliding_attention", getattr(config, "local_rope_theta", None) or global_theta)
        pooling = getattr(config, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise _refuse(f"classifier_pooling={pooling!r} (only 'cls' and 'mean')")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(config, name) not in ACT2FN:
                raise _refuse(f"{name}={getattr(config, name)!r}")
        if config.hidden_size % config.num_attention_heads:
            raise _refuse(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
        return cls(
            model_type=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_layers=n, num_heads=config.num_attention_heads, intermediate_size=int(config.intermediate_size),
            max_position_embeddings=config.max_position_embeddings, num_labels=config.num_labels,
            norm_eps=config.norm_eps, norm_bias=bool(config.norm_bias), attention_bias=bool(config.attention_bias),
            mlp_bias=bool(config.mlp_bias), classifier_bias=bool(config.classifier_bias),
            hidden_act=config.hidden_activation, classifier_act=config.classifier_activation, pooling=pooling,
            window=int(config.local_attention) // 2, global_layers=global_layers(config),
            global_theta=float(global_theta), local_theta=float(local_theta),
            pad_token_id=int(config.pad_token_id or 0),
        )


def _refuse(why: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(f"ModernBERT (model_type='modernbert') is not supported by the packed engine: "
                                   f"{why}. Use the padded engine.")


def _theta(rope: dict, layer_type: str, fallback) -> float:
    params = rope.get(layer_type) if isinstance(rope, dict) else None
    if params:
        if params.get("rope_type", "default") != "default":
            raise _refuse(f"rope_type={params['rope_type']!r} for {layer_type} (only 'default')")
        return params["rope_theta"]
    if fallback is None:
        raise _refuse(f"no rotary base for {layer_type}")
    return fallback


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, H, D] in fp32 math, as HF applies it (HF also rounds cos/sin to the
    activation dtype first; kept in fp32 here, which is closer to the fp32 model), cos/sin [T, 1, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModernBertPackedConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.Wqkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.Wo = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, rope, attn, ctx, window, first=None) -> torch.Tensor:
        """[T, C] -> [T, C]; with `first` ([B] token rows), only those rows' outputs: [B, C]."""
        T = x.shape[0]
        qkv = self.Wqkv(x).view(T, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        cos, sin = rope
        q, k = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin)
        qkv = torch.stack((q, k, qkv[:, 2]), dim=1)  # [T, 3, H, D], contiguous for the kernels
        if first is None:
            out = attn.attend(qkv, ctx, window=window)  # [T, H, D]
        else:
            out = attn.attend_first(qkv, ctx, first, window=window)  # [B, H, D]
        return self.Wo(out.reshape(out.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModernBertPackedConfig) -> None:
        super().__init__()
        self.Wi = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.hidden_act]
        self.Wo = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate)


class Layer(nn.Module):
    def __init__(self, cfg: ModernBertPackedConfig, index: int) -> None:
        super().__init__()
        norm = lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)  # noqa: E731
        self.attn_norm = nn.Identity() if index == 0 else norm()
        self.attn = Attention(cfg)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)
        self.window = None if index in cfg.global_layers else cfg.window

    def forward(self, x, rope, attn, ctx, first=None) -> torch.Tensor:
        residual = x if first is None else x[first]  # [T|B, C]
        x = residual + self.attn(self.attn_norm(x), rope, attn, ctx, self.window, first)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModernBertPackedConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def forward(self, input_ids) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class Head(nn.Module):
    def __init__(self, cfg: ModernBertPackedConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.classifier_bias)
        self.act = ACT2FN[cfg.classifier_act]
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def forward(self, x) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class PackedModernBert(FollowsWeights, nn.Module):
    """ModernBertForSequenceClassification over packed tokens; the interface of PackedCrossEncoder."""

    def __init__(self, cfg: ModernBertPackedConfig, attention: str = "auto") -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        self.head = Head(cfg)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels)
        self._attention_choice = attention
        self._select_kernels()

    def _attention_weight(self) -> torch.Tensor:
        return self.embeddings.tok_embeddings.weight

    @property
    def windowed(self) -> bool:
        return len(self.config.global_layers) < self.config.num_layers

    # -- forward ------------------------------------------------------------------------------------
    def _rope(self, position_ids: torch.Tensor, theta: float):
        """cos, sin [T, 1, D] in fp32. The frequencies are made here, on the ids' device and in fp32,
        rather than kept as buffers that `.half()` would round."""
        D = self.config.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=position_ids.device, dtype=torch.float32) / D))
        freqs = position_ids.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos(), emb.sin()

    def forward(self, input_ids, token_type_ids, position_ids, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        T = input_ids.shape[0]
        ctx = self.attn.prepare(cu_seqlens, max_seqlen, T)
        ropes = {True: self._rope(position_ids, self.config.global_theta),
                 False: self._rope(position_ids, self.config.local_theta)}
        x = self.embeddings(input_ids)  # [T, C]
        *layers, last = self.layers
        for layer in layers:
            x = layer(x, ropes[layer.window is None], self.attn, ctx)
        starts = cu_seqlens[:-1].long()
        if self.config.pooling == "cls":
            # Only first tokens are read: the last layer's queries, projection and MLP run on those alone.
            first = last(x, ropes[last.window is None], self.attn, ctx, starts.clamp(max=T - 1))  # [B, C]
            pooled = self.final_norm(first)
        else:
            x = self.final_norm(last(x, ropes[last.window is None], self.attn, ctx))  # [T, C]
            lengths = cu_seqlens[1:].long() - starts  # [B]
            seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths, output_size=T)
            sums = torch.zeros(lengths.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
            sums.index_add_(0, seq, x.float())  # fp32 sums, as HF's mean over a padded batch
            pooled = (sums / lengths.clamp(min=1)[:, None]).to(x.dtype)  # [B, C]; empty sequences: 0
        return self.classifier(self.head(pooled))  # [B, num_labels]

    # -- weights ------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: nn.Module, attention: str = "auto") -> "PackedModernBert":
        cfg = ModernBertPackedConfig.from_hf(hf_model.config)
        with torch.device("meta"):
            model = cls(cfg, attention="sdpa_padded")
        try:
            model.load_weights(list(hf_model.named_parameters()))
        except KeyError as e:
            raise UnsupportedArchitecture(f"{type(hf_model).__name__} does not have the module layout of "
                                          f"ModernBertForSequenceClassification: {e.args[0]}") from None
        model._attention_choice = attention
        model._select_kernels()
        return model.eval().requires_grad_(False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names minus `model.` (see `kernels.packed.load_hf_weights`)."""
        return load_hf_weights(self, weights, lambda hf_name: (hf_name.removeprefix("model."), None))
