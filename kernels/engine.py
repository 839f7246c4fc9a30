"""The engine: (query, passage) pairs in, float32 scores out, in input order. Usable without Ray.

    engine = Engine.from_pretrained("cross-encoder/ms-marco-MiniLM-L6-v2")
    scores, stats = engine.score(queries, passages)

Pipeline per call: pairs are cut into chunks; worker threads tokenize chunk k+1 (Rust, GIL released) and
lay out its batches in pinned host memory while the device runs chunk k. Batches are copied on a side
stream, logits stay on the device until the chunk ends, then come back in one copy. A batch that runs out
of device memory is split in two and retried, and the token budget is lowered for the rest of the call.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict, field

import numpy as np
import torch

from kernels.batching import LENGTH_BUCKETS, PACKED_TOTAL_MULTIPLE, padded_layout, padded_length, plan_batches
from kernels.config import EngineConfig
from kernels.loading import (
    LoadedModel, check_head, cpu_threads, load_model, resolve_device, resolve_dtype, saved_dtype,
)
from kernels.pairs import EncodedPairs, PairEncoder, scatter_segments as _gather

MIN_BATCH_TOKENS = 256
log = logging.getLogger("crossrank.engine")


@dataclass
class ScoreStats:
    pairs: int = 0
    duplicate_pairs: int = 0  # identical (query, passage) pairs scored once and the score shared
    truncated_pairs: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0  # tokens the device computed, padding included
    batches: int = 0
    tokenize_s: float = 0.0  # thread time spent tokenizing and laying out batches (overlaps model_s)
    model_s: float = 0.0  # time the caller waited on the device loop
    wall_s: float = 0.0
    oom_splits: int = 0
    float32_rescored: int = 0  # distinct pairs whose low-precision score was NaN/inf, mended in float32
    nonfinite: int = 0  # distinct pairs whose score is NaN/inf even so (the model itself): the caller decides
    max_batch_tokens: int = 0  # the budget in force at the end (lower than configured after an OOM)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens if self.computed_tokens else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "padding_efficiency": self.padding_efficiency}


@dataclass
class _HostBatch:
    index: np.ndarray  # [B] positions of these pairs in the chunk
    tensors: dict  # name -> CPU tensor (pinned on CUDA)
    real_tokens: int
    computed_tokens: int
    max_seqlen: int = 0  # packed: bound on every sequence's length, a bucket value so compiled graphs repeat


@dataclass
class _Chunk:
    start: int
    enc: EncodedPairs
    batches: list = field(default_factory=list)
    tokenize_s: float = 0.0


def chunk_starts(n: int, chunk_pairs: int, first: int = 256) -> list[int]:
    """Chunk boundaries `[0, ..., n]`: sizes double from `first` up to `chunk_pairs`.

    Only the first chunk's tokenization is not hidden under the device, so it is small; each later chunk
    is at most twice the one the device runs meanwhile, so it is ready in time (tokenizing a pair costs a
    fraction of scoring it). Every shard of a job starts this way, which is what makes it matter.
    """
    bounds, size = [0], min(first, chunk_pairs)
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + size))
        size = min(2 * size, chunk_pairs)
    return bounds


class InjectedOOM(torch.OutOfMemoryError):
    """Raised by the fault-injection setting `oom_above_tokens`, so CPU tests exercise the OOM path."""


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.model.config
        self.max_length = min(cfg.max_length or loaded.max_length, loaded.max_length)
        self.encoder = PairEncoder(self.tokenizer, self.max_length)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        check_head(self.config)
        self.two_class = self.config.num_labels == 2  # scored as the margin logit[1] - logit[0]
        cuda = device.type == "cuda"
        self.configured_budget = cfg.max_batch_tokens or (16384 if cuda else 4096)
        self.budget = self.configured_budget  # lowered after an out-of-memory error, for the rest of one call
        self.kind, self.packed, self.attention_backend = self._choose_engine(cfg.engine)
        self.compiled = bool(cfg.compile if cfg.compile is not None else cuda)
        # Fixed shapes (padded sequence count) only pay off when a compiled graph replays them; the padded-SDPA
        # fallback would pad attention to every (mostly empty) sequence slot, so it goes without.
        self.static_shapes = self.compiled and cuda and self.attention_backend != "sdpa_padded"
        self.buckets = LENGTH_BUCKETS if cuda else None  # bucketed shapes: compiled graphs and tensor cores
        # Packed token totals rounded up so a compiled forward meets few shapes; eager needs no rounding.
        self.total_multiple = PACKED_TOTAL_MULTIPLE if self.compiled else 1
        self._forward = self._packed_logits if self.kind == "packed" else self._padded_logits
        if self.compiled:
            # dynamic=True: one graph for every token total and max_seqlen. Left automatic, the first call
            # compiles static shapes and the second recompiles dynamic ones: twice the start-up.
            self._forward = torch.compile(self._forward, mode=cfg.extra.get("compile_mode"), dynamic=True)
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.rescorer = None  # kernels.overflow.Float32Rescorer, made when a low-precision score is NaN/inf
        self._warned_overflow = False
        self.oom_above_tokens = int(cfg.extra.get("oom_above_tokens") or os.environ.get("CROSSRANK_FAULT_OOM_ABOVE_TOKENS", 0))
        self.batch_sleep_s = float(cfg.extra.get("batch_sleep_s") or 0)  # fault injection: a slow device
        # Called after every batch: the job's actors report it as proof of life (a wedged device stops it).
        self.heartbeat = None
        if not cuda:
            torch.set_num_threads(cpu_threads())
            if dtype == torch.float16:
                log.warning("float16 on CPU is faster than float32 only where the CPU has AVX512-FP16 or AMX "
                            "(measured 1.04-1.2x on a 2-core Sapphire Rapids), and slower elsewhere")

    @classmethod
    def from_pretrained(cls, name_or_path: str, cfg: EngineConfig | None = None, *, revision: str | None = None,
                        trust_remote_code: bool = False) -> "Engine":
        cfg = cfg or EngineConfig()
        device = resolve_device(cfg.device)
        saved = saved_dtype(name_or_path, revision, trust_remote_code) if cfg.dtype == "auto" else None
        dtype = resolve_dtype(cfg.dtype, device, saved)
        loaded = load_model(name_or_path, device=device, dtype=dtype, revision=revision,
                            trust_remote_code=trust_remote_code)
        return cls(loaded, cfg, device, dtype)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, cfg: EngineConfig | None = None) -> "Engine":
        """Wrap an in-memory `*ForSequenceClassification` (benchmarks build random-weight models this way)."""
        from kernels.loading import model_max_length

        cfg = cfg or EngineConfig()
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device, getattr(model.config, "dtype", None))
        model = model.eval().to(device=device, dtype=dtype)
        return cls(LoadedModel(model, tokenizer, model_max_length(model.config, tokenizer, model)), cfg, device, dtype)

    def _padded_attention(self) -> str:
        return getattr(self.config, "_attn_implementation", None) or "sdpa"  # "eager": models without SDPA

    def _choose_engine(self, wanted: str):
        if wanted == "padded":
            return "padded", None, self._padded_attention()
        from kernels import packed

        if not packed.supports(self.config):
            if wanted == "packed":
                raise packed.UnsupportedArchitecture(
                    f"--engine packed does not support {self.config.model_type!r} "
                    f"({', '.join(self.config.architectures or [])}); use --engine padded or auto")
            return "padded", None, self._padded_attention()
        model = packed.from_hf(self.model).to(device=self.device, dtype=self.dtype).eval()
        if self.device.type == "cuda":
            from kernels.packed_attention import _flash_attn_varlen_qkvpacked

            fallbacks = ["flash_attn"] if _flash_attn_varlen_qkvpacked() is not None else []
            for backend in dict.fromkeys([model.attention_backend, *fallbacks, "sdpa_padded"]):
                try:  # a fallback may not take this dtype (flash kernels are fp16/bf16 only): try the next
                    problem = self._self_check(model.set_attention_backend(backend))
                except ValueError as e:
                    problem = str(e)
                if problem is None:
                    return "packed", model, model.attention_backend
                log.warning("packed engine with %s attention failed its self-check (%s)", backend, problem)
            if wanted == "packed":
                raise RuntimeError("--engine packed failed its self-check on this device; see the log")
            return "padded", None, self._padded_attention()
        return "packed", model, model.attention_backend

    @torch.inference_mode()
    def _self_check(self, model) -> str | None:
        """Packed logits of a few odd-length pairs (and a zero-length dummy) against the HF model's own.

        Both are measured against the HF model in fp32: in fp16/bf16 two correct implementations differ by
        rounding, which on random weights reaches 0.15 relative in bf16 (measured), while the bugs this
        catches (offsets, positions, a kernel misread) are off by order 1. So the packed error may be a few
        times the HF model's own low-precision error, with a small floor."""
        from kernels.packed import position_ids_for
        from kernels.packed_attention import check_window

        window = getattr(model.config, "window", None)  # ModernBERT's sliding-window layers
        if window:
            problem = check_window(model.attn, model.config.num_heads, model.config.head_dim, window, self.device,
                                   self.dtype)
            if problem is not None:
                return problem
        try:
            lengths = np.array([5, 17, 1, 33, 9, 0], dtype=np.int64)
            if window and 2 * window + 1 < self.max_length:  # a pair well past the window, through the model too
                lengths = np.insert(lengths, 2, min(4 * window + 3, self.max_length))
            max_seqlen = padded_length(int(lengths.max()))
            real = int((lengths > 0).sum())
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(5, min(100, self.config.vocab_size), (int(lengths.sum()),), generator=g)
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
            types = torch.zeros_like(ids) if self.encoder.template.uses_token_types else None
            dev = lambda t: None if t is None else t.to(self.device)  # noqa: E731
            got = model(dev(ids), dev(types), dev(position_ids_for(lengths, self.config)), dev(cu),
                        max_seqlen)[:real].float()
            exact = self.dtype == torch.float32
            reference = self.model if exact else copy.deepcopy(self.model).float()
            want, want_low = [], []
            for a, b in zip(cu[:real].tolist(), cu[1:real + 1].tolist()):
                seq = ids[a:b][None].to(self.device)
                kw = {"token_type_ids": torch.zeros_like(seq)} if types is not None else {}
                want.append(reference(input_ids=seq, **kw).logits[0].float())
                want_low.append(self.model(input_ids=seq, **kw).logits[0].float())
            del reference
            want, want_low = torch.stack(want), torch.stack(want_low)
            scale = want.norm().clamp(min=1e-6)
            err, err_hf = float((got - want).norm() / scale), float((want_low - want).norm() / scale)
            floor = 1e-3 if exact else 1e-2
            # An fp16 reference that overflowed says nothing of the packed model: judge that by the floor alone
            # (NaN would reject every backend, inf would pass any).
            bound = max(3 * err_hf, floor) if math.isfinite(err_hf) else floor
            if err <= bound and torch.isfinite(got).all():
                return None
            return f"relative error {err:.3g} against fp32, over the bound {bound:.3g} (HF in {self.dtype}: {err_hf:.3g})"
        except Exception as e:  # a kernel this torch/GPU cannot run
            return f"{type(e).__name__}: {e}"

    def describe(self) -> dict:
        """What scored: recorded in stats and the manifest."""
        return {
            "engine": self.kind,
            "attention": self.attention_backend,
            "linear": getattr(self.packed, "linear_backend", "aten"),  # kernels.linear: oneDNN-prepacked or not
            "truncation": self.encoder.truncation.rule,  # kernels.truncation: how pairs over max_length were cut
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "dtype": str(self.dtype).removeprefix("torch."),
            "compiled": self.compiled,
            "max_length": self.max_length,
            "max_batch_tokens": self.budget,
            "model_type": self.config.model_type,
        }

    # ---- forward passes (pure functions of tensors: the compiled region) ----
    def _padded_logits(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

    def _packed_logits(self, input_ids, position_ids, cu_seqlens, token_type_ids=None, max_seqlen: int = 512):
        return self.packed(input_ids, token_type_ids, position_ids, cu_seqlens, max_seqlen)

    # ---- host-side batch layout (runs in tokenizer threads) ----
    def _host_batch(self, enc: EncodedPairs, index: np.ndarray) -> _HostBatch:
        lengths = enc.lengths[index]
        starts = enc.offsets[:-1][index]
        use_types = self.encoder.template.uses_token_types
        if self.kind == "padded":
            L = min(padded_length(int(lengths.max()), self.buckets), self.max_length)  # within the position table
            t = padded_layout(enc, index, L, self.pad_id, use_types)
            computed = len(index) * L
        else:
            from kernels.packed import position_ids_for

            real = int(lengths.sum())
            total = -(-real // self.total_multiple) * self.total_multiple
            ids = np.full(total, self.pad_id, dtype=np.int64)
            dst = np.cumsum(lengths) - lengths
            _gather(ids, dst, enc.ids, starts, lengths)
            # Every sequence, dummies included, must fit max_seqlen (the kernels size their tiles by it) and
            # the position table: the padding tail is cut into dummy sequences no longer than the longest real one.
            max_seqlen = padded_length(int(lengths.max()))
            piece = min(max_seqlen, self.max_length)
            tail = total - real
            seq_lens = np.append(lengths, [piece] * (tail // piece) + ([tail % piece] if tail % piece else []))
            if self.static_shapes:  # a fixed count of sequences: zero-length ones keep the shape constant
                # room for the real pairs and the dummies: at most a rounding tail cut into pieces >= `shortest`
                shortest = min(LENGTH_BUCKETS[0], self.max_length)
                fixed = self.cfg.max_batch_size + 2 + PACKED_TOTAL_MULTIPLE // shortest
                seq_lens = np.append(seq_lens, np.zeros(fixed - len(seq_lens), np.int64))
            cu = np.zeros(len(seq_lens) + 1, dtype=np.int32)
            np.cumsum(seq_lens, out=cu[1:])
            # The ids too: RoBERTa positions skip a pad token typed in the text, as HF's do.
            positions = np.asarray(position_ids_for(seq_lens, self.config, ids), np.int64)
            t = {"input_ids": ids, "position_ids": positions, "cu_seqlens": cu}
            if use_types:
                types = np.zeros(total, dtype=np.int64)
                _gather(types, dst, enc.type_ids, starts, lengths)
                t["token_type_ids"] = types
            computed = total
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
        if self.device.type == "cuda":
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return _HostBatch(index=index, tensors=tensors, real_tokens=int(lengths.sum()), computed_tokens=computed,
                          max_seqlen=max_seqlen if self.kind == "packed" else 0)

    def _prepare(self, start: int, queries: list[str], docs: list[str]) -> _Chunk:
        t0 = time.perf_counter()
        enc = self.encoder.encode(queries, docs)
        plan = plan_batches(enc.lengths, self.budget, padded=self.kind == "padded",
                            max_batch_size=self.cfg.max_batch_size, sort=self.cfg.bucketing, buckets=self.buckets)
        chunk = _Chunk(start=start, enc=enc, batches=[self._host_batch(enc, b) for b in plan])
        chunk.tokenize_s = time.perf_counter() - t0
        return chunk

    # ---- device side ----
    def _to_device(self, hb: _HostBatch):
        if self.copy_stream is None:
            return hb.tensors, None
        with torch.cuda.stream(self.copy_stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in hb.tensors.items()}
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return dev, event

    def _stage(self, hb: _HostBatch):
        """The batch's copy to the device, started early; None when memory is short (it copies again later,
        inside the batch's own out-of-memory handling, which splits it)."""
        try:
            return self._to_device(hb)
        except torch.OutOfMemoryError:
            return None

    def _launch(self, hb: _HostBatch, dev: dict, event) -> torch.Tensor:
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for v in dev.values():
                v.record_stream(stream)
        if self.oom_above_tokens and hb.computed_tokens > self.oom_above_tokens:
            raise InjectedOOM(f"injected out-of-memory: batch of {hb.computed_tokens} tokens")
        kwargs = dict(dev)
        if self.kind == "packed":
            kwargs["max_seqlen"] = hb.max_seqlen
        try:
            logits = self._forward(**kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if not self.compiled:
                raise
            # A compiler failure must not sink a 100M-pair job: fall back to eager, say so in stats.
            log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, e)
            self.compiled = False
            self._forward = self._packed_logits if self.kind == "packed" else self._padded_logits
            logits = self._forward(**kwargs)
        logits = logits[: len(hb.index)].to(torch.float32)
        # A copy even in fp32: under CUDA graphs the output buffer is overwritten by the next replay.
        return logits[:, 1] - logits[:, 0] if self.two_class else logits[:, 0].clone()

    def _run_batch(self, enc: EncodedPairs, hb: _HostBatch, staged, stats: ScoreStats) -> list:
        """Logits of one batch as [(index, logits)]; splits and retries on device out-of-memory."""
        # The budget bounds real tokens of packed batches (compiled totals round up past it) and padded slots.
        cost = hb.real_tokens if self.kind == "packed" else hb.computed_tokens
        if cost > self.budget and len(hb.index) > 1:
            staged = None  # planned under a budget that has since been lowered: re-cut before running
        else:
            try:
                dev, event = staged if staged is not None else self._to_device(hb)
                logits = self._launch(hb, dev, event)
                stats.batches += 1
                stats.real_tokens += hb.real_tokens
                stats.computed_tokens += hb.computed_tokens
                return [(hb.index, logits)]
            except torch.OutOfMemoryError:
                if len(hb.index) == 1:
                    raise
            # Out of the handler, whose traceback held the failed forward's activations: now they can be freed.
            staged = dev = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            stats.oom_splits += 1
            before, self.budget = self.budget, max(MIN_BATCH_TOKENS, hb.computed_tokens // 2)
            log.warning("device out of memory on a batch of %d pairs (%d tokens): split in two and retried; "
                        "token budget %d -> %d for the rest of the call", len(hb.index), hb.computed_tokens,
                        before, self.budget)
        half = len(hb.index) // 2
        out = []
        for part in (hb.index[:half], hb.index[half:]):
            out += self._run_batch(enc, self._host_batch(enc, part), None, stats)
        return out

    def _run_chunk(self, chunk: _Chunk, scores: np.ndarray, stats: ScoreStats) -> None:
        results = []
        staged = self._stage(chunk.batches[0]) if chunk.batches else None
        for k, hb in enumerate(chunk.batches):
            current = staged
            # Queue the next batch's copy before this batch's kernels, so the copy hides under compute.
            staged = self._stage(chunk.batches[k + 1]) if k + 1 < len(chunk.batches) else None
            results += self._run_batch(chunk.enc, hb, current, stats)
            if self.batch_sleep_s:
                time.sleep(self.batch_sleep_s)
            if self.heartbeat is not None:
                self.heartbeat()
        if not results:
            return
        index = np.concatenate([i for i, _ in results])
        logits = torch.cat([l for _, l in results])
        if self.cfg.activation == "sigmoid":
            logits = torch.sigmoid(logits)
        scores[chunk.start + index] = logits.cpu().numpy()  # the one device->host copy of the chunk
        if self.heartbeat is not None:  # on CUDA the batch beats follow launches; this one, finished work
            self.heartbeat()
        stats.truncated_pairs += int(chunk.enc.truncated.sum())

    def _score_chunk(self, chunk: _Chunk, scores: np.ndarray, stats: ScoreStats) -> None:
        stats.tokenize_s += chunk.tokenize_s
        tm = time.perf_counter()
        self._run_chunk(chunk, scores, stats)
        stats.model_s += time.perf_counter() - tm

    @torch.inference_mode()
    def score(self, queries: list[str], docs: list[str]) -> tuple[np.ndarray, ScoreStats]:
        """Scores of pairs (queries[i], docs[i]) as float32 [N], in input order."""
        t0 = time.perf_counter()
        if len(queries) != len(docs):
            raise ValueError(f"{len(queries)} queries but {len(docs)} passages")
        stats = ScoreStats(pairs=len(queries))
        self.budget = self.configured_budget  # each call (a shard) starts from the configured budget again
        seen: dict[tuple[str, str], int] = {}
        inverse = np.fromiter((seen.setdefault(p, len(seen)) for p in zip(queries, docs)), np.int64, len(queries))
        uq = [q for q, _ in seen]
        ud = [d for _, d in seen]
        stats.duplicate_pairs = len(queries) - len(uq)
        scores = np.empty(len(uq), dtype=np.float32)
        # Packed batches cost their real tokens however a chunk sorts, so chunks may start small; padded
        # batches pay for the longest pair in them and need a whole chunk to sort well (measured: 98% -> 94%
        # padding efficiency on 2,000 mixed pairs with the ramp).
        threads = self.cfg.tokenizer_threads
        first = 256 if self.kind == "packed" and threads else self.cfg.chunk_pairs
        starts = chunk_starts(len(uq), self.cfg.chunk_pairs, first)
        bounds = list(zip(starts[:-1], starts[1:]))
        if not threads:  # inline: tokenize a chunk, run it, next
            for s, e in bounds:
                self._score_chunk(self._prepare(s, uq[s:e], ud[s:e]), scores, stats)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
                ahead = deque(pool.submit(self._prepare, s, uq[s:e], ud[s:e]) for s, e in bounds[:threads])
                submitted = len(ahead)
                while ahead:
                    chunk = ahead.popleft().result()
                    if submitted < len(bounds):
                        s, e = bounds[submitted]
                        ahead.append(pool.submit(self._prepare, s, uq[s:e], ud[s:e]))
                        submitted += 1
                    self._score_chunk(chunk, scores, stats)
        self._mend_nonfinite(uq, ud, scores, stats)
        stats.max_batch_tokens = self.budget
        stats.wall_s = time.perf_counter() - t0
        return scores[inverse], stats

    def _mend_nonfinite(self, queries: list[str], docs: list[str], scores: np.ndarray, stats: ScoreStats) -> None:
        """Rescore in float32 the pairs whose fp16/bf16 score overflowed to NaN or inf (kernels/overflow.py)."""
        bad = np.flatnonzero(~np.isfinite(scores))
        if not len(bad):
            return
        t0 = time.perf_counter()
        if self.dtype != torch.float32:
            from kernels.overflow import Float32Rescorer

            if self.rescorer is None:
                self.rescorer = Float32Rescorer(self.model, self.encoder, self.pad_id, self.two_class, self.device,
                                                self.oom_above_tokens)
            # float32 takes twice the memory a token; the budget in force is lower after an out-of-memory split
            budget = max(MIN_BATCH_TOKENS, self.budget // 2)
            fixed = torch.from_numpy(self.rescorer.logits([queries[i] for i in bad], [docs[i] for i in bad], budget,
                                                          self.heartbeat))
            scores[bad] = (torch.sigmoid(fixed) if self.cfg.activation == "sigmoid" else fixed).numpy()
            stats.nonfinite = int((~np.isfinite(scores[bad])).sum())
            stats.float32_rescored = len(bad) - stats.nonfinite
            if stats.float32_rescored > 0.05 * len(scores) and not self._warned_overflow:
                self._warned_overflow = True
                log.warning("%d of %d pairs overflowed in %s and were scored a second time, in float32: this model "
                            "needs a wider dtype (--dtype bfloat16 has float32's range)", stats.float32_rescored,
                            len(scores), str(self.dtype).removeprefix("torch."))
        else:
            stats.nonfinite = len(bad)
        stats.model_s += time.perf_counter() - t0

    def warmup(self, pairs: int = 0) -> float:
        """Run every shape the planner tends to produce once (compiles them); returns seconds spent, and
        keeps in `compile_cache` how many compiled graphs came from torch's on-disk cache: actors on one node
        share it (TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), so only the first compiles."""
        before = _compile_cache_counts()
        t0 = time.perf_counter()
        word = "warm"
        for n_words in sorted({4, 16, 48, 120, self.max_length}):
            count = max(2, min(self.cfg.max_batch_size, self.budget // max(8, n_words + 4)))
            self.score([word] * count, [" ".join([word] * n_words) + f" {i}" for i in range(count)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        after = _compile_cache_counts()
        self.compile_cache = {k: after[k] - before[k] for k in after}
        return time.perf_counter() - t0


def _compile_cache_counts() -> dict:
    """Inductor's graph-cache hits and misses so far in this process (its own counters: a private API, so
    read defensively)."""
    try:
        from torch._dynamo.utils import counters
        return {"hits": int(counters["inductor"]["fxgraph_cache_hit"]),
                "misses": int(counters["inductor"]["fxgraph_cache_miss"])}
    except Exception:  # a torch without these counters: report nothing rather than fail a warm-up
        return {"hits": 0, "misses": 0}

