"""Bidirectional attention over packed sequences: flat `[T, 3, H, D]` QKV in, `[T, H, D]` out.

Sequence i owns tokens `cu_seqlens[i]:cu_seqlens[i+1]` and attends only to them. Three backends, one chosen
per (device, dtype) by `select_attention_backend` when the model is placed, never per layer:

    torch_varlen  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), CUDA, fp16/bf16
    flash_attn    `flash_attn.flash_attn_varlen_qkvpacked_func`, CUDA, fp16/bf16, when installed
    sdpa_padded   anything else (CPU, fp32): gather into `[B, L, ...]`, masked SDPA, scatter back

Each backend has `prepare(cu_seqlens, max_seqlen, num_tokens)`, run once per forward, whose result every
layer's `attend(qkv, ctx)` reuses: the padded fallback computes its gather/scatter indices there. The last
layer calls `attend_first(qkv, ctx, first)` instead: only each sequence's first token's output.

`window=w` (ModernBERT's sliding-window layers): token i attends to j only when |i - j| <= w, within its
sequence. torch_varlen takes it where its torch has `window_size`, flash_attn always, sdpa_padded by a band
mask; `select_attention_backend(..., windowed=True)` picks only a backend that can.
"""
from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.linear import prepack as prepack_linears

try:  # torch >= 2.10; the GPU box has 2.11, whose keyword arguments differ from later ones: positional only
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _torch_varlen_attn = None
# Sliding windows arrived in varlen_attn after its first release (2.13 has them; 2.11 is not known to).
try:
    _VARLEN_WINDOW = "window_size" in inspect.signature(_torch_varlen_attn).parameters
except (TypeError, ValueError):  # None, or a signature Python cannot read
    _VARLEN_WINDOW = False

BACKENDS = ("auto", "torch_varlen", "flash_attn", "sdpa_padded")
_HALF = (torch.float16, torch.bfloat16)


def _flash_attn_varlen_qkvpacked():
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func
    except Exception:  # ImportError, or a wheel built against another torch/CUDA
        return None
    return flash_attn_varlen_qkvpacked_func


class _AttendFirstByRows:
    """`attend_first(qkv, ctx, first)`: the outputs of rows `first` ([B]) only, as `[B, H, D]`.

    The last layer needs no more (the head reads first tokens). Fused kernels compute every row and keep
    those: the proven call, and the saving that matters (output projection and MLP) happens after it anyway.
    """

    def attend_first(self, qkv: torch.Tensor, ctx, first: torch.Tensor, window: int | None = None) -> torch.Tensor:
        return self.attend(qkv, ctx, window=window).index_select(0, first)  # [B, H, D]


class TorchVarlen(_AttendFirstByRows):
    """PyTorch's own varlen flash kernel. Needs CUDA, fp16/bf16, head_dim a multiple of 8 up to 256."""

    name = "torch_varlen"

    def prepare(self, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int):
        return cu_seqlens, max_seqlen  # int32 [B+1], python int

    def attend(self, qkv: torch.Tensor, ctx, window: int | None = None) -> torch.Tensor:
        cu, max_seqlen = ctx
        q, k, v = qkv.unbind(1)  # 3 x [T, H, D], rows strided by 3*H*D, last dim contiguous
        # Seven positional arguments: the only call that means the same on torch 2.10 through 2.13.
        if window is None:
            return _torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)  # [T, H, D]
        return _torch_varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, window_size=(window, window))


class FlashAttn(_AttendFirstByRows):
    """Dao-AILab flash-attn 2's varlen kernel on the packed QKV. Same limits as TorchVarlen."""

    name = "flash_attn"

    def __init__(self) -> None:
        self._fn = _flash_attn_varlen_qkvpacked()
        if self._fn is None:
            raise RuntimeError("flash_attn is not importable")

    def prepare(self, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int):
        return cu_seqlens, max_seqlen

    def attend(self, qkv: torch.Tensor, ctx, window: int | None = None) -> torch.Tensor:
        cu, max_seqlen = ctx
        if window is None:  # flash-attn before 2.3 has no window_size: BERT and RoBERTa never pass one
            return self._fn(qkv, cu, max_seqlen, dropout_p=0.0, causal=False)  # [T, H, D]
        return self._fn(qkv, cu, max_seqlen, dropout_p=0.0, causal=False, window_size=(window, window))


@dataclass
class _PaddedIndex:
    gather: torch.Tensor  # [B, L] int64: flat token feeding slot (b, l); slots past a sequence's end: any
    key_mask: torch.Tensor  # [B, 1, 1, L] bool: True where slot (b, l) is a real key of sequence b
    scatter: torch.Tensor  # [T] int64: slot b*L + l that flat token t came from
    batch: int
    length: int
    bands: dict = field(default_factory=dict)  # window -> [B, 1, L, L] mask, built by the first layer that needs it


