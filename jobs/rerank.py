"""Rerank Parquet shortlists with a cross-encoder on a Ray actor pool.

    python -m jobs.rerank --input shortlists/ --output out/ --model cross-encoder/ms-marco-MiniLM-L6-v2

Connects to a running cluster (--address or RAY_ADDRESS), else starts Ray locally. Reruns resume: shards
whose output is committed are skipped. See README.md for the input and output contracts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs import manifest as mf
from jobs.layout import REJECTS, SCORES, SHORTLISTS, WORK, DamagedWork, OutputLayout
from jobs.plan import make_plan
from jobs.storage import (
    delete_dir, delete_file, exists, locate, parallel, read_json, remove_temporaries, write_json, write_parquet,
)
from kernels.loading import model_identity, model_provenance, then_now
from schemas.contract import STATS_SCHEMA, ColumnMap, InputSchemaError


def _timeout(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto or seconds >= 0, got {text}")
    return value


_timeout.__name__ = "auto or seconds"


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:  # --rerank-depth 0 once meant "off", i.e. rescore everything
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its message
    return parse


_positive = _at_least(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.rerank", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True, help="Parquet files, directories or globs; local or any pyarrow.fs URI")
    io.add_argument("--output", required=True, help="output directory (local or URI); the job writes only under it")
    io.add_argument("--query-col", default="query", help="column holding the query text")
    io.add_argument("--doc-col", default="doc", help="column holding the passage text")
    io.add_argument("--query-id-col", default="query_id", help="column holding the query id")
    io.add_argument("--doc-id-col", default="doc_id", help="column holding the passage id")
    io.add_argument("--first-stage-score-col", default="first_stage_score", help="column holding the retriever's score")
    io.add_argument("--overwrite", action="store_true", help="redo everything instead of resuming")
    io.add_argument("--shard-rows", type=_positive, default=500_000, help="most rows per shard (whole row groups; default %(default)s)")
    model = ap.add_argument_group("model")
    model.add_argument("--model", required=True, help="Hugging Face id or local folder of a *ForSequenceClassification")
    model.add_argument("--revision", default=None, help="hub branch, tag or commit to load")
    model.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")
    model.add_argument("--max-length", type=_positive, default=None, help="longest pair in tokens (default: the model's limit)")
    model.add_argument("--activation", choices=["identity", "sigmoid"], default="identity",
                       help="identity = raw logits (default); scores are ordering signals either way")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--engine", choices=["auto", "packed", "padded"], default="auto",
                     help="packed = padding-free (auto picks it when the architecture allows)")
    eng.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                     help="auto = on CUDA bfloat16 for a checkpoint saved in it, else float16; float32 on CPU")
    eng.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    eng.add_argument("--max-batch-tokens", type=_positive, default=None, help="token budget per forward pass")
    eng.add_argument("--device", default="auto", help="auto, cpu, cuda")
    pool = ap.add_argument_group("cluster")
    pool.add_argument("--address", default=None,
                      help="Ray cluster address; default: RAY_ADDRESS, else (Ray's rule) a cluster started with "
                           "`ray start` on this machine, else a new local one; `local` always starts a new one")
    pool.add_argument("--num-actors", type=_positive, default=None, help="default: one per GPU, or one CPU actor")
    pool.add_argument("--max-shard-retries", type=_at_least(0), default=2,
                      help="retries of a failing shard before it is reported (default %(default)s)")
    pool.add_argument("--shard-timeout", type=_timeout, default=None, metavar="SECONDS|auto",
                      help="an actor silent this long (no batch done, no step of its shard) or a commit "
                           "running longer than this (and 20x the slowest commit's time per row) is taken for "
                           "hung: its actor or task is killed and the shard retried; auto (default) = 600; "
                           "0 = never")
    pool.add_argument("--ranking-timeout", type=_timeout, default=None, metavar="SECONDS|auto",
                      help="a ranking task of a large job (one query bucket, or one shard's final file) running "
                           "longer than this (and 20x the slowest of its kind) is killed and run again with "
                           "twice the limit, 3 tries in all; auto (default) = 600; 0 = never")
    rank = ap.add_argument_group("ranking")
    rank.add_argument("--rerank-depth", type=_positive, default=None,
                      help="rescore only first_stage_rank <= K; deeper rows stay below, in first-stage order")
    rank.add_argument("--dedupe-docs", action="store_true",
                      help="collapse identical passage texts under different ids within a query (best-ranked id kept)")
    rank.add_argument("--top-k", type=_positive, default=None, help="also write OUT/shortlists/ cut at K per query")
    rank.add_argument("--no-report", action="store_true", help="skip the evaluation report at the end")
    rank.add_argument("--report-scratch", default=None, metavar="DIR",
                      help="local folder for the report's staged columns, tens of bytes a row (default: system temp)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no summary tables (errors still print)")
    return ap.parse_args(argv)


def job_spec(args: argparse.Namespace) -> dict:
    fault = {}
    if os.environ.get("CROSSRANK_FAULT_POINT"):  # tests make workers die at a chosen point
        fault = {"point": os.environ["CROSSRANK_FAULT_POINT"], "shard": os.environ.get("CROSSRANK_FAULT_SHARD", ""),
                 "attempts": int(os.environ.get("CROSSRANK_FAULT_ATTEMPTS", "1"))}
    if os.environ.get("CROSSRANK_FAULT_BREAK_DEVICE_FILE"):  # a hang that kills the device: see maybe_fail
        fault["break_device_file"] = os.environ["CROSSRANK_FAULT_BREAK_DEVICE_FILE"]
    if os.environ.get("CROSSRANK_FAULT_SLEEP_S"):  # tests slow shards down to act on them mid-flight
        fault.update(sleep_s=float(os.environ["CROSSRANK_FAULT_SLEEP_S"]), shard=os.environ.get("CROSSRANK_FAULT_SHARD", ""))
    if os.environ.get("CROSSRANK_FAULT_COMMIT_SLEEP_S"):  # a slow upload
        fault.update(commit_sleep_s=float(os.environ["CROSSRANK_FAULT_COMMIT_SLEEP_S"]),
                     shard=os.environ.get("CROSSRANK_FAULT_SHARD", ""))
    engine = {"device": args.device, "dtype": args.dtype, "engine": args.engine, "max_length": args.max_length,
              "max_batch_tokens": args.max_batch_tokens, "activation": args.activation,
              "compile": False if args.no_compile else None}
    if os.environ.get("CROSSRANK_FAULT_OOM_ABOVE_TOKENS"):
        engine["extra"] = {"oom_above_tokens": int(os.environ["CROSSRANK_FAULT_OOM_ABOVE_TOKENS"])}
    if os.environ.get("CROSSRANK_FAULT_BATCH_SLEEP_S"):  # a slow device: every batch takes this long
        engine["extra"] = {**engine.get("extra", {}), "batch_sleep_s": float(os.environ["CROSSRANK_FAULT_BATCH_SLEEP_S"])}
    return {
        "model": args.model, "revision": args.revision, "trust_remote_code": args.trust_remote_code,
        "engine": engine, "output": args.output, "rerank_depth": args.rerank_depth,
        "dedupe_docs": args.dedupe_docs, "fault": fault,
        "columns": column_names(args),
    }


def column_names(args: argparse.Namespace) -> dict:
    """Canonical column -> the input column it is read from (--query-col etc.)."""
    return {"query_id": args.query_id_col, "query": args.query_col, "doc_id": args.doc_id_col,
            "doc": args.doc_col, "first_stage_score": args.first_stage_score_col}


def scoring_options(args: argparse.Namespace, provenance: dict) -> dict:
    """What decides a row's score and position: a rerun must match it to reuse committed shards."""
    from kernels import SCORE_RULE

    return {"model": model_identity(provenance), "max_length": args.max_length, "activation": args.activation,
            "rerank_depth": args.rerank_depth, "dedupe_docs": args.dedupe_docs, "columns": column_names(args),
            "score_rule": SCORE_RULE}


