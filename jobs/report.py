"""Rerank report: what the cross-encoder moved, and (with labels) whether it helped.

    python -m jobs.report OUT [--top-regressions N] [--scratch DIR] [--quiet]

OUT is a local folder or any URI pyarrow.fs resolves (s3://, gs://, hdfs://), like the job's --output.
Reads OUT/scores/*.parquet once, only the columns the metrics need (jobs/report_source.py), and
OUT/manifest.json when present (for the model name), and writes OUT/report/:

- metrics.parquet: long format, one row per metric. Columns: section (coverage | movement | quality | depth
  | scores), metric, value (float; for before/after metrics it equals `after`), before, after, delta
  (= after - before; the three are null for metrics with a single value), n (the denominator: queries or
  rows the metric is over), description.
- per_query.parquet: one row per query, sorted by query_id. query_id, n_candidates, n_rescored,
  winner_changed, first_stage_winner, new_winner (doc_ids), new_winner_first_stage_rank, top1_from_deep
  (new winner at first-stage rank >= 4), kendall_tau (null for a single candidate), mean_abs_shift,
  max_promotion, max_demotion (positions), most_promoted_/most_demoted_ doc_id, first_stage_rank,
  rerank_position (the doc that moved furthest; null when none did), promoted_into_top{1,3,10},
  demoted_out_of_top{1,3,10} (doc counts); with a `label` column also n_relevant,
  {ndcg@1,ndcg@3,ndcg@10,mrr@10,recall@1,recall@3,recall@10}_{before,after} (null when the query has no
  relevant candidate), ndcg@10_delta, outcome (up | down | unchanged | null), new_misordered_pairs; last
  rerank_position_inconsistent (rerank_position was not exactly 1..n; should never be true).
- review.parquet (labelled runs only; at most --top-regressions rows, possibly none): the worst
  regressions, one row per query, worst nDCG@10 change first. rank, query_id, query,
  ndcg@10_{before,after,delta}, then for the relevant passage reranking pushed down and for the lower-label
  passage now above it: {demoted,above}_doc_id, _doc (text), _label, _first_stage_rank, _rerank_position,
  _score.
- score_histogram.png, position_shifts.png, winner_first_stage_rank.png, quality.png (labelled runs).
- report.html: one self-contained page, plots embedded as data URIs.

Every file is written under a temporary name in OUT/report/ and renamed into place (jobs/storage.py).
Metric definitions live in jobs/report_metrics.py.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import polars as pl

from jobs import report_html as rh
from jobs import report_metrics as rm
from jobs.report_source import stage
from jobs.storage import Location, delete_file, locate, parallel, read_json, write_bytes


def read_manifest(out: Location) -> dict:
    """OUT/manifest.json as a dict; {} when absent or unreadable (the report does not need it)."""
    try:
        data = read_json(out.child("manifest.json"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def model_identity(manifest: dict) -> tuple[str | None, str | None]:
    """(model, revision) from the manifest: flat keys "model" / "model_revision", or "model" holding the
    job's provenance dict (model, resolved_revision, requested_revision, weights_sha256)."""
    model, rev = manifest.get("model"), manifest.get("model_revision") or manifest.get("revision")
    if isinstance(model, dict):
        info = model
        model = info.get("model") or info.get("name")
        rev = rev or info.get("model_revision") or info.get("resolved_revision") or info.get("requested_revision")
        if not rev and info.get("weights_sha256"):
            rev = "weights sha256 " + str(info["weights_sha256"])[:12]
    return (str(model) if model else None), (str(rev) if rev else None)


def _provenance(manifest: dict) -> dict:
    """Scalar manifest entries for the page's header table (nested dicts one level deep, as parent.key)."""
    model, rev = model_identity(manifest)
    shown = {k: v for k, v in (("model", model), ("model_revision", rev)) if v}
    for key, value in manifest.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            if name not in shown and isinstance(v, (str, int, float, bool)) and len(shown) < 24:
                shown[name] = v
    return shown


def _title(manifest: dict) -> str:
    model, rev = model_identity(manifest)
    if not model:
        return "crossrank rerank report"
    return f"crossrank rerank report: {model}" + (f" @ {rev}" if rev else "")


def compute(out: Location, scratch: str | Path, *, max_review: int = 20):
    """All report tables, without writing anything: (staged, per_query, metrics, review, shifts, score_hist).
    `scratch` is a local folder for the staged columns (report_source), used until this returns."""
    staged = stage(out, Path(scratch))
    scores = rm.score_range(staged.score_moments)
    per_q, shift_parts, bin_parts, review_parts = [], [], [], []
    for b in range(staged.n_buckets):
        raw = staged.bucket(b)
        if raw.height == 0:
            continue
        df = rm.prepare(raw, staged.has_label, staged.has_rescored)
        pq = rm.per_query(df, staged.has_label)
        per_q.append(pq)
        shift_parts.append(rm.shift_counts(df))
        bin_parts.append(rm.score_bins(df, scores["min"], scores["max"]))
        if staged.has_label:
            review_parts.append(rm.review_candidates(df, pq, max_review))
        del df, raw
    pq = pl.concat(per_q, how="vertical_relaxed").sort(rm.Q)
    shifts = rm.shift_histogram(shift_parts)
    hist = rm.score_histogram(bin_parts, scores["min"], scores["max"])
    metrics = rm.summarize(pq, shifts, scores, staged.has_label, staged.n_rows)
    review = rm.finish_review(review_parts, staged, max_review) if staged.has_label else None
    return staged, pq, metrics, review, shifts, hist