class PaddedSDPA:
    """Correct everywhere: pad to `[B, L]` inside attention only, everything else stays flat.

    The gather/scatter indices are built once per forward (`prepare`) and reused by every layer, so a layer
    pays two index ops on top of `scaled_dot_product_attention`. L is the longest sequence of the batch when
    running eagerly (one host sync, free on CPU) and `max_seqlen` under torch.compile, so shapes stay static.
    """

    name = "sdpa_padded"

    def prepare(self, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> _PaddedIndex:
        cu = cu_seqlens.long()  # [B+1]
        lengths = cu[1:] - cu[:-1]  # [B]
        batch = lengths.shape[0]
        if torch.compiler.is_compiling():
            length = max_seqlen
        else:
            longest, total = int(lengths.max()), int(cu[-1])
            if longest > max_seqlen:
                raise ValueError(f"a sequence holds {longest} tokens, over max_seqlen={max_seqlen}")
            if total != num_tokens:
                raise ValueError(f"cu_seqlens ends at {total} but there are {num_tokens} tokens")
            length = max(longest, 1)
        slot = torch.arange(length, device=cu.device)  # [L]
        # A padding slot repeats its own sequence's first token, never a neighbour's: masked keys still meet
        # their values (weight 0), and 0 x NaN is NaN, so one pair that overflowed would poison its batch.
        own = torch.where(slot[None, :] < lengths[:, None], slot[None, :], 0)  # [B, L]
        gather = (cu[:-1, None] + own).clamp(max=max(num_tokens - 1, 0))  # [B, L]
        # An empty sequence keeps slot 0 as its one key, so its (discarded) row stays finite rather than NaN.
        key_mask = (slot[None, :] < lengths.clamp(min=1)[:, None])[:, None, None, :]  # [B, 1, 1, L]
        seq = torch.arange(batch, device=cu.device).repeat_interleave(lengths, output_size=num_tokens)  # [T]
        scatter = seq * length + torch.arange(num_tokens, device=cu.device) - cu[seq]  # [T]
        return _PaddedIndex(gather, key_mask, scatter, batch, length)

    def attend(self, qkv: torch.Tensor, ctx: _PaddedIndex, window: int | None = None) -> torch.Tensor:
        T, _, H, D = qkv.shape
        B, L = ctx.batch, ctx.length
        x = qkv.reshape(T, 3 * H * D).index_select(0, ctx.gather.view(-1))  # [B*L, 3*H*D]
        q, k, v = x.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D]
        mask = ctx.key_mask
        if window is not None:
            if window not in ctx.bands:  # the same for every windowed layer of this forward
                slot = torch.arange(L, device=mask.device)
                ctx.bands[window] = mask & ((slot[:, None] - slot[None, :]).abs() <= window)  # [B, 1, L, L]
            mask = ctx.bands[window]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, D]
        out = out.transpose(1, 2).reshape(B * L, H, D)  # [B*L, H, D]
        return out.index_select(0, ctx.scatter)  # [T, H, D]

    def attend_first(self, qkv: torch.Tensor, ctx: _PaddedIndex, first: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
        """One query per sequence (its first token) against all its keys (or the first window+1): `[B, H, D]`."""
        T, _, H, D = qkv.shape
        B, L = ctx.batch, ctx.length
        q = qkv.index_select(0, first)[:, 0].unsqueeze(2)  # [B, H, 1, D]
        kv = qkv[:, 1:].reshape(T, 2 * H * D).index_select(0, ctx.gather.view(-1))  # [B*L, 2*H*D]
        k, v = kv.view(B, L, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, L, D]
        mask = ctx.key_mask
        if window is not None:
            mask = mask & (torch.arange(L, device=mask.device) <= window)  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, 1, D]
        return out.squeeze(2)  # [B, H, D]


def _fast_kernel_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cuda" and dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256