class OutputConflict(Exception):
    """--output holds another job's work; the message says what differs."""


def _setting_change(key: str, before, now) -> str:
    if key == "model" and isinstance(before, dict) and isinstance(now, dict):
        differ = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        return "model: " + ", ".join(f"{k} {str(before.get(k))[:12]} then, {str(now.get(k))[:12]} now" for k in differ)
    return f"{key}: {then_now(before, now)}"


def prepare_output(layout: OutputLayout, plan, overwrite: bool, options: dict | None = None) -> None:
    """Start fresh, or resume the same job: refuse (OutputConflict) to mix the outputs of different inputs or
    settings."""
    if overwrite:
        for sub in (SCORES, REJECTS, SHORTLISTS, WORK, "report"):
            delete_dir(layout.root.child(sub))
        delete_file(layout.stats)
    elif exists(layout.plan):
        committed = layout.committed_shards()
        try:
            earlier = read_json(layout.plan)  # one read: on an object store each is a round trip
        except ValueError as e:  # truncated by hand: nothing to check the committed shards against
            raise OutputConflict(f"{layout.plan.uri} cannot be read ({e}): pass --overwrite or use another --output")
        plan.keep_buckets(earlier)
        problem = plan.resume_problem(earlier, committed.__contains__)
        if problem:
            raise OutputConflict(f"{layout.root.uri} holds the output of different inputs or shard sizes "
                                 f"({problem}): pass --overwrite or use another --output")
        previous = earlier.get("options")
        if options is not None and previous is not None and previous != options:
            changed = sorted(k for k in options if previous.get(k) != options[k])
            raise OutputConflict(f"{layout.root.uri} was written with other settings: "
                                 + "; ".join(_setting_change(k, previous.get(k), options[k]) for k in changed)
                                 + ". Pass --overwrite or use another --output")
        gone = plan.gone_shards(earlier)  # uncommitted (a mended file packs otherwise now): nothing may linger
        parallel(layout.delete_shard, gone)
        if gone:
            print(f"removed what {len(gone)} uncommitted shard(s) of the earlier plan left", file=sys.stderr)
    elif exists(layout.root) and layout.committed_shards():  # its plan.json lost: nothing to check them against
        raise OutputConflict(f"{layout.root.uri} holds committed shards but no {layout.plan.uri} to check them "
                             "against: pass --overwrite or use another --output")
    # Until this run ends, the manifest says so: a resume may rewrite shortlists and final files, and an
    # interrupted one must not leave the last run's "complete" beside them.
    running = {"status": "running", "started": mf.now(), "command": mf.command_line()}
    if not overwrite and exists(layout.manifest):  # the last run's record, kept until this run ends
        try:
            last = read_json(layout.manifest)
        except ValueError:
            last = None
        # An interrupted run's "running" record carries the last finished one: keep that, not a chain.
        last = last.get("previous") if last and last.get("status") == "running" else last
        if last:
            running["previous"] = last
    write_json(running, layout.manifest)
    removed = remove_temporaries(layout.root) if exists(layout.root) else 0
    if removed:
        print(f"removed {removed} half-written file(s) left by an interrupted run", file=sys.stderr)
    write_json({**plan.to_json(), "options": options}, layout.plan)


