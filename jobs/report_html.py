"""Plots (PNG bytes, matplotlib Agg, no pyplot state) and the self-contained report.html.

Everything the page shows is passed in; images are embedded as base64 data URIs so the file opens from
disk in any browser with no server and no external assets.
"""
from __future__ import annotations

import base64
import html
import io
import math

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SCORE_NOTE = ("Scores are ordering signals, not calibrated probabilities: compare them within a query, "
              "never read them as the chance a passage is relevant, and never threshold them across "
              "models or runs.")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d232a;line-height:1.45;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#116329}.down{color:#b42318}.note{background:#fff8e5;border-left:4px solid #d4a72c;padding:.5rem .8rem}
.muted{color:#57606a;font-size:.85rem}.fig{display:flex;gap:1.2rem;align-items:flex-start;flex-wrap:wrap}
.fig img{max-width:560px;width:100%;border:1px solid #eaeef2}.passage{max-width:330px}
"""


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    for ax in fig.axes:
        if ax.get_ylabel() in ("rows", "queries"):  # counts: integer ticks
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.2, top=0.9)  # fixed margins: cheaper than "tight"
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def plot_scores(hist: pl.DataFrame) -> bytes:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    if hist.height and hist["count"].sum():
        starts, ends, counts = hist["bin_start"].to_list(), hist["bin_end"].to_list(), hist["count"].to_list()
        ax.bar(starts, counts, width=[e - s for s, e in zip(starts, ends)], align="edge", color="#4c78a8",
               edgecolor="white", linewidth=0.4)
    else:
        ax.text(0.5, 0.5, "no rescored rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cross-encoder score (as written by the job)")
    ax.set_ylabel("rows")
    ax.set_title("Score distribution (rescored rows)")
    fig.text(0.99, 0.01, "Ordering signals, not probabilities.", fontsize=8, color="#57606a", ha="right")
    return _png(fig)


MAX_SHIFT_BARS = 200


def shift_bars(shifts: pl.DataFrame) -> tuple[list[float], list[int], list[int], int]:
    """Bars of the shift histogram: (centres, counts, signs, values per bar). One bar per shift value while they
    fit; past MAX_SHIFT_BARS (a query with 100,000 candidates has as many values: 73,000 bars took matplotlib
    two minutes), bars of `step` values, with zero kept apart from either sign."""
    if not shifts.height:
        return [], [], [], 1
    step = max(1, math.ceil(2 * int(shifts["shift"].abs().max()) / MAX_SHIFT_BARS))
    v = pl.col("shift")
    binned = (shifts.with_columns(b=pl.when(v > 0).then((v + step - 1) // step).otherwise(-((-v + step - 1) // step)))
              .group_by("b").agg(pl.col("count").sum()).sort("b"))
    b = binned["b"].to_list()
    centres = [0 if k == 0 else k * step - (step - 1) / 2 * (1 if k > 0 else -1) for k in b]
    return centres, binned["count"].to_list(), [(k > 0) - (k < 0) for k in b], step


def plot_shifts(shifts: pl.DataFrame) -> bytes:
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    x, y, signs, step = shift_bars(shifts)
    if x:
        colors = ["#2e7d32" if k > 0 else "#c62828" if k < 0 else "#9e9e9e" for k in signs]
        ax.bar(x, y, width=0.85 * step, color=colors)
    ax.set_xlabel("shift = first-stage position - reranked position (positive = moved up)"
                  + (f"; bars of {step}" if step > 1 else ""))
    ax.set_ylabel("rows")
    ax.set_title("Position shifts")
    return _png(fig)


def plot_winner_ranks(pq: pl.DataFrame) -> bytes:
    counts = (pq.select(r=pl.col("new_winner_first_stage_rank").clip(upper_bound=11))
              .group_by("r").agg(pl.len().alias("n")).sort("r"))
    labels = {r: (str(r) if r < 11 else "11+") for r in counts["r"].to_list()}
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.bar([labels[r] for r in counts["r"].to_list()], counts["n"].to_list(),
           color=["#4c78a8" if r < 4 else "#f58518" for r in counts["r"].to_list()])
    ax.set_xlabel("first-stage rank of the final top-1")
    ax.set_ylabel("queries")
    ax.set_title("Where the reranked winner came from (orange: rank >= 4)")
    return _png(fig)


def plot_quality(metrics: pl.DataFrame) -> bytes:
    q = metrics.filter(pl.col("section") == "quality", pl.col("before").is_not_null())
    names = q["metric"].to_list()
    before, after = q["before"].to_list(), q["after"].to_list()
    fig = Figure(figsize=(7.2, 3.8))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="first stage", color="#9e9e9e")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="reranked", color="#4c78a8")
    for x, b, a in zip(xs, before, after):
        if a is not None:
            ax.text(x + 0.2, a + 0.01, f"{a:.3f}", ha="center", va="bottom", fontsize=7)
        if b is not None:
            ax.text(x - 0.2, b + 0.01, f"{b:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 1.28)
    ax.set_title("Quality before and after reranking (labelled queries)")
    ax.legend(loc="upper left", fontsize=8, ncol=2, frameon=False)
    return _png(fig)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.{digits}f}"  # counts and exact 0 / 1 shares
    return html.escape(str(v))


def _delta(v) -> str:
    if v is None:
        return "<td class=num>–</td>"
    cls = "up" if v > 1e-9 else "down" if v < -1e-9 else ""
    return f"<td class='num {cls}'>{v:+.4f}</td>"


def _metric_table(metrics: pl.DataFrame, section: str, paired: bool = False) -> str:
    rows = metrics.filter(pl.col("section") == section).iter_rows(named=True)
    if paired:
        head = "<tr><th>metric</th><th>first stage</th><th>reranked</th><th>delta</th><th>n</th><th>meaning</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(r['metric'])}</td><td class=num>{_fmt(r['before'])}</td>"
            f"<td class=num>{_fmt(r['after'])}</td>{_delta(r['delta'])}<td class=num>{_fmt(r['n'])}</td>"
            f"<td class=muted>{html.escape(r['description'])}</td></tr>" for r in rows if r["before"] is not None
            or r["after"] is not None)
    else:
        head = "<tr><th>metric</th><th>value</th><th>n</th><th>meaning</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(r['metric'])}</td><td class=num>{_fmt(r['value'])}</td>"
            f"<td class=num>{_fmt(r['n'])}</td><td class=muted>{html.escape(r['description'])}</td></tr>"
            for r in rows if r["before"] is None)
    return f"<table>{head}{body}</table>" if body else ""


def _clip(text, n: int = 320) -> str:
    if text is None:
        return "–"
    text = str(text)
    return html.escape(text if len(text) <= n else text[: n - 1] + "…")


def _review_table(review: pl.DataFrame | None) -> str:
    if review is None or review.height == 0:
        return ("<p>No labelled query has a relevant passage that reranking moved below a less relevant one "
                "it used to outrank.</p>")
    head = ("<tr><th>#</th><th>query</th><th>nDCG@10</th><th>relevant passage pushed down</th>"
            "<th>passage now above it</th></tr>")
    body = []
    for r in review.iter_rows(named=True):
        body.append(
            f"<tr><td class=num>{r['rank']}</td><td><b>{_clip(r['query_id'])}</b><br>{_clip(r['query'], 200)}</td>"
            f"<td class=num>{_fmt(r['ndcg@10_before'], 3)} → {_fmt(r['ndcg@10_after'], 3)}</td>"
            f"<td class=passage><b>{_clip(r['demoted_doc_id'])}</b> (label {_fmt(r['demoted_label'])}, "
            f"rank {r['demoted_first_stage_rank']} → {r['demoted_rerank_position']}, score "
            f"{_fmt(r['demoted_score'])})<br>{_clip(r['demoted_doc'])}</td>"
            f"<td class=passage><b>{_clip(r['above_doc_id'])}</b> (label {_fmt(r['above_label'])}, "
            f"rank {r['above_first_stage_rank']} → {r['above_rerank_position']}, score "
            f"{_fmt(r['above_score'])})<br>{_clip(r['above_doc'])}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def render(*, title: str, subtitle: str, provenance: dict, metrics: pl.DataFrame, review: pl.DataFrame | None,
           images: dict[str, bytes], has_label: bool, deep_rank: int) -> str:
    """The whole report page as one HTML string."""
    def img(name: str, alt: str) -> str:
        return f"<img alt='{html.escape(alt)}' src='{data_uri(images[name])}'>" if name in images else ""

    prov = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in provenance.items())
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class=muted>{html.escape(subtitle)}</p>",
        f"<table>{prov}</table>" if prov else "",
        _metric_table(metrics, "coverage"),
        "<h2>What moved</h2>",
        "<p>Shift = first-stage position − reranked position; positive means the reranker moved the passage up. "
        "Kendall tau compares the two orders of each query (1 = identical, −1 = reversed).</p>",
        _metric_table(metrics, "movement"),
        f"<div class=fig>{img('position_shifts.png', 'position shift histogram')}</div>",
    ]
    if has_label:
        parts += [
            "<h2>Quality before and after</h2>",
            "<p>Relevant = label &gt; 0. nDCG uses gain 2<sup>label</sup> − 1 and discount 1/log2(position + 1), "
            "with the ideal order taken over the query's own candidates. Queries without a relevant candidate "
            "are left out of these means and counted below. Win rate compares each query's nDCG@10.</p>",
            _metric_table(metrics, "quality", paired=True),
            _metric_table(metrics, "quality"),
            f"<div class=fig>{img('quality.png', 'before/after metric bars')}</div>",
            "<h2>Review list: relevant passages pushed down</h2>",
            "<p>For the false-green review: queries where reranking put a less relevant passage above a "
            "labelled-relevant one that used to outrank it, worst nDCG@10 change first. Ranks read first-stage "
            "rank → reranked position.</p>",
            _review_table(review),
        ]
    parts += [
        "<h2>Rerank depth</h2>",
        f"<p>How often the final top-1 came from first-stage rank ≥ {deep_rank}: the winners a shallow "
        "<code>--rerank-depth</code> would never have scored. Rows below the depth keep their first-stage "
        "order after the rescored ones.</p>",
        _metric_table(metrics, "depth"),
        f"<div class=fig>{img('winner_first_stage_rank.png', 'first-stage rank of the reranked winner')}</div>",
        "<h2>Score distribution</h2>",
        f"<div class=fig>{img('score_histogram.png', 'score histogram')}"
        f"<div><p class=note>{html.escape(SCORE_NOTE)}</p>{_metric_table(metrics, 'scores')}</div></div>",
        "<p class=muted>Full tables next to this page: metrics.parquet (one row per metric), "
        "per_query.parquet (one row per query)"
        + (", review.parquet (the review list)" if has_label else "") + ".</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
