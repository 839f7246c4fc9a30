"""The ranking rules of the cross-shard pass on hand-made key rows (no Ray): `jobs.finalize`."""
from __future__ import annotations

import polars as pl

from jobs.finalize import collapse_duplicates, first_stage_rank, rerank_positions
from schemas.contract import DOC_HASH, DUPLICATE_DOC_IDS, DUPLICATE_OF, RERANK_POSITION, SEQ


def _keys(rows: list[tuple]) -> pl.DataFrame:
    """(doc_id, first_stage_rank, score, doc text hash) rows of one query, in input order."""
    return pl.DataFrame({"query_id": ["q"] * len(rows), "doc_id": [r[0] for r in rows],
                         "first_stage_rank": [r[1] for r in rows], "score": [r[2] for r in rows],
                         DOC_HASH: [r[3] for r in rows], SEQ: list(range(len(rows)))},
                        schema_overrides={"score": pl.Float32, DOC_HASH: pl.UInt64})


def _ranked(df: pl.DataFrame) -> dict:
    df = rerank_positions(collapse_duplicates(first_stage_rank(df)))
    return {(r["doc_id"], r[SEQ]): r for r in df.iter_rows(named=True)}


def test_dedupe_collapses_other_ids_but_keeps_repeated_rows_of_one_id():
    """A (query_id, doc_id) row repeated with its text once named itself in duplicate_of and sank below the
    other passages; repeated rows of one id stay side by side, as without --dedupe-docs."""
    got = _ranked(_keys([("d1", 1, 0.9, 7), ("d1", 2, 0.9, 7), ("d2", 3, 0.5, 8), ("d3", 4, 0.8, 7),
                         ("d4", 5, 0.1, 9)]))
    assert got[("d1", 0)][DUPLICATE_OF] is None and got[("d1", 1)][DUPLICATE_OF] is None
    assert got[("d1", 0)][DUPLICATE_DOC_IDS] == ["d3"]
    assert got[("d3", 3)][DUPLICATE_OF] == "d1"
    positions = {k: r[RERANK_POSITION] for k, r in got.items()}
    assert positions == {("d1", 0): 1, ("d1", 1): 2, ("d2", 2): 3, ("d4", 4): 4, ("d3", 3): 5}


def test_a_nan_score_ranks_below_every_number_and_every_unscored_row():
    got = _ranked(_keys([("a", 1, float("nan"), 1), ("b", 2, 0.3, 2), ("c", 3, None, 3), ("d", 4, -5.0, 4)]))
    assert [k[0] for k, r in sorted(got.items(), key=lambda kv: kv[1][RERANK_POSITION])] == ["b", "d", "c", "a"]


def test_sigmoid_scores_rank_as_their_logits(ray_local, tiny_bert, tmp_path, capsys):
    """A float32 sigmoid is exactly 1.0 above a logit of ~16.6: ranked on it, a model with large logits tied
    most passages and fell back to first-stage order. Positions now come from the logits either way."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file, save_file

    from conftest import job_args, read_dir, shortlist_rows
    from jobs.rerank import main

    model = tmp_path / "loud"
    shutil.copytree(tiny_bert, model)
    weights = load_file(model / "model.safetensors")
    # Logits spread over tens, all far above 16.6. The shift is large because the tiny model's tokenizer is
    # trained afresh per session and not byte-identical across processes: the logits' common offset moves
    # by a few hundred between sessions.
    weights["classifier.weight"] *= 1e5
    weights["classifier.bias"] += 1e4
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(shortlist_rows(4, 12)), inp)
    runs = {}
    for act in ("identity", "sigmoid"):
        assert main(job_args(inp, tmp_path / act, model, "--activation", act, "--top-k", "5")) == 0
        capsys.readouterr()
        runs[act] = pl.from_arrow(read_dir(tmp_path / act / "scores")).sort("doc_id")
    logits, sig = runs["identity"], runs["sigmoid"]
    assert logits["score"].min() > 20 and logits["score"].n_unique() > 40 and (sig["score"] == 1.0).all()
    want = 1 / (1 + np.exp(-logits["score"].to_numpy().astype(np.float64)))
    np.testing.assert_allclose(sig["score"].to_numpy(), want, rtol=1e-6)
    assert sig["rerank_position"].to_list() == logits["rerank_position"].to_list()
    short = read_dir(tmp_path / "sigmoid" / "shortlists").to_pylist()
    assert all(0.0 < s <= 1.0 for row in short for s in row["scores"])