def select_attention_backend(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, prefer: str = "auto", *, windowed: bool = False
):
    """The backend for weights on `device` in `dtype`: torch_varlen > flash_attn > sdpa_padded under "auto";
    with `windowed` (some layers attend through a sliding window), torch_varlen only if its torch has windows.

    A named backend that cannot run there raises ValueError instead of silently falling back.
    """
    device = torch.device(device)
    if prefer not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {prefer!r}")
    fast_ok = _fast_kernel_ok(device, dtype, head_dim)
    varlen_ok = _torch_varlen_attn is not None and (_VARLEN_WINDOW or not windowed)
    if prefer == "auto":
        if fast_ok and varlen_ok:
            return TorchVarlen()
        if fast_ok and _flash_attn_varlen_qkvpacked() is not None:
            return FlashAttn()
        return PaddedSDPA()
    if prefer == "sdpa_padded":
        return PaddedSDPA()
    if not fast_ok:
        raise ValueError(f"{prefer} needs CUDA, float16/bfloat16 and head_dim % 8 == 0 <= 256; "
                         f"got {device.type}, {dtype}, head_dim={head_dim}")
    if prefer == "torch_varlen":
        if _torch_varlen_attn is None:
            raise ValueError(f"torch {torch.__version__} has no nn.attention.varlen.varlen_attn (needs >= 2.10)")
        if not varlen_ok:
            raise ValueError(f"torch {torch.__version__}'s varlen_attn has no window_size (sliding-window layers)")
        return TorchVarlen()
    if _flash_attn_varlen_qkvpacked() is None:
        raise ValueError("flash_attn is not installed")
    return FlashAttn()


@torch.inference_mode()
def check_window(attn, num_heads: int, head_dim: int, window: int, device, dtype) -> str | None:
    """A backend's sliding windows against the padded fallback's band mask, on sharp random attention.

    The engine's logit self-check cannot see a window bug on random-weight or real checkpoints alike
    (attention spread over many keys hides which of them were allowed), so windowed models run this
    too: sequences several windows long, every row compared. None when it agrees, else what went wrong."""
    try:
        lengths = [4 * window + 5, 7, 2 * window + 1, 1, 3 * window]
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        T, longest = int(cu[-1]), max(lengths)
        g = torch.Generator(device="cpu").manual_seed(0)
        # Scaled so each query leans on a few keys (which ones were allowed shows), not so sharp that
        # fp16 rounding of near-tied scores flips them.
        qkv = (torch.randn(T, 3, num_heads, head_dim, generator=g) * 1.5).to(device=device, dtype=dtype)
        ref = PaddedSDPA()
        ctx_ref = ref.prepare(cu, longest, T)
        ctx = attn.prepare(cu, longest, T)
        first = cu[:-1].long()
        for w in sorted({2, window}):
            want = ref.attend(qkv.float(), ctx_ref, window=w)  # [T, H, D]
            got = attn.attend(qkv, ctx, window=w).float()
            got_first = attn.attend_first(qkv, ctx, first, window=w).float()
            for name, a, b in (("attend", got, want), ("attend_first", got_first, want.index_select(0, first))):
                err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))
                if not err <= (1e-4 if dtype == torch.float32 else 3e-2):
                    return f"{attn.name} {name} with window {w}: max error {err:.3g} against the band mask"
        return None
    except Exception as e:  # a kernel this torch/GPU cannot run
        return f"{attn.name} window check: {type(e).__name__}: {e}"


class FollowsWeights:
    """Mixin of the packed models: `self.attn` is the attention backend for the device and dtype of their
    weights, and their `kernels.linear.Linear` layers are prepacked for it (or not), chosen again whenever
    they move (`.to(device, dtype)`, `.cuda()`, `.half()`). A subclass names the weight to look at
    (`_attention_weight`) and whether some layers attend through a window."""

    _attention_choice = "auto"
    _linear_choice = "auto"
    windowed = False

    def _attention_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _select_attention(self) -> None:
        w = self._attention_weight()
        device = torch.device("cpu") if w.device.type == "meta" else w.device
        self.attn = select_attention_backend(device, w.dtype, self.config.head_dim, self._attention_choice,
                                             windowed=self.windowed)
        self.attention_backend: str = self.attn.name

    def _select_kernels(self) -> None:
        self._select_attention()
        self.linear_backend: str = prepack_linears(self, self._linear_choice)

    def set_attention_backend(self, name: str):
        """Pin a backend ("auto", "torch_varlen", "flash_attn", "sdpa_padded"); ValueError if it can't run."""
        self._attention_choice = name
        self._select_attention()
        return self

    def set_linear_backend(self, name: str):
        """Pin how Linear layers run ("auto", "onednn", "aten"; see kernels.linear); ValueError if it can't."""
        self.linear_backend = prepack_linears(self, name)  # raises before pinning a choice that cannot run
        self._linear_choice = name
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._select_kernels()
        return out

    def load_state_dict(self, *args, **kwargs):
        out = super().load_state_dict(*args, **kwargs)
        self._select_kernels()  # new weight values: prepacked copies made from the old ones are stale
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._select_kernels()  # a deep copy or an unpickled model: prepacked weights are never copied
