"""The driver: start or join Ray, score pending shards on the actor pool, then rank across shards.

It plans and schedules; what it keeps is one stats dict per shard. The one exception is the ranking pass
of a small job (LOCAL_RANK_ROWS), which it runs itself rather than start Ray workers for a second's work.
"""
from __future__ import annotations

import os
import sys
import time

import ray

from jobs.finalize import finish_shard, rank_bucket
from jobs.layout import SCORES, SHORTLISTS, WORK, DamagedWork, OutputLayout
from jobs.plan import shard_rows_of
from jobs.pool import ActorPool, actor_resources
from jobs.storage import delete_dir, delete_file, exists, read_json, remove_temporaries
from jobs.watched_tasks import run_watched

# Below this many input rows the driver ranks in-process: measured on 20,000 pairs, ranking plus writing the
# final files took 0.3 s of work but 1.8-3.0 s as Ray tasks (fresh worker processes importing polars).
LOCAL_RANK_ROWS = 250_000


def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import jobs/ and kernels/ from the installed package, or from `ray job submit --working-dir .`.
    ray.init(address=address, include_dashboard=False if not address else None)


def run_job(args, spec: dict, plan, layout: OutputLayout, provenance: dict) -> dict:
    from jobs.rerank import read_shard_stats, write_stats

    t0 = time.perf_counter()
    connect(args.address)
    committed = layout.committed_shards()
    pending = [s.to_dict() for s in plan.shards if s.name not in committed]
    skipped = len(plan.shards) - len(pending)
    if skipped:
        print(f"resuming: {skipped} of {len(plan.shards)} shard(s) already committed", file=sys.stderr)
    engine_info: dict = {}
    failed: list[dict] = []
    per_actor: dict[str, list[float]] = {}
    ray_start_s = time.perf_counter() - t0
    score_t0 = time.perf_counter()
    score_t0_mono = time.monotonic()  # the pool stamps its first ready actor on this clock
    first_ready = None
    if pending:
        # Positions, final files and shortlists made before a shard is (re)scored are stale: drop them before
        # scoring, so that a run killed after its last commit cannot leave them to a rerun with nothing pending.
        for old in (layout.root.child(WORK, "positions"), layout.root.child(SCORES), layout.root.child(SHORTLISTS)):
            delete_dir(old)
        n, resources = actor_resources(args.num_actors, spec.get("engine"))
        pool = ActorPool(spec, n, resources, max_retries=args.max_shard_retries,
                         recover=lambda shard: _committed_stats(layout, shard),
                         shard_timeout=args.shard_timeout)
        bar = _progress(sum(shard_rows_of(s) for s in pending), args.quiet)

        def on_done(stats: dict) -> None:
            mine = per_actor.setdefault(stats["actor"], [0, 0.0, 0.0])
            mine[0] += stats["rows_scored"]
            mine[1] += stats["wall_s"]
            mine[2] += stats.get("model_s") or 0.0
            bar.update(stats["rows_in"])

        try:
            failed = pool.run(pending, on_done)
            infos = pool.actor_info()
            engine_info = {**(infos[0] if infos else {}), "actors": n, "actor_resources": resources,
                           "commits": "apart" if pool.commit_apart else "in the actor",
                           # Per actor: start-up cost, and whether its compiled graphs came from the node's cache
                           "actor_starts": [{k: i.get(k) for k in ("actor", "load_s", "warmup_s", "compile_cache")}
                                            for i in infos]}
            replaced, recovered, timeouts = pool.replaced, pool.recovered, pool.timeouts
            first_ready = pool.first_ready
        finally:
            pool.shutdown()  # frees the GPUs (and a CPU actor's cores) for the ranking pass
            bar.close()
        _withdraw_rejects(layout, failed)
    else:
        replaced = recovered = timeouts = 0
    score_end = time.perf_counter()
    score_s = score_end - score_t0
    actor_start_s = min(first_ready - score_t0_mono, score_s) if first_ready else 0.0  # reported apart
    fin_t0 = time.perf_counter()
    shard_stats = read_shard_stats(layout, [s.name for s in plan.shards])
    collapsed, ranked_in, rank_timeouts, rank_deaths = 0, None, 0, 0
    if not failed:
        key_files = layout.key_files()
        _check_work(layout, plan, shard_stats, key_files)
        collapsed, ranked_in, rank_timeouts, rank_deaths = _finalize(spec, plan, layout, args.top_k, key_files,
                                                                     args.ranking_timeout)
    finalize_s = time.perf_counter() - fin_t0
    stats = write_stats(layout, [s.name for s in plan.shards], failed, shard_stats)
    totals = _check_totals(plan, stats, failed)
    totals.update(wall_s=time.perf_counter() - t0, ray_start_s=ray_start_s, score_s=score_s,
                  actor_start_s=actor_start_s, score_after_ready_s=score_s - actor_start_s,
                  finalize_s=finalize_s, actors_replaced=replaced, shard_timeouts=timeouts,
                  ranking_timeouts=rank_timeouts, ranking_task_deaths=rank_deaths,
                  shards_recovered_after_crash=recovered, docs_collapsed=collapsed,
                  ranking_buckets=plan.buckets, ranking_ran_in=ranked_in,
                  # Of the actors' time on shards, the share spent driving the model (the rest: reading,
                  # splitting, de-duplicating, handing over or committing): how well the device is fed.
                  model_share=_share(sum(a[2] for a in per_actor.values()), sum(a[1] for a in per_actor.values())))
    if replaced or timeouts or rank_timeouts or rank_deaths or totals["retries"]:
        # A process killed mid-write (hung, or its actor lost) may have left a half-written temporary file,
        # which a reader's glob of OUT/scores/ would take in: the run's end leaves none.
        remove_temporaries(layout.root)
    _summary(totals, per_actor, args.quiet)
    return {"failed": failed, "totals": totals, "provenance": provenance, "engine": engine_info}


