"""Linear layers whose weights are prepacked once for oneDNN when they sit on an x86 CPU.

Why: on a CPU, `F.linear` in fp32 calls MKL with the plain `[out, in]` weight. On the 2-core AMD EPYC
(Zen 4) development box that product ran at 115-145 GFLOP/s for the packed engine's MiniLM-L6 shapes
([4096 x 384] x [384 x 1536] and friends). oneDNN with the weight reordered once into its own blocked layout
ran the same products at 165-220 GFLOP/s: 1.1-1.8x, with 1.3-1.5x typical (BENCHMARKS.md). The arithmetic
is the same fp32, only summed in another order: the error against a float64 product was 4e-6, against
MKL's 3e-6. This is what inductor's CPU weight freezing does, without compiling anything.

`Linear` is an `nn.Linear`, so names, state dicts and `from_hf` loading stay as they were. `prepack(model)`
fills in each `Linear`'s `prepacked` weight, or clears it, for the device and dtype the weights are on now.
The packed models call it whenever they move, are copied or load a state dict
(`kernels.packed_attention.FollowsWeights`). Without a prepacked weight, under `torch.compile`, or once
its weight was replaced, cast or written in place since `prepack` (`Linear.fresh`), `Linear` is plain
`F.linear`: a stale copy never scores.

The cost is a second copy of every Linear weight in CPU memory: +42 MB for MiniLM-L6, +1.2 GB for XLM-R-large.
"""
from __future__ import annotations

import logging
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("crossrank.engine")

BACKENDS = ("auto", "onednn", "aten")
# Measured on x86 only (see above); ARM builds ship oneDNN too, but nobody here has timed it there.
_X86 = platform.machine().lower() in ("x86_64", "amd64")
_DTYPES = (torch.float32, torch.bfloat16)  # fp16 on a CPU: F.linear (the engine warns it rarely pays)
MIN_FEATURES = 128  # see `prepack`


def _onednn_ops():
    """(reorder, linear) from torch's oneDNN bindings, or None when this torch build lacks them."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


class Linear(nn.Linear):
    """`nn.Linear` that runs through oneDNN when `prepack` gave it a prepacked weight (CPU only)."""

    prepacked: torch.Tensor | None = None  # an opaque oneDNN tensor: not a parameter or buffer, never saved
    _packed_from: tuple | None = None  # (weight, its dtype, its version) when `prepacked` was made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # is_compiling() first: torch.compile must never see the opaque tensor (inductor freezes on its own)
        if torch.compiler.is_compiling() or self.prepacked is None or x.device.type != "cpu" or not self.fresh():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, self.bias, "none", [], "")

    def fresh(self) -> bool:
        """True while the prepacked copy matches the weight: the same tensor, dtype and version. A weight
        replaced, cast or written in place (`load_state_dict` copies into it) makes it stale, and a stale
        copy is never used: F.linear runs until the next `prepack`."""
        made = self._packed_from
        w = self.weight
        return made is not None and made[0] is w and made[1:] == (w.dtype, _version(w))

    def __getstate__(self):
        # An opaque oneDNN tensor has no storage to copy or pickle: a copy starts without one and falls back
        # to F.linear until its next `prepack` (the packed models call it when copied, unpickled or moved).
        state = dict(super().__getstate__())
        state.pop("prepacked", None)
        state.pop("_packed_from", None)
        return state


def _version(w: torch.Tensor) -> int | None:
    try:
        return w._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter, and cannot be written either
        return None


def prepack(model: nn.Module, choice: str = "auto") -> str:
    """Prepack or clear every `Linear` of `model` for where its weights are now; return the backend in use.

    "onednn": prepacked (x86 CPU, fp32/bf16, a torch with oneDNN, and a check against `F.linear` passed);
    "aten": plain `F.linear` (any other device or dtype, or `choice="aten"`). `auto` prepacks only layers of
    at least MIN_FEATURES inputs and outputs: below that oneDNN was no faster (a 32 x 96 product ran at a
    third of MKL's speed), and a model with none of them (the tests' tiny models) stays "aten".
    `choice="onednn"` prepacks every layer, and raises ValueError where that cannot run, as a pinned
    attention backend does.
    """
    if choice not in BACKENDS:
        raise ValueError(f"linear backend {choice!r}: choose from {BACKENDS}")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    chosen = [] if choice == "aten" else [
        m for m in linears if choice == "onednn" or min(m.in_features, m.out_features) >= MIN_FEATURES]
    keep = {id(m) for m in chosen}
    for m in linears:
        if id(m) not in keep:
            m.prepacked = m._packed_from = None
    if not chosen:
        return "aten"
    w = chosen[0].weight
    ops = _onednn_ops()
    elsewhere = _not_an_x86_cpu_weight(w)  # not where prepacking is meant to run: F.linear, no warning
    why = elsewhere or (None if ops else "this torch has no oneDNN linear")
    if why is None:
        try:
            for m in chosen:
                if m.prepacked is None or not m.fresh():  # a fresh one stays: `.to()` where the weights are
                    m.prepacked = ops[0](m.weight.detach())
                    m._packed_from = (m.weight, m.weight.dtype, _version(m.weight))
            why = _check(chosen[0])
        except Exception as e:  # a oneDNN build that refuses this shape or dtype, or another op signature
            why = f"{type(e).__name__}: {e}"
    if why is None:
        return "onednn"
    for m in chosen:
        m.prepacked = m._packed_from = None
    if choice == "onednn":
        raise ValueError(f"linear backend 'onednn' cannot run here: {why}")
    if elsewhere is None:
        log.warning("Linear layers stay on F.linear: %s", why)
    return "aten"


def _not_an_x86_cpu_weight(w: torch.Tensor) -> str | None:
    if w.device.type != "cpu":
        return f"weights on {w.device.type}"
    if w.dtype not in _DTYPES:
        return f"{w.dtype} weights"
    if not _X86:
        return "not an x86 CPU"
    return None


def _check(m: Linear) -> str | None:
    """A prepacked product against `F.linear` on odd row counts, or why it disagrees."""
    g = torch.Generator().manual_seed(0)
    for rows in (1, 7, 33):
        x = torch.randn(rows, m.in_features, generator=g).to(m.weight.dtype)
        want = F.linear(x, m.weight, m.bias).float()
        got = m(x).float()
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if not err <= (1e-4 if m.weight.dtype == torch.float32 else 2e-2):
            return f"prepacked product off by {err:.3g} (relative) at {rows} rows"
    return None
