"""One bounded GPU check of the crossrank engine: score precision, the bench matrix, CPU tokenization.

    bash scripts/gpu_check.sh                      # on the GPU box (repo root); files under $OUT, else bench_out/
    python scripts/gpu_check.py --smoke            # CPU dry run of the whole path: tiny pair counts, fp32

Steps, most informative first; each configuration is its own try/except (an error is a row, the check goes
on), and a global time guard (--budget-s, default 420 s) skips what would not fit and interrupts a
configuration that overruns. Rows print as they complete and every file is rewritten after each row, so a
kill at any point leaves everything measured so far.

  1. CPU tokenization: the engine's pair encoder vs tokenizer(q, d, truncation=True), MS MARCO lengths
     (~80 tokens a pair), MiniLM (WordPiece) and XLM-R (Unigram) tokenizers; an error row unless the pair
     lengths agree and the ids of 1,000 pairs cut at max_length 8 too (this box's `tokenizers` release).
  2. precision, MiniLM-L6 shape: fp16 and bf16 scores of the packed and padded engines (eager) against an fp32
     reference (sentence-transformers in fp32), with sentence-transformers' own fp16/bf16 scores alongside:
     relative L2 error, mean per-query Spearman, share of queries with the same top-1.
  3. MiniLM-L6, NQ lengths (~150 tokens a pair), 20k pairs in shortlists of 50: the anchor
     (CrossEncoder.predict, batch 32, fp16), then packed/padded x eager/compiled at 16k tokens.
  4. precision, XLM-R-large shape (bge-reranker-v2-m3), as in 2.
  5. XLM-R-large, 4k NQ pairs: anchor fp16, packed eager, padded eager, packed compiled (padded compiled if
     packed did not compile on MiniLM); then MiniLM padded compiled.
  6. MiniLM extras: token budgets 8k / 32k, bf16 (anchor, eager engines, best compiled), bucketing off.
  7. XLM-R extras: bf16 anchor and best config in bf16, budget 32k.
  4b. precision, ModernBERT-base shape (gte-reranker-modernbert-base: rotary, 128-token sliding windows,
     mean pooling), as in 2: the packed path's windowed attention on this GPU's kernels.
  8. The shard pipeline around the engine, without Ray (scripts/bench_shard_pipeline.py): MiniLM-L6, packed,
     eager, 200k NQ pairs in 4 Parquet shards; the engine alone vs read + score + commit per shard, with the
     commit inline (a CPU actor) or in a background thread (a GPU actor's commit task): shard_pipeline.txt.
  9. ModernBERT-base, 4k NQ pairs: anchor fp16, packed eager, padded eager.
  10. MiniLM compiled extras: the best compiled engine under CUDA graphs (torch.compile mode "reduce-overhead"),
     compiled token budgets 8k / 32k, the other engine compiled in bf16.

Output under --out ($OUT, else bench_out/): runs.json / runs.jsonl / runs.parquet (every row, all fields;
see jobs/bench_report.py), env.json, summary.txt (the final tables), PNG plots.

Needs only torch, transformers, sentence-transformers, tokenizers, numpy, pyarrow (matplotlib optional).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T_START = time.monotonic()  # the time budget counts from here: imports and model builds included


def _import_bench():
    """Import jobs.bench without running jobs/__init__.py (whatever the Ray job package may import there)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if "jobs" not in sys.modules:
        pkg = types.ModuleType("jobs")
        pkg.__path__ = [str(ROOT / "jobs")]
        pkg.__file__ = str(ROOT / "jobs" / "__init__.py")
        sys.modules["jobs"] = pkg
    from jobs import bench, bench_models, bench_report

    return bench, bench_models, bench_report