def _committed_stats(layout: OutputLayout, shard: dict) -> dict | None:
    """A shard whose commit process died after the commit (the reply lost with the process) is done: its stats are on
    storage, written just before the scored file (so a scored file implies them)."""
    return read_json(layout.shard_stats(shard["name"])) if exists(layout.scored(shard["name"])) else None


def _withdraw_rejects(layout: OutputLayout, failed: list[dict]) -> None:
    """A shard writes its rejects before it commits, so one that failed may have left them: remove them, so
    that OUT/rejects/ holds only rows of committed shards and no row of a failed shard is half accounted for.
    Safe only once the pool is shut down (no actor can still be writing); a rerun rewrites them."""
    committed = layout.committed_shards() if failed else set()
    for shard in failed:
        if shard["shard"] in committed:  # its commit landed though its call failed: its rejects are its rows
            continue
        if delete_file(layout.rejects(shard["shard"])):
            print(f"removed the rejects of failed shard {shard['shard']} (a rerun rewrites them)", file=sys.stderr)


def _check_work(layout: OutputLayout, plan, shard_stats: dict[str, dict], key_files: dict) -> None:
    """Before ranking: every shard left its stats and the key files they name. Work files deleted since (by
    hand, by a storage lifecycle rule) would rank queries without some of their rows, or stop the job later
    after final files were written; DamagedWork names the shard and how to redo it."""
    problems = []
    for s in plan.shards:
        st = shard_stats.get(s.name)
        if st is None:
            problems.append((s.name, f"its stats {layout.shard_stats(s.name).uri} are missing"))
            continue
        have = set(key_files.get(s.name, {}))
        if "key_buckets" not in st:  # committed before the buckets were recorded: some, if it has rows
            if st["rows_scored"] and not have:
                problems.append((s.name, f"its key files under {layout.keys_dir(s.name).uri} are missing"))
            continue
        missing = sorted(set(st["key_buckets"]) - have)
        if missing:
            problems.append((s.name, "its key file(s) " + ", ".join(layout.keys(s.name, b).uri for b in missing)
                             + " are missing"))
    if problems:
        raise DamagedWork.of(layout, problems)


