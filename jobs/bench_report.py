"""Benchmark output: the row schema, a compact text table, JSON / JSON Lines / Parquet files, PNG plots.

Every run is one row (a dict with every key of ROW_FIELDS; None where it does not apply). Files under the
output folder, all rewritten (atomically) after every row, so a run killed half-way leaves what it measured:

    runs.jsonl     one row per line, appended as each run ends
    runs.json      the list of rows
    runs.parquet   the same table (pyarrow)
    throughput_vs_budget_<model>.png   pairs/s against max_batch_tokens, one line per engine variant,
                                       the anchor (sentence-transformers) as dashed horizontal lines
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# Row schema: name -> type ("str", "int", "float", "bool", "list"). Order is the column order in files.
ROW_FIELDS: dict[str, str] = {
    "run_id": "int", "kind": "str", "label": "str", "status": "str", "error": "str",
    "model": "str", "mix": "str", "n_pairs": "int", "candidates": "int", "pairs_fingerprint": "str",
    "pair_tokens_mean": "float", "device": "str", "device_name": "str", "dtype": "str",
    "engine": "str", "attention": "str", "linear": "str", "compiled": "bool", "compile_mode": "str",
    "max_batch_tokens": "int", "bucketing": "bool", "batch_size": "int",
    "repeats": "int", "load_s": "float", "warmup_s": "float", "first_pass_s": "float",
    "wall_s": "float", "wall_s_min": "float", "wall_s_max": "float", "wall_s_all": "list",
    "pairs_per_s": "float", "tokens_per_s": "float", "pairs_per_s_per_core": "float", "cores": "int",
    "real_tokens": "int", "computed_tokens": "int", "padding_efficiency": "float", "batches": "int",
    "tokenize_s": "float", "model_s": "float", "oom_splits": "int", "duplicate_pairs": "int",
    "peak_mem_gb": "float", "rss_gb": "float",
    "flops_per_pass": "float", "tflops": "float", "peak_tflops": "float", "mfu": "float", "mfu_achievable": "float",
    "speedup_vs_anchor": "float",
    "vs": "str", "score_max_abs_diff": "float", "score_rel_l2": "float", "score_rel_l2_centered": "float",
    "spearman": "float", "top1_agree": "float", "score_std": "float",
    "graphs_compiled": "int", "recompiles_during_timing": "int",
    "torch": "str", "transformers": "str", "sentence_transformers": "str", "time_utc": "str", "elapsed_s": "float",
}


def new_row(**values) -> dict:
    unknown = set(values) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"not row fields: {sorted(unknown)}")
    row = dict.fromkeys(ROW_FIELDS)
    row.update(values)
    return row


def clean(row: dict) -> dict:
    """Coerce every field to its schema type (numpy scalars to Python, NaN/inf to None)."""
    out = {}
    for key, kind in ROW_FIELDS.items():
        v = row.get(key)
        if v is None:
            out[key] = None
            continue
        try:
            if kind == "float":
                v = float(v)
                v = v if math.isfinite(v) else None
            elif kind == "int":
                v = int(v)
            elif kind == "bool":
                v = bool(v)
            elif kind == "str":
                v = str(v)
            elif kind == "list":
                v = [float(x) for x in v]
        except (TypeError, ValueError):
            v = None
        out[key] = v
    return out


# ---------------------------------------------------------------------------------------------- text table
def _num(v, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _spread(r: dict) -> str:
    """(slowest - fastest) / median of the timed repeats: above ~10% the machine was not quiet."""
    if not r.get("wall_s") or r.get("wall_s_min") is None or r.get("wall_s_max") is None or not r.get("repeats") \
            or r["repeats"] < 2:
        return "-"
    return f"{100 * (r['wall_s_max'] - r['wall_s_min']) / r['wall_s']:.0f}%"


def _budget(v) -> str:
    if v is None:
        return "-"
    return f"{v // 1024}k" if v % 1024 == 0 else str(v)


_RUN_COLS = [  # (header, width, getter)
    ("model", 12, lambda r: r["model"]),
    ("mix", 7, lambda r: r["mix"]),
    ("runner", 40, lambda r: r["label"]),
    ("pairs/s", 9, lambda r: _num(r["pairs_per_s"])),
    ("tok/s", 11, lambda r: _num(r["tokens_per_s"])),
    ("/core", 8, lambda r: _num(r["pairs_per_s_per_core"])),
    ("x anch", 6, lambda r: _num(r["speedup_vs_anchor"], "{:.2f}")),
    ("pad eff", 7, lambda r: _pct(r["padding_efficiency"])),
    ("MFU", 6, lambda r: _pct(r["mfu"])),
    ("peak GB", 7, lambda r: _num(r["peak_mem_gb"], "{:.2f}")),
    ("warm s", 6, lambda r: _num(r["warmup_s"], "{:.1f}")),
    ("wall s", 7, lambda r: _num(r["wall_s"], "{:.3f}")),
    ("spread", 6, lambda r: _spread(r)),
    ("top1", 5, lambda r: _num(r["top1_agree"], "{:.2f}")),
    ("maxdiff", 8, lambda r: _num(r["score_max_abs_diff"], "{:.1e}")),
    ("status", 0, lambda r: r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['error'] or '')[:90]}"),
]
_PREC_COLS = [
    ("model", 12, lambda r: r["model"]),
    ("runner", 40, lambda r: r["label"]),
    ("vs", 22, lambda r: r["vs"]),
    ("pairs", 6, lambda r: _num(r["n_pairs"])),
    ("rel L2", 8, lambda r: _num(r["score_rel_l2"], "{:.1e}")),
    ("rel L2 c", 8, lambda r: _num(r["score_rel_l2_centered"], "{:.1e}")),
    ("maxdiff", 8, lambda r: _num(r["score_max_abs_diff"], "{:.1e}")),
    ("spearman", 8, lambda r: _num(r["spearman"], "{:.4f}")),
    ("top1", 5, lambda r: _num(r["top1_agree"], "{:.3f}")),
    ("score sd", 8, lambda r: _num(r["score_std"], "{:.3f}")),
    ("status", 0, lambda r: r["status"] if r["status"] == "ok" else f"{r['status']}: {(r['error'] or '')[:90]}"),
]


def _cols(kind: str):
    return _PREC_COLS if kind == "precision" else _RUN_COLS


def header(kind: str = "engine") -> str:
    cols = _cols(kind)
    line = " ".join(f"{h:<{w}}" if w else h for h, w, _ in cols)
    return line + "\n" + "-" * len(line)


def format_row(row: dict) -> str:
    parts = []
    for _, width, get in _cols(row.get("kind") or "engine"):
        v = get(row)
        text = "-" if v is None else str(v)
        parts.append(text[:width].ljust(width) if width else text)
    return " ".join(parts)


def table(rows: list[dict]) -> str:
    """Runs (tokenize / anchor / engine rows) in one table, precision rows in another."""
    out = []
    runs = [r for r in rows if r.get("kind") != "precision"]
    prec = [r for r in rows if r.get("kind") == "precision"]
    if prec:
        out += ["score agreement (low precision vs fp32 reference)", header("precision")]
        out += [format_row(r) for r in prec]
        out.append("")
    if runs:
        out += ["throughput", header("engine")]
        out += [format_row(r) for r in runs]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- files
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class RowWriter:
    """Keeps every row and rewrites the output files after each one."""

    def __init__(self, out_dir: str | os.PathLike | None):
        self.out = Path(out_dir) if out_dir else None
        self.rows: list[dict] = []
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "runs.jsonl").write_text("")

    def add(self, row: dict) -> dict:
        row = clean(row)
        self.rows.append(row)
        if self.out is not None:
            with open(self.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.flush()
        return row

    def flush(self) -> None:
        if self.out is None:
            return
        _atomic_write(self.out / "runs.json", lambda p: p.write_text(json.dumps(self.rows, indent=1)))
        try:
            write_parquet(self.rows, self.out / "runs.parquet")
        except Exception as e:  # never lose the JSON because of the Parquet writer
            print(f"[bench] parquet write failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
             "list": pa.list_(pa.float64())}
    schema = pa.schema([(k, types[t]) for k, t in ROW_FIELDS.items()])
    table = pa.Table.from_pylist([clean(r) for r in rows], schema=schema)
    _atomic_write(Path(path), lambda p: pq.write_table(table, p))


# ---------------------------------------------------------------------------------------------- plots
def plot_throughput(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per model: engine pairs/s against the token budget; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    out = Path(out_dir)
    paths = []
    ok = [r for r in rows if r["status"] == "ok" and r["pairs_per_s"]]
    for model in sorted({r["model"] for r in ok if r["kind"] == "engine"}):
        mine = [r for r in ok if r["model"] == model]
        for mix in sorted({r["mix"] for r in mine if r["kind"] == "engine"}):
            eng = [r for r in mine if r["kind"] == "engine" and r["mix"] == mix]
            anchors = [r for r in mine if r["kind"] == "anchor" and r["mix"] == mix]
            series: dict[str, list] = {}
            for r in eng:
                mode = f"+{r['compile_mode']}" if r["compiled"] and r.get("compile_mode") else ""
                key = f"{r['engine']} {r['dtype']} {'compiled' if r['compiled'] else 'eager'}{mode}" + (
                    "" if r["bucketing"] in (None, True) else " no-bucketing")
                series.setdefault(key, []).append((r["max_batch_tokens"], r["pairs_per_s"]))
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            for key in sorted(series):
                pts = sorted(p for p in series[key] if p[0])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            for a in anchors:
                ax.axhline(a["pairs_per_s"], linestyle="--", color="grey", linewidth=1)
                ax.annotate(f"sentence-transformers {a['dtype']} bs{a['batch_size']}", (0.01, a["pairs_per_s"]),
                            xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max_batch_tokens")
            ax.set_ylabel("pairs / s")
            dev = next((r["device_name"] for r in mine if r["device_name"]), "")
            ax.set_title(f"{model}, {mix} lengths, {dev}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"throughput_vs_budget_{model}_{mix}.png".replace("/", "_")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