def _earlier_plan(out, overwrite: bool) -> dict | None:
    """The plan.json of the run this one may resume (one that committed shards): files pack as they did in it,
    so a file mended or added since changes no committed shard."""
    layout = OutputLayout(out)
    if overwrite or not exists(layout.plan) or not layout.committed_shards():
        return None
    try:
        return read_json(layout.plan)
    except ValueError:  # prepare_output refuses it, with the reason
        return None


def check_engine_choice(args: argparse.Namespace) -> None:
    """--engine packed on an architecture it cannot run fails here, before Ray, not in every actor."""
    if args.engine != "packed":
        return
    from transformers import AutoConfig

    from kernels import packed

    config = AutoConfig.from_pretrained(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    if not packed.supports(config):
        raise packed.UnsupportedArchitecture(
            f"--engine packed does not support model_type {config.model_type!r}; use --engine auto or padded")


def _model_hint(error: Exception) -> str:
    from kernels.packed import UnsupportedArchitecture

    if isinstance(error, (FileNotFoundError, NotADirectoryError, UnsupportedArchitecture)):
        return ""  # the message says it all
    return ("\n  a hub id needs network access or the model in the local Hugging Face cache (HF_HUB_OFFLINE=1 "
            "reads the cache without retrying); a local folder must hold config.json and *.safetensors")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, t0 = mf.now(), time.perf_counter()
    cols = ColumnMap(**column_names(args))
    try:
        out = locate(args.output)
        if out.fs.get_file_info(out.path).type == pafs.FileType.File:
            raise NotADirectoryError(f"--output {args.output} is a file; name a folder (it is created if missing)")
        plan = make_plan(args.input, cols, args.shard_rows, exclude=out, earlier=_earlier_plan(out, args.overwrite))
    except (InputSchemaError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, pa.ArrowException) as e:  # a store that cannot be reached, credentials, permissions
        print(f"error: cannot read --input or --output: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if not args.quiet and (small := plan.small_shards_warning(args.shard_rows)):
        print(small, file=sys.stderr)
    if args.rerank_depth and any("first_stage_rank" not in c for c in plan.columns.values()):
        print("error: --rerank-depth needs a first_stage_rank column in every input file", file=sys.stderr)
        return 2
    try:  # the model's config and revision, before Ray starts: a wrong id or missing flag fails in one line
        provenance = model_provenance(args.model, args.revision, trust_remote_code=args.trust_remote_code)
        check_engine_choice(args)
    except Exception as e:
        print(f"error: cannot load model {args.model!r}: {type(e).__name__}: {e}{_model_hint(e)}",
              file=sys.stderr)
        return 2
    layout = OutputLayout(out)
    try:
        prepare_output(layout, plan, args.overwrite, scoring_options(args, provenance))
    except OutputConflict as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, pa.ArrowException) as e:
        print(f"error: cannot write --output {args.output}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    spec = {**job_spec(args), "buckets": plan.buckets, "model_path": provenance.get("model_path"),
            "model_identity": model_identity(provenance)}

    from jobs.driver import run_job  # imports ray: after the cheap checks, so bad input fails fast
    from jobs.pool import ActorStartError
    from jobs.watched_tasks import RankingFailed

    try:
        result = run_job(args, spec, plan, layout, provenance)
    except ActorStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DamagedWork as e:  # raised in a Ray task, it comes wrapped: its cause holds the message
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 1
    except RankingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    totals = result["totals"]
    manifest = {
        "status": "complete" if not result["failed"] else "incomplete",
        "command": mf.command_line(), "started": started, "finished": mf.now(),
        "wall_s": time.perf_counter() - t0, "model": result["provenance"], "engine": result["engine"],
        "engine_config": spec["engine"], "libraries": mf.library_versions(), "code_revision": mf.code_revision(),
        "inputs": plan.files, "plan_fingerprint": plan.fingerprint(), "shards": len(plan.shards),
        "buckets": plan.buckets, "totals": totals, "failed_shards": [f["shard"] for f in result["failed"]],
        "rerank_depth": args.rerank_depth, "top_k": args.top_k, "columns": spec["columns"],
        "score_note": "raw cross-encoder logits (or their sigmoid): ordering signals within a query, not probabilities",
    }
    write_json(manifest, layout.manifest)
    if result["failed"]:
        print(f"\n{len(result['failed'])} shard(s) failed; mend what each error names (or wait out a passing "
              "fault), then rerun the same command: it redoes only these", file=sys.stderr)
        for f in result["failed"]:
            print(f"  {f['shard']} ({f['source']}, {f['attempts']} attempt(s)): {f['error']}", file=sys.stderr)
        return 1
    if not args.no_report:
        try:
            from jobs.report import write_report

            write_report(args.output, quiet=args.quiet, scratch=args.report_scratch)
        except Exception as e:  # the scores are committed; a report problem must not hide that
            print(f"warning: report failed: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


def read_shard_stats(layout: OutputLayout, shard_names: list[str]) -> dict[str, dict]:
    """The stats each shard's commit wrote, by shard, in `shard_names` order (from one listing, then
    concurrent reads)."""
    written = layout.shards_with_stats()
    names = [s for s in shard_names if s in written]

    def read(name: str) -> dict:
        loc = layout.shard_stats(name)
        try:
            return read_json(loc)
        except (ValueError, FileNotFoundError) as e:  # truncated or gone: a JSONDecodeError names no file
            raise DamagedWork(layout, name, f"its stats {loc.uri} cannot be read ({type(e).__name__}: {e})") from e

    return dict(zip(names, parallel(read, names)))


def write_stats(layout: OutputLayout, shard_names: list[str], failed: list[dict],
                rows: dict[str, dict] | None = None) -> pa.Table:
    """OUT/stats.parquet: one row per shard; `rows` as read_shard_stats gives them (read here if not given)."""
    rows = read_shard_stats(layout, shard_names) if rows is None else rows
    failed_names = {f["shard"] for f in failed}
    rows = [r for r in rows.values() if r["shard"] not in failed_names] + failed
    table = pa.Table.from_pylist([{k: r.get(k) for k in STATS_SCHEMA.names} for r in rows], schema=STATS_SCHEMA)
    write_parquet(table, layout.stats)
    return table


if __name__ == "__main__":
    sys.exit(main())
