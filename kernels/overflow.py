"""Pairs whose half-precision score came out NaN or infinite are scored again in float32.

fp16 tops out at 65,504. A model whose activations pass that on some inputs (an outlier feature times a
large weight; DeBERTa-v3 rerankers are known for it) gets inf there, then NaN after the next norm, and a NaN
score sorts anywhere: the ranking is wrong and nothing says so. The engine finds such pairs after each call
and hands them here: a float32 copy of the loaded model (made on first need, then kept) scores them through
the Hugging Face model's own padded forward, from the same pair ids. These are rare pairs, so the copy runs
eagerly, in small batches. A pair still non-finite in float32 stays so: the caller decides (the job
rejects it, with its reason).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from kernels.batching import padded_layout, plan_batches
from kernels.pairs import PairEncoder

log = logging.getLogger("crossrank.engine")


class Float32Rescorer:
    def __init__(self, model: torch.nn.Module, encoder: PairEncoder, pad_id: int, two_class: bool,
                 max_batch_tokens: int, device: torch.device):
        self.source = model  # the low-precision model: copied and widened on first use only
        self.model = None
        self.encoder = encoder
        self.pad_id = pad_id
        self.two_class = two_class
        self.budget = max_batch_tokens
        self.device = device

    def _float32_model(self) -> torch.nn.Module:
        if self.model is None:
            # Widening the low-precision weights gives the loaded weights exactly; only the arithmetic changes.
            self.model = copy.deepcopy(self.source).to(torch.float32).eval()
            log.warning("scores came out NaN or infinite in %s: rescoring those pairs with a float32 copy of the "
                        "model (kept for the rest of the run)", next(self.source.parameters()).dtype)
        return self.model

    @torch.inference_mode()
    def logits(self, queries: list[str], docs: list[str]) -> np.ndarray:
        """Float32 scores (the engine's rule: logit, or the two-class margin) of the given pairs, in order."""
        model = self._float32_model()
        enc = self.encoder.encode(queries, docs)
        out = np.empty(len(queries), dtype=np.float32)
        use_types = self.encoder.template.uses_token_types
        for index in plan_batches(enc.lengths, self.budget, padded=True, max_batch_size=64, buckets=None):
            length = max(1, int(enc.lengths[index].max()))
            batch = {k: torch.from_numpy(v).to(self.device)
                     for k, v in padded_layout(enc, index, length, self.pad_id, use_types).items()}
            logits = model(**batch).logits.float()
            margin = logits[:, 1] - logits[:, 0] if self.two_class else logits[:, 0]
            out[index] = margin.cpu().numpy()
        return out