def _finalize(spec: dict, plan, layout: OutputLayout, top_k: int | None, key_files: dict,
              ranking_timeout: float | None) -> tuple[int, str, int, int]:
    """Rank every bucket of queries, then write each shard's final file: Ray tasks, which scale with the
    cluster (each under a time limit: jobs.watched_tasks), or the driver itself for a small job. Returns the
    passages collapsed, where it ran, and how many ranking tasks were killed for running too long or died."""
    names = {s.seq: s.name for s in plan.shards}
    act = spec["engine"].get("activation", "identity")  # applied to the final files; actors score logits
    by_bucket: dict[int, list[str]] = {}
    for s in plan.shards:
        for bucket, loc in key_files.get(s.name, {}).items():
            by_bucket.setdefault(bucket, []).append(loc.uri)
    timeouts = deaths = 0
    if plan.total_rows <= LOCAL_RANK_ROWS:
        ranked = [rank_bucket(spec["output"], b, by_bucket.get(b, []), names, top_k, act) for b in range(plan.buckets)]
        for s in plan.shards:
            finish_shard(spec["output"], s.name, act)
        where = "driver"
    else:
        watch = {"setting": ranking_timeout, "fault": spec.get("fault")}
        ranked, counts = run_watched(rank_bucket, [(f"ranking bucket {b}", (spec["output"], b, by_bucket.get(b, []),
                                                    names, top_k, act)) for b in range(plan.buckets)], **watch)
        _, more = run_watched(finish_shard, [(f"final file of shard {s.name}", (spec["output"], s.name, act))
                                             for s in plan.shards], **watch)
        timeouts, deaths = counts.timeouts + more.timeouts, counts.deaths + more.deaths
        where = "ray tasks"
    return sum(r.get("docs_collapsed", 0) for r in ranked), where, timeouts, deaths


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _check_totals(plan, stats, failed) -> dict:
    """scored + rejected = input, per shard and in total; a mismatch is a bug, and the job says so."""
    rows = stats.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    by_name = {s.name: s for s in plan.shards}
    for r in ok:
        expect = by_name[r["shard"]].rows
        if r["rows_in"] != expect or r["rows_scored"] + r["rows_rejected"] != expect:
            raise AssertionError(f"shard {r['shard']}: {expect} input rows but {r['rows_in']} read, "
                                 f"{r['rows_scored']} scored, {r['rows_rejected']} rejected")
    totals = {
        "rows_in": plan.total_rows,
        "rows_scored": sum(r["rows_scored"] for r in ok),
        "rows_rejected": sum(r["rows_rejected"] for r in ok),
        "rows_not_rescored": sum(r["rows_not_rescored"] or 0 for r in ok),
        "float32_rescored": sum(r.get("float32_rescored") or 0 for r in ok),
        "rows_in_failed_shards": sum(f["rows_in"] for f in failed),
        # an unreadable file's rows are unknown (counted as 0 above): its shard failed and is named
        "input_files_unreadable": sum(1 for f in plan.files if f.get("rows") is None),
        "shards": len(plan.shards), "shards_failed": len(failed),
        "retries": sum(max(0, (r["attempts"] or 1) - 1) for r in rows),
        "real_tokens": sum(r["real_tokens"] or 0 for r in ok),
        "computed_tokens": sum(r["computed_tokens"] or 0 for r in ok),
    }
    if not failed and totals["rows_scored"] + totals["rows_rejected"] != plan.total_rows:
        raise AssertionError(f"{plan.total_rows} input rows but {totals['rows_scored']} scored + "
                             f"{totals['rows_rejected']} rejected")
    return totals


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, quiet: bool):
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", unit_scale=True, desc="rerank", file=sys.stderr, smoothing=0.1)


def _summary(totals: dict, per_actor: dict, quiet: bool) -> None:
    if quiet:
        return
    wall = totals["wall_s"]
    scored = totals["rows_scored"]
    rank_note = "".join(f", {n} task(s) {what}, ran again" for n, what in (
        (totals["ranking_timeouts"], "timed out"), (totals["ranking_task_deaths"], "lost their process")) if n)
    lines = [
        "", "crossrank summary",
        f"  pairs in          {totals['rows_in']:>12,}",
        f"  scored            {scored:>12,}",
        f"  rejected          {totals['rows_rejected']:>12,}   (see OUT/rejects/, column reject_reason)",
        f"  not rescored      {totals['rows_not_rescored']:>12,}   (below --rerank-depth)",
        *([f"  float32 rescored  {totals['float32_rescored']:>12,}   (distinct pairs whose fp16/bf16 score overflowed "
           f"to NaN/inf)"] if totals["float32_rescored"] else []),
        f"  shards            {totals['shards']:>12,}   failed {totals['shards_failed']}, retries {totals['retries']}"
        f"{f', timed out {n}' if (n := totals.get('shard_timeouts')) else ''}",
        f"  wall time         {wall:>12.1f} s  (Ray start {totals['ray_start_s']:.1f} s, actor start and model "
        f"load {totals['actor_start_s']:.1f} s, scoring {totals['score_after_ready_s']:.1f} s, "
        f"ranking {totals['finalize_s']:.1f} s{rank_note})",
        f"  pairs/s overall   {scored / wall if wall else 0:>12,.0f}",
    ]
    for actor, (n, secs, model_s) in sorted(per_actor.items()):
        lines.append(f"  pairs/s {actor:<24} {n / secs if secs else 0:>10,.0f}  ({n:,} pairs, in the model "
                     f"{_share(model_s, secs) or 0:.0%} of its time on shards)")
    print("\n".join(lines), file=sys.stderr)