class Settings:
    def __init__(self, smoke: bool, args):
        self.smoke = smoke
        if smoke:
            self.small, self.large, self.modern = "minilm-l6", "tiny-xlmr", "tiny-modernbert"
            self.main_dtype, self.alt_dtype = "float32", None
            self.low_dtypes = ("bfloat16",)  # bf16 exercises the low-precision path (fp16 on CPU is slow)
            self.budget, self.sweep = 4096, (2048, 8192)
            self.small_pairs, self.large_pairs, self.prec_pairs, self.tok_pairs = 64, 128, 64, 2000
            self.candidates, self.repeats, self.large_repeats = 16, 1, 1
            self.pipeline_pairs, self.pipeline_rounds = 600, 1  # 3 passes: ~60 s on a slow 2-core box
        else:
            self.small, self.large, self.modern = "minilm-l6", "xlmr-large", "modernbert-base"
            self.main_dtype, self.alt_dtype = "float16", "bfloat16"
            self.low_dtypes = ("float16", "bfloat16")
            self.budget, self.sweep = 16384, (8192, 32768)
            self.small_pairs, self.large_pairs, self.prec_pairs, self.tok_pairs = 20000, 4000, 2000, 20000
            self.candidates, self.repeats, self.large_repeats = 50, 3, 2
            self.pipeline_pairs, self.pipeline_rounds = 200_000, 2
        if args.small_pairs:
            self.small_pairs = args.small_pairs
        if args.large_pairs:
            self.large_pairs = args.large_pairs
        if args.repeats:
            self.repeats = self.large_repeats = args.repeats
        self.large_prec_pairs = max(100, self.prec_pairs // 2)


class Estimates:
    """Seconds a kind of run is expected to take (a guess until one ran, then the latest seen) and the most one
    may take before it is interrupted."""

    GUESS = {("small", "anchor"): 20, ("small", "eager"): 15, ("small", "compiled"): 70,
             ("large", "anchor"): 35, ("large", "eager"): 30, ("large", "compiled"): 120,
             ("small", "precision"): 30, ("large", "precision"): 60, ("any", "tokenize"): 15,
             ("small", "pipeline"): 60, ("modern", "precision"): 40, ("modern", "anchor"): 25,
             ("modern", "eager"): 20}
    CAP = {("small", "anchor"): 90, ("small", "eager"): 60, ("small", "compiled"): 150,
           ("large", "anchor"): 120, ("large", "eager"): 90, ("large", "compiled"): 200,
           ("small", "precision"): 120, ("large", "precision"): 180, ("any", "tokenize"): 60,
           ("small", "pipeline"): 150, ("modern", "precision"): 120, ("modern", "anchor"): 90,
           ("modern", "eager"): 90}

    def __init__(self):
        self.seen: dict = {}

    def est(self, key) -> float:
        return self.seen.get(key, self.GUESS[key])

    def cap(self, key) -> float:
        return self.CAP[key]

    def observe(self, key, seconds: float) -> None:
        self.seen[key] = seconds


def _env(B, device) -> dict:
    import torch

    env = {"python": sys.version.split()[0], **B.versions(), "device": str(device),
           "device_name": B.device_name(device), "cpu_cores": B.cpu_cores(), "cuda": torch.version.cuda}
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = getattr(flash_attn, "__version__", "yes")
    except Exception:
        env["flash_attn"] = None
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        env["torch_varlen_attn"] = True
    except Exception:
        env["torch_varlen_attn"] = False
    from kernels.packed_attention import _VARLEN_WINDOW

    env["torch_varlen_window"] = _VARLEN_WINDOW  # ModernBERT's windowed layers on torch's kernel, else flash-attn
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return env


def _ok(row) -> bool:
    return row is not None and row.get("status") == "ok" and bool(row.get("pairs_per_s"))


def run_check(args, state: dict) -> int:
    B, bm, br = _import_bench()
    import torch

    smoke = args.smoke
    S = Settings(smoke, args)
    device = "cpu" if smoke else args.device
    out = Path(args.out or os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    bench = B.Bench(device=device, repeats=S.repeats, out_dir=str(out),
                    budget_s=args.budget_s - (time.monotonic() - T_START), peak_tflops=args.peak_tflops)
    state["bench"] = bench
    est = Estimates()
    env = _env(B, bench.device)
    env.update(budget_s=args.budget_s, smoke=smoke, argv=sys.argv[1:])
    (out / "env.json").write_text(json.dumps(env, indent=1))
    bench.log("env " + json.dumps(env))
    if bench.device.type != "cuda" and not smoke:
        bench.log("WARNING: no CUDA device; running the GPU plan on CPU will mostly be skipped by the time guard")

    def timed(key, fn):
        t = time.monotonic()
        out = fn()
        rows = out if isinstance(out, list) else [out]
        if any(r.get("status") != "skipped" for r in rows):  # a skip says nothing about the cost
            est.observe(key, time.monotonic() - t)
        return out

    def engine(role, bundle, pairs, eng, dtype, compiled, budget=None, bucketing=True, repeats=None, mode=None):
        key = (role, "compiled" if compiled else "eager")
        spec = B.EngineSpec(engine=eng, dtype=dtype, compile=compiled, max_batch_tokens=budget or S.budget,
                            bucketing=bucketing, compile_mode=mode)
        return timed(key, lambda: bench.run_engine(bundle, pairs, spec, est_s=est.est(key), cap_s=est.cap(key),
                                                   repeats=repeats))

    def anchor(role, bundle, pairs, dtype, repeats=None):
        key = (role, "anchor")
        return timed(key, lambda: bench.run_anchor(bundle, pairs, dtype, est_s=est.est(key), cap_s=est.cap(key),
                                                   repeats=repeats))

    def precision(role, bundle, pairs):
        key = (role, "precision")
        return timed(key, lambda: bench.precision(bundle, pairs, S.low_dtypes, ("packed", "padded"),
                                                  est_s=est.est(key), cap_s=est.cap(key)))

    def model(name):
        try:
            return bench.model(name)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001
            bench.record_failure("engine", f"build {name}", name, e)
            return None

    results: dict = {}

    # 1. CPU tokenization
    for name in (S.small, S.large):
        if bench._skip_reason(est.est(("any", "tokenize"))):
            break
        try:
            tb = bench.tokenizer_bundle(name)
            tp = bench.pairs("msmarco", S.tok_pairs, S.candidates)
            timed(("any", "tokenize"), lambda: bench.run_tokenize(tb, tp, est_s=est.est(("any", "tokenize"))))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001
            bench.record_failure("tokenize", f"tokenizer {name}", name, e)

    # 2-3. MiniLM: precision, then the core matrix
    small = model(S.small)
    if small is not None:
        precision("small", small, bench.pairs("nq", S.prec_pairs, S.candidates))
        sp = bench.pairs("nq", S.small_pairs, S.candidates)
        anchor("small", small, sp, S.main_dtype)
        for eng in ("packed", "padded"):
            results[("small", eng, False)] = engine("small", small, sp, eng, S.main_dtype, False)
        results[("small", "packed", True)] = engine("small", small, sp, "packed", S.main_dtype, True)

    # 4-5. XLM-R-large: precision, anchor, eager engines
    large = None
    if not bench._skip_reason(est.est(("large", "precision"))):
        large = model(S.large)
    lp = bench.pairs("nq", S.large_pairs, S.candidates)
    if large is not None:
        precision("large", large, bench.pairs("nq", S.large_prec_pairs, S.candidates))
        anchor("large", large, lp, S.main_dtype, repeats=S.large_repeats)
        for eng in ("packed", "padded"):
            results[("large", eng, False)] = engine("large", large, lp, eng, S.main_dtype, False,
                                                    repeats=S.large_repeats)

    # 4b. ModernBERT precision: its packed path (rotary, sliding windows, mean pooling) on this GPU's kernels
    modern = None
    if not bench._skip_reason(est.est(("modern", "precision"))):
        modern = model(S.modern)
    if modern is not None:
        precision("modern", modern, bench.pairs("nq", S.large_prec_pairs, S.candidates))

    # the compiled engine on XLM-R (packed unless it failed to compile on MiniLM), then MiniLM padded compiled
    best_compiled = "padded" if ("small", "packed", True) in results and not _ok(results[("small", "packed", True)]) \
        else "packed"
    if large is not None:
        results[("large", best_compiled, True)] = engine("large", large, lp, best_compiled, S.main_dtype, True,
                                                         repeats=S.large_repeats)
    if small is not None:
        results[("small", "padded", True)] = engine("small", small, sp, "padded", S.main_dtype, True)
    compiled_small = [(results.get(("small", e, True)), e) for e in ("packed", "padded")]
    compiled_small = [(r["pairs_per_s"], e) for r, e in compiled_small if _ok(r)]
    best_compiled = max(compiled_small)[1] if compiled_small else best_compiled

    # 6. MiniLM extras: budgets, bf16, bucketing off
    if small is not None:
        for budget in S.sweep:
            for eng in ("packed", "padded"):
                engine("small", small, sp, eng, S.main_dtype, False, budget=budget)
        if S.alt_dtype:
            anchor("small", small, sp, S.alt_dtype)
            for eng in ("packed", "padded"):
                engine("small", small, sp, eng, S.alt_dtype, False)
            engine("small", small, sp, best_compiled, S.alt_dtype, True)
        for eng in ("packed", "padded"):
            engine("small", small, sp, eng, S.main_dtype, False, bucketing=False)

    # 7. XLM-R extras
    if large is not None:
        best_large = [(r["pairs_per_s"], k) for k, r in results.items() if k[0] == "large" and _ok(r)]
        _, (_, eng, comp) = max(best_large) if best_large else (0, ("large", "packed", False))
        if S.alt_dtype:
            anchor("large", large, lp, S.alt_dtype, repeats=S.large_repeats)
            engine("large", large, lp, eng, S.alt_dtype, comp, repeats=S.large_repeats)
        engine("large", large, lp, eng, S.main_dtype, comp, budget=max(S.sweep), repeats=S.large_repeats)

    # 8. the shard pipeline around the engine
    if small is not None and not bench._skip_reason(est.est(("small", "pipeline"))):
        timed(("small", "pipeline"), lambda: _pipeline(B, bm, bench, small, S, out, est.cap(("small", "pipeline"))))

    # 9. ModernBERT speed: the anchor, then both engines eager
    if modern is not None:  # on XLM-R's pairs
        anchor("modern", modern, lp, S.main_dtype, repeats=S.large_repeats)
        for eng in ("packed", "padded"):
            engine("modern", modern, lp, eng, S.main_dtype, False, repeats=S.large_repeats)

    # 10. MiniLM compiled extras, last: each compiles afresh, and a time guard firing inside a CUDA-graph capture
    # or a compile could spoil later rows of this process
    if small is not None:
        # CUDA graphs: a MiniLM-L6 batch is ~100 small kernels, so launch overhead is a visible share of it.
        # A graph is recorded per (token total, max_seqlen) the warm-up and the first repeat meet, then replayed.
        engine("small", small, sp, best_compiled, S.main_dtype, True, mode="reduce-overhead")
        for budget in S.sweep:
            for eng in ("packed", "padded"):
                engine("small", small, sp, eng, S.main_dtype, True, budget=budget)
        if S.alt_dtype:
            other = "padded" if best_compiled == "packed" else "packed"
            engine("small", small, sp, other, S.alt_dtype, True)
    return 0


def _pipeline(B, bm, bench, bundle, S, out: Path, cap_s: float) -> dict:
    """Step 8; its table goes to shard_pipeline.txt (appended to the summary), a failure to an error row."""
    import tempfile

    from kernels.config import EngineConfig
    from kernels.engine import Engine
    from scripts.bench_shard_pipeline import measure, table

    try:
        with B.deadline(bench._cap(cap_s)):
            pairs = bench.pairs("nq", S.pipeline_pairs, S.candidates)
            eng = Engine.from_model(bm.copy_model(bundle.model), bundle.tokenizer,
                                    EngineConfig(device=str(bench.device), dtype=S.main_dtype, engine="packed",
                                                 compile=False))
            eng.warmup()
            with tempfile.TemporaryDirectory(prefix="crossrank-pipeline-") as work:
                rows = measure(eng, pairs.queries, pairs.docs, pairs.query_ids, -(-len(pairs) // 4), Path(work),
                               rounds=S.pipeline_rounds)
        d = eng.describe()
        text = f"shard pipeline, {bundle.name} ({d['engine']} {d['dtype']} eager, {d['device_name']}), nq:\n" + table(rows)
        (out / "shard_pipeline.txt").write_text(text + "\n")
        (out / "shard_pipeline.json").write_text(json.dumps(rows, indent=1))
        bench.log(text)
        return {"status": "ok"}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001
        return bench.record_failure("pipeline", "shard pipeline", bundle.name, e)


def summary(rows: list[dict]) -> str:
    """Headline lines: per model the anchor, the fastest engine run and its speed-up; worst precision rows."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("model")):
        mine = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        for r in (r for r in mine if r["kind"] == "tokenize" and r["engine"] != "tokenizer"):
            lines.append(f"{model}: tokenize+assemble {r['pairs_per_s']:,.0f} pairs/s "
                         f"({r['pairs_per_s_per_core']:,.0f}/core, {r['cores']} cores), "
                         f"x{(r['speedup_vs_anchor'] or 0):.2f} vs tokenizer(q, d)")
        for mix in dict.fromkeys(r["mix"] for r in mine if r["kind"] == "engine"):
            eng = [r for r in mine if r["kind"] == "engine" and r["mix"] == mix and r["pairs_per_s"]]
            anc = [r for r in mine if r["kind"] == "anchor" and r["mix"] == mix and r["pairs_per_s"]]
            if eng:
                best = max(eng, key=lambda r: r["pairs_per_s"])
                a = next((x for x in anc if x["dtype"] == best["dtype"]), None)
                lines.append(
                    f"{model} {mix}: best {best['label']}: {best['pairs_per_s']:,.0f} pairs/s, "
                    f"{best['tokens_per_s']:,.0f} tok/s, MFU {('%.1f%%' % (100 * best['mfu'])) if best['mfu'] else '-'}"
                    + (f"; anchor {a['pairs_per_s']:,.0f} pairs/s -> x{best['pairs_per_s'] / a['pairs_per_s']:.2f}"
                       if a else ""))
        prec = [r for r in mine if r["kind"] == "precision" and r["top1_agree"] is not None
                and r["dtype"] != "float32"]
        if prec:
            worst = min(prec, key=lambda r: (r["spearman"] or 0))
            lines.append(f"{model} precision vs fp32: worst spearman {worst['spearman'] or 0:.4f} / top1 "
                         f"{worst['top1_agree']:.3f} ({worst['label']}); " + ", ".join(
                             f"{r['label'].split(' eager')[0]} rel L2 {r['score_rel_l2'] or 0:.1e} "
                             f"(centred {r.get('score_rel_l2_centered') or 0:.1e})" for r in prec))
    errors = [r for r in rows if r["status"] in ("error", "timeout")]
    skipped = [r for r in rows if r["status"] == "skipped"]
    lines.append(f"{len(rows)} rows: {len(rows) - len(errors) - len(skipped)} ok, {len(errors)} error/timeout, "
                 f"{len(skipped)} skipped")
    for r in errors:
        lines.append(f"  {r['status']}: {r['model']} {r['label']}: {(r['error'] or '')[:200]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else bench_out)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget for the whole check in seconds (default 420; 1200 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: tiny pair counts, fp32, tiny XLM-R")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--small-pairs", type=int, default=None, help="MiniLM pairs per measurement (20000)")
    ap.add_argument("--large-pairs", type=int, default=None, help="XLM-R pairs per measurement (4000)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.smoke else 420.0
    B, bm, br = _import_bench()
    out = Path(args.out or os.environ.get("OUT") or "bench_out")
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs.json", "runs.jsonl", "runs.parquet", "summary.txt", "env.json", "shard_pipeline.txt",
                  "shard_pipeline.json"):
        (out / stale).unlink(missing_ok=True)  # a reused folder must not pass off an older run's rows
    for png in out.glob("throughput_vs_budget_*.png"):
        png.unlink(missing_ok=True)
    rc = 1
    bench_rows: list = []
    state: dict = {}
    try:
        rc = run_check(args, state)
    except KeyboardInterrupt:
        print("\n[gpu_check] interrupted: writing what was measured", flush=True)
    except BaseException as e:  # noqa: BLE001 - the check must still write its summary
        import traceback

        print(f"\n[gpu_check] aborted: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
    finally:
        if state.get("bench") is not None:
            try:
                state["bench"].finish(plots=False)  # removes the temp model folders
            except Exception:  # noqa: BLE001
                pass
        try:
            bench_rows = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else []
        except Exception:
            bench_rows = []
        try:
            br.plot_throughput(bench_rows, out)
        except Exception as e:  # noqa: BLE001
            print(f"[gpu_check] plots failed: {e}", flush=True)
        try:
            text = br.table(bench_rows) + "\n\n" + summary(bench_rows)
        except Exception as e:  # noqa: BLE001 - the rows are on disk whatever happens here
            text = f"(summary failed: {type(e).__name__}: {e}; the rows are in {out}/runs.json)"
        if (out / "shard_pipeline.txt").exists():
            text += "\n\n" + (out / "shard_pipeline.txt").read_text().strip()
        text += f"\n\ntotal {time.monotonic() - T_START:.0f}s; rows, plots and this summary in {out}/"
        print("\n" + "=" * 100 + "\n" + text, flush=True)
        try:
            (out / "summary.txt").write_text(text + "\n")
        except OSError:
            pass
    return rc if any(r["status"] == "ok" for r in bench_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