def summary_dict(metrics: pl.DataFrame) -> dict:
    """metrics.parquet flattened: `name` for single-valued metrics, `name_before/_after/_delta` for pairs."""
    out: dict = {}
    for r in metrics.iter_rows(named=True):
        if r["before"] is not None or r["after"] is not None:
            for side in ("before", "after", "delta"):
                out[f"{r['metric']}_{side}"] = r[side]
        else:
            out[r["metric"]] = r["value"]
    return out


def _print_summary(title: str, s: dict, report_dir: str, has_label: bool) -> None:
    def f(v, pct=False):
        if v is None:
            return "n/a"
        return f"{v:.1%}" if pct else f"{v:.4f}"
    lines = [
        title,
        f"  queries {int(s['queries'])}, rows {int(s['rows'])}, rescored {f(s['rows_rescored_share'], True)}",
        f"  winner changed in {f(s['winner_change_rate'], True)} of queries; mean |shift| "
        f"{f(s['mean_abs_shift'])}; mean Kendall tau {f(s['kendall_tau_mean'])}",
        f"  final top-1 from first-stage rank >= {rm.DEEP_RANK}: "
        f"{f(s[f'top1_from_first_stage_rank_ge_{rm.DEEP_RANK}_share'], True)}",
    ]
    if has_label:
        for name in rm.QUALITY:
            lines.append(f"  {name:<10} {f(s[f'{name}_before'])} -> {f(s[f'{name}_after'])} "
                         f"({'n/a' if s[f'{name}_delta'] is None else format(s[f'{name}_delta'], '+.4f')})")
        lines.append(f"  nDCG@10 up {f(s['win_rate_up'], True)}, down {f(s['win_rate_down'], True)}, unchanged "
                     f"{f(s['win_rate_unchanged'], True)}; left out for want of a relevant candidate: "
                     f"{int(s['queries_without_relevant'])} queries")
    lines.append("  scores are ordering signals, not probabilities")
    lines.append(f"  report: {report_dir}/report.html")
    print("\n".join(lines))


def write_report(out_dir: str | Path | Location, *, max_review: int = 20, quiet: bool = False,
                 scratch: str | Path | None = None) -> dict:
    """Compute the report for a finished rerank run in out_dir (a local path, a pyarrow.fs URI or a
    Location) and write it to out_dir/report/. `scratch`: local folder for the staged columns (default:
    the system's temporary folder; tens of bytes a row (13 with short ids), removed afterwards).

    Returns the summary metrics (summary_dict of metrics.parquet) plus model, model_revision, report_dir.
    Raises report_metrics.ScoresMissingError (a FileNotFoundError) when OUT/scores is missing or empty.
    """
    out = out_dir if isinstance(out_dir, Location) else locate(str(out_dir))
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)  # a named scratch folder need not exist yet
    with tempfile.TemporaryDirectory(prefix="crossrank-report-", dir=scratch) as tmp:
        staged, pq, metrics, review, shifts, hist = compute(out, tmp, max_review=max_review)
    manifest = read_manifest(out)
    title = _title(manifest)

    images = {
        "score_histogram.png": rh.plot_scores(hist),
        "position_shifts.png": rh.plot_shifts(shifts),
        "winner_first_stage_rank.png": rh.plot_winner_ranks(pq),
    }
    if staged.has_label:
        images["quality.png"] = rh.plot_quality(metrics)
    subtitle = f"run directory: {out.uri}"
    if manifest.get("status") not in (None, "complete"):
        subtitle += f" (run status: {manifest['status']}: these metrics cover only the shards written so far)"
    page = rh.render(
        title=title, subtitle=subtitle, provenance=_provenance(manifest),
        metrics=metrics, review=review, images=images, has_label=staged.has_label, deep_rank=rm.DEEP_RANK)

    report_dir = out.child("report")
    files = {"metrics.parquet": _parquet_bytes(metrics), "per_query.parquet": _parquet_bytes(pq),
             **images, "report.html": page.encode("utf-8")}
    if review is not None:
        files["review.parquet"] = _parquet_bytes(review)
    else:
        delete_file(report_dir.child("review.parquet"))  # stale from an earlier labelled report of this directory
    parallel(lambda item: write_bytes(item[1], report_dir.child(item[0])), list(files.items()))

    summary = summary_dict(metrics)
    if not quiet:
        _print_summary(title, summary, report_dir.uri, staged.has_label)
    model, rev = model_identity(manifest)
    summary.update(model=model, model_revision=rev, report_dir=report_dir.uri)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report",
                                     description="Write OUT/report/ for a finished rerank run.")
    parser.add_argument("out", help="the rerank job's output directory (holds scores/*.parquet)")
    parser.add_argument("--top-regressions", type=int, default=20, metavar="N",
                        help="queries on the review list of relevant passages pushed down (default 20)")
    parser.add_argument("--scratch", default=None, metavar="DIR",
                        help="local folder for the staged columns, tens of bytes a row (default: system temp)")
    parser.add_argument("--quiet", action="store_true", help="no summary on stdout")
    args = parser.parse_args(argv)
    if args.top_regressions < 0:
        parser.error("--top-regressions must be >= 0")
    try:
        write_report(args.out, max_review=args.top_regressions, quiet=args.quiet, scratch=args.scratch)
    except rm.ScoresMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
