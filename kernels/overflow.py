"""Pairs whose half-precision score came out NaN or infinite are scored again in float32.

fp16 tops out at 65,504. A model whose activations pass that on some inputs (an outlier feature times a
large weight; DeBERTa-v3 rerankers are known for it) gets inf there, then NaN after the next norm, and a NaN
score sorts anywhere: the ranking is wrong and nothing says so. The engine finds such pairs after each call
and hands them here: a float32 copy of the loaded model (made on first need, then kept) scores them through
the Hugging Face model's own padded forward, from the same pair ids. These are rare pairs, so the copy runs
eagerly, in small batches; a batch that runs out of device memory is split, as the engine's are. A pair
still non-finite in float32 stays so: the caller decides (the job rejects it, with its reason).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from kernels.batching import padded_layout, plan_batches
from kernels.pairs import EncodedPairs, PairEncoder

log = logging.getLogger("crossrank.engine")


class Float32Rescorer:
    def __init__(self, model: torch.nn.Module, encoder: PairEncoder, pad_id: int, two_class: bool,
                 device: torch.device, oom_above_tokens: int = 0):
        self.source = model  # the low-precision model: copied and widened on first use only
        self.model = None
        self.encoder = encoder
        self.pad_id = pad_id
        self.two_class = two_class
        self.device = device
        self.oom_above_tokens = oom_above_tokens  # fault injection, as the engine's (tests/test_overflow.py)

    def _float32_model(self) -> torch.nn.Module:
        if self.model is None:
            # Widening the low-precision weights gives the loaded weights exactly; only the arithmetic changes.
            self.model = copy.deepcopy(self.source).to(torch.float32).eval()
            log.warning("scores came out NaN or infinite in %s: rescoring those pairs with a float32 copy of the "
                        "model (kept for the rest of the run)", next(self.source.parameters()).dtype)
        return self.model

    @torch.inference_mode()
    def logits(self, queries: list[str], docs: list[str], max_batch_tokens: int, heartbeat=None) -> np.ndarray:
        """Float32 scores (the engine's rule: logit, or the two-class margin) of the given pairs, in order.
        `max_batch_tokens` bounds a batch's padded tokens (float32 needs about twice fp16's memory a token);
        `heartbeat()` after each batch, as the engine's own (a model that overflows everywhere is rescored
        whole here, which takes a while, and must not look hung)."""
        model = self._float32_model()
        if heartbeat is not None:  # the copy is made on first need: seconds for a large model
            heartbeat()
        enc = self.encoder.encode(queries, docs)
        out = np.empty(len(queries), dtype=np.float32)
        for index in plan_batches(enc.lengths, max_batch_tokens, padded=True, max_batch_size=64, buckets=None):
            self._run(model, enc, index, out)
            if heartbeat is not None:
                heartbeat()
        return out

    def _run(self, model, enc: EncodedPairs, index: np.ndarray, out: np.ndarray) -> None:
        try:
            length = max(1, int(enc.lengths[index].max()))
            if self.oom_above_tokens and len(index) * length > self.oom_above_tokens:
                from kernels.engine import InjectedOOM

                raise InjectedOOM(f"injected out-of-memory: float32 batch of {len(index) * length} tokens")
            arrays = padded_layout(enc, index, length, self.pad_id, self.encoder.template.uses_token_types)
            logits = model(**{k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}).logits.float()
            margin = logits[:, 1] - logits[:, 0] if self.two_class else logits[:, 0]
            out[index] = margin.cpu().numpy()
            return
        except torch.OutOfMemoryError:
            if len(index) == 1:
                raise
        # Out of the handler, whose traceback held the failed forward's activations: now they can be freed.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(index) // 2
        self._run(model, enc, index[:half], out)
        self._run(model, enc, index[half:], out)
