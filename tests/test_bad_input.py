"""Nasty input: each row is scored or rejected with a reason, each bad file or schema is a clear job-level
error before any model work, and the job writes nowhere but under --output, under names it chose itself.

Also the model-safety rules: checkpoint code runs only with --trust-remote-code, weights load from
safetensors only (a pickle is never opened).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PY, ROOT, assert_each_row_once, job_args, read_dir, shortlist_rows, subprocess_env

ONE_MB_PASSAGE = ("renewal approval finance clause " * 40_000)[: 1 << 20]

# (case, query_id, query, doc_id, doc, first_stage_score, expected): expected is "scored" or the reject reason.
CASES = [
    ("plain", "q-main", "contract renewal approval", "d-plain", "renewal needs cfo approval", 9.0, "scored"),
    ("null query", "q-main", None, "d-1", "a passage", 8.9, "query is null"),
    ("empty query", "q-main", "", "d-2", "a passage", 8.8, "query is empty or whitespace"),
    ("whitespace query", "q-main", " \t\n ", "d-3", "a passage", 8.7, "query is empty or whitespace"),
    ("unicode-space query", "q-main", "\u00a0\u3000\u2028", "d-4", "a passage", 8.6, "query is empty or whitespace"),
    ("null passage", "q-main", "contract renewal approval", "d-5", None, 8.5, "doc is null"),
    ("empty passage", "q-main", "contract renewal approval", "d-6", "", 8.4, "doc is empty or whitespace"),
    ("whitespace passage", "q-main", "contract renewal approval", "d-7", "\n\n\t", 8.3, "doc is empty or whitespace"),
    ("null query_id", None, "contract renewal approval", "d-8", "a passage", 8.2, "query_id is null"),
    ("null doc_id", "q-main", "contract renewal approval", None, "a passage", 8.1, "doc_id is null"),
    ("NaN score", "q-main", "contract renewal approval", "d-9", "a passage", math.nan,
     "first_stage_score is NaN or infinite"),
    ("+inf score", "q-main", "contract renewal approval", "d-10", "a passage", math.inf,
     "first_stage_score is NaN or infinite"),
    ("-inf score", "q-main", "contract renewal approval", "d-11", "a passage", -math.inf,
     "first_stage_score is NaN or infinite"),
    ("null score", "q-main", "contract renewal approval", "d-12", "a passage", None, "first_stage_score is null"),
    ("1 MB passage", "q-main", "contract renewal approval", "d-huge", ONE_MB_PASSAGE, 7.0, "scored"),
    ("emoji", "q-main", "contract renewal approval", "d-emoji", "🙂👍🏽 renewal 🚀 approved ✅", 6.9, "scored"),
    ("right-to-left", "q-main", "contract renewal approval", "d-rtl", "مرحبا بالعالم שלום עולם renewal", 6.8, "scored"),
    ("combining marks", "q-main", "contract renewal approval", "d-comb", "cafe\u0301 Z\u0324\u0354\u0367a\u0308 n\u0303", 6.7,
     "scored"),
    ("zero-width inside", "q-main", "contract renewal approval", "d-zw", "zero\u200bwidth\u200djoiner\ufeff", 6.6, "scored"),
    ("zero-width-only query", "q-zw", "\u200b\u200c\u200d", "d-zwq", "a passage", 1.0, "scored"),
    ("control characters", "q-main", "contract renewal approval", "d-ctl", "nul\x00bell\x07 tab\there", 6.5, "scored"),
    ("duplicate pair 1", "q-main", "contract renewal approval", "d-dup", "the same passage twice", 6.4, "scored"),
    ("duplicate pair 2", "q-main", "contract renewal approval", "d-dup", "the same passage twice", 6.4, "scored"),
    ("single candidate", "q-solo", "a query with one candidate", "d-solo", "its only passage", 0.5, "scored"),
    ("path-like query_id", "../../etc/passwd", "contract renewal approval", "../../../tmp/x", "a passage", 1.0,
     "scored"),
    ("path-like doc_id", "/etc/shadow", "contract renewal approval", "..\\..\\windows\\system32", "a passage", 1.0,
     "scored"),
    ("newline query_id", "q\nnew/line", "contract renewal approval", "d\x00nul", "a passage", 1.0, "scored"),
]


def nasty_table() -> pa.Table:
    rows = []
    for i, (case, qid, q, did, d, s, _) in enumerate(CASES):
        rows.append({"query_id": qid, "query": q, "doc_id": did, "doc": d, "first_stage_score": s, "case": case,
                     # nested pass-through columns: must reach the output untouched
                     "meta": {"source": f"src-{i}", "tags": [f"t{i}", "x"] if i % 3 else []},
                     "vec": [float(i), -1.5] if i % 4 else None,
                     "_row": 1000 + i})  # a user's column named like a job's working one once was
    schema = pa.schema([("query_id", pa.string()), ("query", pa.string()), ("doc_id", pa.string()),
                        ("doc", pa.string()), ("first_stage_score", pa.float64()), ("case", pa.string()),
                        ("meta", pa.struct([("source", pa.string()), ("tags", pa.list_(pa.string()))])),
                        ("vec", pa.list_(pa.float32())), ("_row", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def tree(*roots: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under the roots, with its kind, size and mtime (what a stray write would change)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()  # a folder changes only by what it holds, which is listed itself
            out[str(p)] = ("dir",) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    inp = tmp_path_factory.mktemp("bad") / "in"
    inp.mkdir()
    pq.write_table(nasty_table(), inp / "nasty.parquet")
    pq.write_table(nasty_table().slice(0, 0), inp / "zero-rows.parquet")
    # Polars Categorical (dictionary-encoded) query, large_string elsewhere: a common writer's output.
    df = pl.DataFrame(shortlist_rows(2, 5, prefix="cat")).with_columns(pl.col("query").cast(pl.Categorical))
    df.write_parquet(inp / "categorical.parquet")
    return inp


@pytest.fixture(scope="module")
def corpus_run(ray_local, corpus, tiny_model, models_dir, tmp_path_factory):
    from jobs.rerank import main

    base = tmp_path_factory.mktemp("badrun")
    out = base / "out"
    before = tree(corpus, base, models_dir)
    rc = main(job_args(corpus, out, tiny_model, "--num-actors", 1))
    after = tree(corpus, base, models_dir, skip=out)
    return rc, out, before, after


@pytest.mark.slow
def test_every_row_scored_or_rejected_with_its_reason(corpus, corpus_run):
    rc, out, _, _ = corpus_run
    assert rc == 0
    scored, rejected = assert_each_row_once(corpus, out)
    table = nasty_table()
    n = table.num_rows
    got_scored = {c: r for c, r in zip(scored["case"].to_pylist(), scored.to_pylist()) if c is not None}
    got_rejected = {c: r for c, r in zip(rejected["case"].to_pylist(), rejected.to_pylist())}
    for i, (case, *_, expected) in enumerate(CASES):
        if expected == "scored":
            assert case in got_scored, f"{case!r} was not scored"
            assert math.isfinite(got_scored[case]["score"]), case
        else:
            assert case in got_rejected, f"{case!r} was not rejected"
            assert got_rejected[case]["reject_reason"] == expected, (case, got_rejected[case]["reject_reason"])
            assert got_rejected[case]["source_row"] == i, case
            assert got_rejected[case]["source_file"] == str(corpus / "nasty.parquet"), case
    assert len(got_scored) + len(got_rejected) == n
    dup = [r for r in scored.to_pylist() if r["doc_id"] == "d-dup"]
    assert len(dup) == 2 and dup[0]["score"] == dup[1]["score"]
    assert sorted(r["rerank_position"] for r in dup)[0] != sorted(r["rerank_position"] for r in dup)[1]
    solo = [r for r in scored.to_pylist() if r["query_id"] == "q-solo"]
    assert len(solo) == 1 and solo[0]["rerank_position"] == 1 and solo[0]["first_stage_rank"] == 1
    huge = [r for r in scored.to_pylist() if r["doc_id"] == "d-huge"]
    assert len(huge) == 1 and len(huge[0]["doc"]) == len(ONE_MB_PASSAGE)  # stored whole, scored truncated
    # NaN stays NaN in the rejects (the row as it came)
    assert math.isnan(got_rejected["NaN score"]["first_stage_score"])

    stats = {r["shard"]: r for r in pq.read_table(out / "stats.parquet").to_pylist()}
    nasty = next(s for s in stats.values() if s["input_path"].endswith("nasty.parquet"))
    assert nasty["rows_in"] == n
    assert nasty["rows_rejected"] == sum(1 for c in CASES if c[-1] != "scored")
    assert nasty["truncated_pairs"] >= 1 and nasty["duplicate_pairs"] >= 1
    # the empty file (same columns) is packed with the one before it; the categorical one's do not combine
    assert nasty["status"] == "ok" and nasty["input_files"] == 2 and len(stats) == 2
    plan = json.loads((out / "_work" / "plan.json").read_text())
    parts = next(s["parts"] for s in plan["shards"] if s["name"] == nasty["shard"])
    assert [p["uri"].rsplit("/", 1)[-1] for p in parts] == ["nasty.parquet", "zero-rows.parquet"]
    assert parts[1]["row_end"] == 0


@pytest.mark.slow
def test_nested_and_extra_columns_pass_through(corpus_run):
    _, out, _, _ = corpus_run
    src = {r["case"]: r for r in nasty_table().to_pylist()}
    seen = 0
    for folder in ("scores", "rejects"):
        t = read_dir(out / folder)
        assert t.schema.field("meta").type == nasty_table().schema.field("meta").type
        assert t.schema.field("vec").type == pa.list_(pa.float32())
        for r in t.to_pylist():
            if r["case"] is not None:  # None: rows of the categorical file, which has no such columns
                assert (r["meta"], r["vec"], r["_row"]) == (src[r["case"]]["meta"], src[r["case"]]["vec"],
                                                             src[r["case"]]["_row"]), r["case"]
                seen += 1
    assert seen == len(CASES)


@pytest.mark.slow
def test_categorical_text_columns_are_scored(corpus_run):
    _, out, _, _ = corpus_run
    t = read_dir(out / "scores")
    cat = [r for r in t.to_pylist() if str(r["query_id"]).startswith("cat")]
    assert len(cat) == 10 and all(isinstance(r["query"], str) and math.isfinite(r["score"]) for r in cat)


@pytest.mark.slow
def test_job_writes_only_under_output_with_names_of_its_own(corpus, corpus_run):
    """Nothing outside --output changes (inputs, models, the output's parent); every file under it is named
    after a shard, a bucket or the job itself, never after a data value such as query_id '../../etc/passwd'."""
    from jobs.plan import make_plan
    from schemas.contract import ColumnMap

    rc, out, before, after = corpus_run
    assert rc == 0
    assert after == {k: v for k, v in before.items()}, {
        "added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
        "changed": sorted(k for k in after if k in before and after[k] != before[k])}
    shards = {s.name for s in make_plan([str(corpus)], ColumnMap(), 80).shards}
    allowed_top = {"scores", "rejects", "_work", "stats.parquet", "manifest.json"}
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert p.resolve().is_relative_to(out.resolve())
        assert rel.parts[0] in allowed_top, rel
        assert all(part.replace("-", "").replace("_", "").replace(".", "").isalnum() for part in rel.parts), rel
        if rel.parts[0] in ("scores", "rejects") and p.is_file():
            assert p.stem in shards, rel
    assert {p.stem for p in (out / "scores").glob("*.parquet")} == shards


# ---- job-level errors: before any model work ------------------------------------------------------------

def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _good(n=4, prefix="g") -> pa.Table:
    return pa.Table.from_pylist(shortlist_rows(1, n, prefix=prefix))


def _with(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, column)


@pytest.mark.parametrize("column, values, found, expected", [
    ("doc", pa.array([1, 2, 3, 4], pa.int64()), "int64", "string"),
    ("query", pa.array([b"a", b"b", b"c", b"d"], pa.binary()), "binary", "string"),
    ("doc", pa.array([["a"], ["b"], ["c"], ["d"]]), "list<element: string>", "string"),
    ("query_id", pa.array([1.5, 2.5, 3.5, 4.5]), "double", "string or integer"),
    ("first_stage_score", pa.array(["1", "2", "3", "4"]), "string", "float"),
])
def test_wrong_column_type_is_a_job_error(tmp_path, capsys, column, values, found, expected):
    from jobs.rerank import main

    bad = _write(tmp_path / "in" / "b-bad.parquet", _with(_good(), column, values))
    _write(tmp_path / "in" / "a-good.parquet", _good(prefix="a"))
    out = tmp_path / "out"
    assert main(job_args(tmp_path / "in", out, "/nonexistent-model")) == 2
    err = capsys.readouterr().err
    assert f"{bad}: column '{column}' has type {found}, expected {expected}" in err, err
    assert "a-good.parquet" not in err
    assert not out.exists(), "a job-level error must come before any output (or model) work"


def test_mixed_schemas_across_files_are_job_errors(tmp_path, capsys):
    from jobs.rerank import main

    cases = {
        "required column missing in one file": (_good().drop_columns(["doc"]), "required column 'doc' is missing"),
        "optional column missing in one file": (_good().drop_columns(["first_stage_score"]),
                                                "column 'first_stage_score' is in"),
        "id integer in one file, string in another": (
            _with(_good(), "query_id", pa.array([1, 1, 1, 1], pa.int64())), "column 'query_id' is integer in"),
    }
    for name, (table, message) in cases.items():
        inp = tmp_path / name.replace(" ", "_") / "in"
        _write(inp / "a.parquet", _good(prefix="a"))
        other = _write(inp / "b.parquet", table)
        out = inp.parent / "out"
        assert main(job_args(inp, out, "/nonexistent-model")) == 2, name
        err = capsys.readouterr().err
        assert message in err and str(other) in err, (name, err)
        assert not out.exists(), name


def test_unreadable_input_path_is_a_job_error(tmp_path, capsys):
    from jobs.rerank import main

    assert main(job_args(tmp_path / "missing", tmp_path / "out", "/nonexistent-model")) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(job_args(tmp_path / "empty", tmp_path / "out", "/nonexistent-model")) == 2
    assert "holds no .parquet file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- model safety ------------------------------------------------------------------------------------------

def _evil_model(tiny_model: Path, folder: Path, marker: Path) -> Path:
    """A copy of the tiny model whose config maps the auto classes to code in the folder, which leaves a marker
    file when imported."""
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="crossrank-evil", architectures=["EvilModel"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_evil.py").write_text(
        f"from transformers import BertConfig\nopen({str(marker)!r}, 'a').write('config code ran\\n')\n\n"
        "class EvilConfig(BertConfig):\n    model_type = 'crossrank-evil'\n")
    (folder / "modeling_evil.py").write_text(
        "from transformers import BertForSequenceClassification\nfrom .configuration_evil import EvilConfig\n"
        f"open({str(marker)!r}, 'a').write('model code ran\\n')\n\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n")
    return folder


@pytest.mark.slow
def test_checkpoint_code_runs_only_with_trust_remote_code(ray_local, tiny_model, tmp_path, capsys):
    from jobs.rerank import main

    marker = tmp_path / "CODE_RAN"
    model = _evil_model(tiny_model, tmp_path / "evil", marker)
    inp = tmp_path / "in"
    _write(inp / "a.parquet", _good())
    code = main(job_args(inp, tmp_path / "out", model, "--num-actors", 1))
    err = capsys.readouterr().err
    assert code == 2  # refused in one line before Ray or any actor starts
    assert "cannot load model" in err and "trust_remote_code=True" in err
    assert not marker.exists(), "checkpoint code ran without --trust-remote-code"
    assert not list((tmp_path / "out").rglob("scores/*.parquet"))

    # Control: with the flag the same folder loads, and its code runs (so the check above is not vacuous).
    code = ("import sys; from kernels.engine import Engine; "
            "e = Engine.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(e.model).__name__)")
    r = subprocess.run([PY, "-c", code, str(model)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env=subprocess_env(HF_MODULES_CACHE=tmp_path / "hf_modules"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("EvilModel") and "model code ran" in marker.read_text()


def test_weights_load_from_safetensors_only(tiny_model, tmp_path):
    """A folder with only pytorch_model.bin fails with a clear error, and the pickle inside is never opened."""
    import pickle

    from kernels.engine import Engine

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for p in folder.glob("*.safetensors"):
        p.unlink()
    marker = tmp_path / "PICKLE_RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(OSError) as info:
        Engine.from_pretrained(str(folder))
    assert "safetensors" in str(info.value)
    assert not marker.exists(), "a pickle was opened"
    # the payload is live: unpickling it would have left the marker
    pickle.loads((folder / "pytorch_model.bin").read_bytes())
    assert marker.exists()
