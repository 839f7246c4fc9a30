"""Which files a job reads: directories, globs, literal names, its own output (no Ray, no model)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_args, shortlist_rows
from jobs.storage import list_parquet, locate


def _touch(path: Path, prefix: str = "q") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(shortlist_rows(1, 3, prefix=prefix)), path)
    return path


def _names(inputs, root: Path, exclude: Path | None = None) -> list[str]:
    found = list_parquet([str(i) for i in inputs], locate(str(exclude)) if exclude else None)
    return [str(Path(loc.path).relative_to(root)) for loc in found]


def test_glob_wildcards_stay_in_their_folder_and_skip_hidden_names(tmp_path):
    """`*` no longer crosses `/` (it took `old/` and `_tmp/` files into a job); `**` spans folders but, like a
    directory input, never reaches `_` or `.` names unless the pattern names them."""
    for rel in ("a.parquet", "b.parquet", "old/c.parquet", "old/deep/d.parquet", "_tmp/e.parquet",
                ".trash/f.parquet", "_SUCCESS.parquet", "old/_g.parquet"):
        _touch(tmp_path / rel)
    assert _names([tmp_path / "*.parquet"], tmp_path) == ["a.parquet", "b.parquet"]
    assert _names([tmp_path / "*" / "*.parquet"], tmp_path) == ["old/c.parquet"]
    assert _names([tmp_path / "**" / "*.parquet"], tmp_path) == [
        "a.parquet", "b.parquet", "old/c.parquet", "old/deep/d.parquet"]
    assert _names([tmp_path / "_tmp" / "*.parquet"], tmp_path) == ["_tmp/e.parquet"]  # named: taken
    assert _names([tmp_path / "_*.parquet"], tmp_path) == ["_SUCCESS.parquet"]
    assert _names([tmp_path / "[ab].parquet"], tmp_path) == ["a.parquet", "b.parquet"]
    assert _names([tmp_path], tmp_path) == ["a.parquet", "b.parquet", "old/c.parquet", "old/deep/d.parquet"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        list_parquet([str(tmp_path / "*.csv")])


def test_a_path_that_exists_is_literal_whatever_its_characters(tmp_path):
    """A file named `data[1].parquet` once read as a glob that matched nothing."""
    literal = _touch(tmp_path / "b r" / "ü" / "data[1].parquet")
    _touch(tmp_path / "b r" / "ü" / "data1.parquet")  # what the pattern [1] would match instead
    assert _names([literal], tmp_path) == ["b r/ü/data[1].parquet"]
    assert _names([tmp_path / "b r" / "ü" / "data[12].parquet"], tmp_path) == ["b r/ü/data1.parquet"]


def test_the_output_folder_is_never_read_as_input(tmp_path):
    inp = tmp_path / "in"
    _touch(inp / "part-0.parquet")
    _touch(inp / "out" / "scores" / "part-0-x.parquet")
    _touch(inp / "out" / "stats.parquet")
    _touch(inp / "outside.parquet")
    out = inp / "out"
    assert _names([inp], tmp_path, exclude=out) == ["in/outside.parquet", "in/part-0.parquet"]
    assert _names([inp / "**" / "*.parquet"], tmp_path, exclude=out) == ["in/outside.parquet", "in/part-0.parquet"]
    assert _names([inp], tmp_path, exclude=tmp_path / "in" / "ou") == [  # a prefix of a name is not a folder
        "in/out/scores/part-0-x.parquet", "in/out/stats.parquet", "in/outside.parquet", "in/part-0.parquet"]


@pytest.mark.parametrize("column", ["_crossrank_row", "_crossrank_seq", "_crossrank_doc_hash", "score"])
def test_a_column_the_job_works_with_is_refused_before_any_model_work(tmp_path, capsys, column):
    """A pass-through column once collided with the job's working `_row` column, and every shard failed after
    the model had loaded; the working columns are now prefixed, and refused in the input like `score`."""
    from jobs.rerank import main

    table = pa.Table.from_pylist(shortlist_rows(1, 3))
    pq.write_table(table.append_column(column, pa.array([1, 2, 3])), tmp_path / "in.parquet")
    pq.write_table(table.append_column("_row", pa.array([1, 2, 3])), tmp_path / "ok.parquet")  # passes through
    assert main(job_args(tmp_path / "in.parquet", tmp_path / "out", "/nonexistent-model")) == 2
    assert f"{tmp_path / 'in.parquet'}: column '{column}' is one crossrank writes" in capsys.readouterr().err
    assert main(job_args(tmp_path / "ok.parquet", tmp_path / "out", "/nonexistent-model")) == 2
    assert "cannot load model" in capsys.readouterr().err  # past the input checks: `_row` is the user's own


# ---- usage mistakes: one line naming the problem, exit 2, nothing written -----------------------------------

def test_usage_mistakes_are_one_line_errors_before_ray(tmp_path, capsys, monkeypatch, tiny_bert):
    from jobs.rerank import main

    inp = _touch(tmp_path / "in.parquet")
    (tmp_path / "models").mkdir()
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "data.csv").write_text("query_id,query,doc_id,doc\n1,a,2,b\n")
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    distil = tmp_path / "tiny-distilbert"  # a real classifier the packed engine does not cover
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2,
                                                         hidden_dim=64, num_labels=1)).save_pretrained(distil)
    tok.save_pretrained(distil)
    capsys.readouterr()  # the save's progress bar
    monkeypatch.chdir(tmp_path)
    cases = [
        (job_args(inp, tmp_path / "out", distil, "--engine", "packed"),
         "--engine packed does not support model_type 'distilbert'; use --engine auto or padded"),
        (job_args(inp, tmp_path / "a-file", tiny_bert), f"--output {tmp_path / 'a-file'} is a file"),
        (job_args(tmp_path / "data.csv", tmp_path / "out", tiny_bert), "data.csv: not a Parquet file"),
        (job_args(inp, tmp_path / "out", "models/tiny-bret"), f"no model folder at {tmp_path / 'models/tiny-bret'}"),
        (job_args(inp, tmp_path / "out", "./tiny-bret"), "no model folder at"),
        (job_args(inp, tmp_path / "out", "not-a-model"), "holds no config.json: not a Hugging Face model folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(job_args(inp, tmp_path / "out", tiny_bert, "--max-shard-retries", "-1"))
    assert "must be a whole number >= 0" in capsys.readouterr().err


def test_settings_no_actor_can_run_stop_the_job_in_one_line(ray_local, tiny_bert, tmp_path, capsys):
    """--device cuda where the actors have no CUDA (the test cluster's GPUs are logical): the reason, not a
    Ray traceback."""
    from jobs.rerank import main

    inp = _touch(tmp_path / "in.parquet")
    assert main(job_args(inp, tmp_path / "out", tiny_bert, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: actor failed to start: ") and "CUDA" in last, err
    assert not list((tmp_path / "out").glob("scores/*.parquet"))
