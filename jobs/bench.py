"""Throughput benchmark: the crossrank engine against sentence-transformers' `CrossEncoder.predict`.

    python -m jobs.bench                                   # MiniLM-L6 shape, NQ lengths, defaults per device
    python -m jobs.bench --model minilm-l6 xlmr-large --mix nq msmarco --pairs 20000 \\
        --engine packed padded --dtype float16 bfloat16 --compile on off --budget 8192 16384 32768
    python -m jobs.bench --model /path/to/checkpoint --data pairs.parquet      # a real model and your pairs

    from jobs.bench import run_bench
    rows = run_bench(models=["minilm-l6"], mixes=["mixed"], n_pairs=2000, engines=["padded", "packed"])

Method, for every configuration, in one process and on the very same pairs:
  * models: real shapes with random weights built in-process (`jobs.bench_models`; no download), or a local
    folder / Hugging Face id (`--model`). Tokenizers and pairs are synthetic and offline (`jobs.bench_data`).
  * engine: `Engine.from_model(copy of the fp32 model, tokenizer, EngineConfig(...))`; `warmup()` (compiles)
    and, on CUDA, one untimed pass over the pairs, both reported apart (warmup_s, first_pass_s); then
    `--repeats` timed `score()` calls, of which the median wall time is reported.
  * anchor: `sentence_transformers.CrossEncoder` loaded from the same weights (saved to a temp folder),
    identity activation, `predict(pairs, batch_size=32)` in the same dtype, warmed and timed the same way.
  * pairs/s and tokens/s (real tokens, i.e. what the model had to read) over the wall time of the whole call
    (tokenization included, for both); padding efficiency = real / computed tokens (the anchor's computed
    tokens are read off the input shapes its model actually received); peak device memory
    (torch.cuda.max_memory_allocated; on CPU the process RSS instead); MFU = model FLOPs / time / the device's
    peak (`jobs.bench_models` for the FLOP count and the table of peaks; `--peak-tflops` overrides).
  * score agreement of each engine run with the anchor in the same dtype (max |diff|, relative L2, mean
    per-query Spearman, share of queries with the same top-1), and `precision()`: low precision against an
    fp32 reference.
  * tokenize: the CPU side alone: `engine.encoder.encode` (tokenize distinct texts once + assemble pairs) vs a
    plain `tokenizer(queries, docs, truncation=True)` call, pairs/s and pairs/s per core.

A configuration that raises becomes a row with status "error" (and the traceback on stderr), never a crash.
With a time budget, configurations that would not fit are recorded as "skipped", and one that overruns its
share is interrupted ("timeout"). Output: a table on stdout as rows complete, and `--out` (default
bench_out/): runs.jsonl, runs.json, runs.parquet, throughput_vs_budget_<model>_<mix>.png (`jobs.bench_report`).

Imports only torch, transformers, sentence-transformers, tokenizers, numpy, pyarrow (matplotlib optional):
it runs on a bare GPU box.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import torch

from jobs import bench_data as bd
from jobs import bench_models as bm
from jobs import bench_report as br

DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ANCHOR_NAME = "st.CrossEncoder"


class BenchTimeout(BaseException):
    """A run overran its share of the time budget. BaseException: library code catching Exception lets it by."""


@contextmanager
def deadline(seconds: float | None):
    """Raise BenchTimeout in the main thread after `seconds` (no-op off the main thread or without a limit)."""
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise BenchTimeout(f"interrupted after {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_MODE_SHORT = {"reduce-overhead": "cudagraphs", "max-autotune-no-cudagraphs": "autotune"}


@dataclass(frozen=True)
class EngineSpec:
    """One engine configuration (the EngineConfig knobs a sweep varies)."""

    engine: str = "auto"  # packed | padded | auto
    dtype: str = "auto"  # float16 | bfloat16 | float32 | auto
    compile: bool | None = None  # None = the engine's default (on for CUDA)
    max_batch_tokens: int | None = None  # None = the engine's default
    bucketing: bool = True
    compile_mode: str | None = None
    max_batch_size: int = 1024

    def label(self, describe: dict | None = None) -> str:
        d = describe or {}
        kind = d.get("engine") or self.engine
        dtype = DTYPE_SHORT.get(d.get("dtype") or self.dtype, d.get("dtype") or self.dtype)
        compiled = d.get("compiled", self.compile)
        comp = "auto" if compiled is None else ("compiled" if compiled else "eager")
        if compiled and self.compile_mode:  # short, so the table's runner column keeps the budget
            comp += "+" + _MODE_SHORT.get(self.compile_mode, self.compile_mode)
        budget = d.get("max_batch_tokens") or self.max_batch_tokens
        text = f"{kind} {dtype} {comp} {br._budget(budget) if budget else 'auto'}"
        return text + ("" if self.bucketing else " nobkt")


@dataclass
class ModelBundle:
    name: str
    model: torch.nn.Module | None  # fp32, CPU, eval: the master copy every run starts from (None: tokenizer only)
    tokenizer: object
    max_length: int
    flops: bm.FlopModel | None
    source: str  # "random" or the path / id it was loaded from
    build_s: float
    ce_path: str | None = None  # a folder CrossEncoder loads the same weights from
    _lengths: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- helpers
def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "sentence_transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, bundle: "ModelBundle | None" = None) -> str:
    """The job's rule for `auto` (kernels.loading.resolve_dtype: bf16 on CUDA for a checkpoint saved in it)."""
    if dtype == "auto":
        from kernels.loading import resolve_dtype as job_rule

        saved = getattr(getattr(bundle and bundle.model, "config", None), "dtype", None)
        return str(job_rule("auto", device, saved)).removeprefix("torch.")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be auto or one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    return dtype


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def rss_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _free(device: torch.device, dynamo: bool = False) -> None:
    """Release what the last run held: dynamo's caches first (their guards reference the model), then
    Python's cycles, then the CUDA caching allocator's blocks."""
    if dynamo:
        try:
            torch._dynamo.reset()
        except Exception:
            pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _graphs() -> int | None:
    """Graphs dynamo has compiled in this process so far (None if torch does not say)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def agreement(scores: np.ndarray, ref: np.ndarray, query_ids: np.ndarray | None = None) -> dict:
    """How far `scores` are from `ref` on the same pairs: max |diff|, relative L2 (raw, and after removing each
    side's mean), and per query (shortlist) the Spearman correlation (mean over queries) and whether the top-1
    passage is the same (share of queries)."""
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if s.shape != r.shape:
        raise ValueError(f"score shapes differ: {s.shape} vs {r.shape}")
    diff = s - r
    out = {
        "score_max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0,
        "score_rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(r), 1e-30)),
        "score_rel_l2_centered": float(np.linalg.norm((s - s.mean()) - (r - r.mean()))
                                       / max(np.linalg.norm(r - r.mean()), 1e-30)),
    }
    qid = np.zeros(len(s), dtype=np.int64) if query_ids is None else np.asarray(query_ids)
    order = np.argsort(qid, kind="stable")
    bounds = np.flatnonzero(np.diff(qid[order])) + 1
    rhos, top1 = [], []
    for idx in np.split(order, bounds):
        if len(idx) < 2:
            continue
        a, b = _rank(s[idx]), _rank(r[idx])
        sa, sb = a.std(), b.std()
        if sa > 0 and sb > 0:
            rhos.append(float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb)))
        top1.append(bool(np.argmax(s[idx]) == np.argmax(r[idx])))
    out["spearman"] = float(np.mean(rhos)) if rhos else None
    out["top1_agree"] = float(np.mean(top1)) if top1 else None
    return out


def _find_hf_model(module: torch.nn.Module):
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return module
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            return m
    inner = getattr(module, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    return None


# The pair encoder's exactness check cuts at this length, where most pairs lose tokens from both segments
SHORT_MAX_LENGTH = 8


def pair_ids_differ(tokenizer, queries: list[str], docs: list[str], max_length: int) -> int:
    """How many pairs the engine's pair encoder encodes otherwise than `tokenizer(q, d, truncation=True,
    max_length=...)`, under the installed `tokenizers` release (kernels/truncation.py)."""
    from kernels.pairs import PairEncoder

    enc = PairEncoder(tokenizer, max_length).encode(queries, docs)
    bad = 0
    for s in range(0, len(queries), 256):  # slices: the tokenizer keeps every cut pair's overflowing pieces
        ref = tokenizer(queries[s:s + 256], docs[s:s + 256], truncation=True, max_length=max_length)["input_ids"]
        bad += sum(enc.ids[enc.offsets[i]:enc.offsets[i + 1]].tolist() != r for i, r in enumerate(ref, start=s))
    return bad


def make_cross_encoder(path: str, device: torch.device, dtype: str, max_length: int):
    """sentence-transformers' CrossEncoder on `path` in `dtype`, raw logits out (identity activation).

    Tries the keyword spellings of sentence-transformers 3.x to 6.x in turn, then checks the dtype it got."""
    from sentence_transformers import CrossEncoder

    want = TORCH_DTYPES[dtype]
    base = dict(device=str(device), max_length=max_length)
    errors = []

    def build(attn: dict):
        attempts = [
            dict(activation_fn=torch.nn.Identity(), model_kwargs={"dtype": want, **attn}),
            dict(activation_fn=torch.nn.Identity(), model_kwargs={"torch_dtype": want, **attn}),
            dict(activation_fn=torch.nn.Identity()),
            dict(default_activation_function=torch.nn.Identity(), automodel_args={"torch_dtype": want, **attn}),
        ]
        for extra in attempts:
            try:
                return CrossEncoder(path, **base, **extra)
            except TypeError as e:  # an unknown keyword in this version: try the next spelling
                errors.append(f"{type(e).__name__}: {e}")
        return None

    # The published anchor figures ran padded FlashAttention-2: use it wherever flash-attn is installed and the
    # dtype allows, so the engine is not measured against a slower anchor than users would run (the row's
    # `attention` and label say which one ran).
    ce = None
    from kernels.packed_attention import _flash_attn_varlen_qkvpacked  # None: flash-attn absent or unusable

    if device.type == "cuda" and dtype in ("float16", "bfloat16") and _flash_attn_varlen_qkvpacked() is not None:
        try:
            ce = build({"attn_implementation": "flash_attention_2"})
        except (ValueError, ImportError, RuntimeError) as e:  # this model or build has no FA2 path
            errors.append(f"flash_attention_2: {type(e).__name__}: {e}")
    if ce is None:
        ce = build({})
    if ce is None:
        raise RuntimeError("could not build a CrossEncoder: " + " | ".join(errors))
    hf = _find_hf_model(ce if isinstance(ce, torch.nn.Module) else getattr(ce, "model", ce))
    if hf is None:
        raise RuntimeError("no transformers model inside the CrossEncoder")
    if next(hf.parameters()).dtype != want:
        hf.to(want)
    # raw logits whatever the version's default: `activation_fn` (3.x: `default_activation_function`)
    if hasattr(ce, "activation_fn"):
        ce.activation_fn = torch.nn.Identity()
    else:
        ce.default_activation_function = torch.nn.Identity()
    return ce, hf


class _ShapeCounter:
    """Counts the tokens (padding included) an HF model embeds: a forward pre-hook on its input embedding
    table, which sees every batch's `input_ids` whatever way the caller invokes the model (sentence-transformers
    6 calls `model.forward` directly, past model-level hooks). Host-side shapes only: no device sync."""

    def __init__(self, hf_model: torch.nn.Module):
        self.computed = 0
        self.batches = 0
        self.handle = hf_model.get_input_embeddings().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor):
            self.computed += int(ids.numel())
            self.batches += 1

    def reset(self) -> None:
        self.computed = 0
        self.batches = 0

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- the bench
class Bench:
    """State shared by the runs of one benchmark: models, pairs, anchor scores, output, time budget.

    Every `run_*` method returns the row it recorded (and never raises, except KeyboardInterrupt)."""

    def __init__(self, *, device: str = "auto", repeats: int = 3, out_dir: str | None = None,
                 anchor_batch_size: int = 32, peak_tflops: float | None = None, budget_s: float | None = None,
                 seed: int = 0, first_pass: bool | None = None, verbose: bool = True, stream=None):
        self.device = resolve_device(device)
        self.device_name = device_name(self.device)
        self.repeats = max(1, int(repeats))
        self.anchor_batch_size = anchor_batch_size
        self.peak_tflops = peak_tflops
        self.budget_s = budget_s
        self.seed = seed
        self.first_pass = self.device.type == "cuda" if first_pass is None else first_pass
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.writer = br.RowWriter(out_dir)
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.versions = versions()
        self._models: dict[str, ModelBundle] = {}
        self._pairs: dict[tuple, bd.Pairs] = {}
        self._anchor_scores: dict[tuple, np.ndarray] = {}
        self._anchor_pps: dict[tuple, float] = {}
        self._tmp = tempfile.mkdtemp(prefix="crossrank-bench-")
        self._printed_kind = None
        self._run_id = 0

    @property
    def rows(self) -> list[dict]:
        return self.writer.rows

    # ---- time budget ----
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def time_left(self) -> float | None:
        return None if self.budget_s is None else self.budget_s - self.elapsed()

    def _skip_reason(self, est_s: float | None) -> str | None:
        left = self.time_left()
        if left is None:
            return None
        if left <= 0 or (est_s is not None and left < est_s):
            return f"time budget: {max(0, left):.0f}s left of {self.budget_s:.0f}s, this needs ~{est_s or 0:.0f}s"
        return None

    def _cap(self, cap_s: float | None) -> float | None:
        left = self.time_left()
        if left is None:
            return cap_s
        return max(1.0, min(left, cap_s) if cap_s else left)

    # ---- output ----
    def log(self, msg: str) -> None:
        if self.verbose:
            print(f"[bench {self.elapsed():6.1f}s] {msg}", file=self.stream, flush=True)

    def _row(self, kind: str, bundle: ModelBundle | None, pairs: bd.Pairs | None, **values) -> dict:
        self._run_id += 1
        row = br.new_row(run_id=self._run_id, kind=kind, status="ok", device=str(self.device),
                         device_name=self.device_name, **self.versions, **values)
        if bundle is not None:
            row["model"] = bundle.name
        if pairs is not None:
            row.update(mix=pairs.mix, n_pairs=len(pairs), candidates=int(np.bincount(pairs.query_ids).max()),
                       pairs_fingerprint=pairs.fingerprint())
            if bundle is not None:
                row["pair_tokens_mean"] = float(self.lengths(bundle, pairs).mean())
        return row

    def _emit(self, row: dict) -> dict:
        if self.device.type == "cuda" and self.verbose and row["kind"] in ("engine", "anchor"):
            self.log(f"device memory still allocated after {row.get('label')}: "
                     f"{torch.cuda.memory_allocated(self.device) / 2**30:.2f} GB")
        row["elapsed_s"] = self.elapsed()
        row["time_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row = self.writer.add(row)
        if self.verbose:
            group = "precision" if row["kind"] == "precision" else "runs"
            if group != self._printed_kind:
                print("\n" + br.header(row["kind"]), file=self.stream, flush=True)
                self._printed_kind = group
            print(br.format_row(row), file=self.stream, flush=True)
        return row

    def record_failure(self, kind: str, label: str, model: str, e: BaseException) -> dict:
        """A step outside any one configuration (building a model or tokenizer) failed: one error row."""
        row = self._row(kind, None, None, label=label, model=model)
        self._fail(row, e)
        return self._emit(row)

    def _fail(self, row: dict, e: BaseException) -> None:
        row["status"] = "timeout" if isinstance(e, BenchTimeout) else "error"
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:1000]
        if not isinstance(e, BenchTimeout):
            print(f"[bench] {row.get('label')} failed:", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()

    # ---- inputs ----
    def model(self, name: str, *, max_length: int | None = None) -> ModelBundle:
        """A shape name of `bench_models.SHAPES` (random weights) or a local folder / Hugging Face id."""
        if name in self._models:
            return self._models[name]
        from kernels.loading import model_max_length

        t0 = time.perf_counter()
        if name in bm.SHAPES:
            shape = bm.SHAPES[name]
            tok = bd.build_tokenizer(bm.TOKENIZER_FOR_FAMILY[shape["family"]])
            init = "cuda" if self.device.type == "cuda" else "cpu"
            model = bm.build_model(name, tok, seed=self.seed, init_device=init)
            source, ce_path = "random", None
        else:
            from kernels.loading import load_model

            # The job's own loader: SDPA where transformers has it, else eager (DeBERTa-v2/v3, MPNet)
            loaded = load_model(name, device=torch.device("cpu"), dtype=torch.float32)
            tok, model = loaded.tokenizer, loaded.model
            source, ce_path = name, name
        limit = model_max_length(model.config, tok, model)  # the engine's own limit, offsets read from the model
        bundle = ModelBundle(name=name, model=model, tokenizer=tok, max_length=min(max_length or limit, limit),
                             flops=bm.flop_model(model.config), source=source, build_s=time.perf_counter() - t0,
                             ce_path=ce_path)
        self._models[name] = bundle
        self.log(f"model {name}: {source}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                 f"max_length {bundle.max_length}, built in {bundle.build_s:.1f}s")
        return bundle

    def tokenizer_bundle(self, name: str) -> ModelBundle:
        """A shape's (or checkpoint's) tokenizer and length limit without building the model, for run_tokenize."""
        if name in self._models:
            return self._models[name]
        from kernels.loading import model_max_length

        t0 = time.perf_counter()
        if name in bm.SHAPES:
            tok = bd.build_tokenizer(bm.TOKENIZER_FOR_FAMILY[bm.SHAPES[name]["family"]])
            limit = model_max_length(bm.hf_config(name, tok), tok)
        else:
            from transformers import AutoConfig, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
            limit = model_max_length(AutoConfig.from_pretrained(name), tok)
        return ModelBundle(name=name, model=None, tokenizer=tok, max_length=limit, flops=None, source="tokenizer",
                           build_s=time.perf_counter() - t0)

    def drop_model(self, name: str) -> None:
        bundle = self._models.pop(name, None)
        if bundle is not None and bundle.ce_path and bundle.source == "random":
            shutil.rmtree(bundle.ce_path, ignore_errors=True)
        self._anchor_scores = {k: v for k, v in self._anchor_scores.items() if k[0] != name}
        _free(self.device)

    def pairs(self, mix: str = "nq", n_pairs: int = 2000, candidates: int = 50, data: str | None = None) -> bd.Pairs:
        key = (mix, n_pairs, candidates, data, self.seed)
        if key not in self._pairs:
            self._pairs[key] = (bd.load_pairs(data, n_pairs) if data
                                else bd.make_pairs(n_pairs, mix, candidates, seed=self.seed))
        return self._pairs[key]

    def lengths(self, bundle: ModelBundle, pairs: bd.Pairs) -> np.ndarray:
        """Token count of every pair as the model sees it (the engine's encoder: equal to the tokenizer's)."""
        key = pairs.fingerprint()
        if key not in bundle._lengths:
            from kernels.pairs import PairEncoder

            bundle._lengths[key] = PairEncoder(bundle.tokenizer, bundle.max_length).encode(
                pairs.queries, pairs.docs).lengths.copy()
        return bundle._lengths[key]

    def ce_path(self, bundle: ModelBundle) -> str:
        if bundle.ce_path is None:
            path = os.path.join(self._tmp, bundle.name)
            t0 = time.perf_counter()
            bundle.model.save_pretrained(path, safe_serialization=True)
            bundle.tokenizer.save_pretrained(path)
            bundle.ce_path = path
            self.log(f"saved {bundle.name} for sentence-transformers in {time.perf_counter() - t0:.1f}s")
        return bundle.ce_path

    def _rates(self, row: dict, bundle: ModelBundle, pairs: bd.Pairs, wall: float, dtype: str) -> None:
        lengths = self.lengths(bundle, pairs)
        flops = bundle.flops.flops(lengths)
        row["real_tokens"] = int(lengths.sum())
        row["pairs_per_s"] = len(pairs) / wall
        row["tokens_per_s"] = row["real_tokens"] / wall
        row["flops_per_pass"] = flops
        row["tflops"] = flops / wall / 1e12
        peak = self.peak_tflops * 1e12 if self.peak_tflops else bm.peak_flops(self.device_name, dtype)
        if peak:
            row["peak_tflops"] = peak / 1e12
            row["mfu"] = flops / wall / peak
            ach = None if self.peak_tflops else bm.achievable_flops(self.device_name, dtype)
            row["mfu_achievable"] = flops / wall / ach if ach else None

    def _timed(self, fn, repeats: int) -> tuple[list[float], object]:
        walls, last = [], None
        for _ in range(repeats):
            _sync(self.device)
            t = time.perf_counter()
            last = fn()
            _sync(self.device)
            walls.append(time.perf_counter() - t)
        return walls, last

    @staticmethod
    def _walls(row: dict, walls: list[float]) -> float:
        wall = statistics.median(walls)
        row.update(wall_s=wall, wall_s_min=min(walls), wall_s_max=max(walls), wall_s_all=walls)
        return wall

    # ---- runs ----
    def run_engine(self, bundle: ModelBundle, pairs: bd.Pairs, spec: EngineSpec, *, est_s: float | None = None,
                   cap_s: float | None = None, repeats: int | None = None) -> dict:
        """One engine configuration: build, warm up (compile), time `repeats` passes, compare with the anchor."""
        dtype = spec.dtype if spec.dtype != "auto" else resolve_dtype("auto", self.device, bundle)
        spec = replace(spec, dtype=dtype)
        row = self._row("engine", bundle, pairs, label=spec.label(), engine=spec.engine, dtype=dtype,
                        compiled=spec.compile, compile_mode=spec.compile_mode, max_batch_tokens=spec.max_batch_tokens,
                        bucketing=spec.bucketing, repeats=repeats or self.repeats)
        skip = self._skip_reason(est_s)
        if skip:
            row.update(status="skipped", error=skip)
            return self._emit(row)
        compiled_hint = bool(spec.compile) or (spec.compile is None and self.device.type == "cuda")
        eng = model = None
        try:
            with deadline(self._cap(cap_s)):
                from kernels.config import EngineConfig
                from kernels.engine import Engine

                if compiled_hint:
                    torch._dynamo.reset()
                cfg = EngineConfig(device=str(self.device), dtype=dtype, compile=spec.compile, engine=spec.engine,
                                   max_length=bundle.max_length,  # the anchor's truncation, not the model's limit
                                   max_batch_tokens=spec.max_batch_tokens, bucketing=spec.bucketing,
                                   max_batch_size=spec.max_batch_size,
                                   extra={"compile_mode": spec.compile_mode} if spec.compile_mode else {})
                t = time.perf_counter()
                # Engine.from_model casts and moves the model it gets: give it a copy unless that is a no-op
                same = self.device.type == "cpu" and dtype == "float32"
                model = bundle.model if same else bm.copy_model(bundle.model)
                eng = Engine.from_model(model, bundle.tokenizer, cfg)
                _sync(self.device)
                row["load_s"] = time.perf_counter() - t
                d = eng.describe()
                row.update(label=spec.label(d), engine=d["engine"], attention=d.get("attention"),
                           linear=d.get("linear"), compiled=d["compiled"], max_batch_tokens=d["max_batch_tokens"],
                           dtype=d["dtype"])
                g0 = _graphs()
                row["warmup_s"] = eng.warmup()
                q, docs = pairs.queries, pairs.docs
                if self.first_pass:
                    t = time.perf_counter()
                    eng.score(q, docs)
                    _sync(self.device)
                    row["first_pass_s"] = time.perf_counter() - t
                g1 = _graphs()
                _reset_peak(self.device)
                runs = []
                walls, _ = self._timed(lambda: runs.append(eng.score(q, docs)), repeats or self.repeats)
                g2 = _graphs()
                wall = self._walls(row, walls)
                scores, stats = runs[-1]
                st = stats.to_dict()
                row.update(computed_tokens=st["computed_tokens"], padding_efficiency=st["padding_efficiency"],
                           batches=st["batches"], oom_splits=st["oom_splits"], duplicate_pairs=st["duplicate_pairs"],
                           float32_rescored=st["float32_rescored"],  # a low-precision row partly scored in fp32
                           tokenize_s=statistics.median(r[1].tokenize_s for r in runs),
                           model_s=statistics.median(r[1].model_s for r in runs),
                           peak_mem_gb=_peak_gb(self.device), rss_gb=rss_gb(), score_std=float(np.std(scores)))
                if g0 is not None and g1 is not None and g2 is not None:
                    row.update(graphs_compiled=g1 - g0, recompiles_during_timing=g2 - g1)
                self._rates(row, bundle, pairs, wall, row["dtype"])
                self._compare(row, bundle, pairs, scores)
                d2 = eng.describe()
                if d2["compiled"] != d["compiled"] or d2["engine"] != d["engine"]:
                    # the engine gave up on compile (or the packed kernel) mid-run and went on without it
                    row.update(status="fallback", label=spec.label(d2), compiled=d2["compiled"], engine=d2["engine"],
                               attention=d2.get("attention"),
                               error=f"engine fell back: {spec.label(d)} -> {spec.label(d2)} (see the log)")
                if st["real_tokens"] != row["real_tokens"]:
                    row.update(status="error", error=f"engine counted {st['real_tokens']} real tokens, "
                                                     f"the pair encoder {row['real_tokens']}")
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - every failure becomes a row
            self._fail(row, e)
        finally:
            eng = model = None
            _free(self.device, dynamo=compiled_hint)
        return self._emit(row)

    def _compare(self, row: dict, bundle: ModelBundle, pairs: bd.Pairs, scores: np.ndarray) -> None:
        key = (bundle.name, pairs.fingerprint(), row["dtype"])
        ref = self._anchor_scores.get(key)
        if ref is not None:
            row["vs"] = f"anchor {DTYPE_SHORT.get(row['dtype'], row['dtype'])}"
            row.update(agreement(scores, ref, pairs.query_ids))
        pps = self._anchor_pps.get(key)
        if pps and row.get("pairs_per_s"):
            row["speedup_vs_anchor"] = row["pairs_per_s"] / pps

    def run_anchor(self, bundle: ModelBundle, pairs: bd.Pairs, dtype: str = "auto", *, batch_size: int | None = None,
                   est_s: float | None = None, cap_s: float | None = None, repeats: int | None = None) -> dict:
        """sentence-transformers CrossEncoder.predict on the same weights and pairs, in `dtype`."""
        dtype = resolve_dtype(dtype, self.device, bundle)
        bs = batch_size or self.anchor_batch_size
        row = self._row("anchor", bundle, pairs, label=f"{ANCHOR_NAME} {DTYPE_SHORT[dtype]} bs{bs}",
                        engine=ANCHOR_NAME, dtype=dtype, compiled=False, batch_size=bs, repeats=repeats or self.repeats)
        skip = self._skip_reason(est_s)
        if skip:
            row.update(status="skipped", error=skip)
            return self._emit(row)
        ce = hf = counter = None
        try:
            with deadline(self._cap(cap_s)):
                path = self.ce_path(bundle)
                t = time.perf_counter()
                ce, hf = make_cross_encoder(path, self.device, dtype, bundle.max_length)
                _sync(self.device)
                row["load_s"] = time.perf_counter() - t
                row["attention"] = getattr(hf.config, "_attn_implementation", None)
                row["label"] = f"{row['label']} {row['attention'] or ''}".strip()
                items = [[q, d] for q, d in zip(pairs.queries, pairs.docs)]

                def predict(x):
                    return np.asarray(ce.predict(x, batch_size=bs, show_progress_bar=False, convert_to_numpy=True),
                                      dtype=np.float32)

                t = time.perf_counter()
                predict(items[: min(len(items), 4 * bs)])
                _sync(self.device)
                row["warmup_s"] = time.perf_counter() - t
                if self.first_pass:
                    t = time.perf_counter()
                    predict(items)
                    _sync(self.device)
                    row["first_pass_s"] = time.perf_counter() - t
                counter = _ShapeCounter(hf)
                _reset_peak(self.device)
                out = []
                walls, _ = self._timed(lambda: out.append(predict(items)), repeats or self.repeats)
                wall = self._walls(row, walls)
                scores = out[-1]
                n_rep = len(walls)
                row.update(computed_tokens=counter.computed // n_rep, batches=counter.batches // n_rep,
                           peak_mem_gb=_peak_gb(self.device), rss_gb=rss_gb(), score_std=float(np.std(scores)))
                self._rates(row, bundle, pairs, wall, dtype)
                if row["computed_tokens"]:
                    row["padding_efficiency"] = row["real_tokens"] / row["computed_tokens"]
                key = (bundle.name, pairs.fingerprint(), dtype)
                self._anchor_scores[key] = scores
                self._anchor_pps[key] = row["pairs_per_s"]
                row["speedup_vs_anchor"] = 1.0
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001
            self._fail(row, e)
        finally:
            if counter is not None:
                counter.remove()
            ce = hf = None
            _free(self.device)
        return self._emit(row)

    def run_tokenize(self, bundle: ModelBundle, pairs: bd.Pairs, *, repeats: int | None = None,
                     est_s: float | None = None) -> list[dict]:
        """The CPU side alone: the engine's pair encoder vs a plain tokenizer(queries, docs) call."""
        from kernels.pairs import PairEncoder

        cores = cpu_cores()
        reps = repeats or self.repeats
        tok = bundle.tokenizer
        enc = PairEncoder(tok, bundle.max_length)
        q, d = pairs.queries, pairs.docs
        runners = [
            ("crossrank encode", "crossrank.PairEncoder", lambda: enc.encode(q, d).lengths),
            ("tokenizer(q, d)", "tokenizer", lambda: np.fromiter(
                map(len, tok(q, d, truncation=True, max_length=bundle.max_length)["input_ids"]), np.int64, len(q))),
        ]
        rows, results, pps = [], {}, {}
        for label, name, fn in runners:
            row = self._row("tokenize", bundle, pairs, label=label, engine=name, repeats=reps, cores=cores)
            skip = self._skip_reason(est_s)
            if skip:
                row.update(status="skipped", error=skip)
                rows.append(self._emit(row))
                continue
            try:
                with deadline(self._cap(None)):
                    t = time.perf_counter()
                    fn()  # warm: thread pools, allocator
                    row["warmup_s"] = time.perf_counter() - t
                    walls, lengths = self._timed(fn, reps)
                    wall = self._walls(row, walls)
                    results[label] = lengths
                    row.update(pairs_per_s=len(pairs) / wall, real_tokens=int(lengths.sum()),
                               tokens_per_s=int(lengths.sum()) / wall, pairs_per_s_per_core=len(pairs) / wall / cores,
                               rss_gb=rss_gb())
                    pps[label] = row["pairs_per_s"]
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                self._fail(row, e)
            rows.append(row)
        a, b = (results.get(label) for label, _, _ in runners)
        if a is not None and b is not None:
            rows[0]["vs"] = runners[1][0]
            if not np.array_equal(a, b):
                rows[0].update(status="error", error=f"pair lengths differ from the tokenizer's on "
                                                     f"{int((a != b).sum())} of {len(a)} pairs")
            else:  # the ids too, at the model's max_length and at one where most pairs lose tokens from both sides
                n = min(len(q), 1000)
                for length in (bundle.max_length, SHORT_MAX_LENGTH):
                    what = f"tokenizer(q, d, truncation=True, max_length={length})"
                    try:
                        bad = pair_ids_differ(tok, q[:n], d[:n], length)
                        error = f"pair ids differ from {what} on {bad} of {n} pairs" if bad else None
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:  # noqa: BLE001 - a Rust panic too: a row, not the end of the check
                        error = f"pair ids not compared with {what}: {type(e).__name__}: {e}"[:1000]
                    if error:
                        rows[0].update(status="error", error=" ".join(error.split()))
                        break
            anchor = pps.get(runners[1][0])
            for row in rows:
                if anchor and row["pairs_per_s"]:
                    row["speedup_vs_anchor"] = row["pairs_per_s"] / anchor
        return [self._emit(r) if r.get("elapsed_s") is None else r for r in rows]

    # ---- score agreement at low precision ----
    def _engine_scores(self, bundle: ModelBundle, pairs: bd.Pairs, spec: EngineSpec) -> tuple[np.ndarray, dict]:
        from kernels.config import EngineConfig
        from kernels.engine import Engine

        same = self.device.type == "cpu" and spec.dtype == "float32"
        model = bundle.model if same else bm.copy_model(bundle.model)
        cfg = EngineConfig(device=str(self.device), dtype=spec.dtype, compile=spec.compile, engine=spec.engine,
                           max_length=bundle.max_length, max_batch_tokens=spec.max_batch_tokens,
                           bucketing=spec.bucketing)
        eng = Engine.from_model(model, bundle.tokenizer, cfg)
        try:
            scores, _ = eng.score(pairs.queries, pairs.docs)
            return scores, eng.describe()
        finally:
            del eng, model
            _free(self.device, dynamo=bool(spec.compile))

    def _anchor_only(self, bundle: ModelBundle, pairs: bd.Pairs, dtype: str) -> np.ndarray:
        key = (bundle.name, pairs.fingerprint(), dtype)
        if key not in self._anchor_scores:
            ce, hf = make_cross_encoder(self.ce_path(bundle), self.device, dtype, bundle.max_length)
            try:
                self._anchor_scores[key] = np.asarray(ce.predict(
                    [[q, d] for q, d in zip(pairs.queries, pairs.docs)], batch_size=self.anchor_batch_size,
                    show_progress_bar=False, convert_to_numpy=True), dtype=np.float32)
            finally:
                del ce, hf
                _free(self.device)
        return self._anchor_scores[key]

    def precision(self, bundle: ModelBundle, pairs: bd.Pairs, dtypes=("float16", "bfloat16"),
                  engines=("packed", "padded"), *, compile: bool = False, anchor: bool = True,
                  est_s: float | None = None, cap_s: float | None = None) -> list[dict]:
        """Scores in each low-precision dtype against an fp32 reference (the anchor in fp32), per engine; the
        engines in fp32 and the anchor in each dtype alongside, so the engine's error reads against the
        anchor's own. Eager (uncompiled) unless `compile`."""
        rows = []
        skip = self._skip_reason(est_s)
        ref = None
        ref_row = self._row("precision", bundle, pairs, label="reference", vs=f"{ANCHOR_NAME} fp32")
        if not skip:
            try:
                with deadline(self._cap(cap_s)):
                    ref = self._anchor_only(bundle, pairs, "float32")
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                self._fail(ref_row, e)
                return [self._emit(ref_row)]
        jobs = [("engine", e, "float32") for e in engines]
        for dt in dtypes:
            jobs += [("engine", e, dt) for e in engines]
            if anchor:
                jobs.append(("anchor", ANCHOR_NAME, dt))
        for kind, name, dt in jobs:
            spec = EngineSpec(engine=name, dtype=dt, compile=compile)
            label = spec.label() if kind == "engine" else f"{ANCHOR_NAME} {DTYPE_SHORT[dt]}"
            row = self._row("precision", bundle, pairs, label=label, engine=name, dtype=dt,
                            compiled=compile if kind == "engine" else False, vs=f"{ANCHOR_NAME} fp32")
            # checked per job: the budget may run out midway, and then each job would still build its model
            skip = skip or self._skip_reason((est_s or 0.0) / (len(jobs) + 1))
            if skip or ref is None:
                row.update(status="skipped", error=skip or "no reference")
                rows.append(self._emit(row))
                continue
            try:
                with deadline(self._cap(cap_s)):
                    if kind == "engine":
                        scores, d = self._engine_scores(bundle, pairs, spec)
                        row.update(label=spec.label(d), engine=d["engine"], attention=d.get("attention"),
                                   compiled=d["compiled"], max_batch_tokens=d["max_batch_tokens"])
                    else:
                        scores = self._anchor_only(bundle, pairs, dt)
                    row["score_std"] = float(np.std(scores))
                    row.update(agreement(scores, ref, pairs.query_ids))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                self._fail(row, e)
            rows.append(self._emit(row))
        return rows

    def finish(self, plots: bool = True) -> list:
        paths = []
        if plots and self.writer.out is not None:
            try:
                paths = br.plot_throughput(self.rows, self.writer.out)
            except Exception as e:  # plots are a nicety
                print(f"[bench] plots failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        return paths


# ---------------------------------------------------------------------------------------------- sweep
def run_bench(models=("minilm-l6",), *, mixes=("nq",), n_pairs: int = 2000, candidates: int = 50,
              data: str | None = None, engines=("packed", "padded"), dtypes=("auto",), compile=(None,),
              budgets=(None,), bucketing=(True,), compile_mode: str | None = None, anchor: bool = True,
              anchor_batch_size: int = 32, tokenize: bool = True, tokenize_pairs: int | None = None,
              tokenize_mix: str = "msmarco", precision: bool = False, repeats: int = 3, device: str = "auto",
              out_dir: str | None = None, peak_tflops: float | None = None, budget_s: float | None = None,
              max_length: int | None = None, seed: int = 0, first_pass: bool | None = None, plots: bool = True,
              verbose: bool = True) -> list[dict]:
    """Run the sweep and return one row per run (see `jobs.bench_report.ROW_FIELDS`).

    For each model: the CPU tokenize comparison (`tokenize_mix`, ~80 tokens a pair); then for each length mix
    and dtype: the anchor, then every engine x compile x budget x bucketing combination. With `precision`, a
    low-precision-vs-fp32 check per model and mix first. `data` (a Parquet file) replaces the synthetic mixes.
    """
    bench = Bench(device=device, repeats=repeats, out_dir=out_dir, anchor_batch_size=anchor_batch_size,
                  peak_tflops=peak_tflops, budget_s=budget_s, seed=seed, first_pass=first_pass, verbose=verbose)
    dev = bench.device
    dtypes = list(dict.fromkeys(resolve_dtype(d, dev) for d in dtypes))
    bench.log(f"device {dev} ({bench.device_name}), versions {bench.versions}")
    try:
        for name in models:
            try:
                bundle = bench.model(name, max_length=max_length)
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001
                bench.record_failure("engine", f"build {name}", name, e)
                continue
            if tokenize:
                tp = bench.pairs(tokenize_mix, tokenize_pairs or max(n_pairs, 2000), candidates, data)
                bench.run_tokenize(bundle, tp)
            for mix in (["file"] if data else mixes):
                pairs = bench.pairs(mix, n_pairs, candidates, data)
                if precision:
                    low = [d for d in ("float16", "bfloat16") if dev.type == "cuda"] or ["bfloat16"]
                    bench.precision(bundle, pairs, low, engines)
                for dt in dtypes:
                    if anchor:
                        bench.run_anchor(bundle, pairs, dt)
                    for eng in engines:
                        for comp in compile:
                            for budget in budgets:
                                for bkt in bucketing:
                                    spec = EngineSpec(engine=eng, dtype=dt, compile=comp, max_batch_tokens=budget,
                                                      bucketing=bkt, compile_mode=compile_mode)
                                    bench.run_engine(bundle, pairs, spec)
            bench.drop_model(name)
    finally:
        bench.finish(plots=plots)
    if verbose:
        print("\n" + br.table(bench.rows), flush=True)
        if out_dir:
            print(f"\nrows written to {out_dir}/runs.json, runs.jsonl, runs.parquet", flush=True)
    return bench.rows


def _on_off(values: list[str]) -> list[bool | None]:
    table = {"on": True, "off": False, "auto": None, "true": True, "false": False}
    return [table[v.lower()] for v in values]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["minilm-l6"],
                    help=f"shape names ({', '.join(bm.SHAPES)}) or local folders / Hugging Face ids")
    ap.add_argument("--mix", nargs="+", default=["nq"], choices=bd.MIX_NAMES, help="synthetic length mixes")
    ap.add_argument("--data", help="Parquet file with query and doc columns (replaces --mix)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per measurement (default 20000 on GPU, 2000 on CPU)")
    ap.add_argument("--candidates", type=int, default=50, help="passages per query (shortlist size)")
    ap.add_argument("--engine", nargs="+", default=["packed", "padded"], choices=["packed", "padded", "auto"])
    ap.add_argument("--dtype", nargs="+", default=None,
                    help="float16 bfloat16 float32 auto (default: float16 bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--compile", nargs="+", default=None, choices=["on", "off", "auto"],
                    help="default: on off on GPU, off on CPU")
    ap.add_argument("--compile-mode", default=None,
                    choices=[None, "default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    ap.add_argument("--budget", nargs="+", type=int, default=None,
                    help="max_batch_tokens values (default: 8192 16384 32768 on GPU, 4096 on CPU)")
    ap.add_argument("--bucketing", nargs="+", default=["on"], choices=["on", "off"])
    ap.add_argument("--no-anchor", action="store_true", help="skip sentence-transformers")
    ap.add_argument("--anchor-batch-size", type=int, default=32)
    ap.add_argument("--no-tokenize", action="store_true", help="skip the CPU tokenize comparison")
    ap.add_argument("--tokenize-pairs", type=int, default=None)
    ap.add_argument("--precision", action="store_true", help="also check low precision against fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (overrides the table)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip what would not fit in this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    cuda = resolve_device(args.device).type == "cuda"
    compile_mode = None if args.compile_mode in (None, "default") else args.compile_mode
    rows = run_bench(
        models=args.model, mixes=args.mix, n_pairs=args.pairs or (20000 if cuda else 2000),
        candidates=args.candidates, data=args.data, engines=args.engine,
        dtypes=args.dtype or (["float16", "bfloat16"] if cuda else ["float32"]),
        compile=_on_off(args.compile or (["on", "off"] if cuda else ["off"])),
        budgets=args.budget or ([8192, 16384, 32768] if cuda else [4096]),
        bucketing=_on_off(args.bucketing), compile_mode=compile_mode, anchor=not args.no_anchor,
        anchor_batch_size=args.anchor_batch_size, tokenize=not args.no_tokenize, tokenize_pairs=args.tokenize_pairs,
        precision=args.precision, repeats=args.repeats, device=args.device, out_dir=args.out,
        peak_tflops=args.peak_tflops, budget_s=args.budget_s, max_length=args.max_length, seed=args.seed,
        plots=not args.no_plots)
    return 0 if rows and all(r["status"] in ("ok", "skipped", "fallback") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
