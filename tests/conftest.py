"""Shared fixtures: tiny on-disk models, one local Ray instance per session, input writers, output readers.

Tiny models are real `transformers` checkpoints built by `scripts.make_tiny_model` (no download), once per
session. `ray_local` starts one local Ray (2 CPUs, 2 logical GPUs so the pool runs two actors as it would
on a GPU node); in-process jobs (`jobs.rerank.main([...])`) join it instead of starting their own.
Tests that must kill a driver, or need a cluster of their own, start subprocesses instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Ray 2.60 turns token authentication on by default; local test clusters run without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Fault-injection settings must never leak from the caller's shell into a test that does not ask for them.
for _k in [k for k in os.environ if k.startswith("CROSSRANK_FAULT_")]:
    del os.environ[_k]

PY = sys.executable
WORDS = ("contract renewal approval finance clause enterprise threshold expiry report quarter procurement policy "
         "memo checklist deal vendor budget legal review signature owner region refund invoice customer support "
         "ticket incident runbook dashboard deploy config service latency").split()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_bert(models_dir) -> Path:
    """Folder of a tiny random BERT cross-encoder (safetensors + fast tokenizer)."""
    from scripts.make_tiny_model import make_tiny_model

    return make_tiny_model(models_dir / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def tiny_xlmr(models_dir) -> Path:
    """Folder of a tiny random XLM-RoBERTa cross-encoder."""
    from scripts.make_tiny_model import make_tiny_model

    return make_tiny_model(models_dir / "tiny-xlmr", "xlmr")


@pytest.fixture(scope="session")
def tiny_modernbert(models_dir) -> Path:
    """Folder of a tiny random ModernBERT cross-encoder (rotary, sliding-window layers, mean pooling)."""
    from scripts.make_tiny_model import make_tiny_model

    return make_tiny_model(models_dir / "tiny-modernbert", "modernbert")


@pytest.fixture(scope="session")
def tiny_model(tiny_bert) -> Path:
    """The model the job tests run (an alias of tiny_bert)."""
    return tiny_bert


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every in-process job of the session (starting Ray costs ~10 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


# ---- inputs ----------------------------------------------------------------------------------------------

def shortlist_rows(n_queries: int, per_query: int, prefix: str = "q", seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for q in range(n_queries):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        for d in range(per_query):
            rows.append({"query_id": f"{prefix}{q}", "query": query, "doc_id": f"{prefix}{q}-d{d}",
                         "doc": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))),
                         "first_stage_score": float(per_query - d) + rng.random() * 0.1})
    return rows


def write_shortlists(folder: Path, files: int = 2, n_queries: int = 8, per_query: int = 20,
                     row_group_size: int = 40) -> Path:
    """`files` Parquet files of n_queries x per_query rows, row groups of `row_group_size` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        table = pa.Table.from_pylist(shortlist_rows(n_queries, per_query, prefix=f"f{f}q", seed=f))
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=row_group_size)
    return folder


def plan_shards(folder: Path, shard_rows: int = 80) -> list[dict]:
    """The shards the job would cut `folder` into, as the pool hands them to workers."""
    from jobs.plan import make_plan
    from schemas.contract import ColumnMap

    return [s.to_dict() for s in make_plan([str(folder)], ColumnMap(), shard_rows).shards]


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas category, Polars Categorical) as plain ones, so files concatenate."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table[f.name].cast(f.type.value_type))
    return table


def read_inputs(folder: Path) -> pa.Table:
    tables = [_decoded(pq.read_table(p)) for p in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables(tables, promote_options="permissive")


# ---- outputs ---------------------------------------------------------------------------------------------

def read_dir(folder: Path) -> pa.Table | None:
    files = sorted(p for p in folder.glob("*.parquet"))
    if not files:
        return None
    return pa.concat_tables([_decoded(pq.read_table(p)) for p in files], promote_options="permissive")


def job_args(inp, out, model, *extra) -> list[str]:
    return ["--input", str(inp), "--output", str(out), "--model", str(model), "--shard-rows", "80",
            "--no-report", "--quiet", *map(str, extra)]


def key_multiset(table: pa.Table, cols=("query_id", "doc_id", "doc")) -> list[tuple]:
    """Sorted (query_id, doc_id, passage) tuples: equal lists mean the same rows, each as often."""
    if table is None or table.num_rows == 0:
        return []
    data = [table[c].to_pylist() for c in cols]
    return sorted(zip(*data), key=repr)


def assert_each_row_once(inp: Path, out: Path) -> tuple[pa.Table, pa.Table | None]:
    """The invariant: every input row comes out exactly once, scored or rejected, and nothing else does."""
    scored = read_dir(out / "scores")
    rejected = read_dir(out / "rejects")
    source = read_inputs(inp)
    n_scored = scored.num_rows if scored is not None else 0
    n_rejected = rejected.num_rows if rejected is not None else 0
    assert n_scored + n_rejected == source.num_rows, (n_scored, n_rejected, source.num_rows)
    assert sorted(key_multiset(scored) + key_multiset(rejected), key=repr) == key_multiset(source)
    stats = pq.read_table(out / "stats.parquet").to_pylist()
    assert all(s["status"] == "ok" for s in stats), [(s["shard"], s["error"]) for s in stats if s["status"] != "ok"]
    assert sum(s["rows_in"] for s in stats) == source.num_rows
    assert sum(s["rows_scored"] for s in stats) == n_scored
    assert sum(s["rows_rejected"] for s in stats) == n_rejected
    if scored is not None and scored.num_rows:
        # positions within each query are 1..n, each once
        by_q: dict = {}
        for q, p in zip(scored["query_id"].to_pylist(), scored["rerank_position"].to_pylist()):
            by_q.setdefault(q, []).append(p)
        for q, ps in by_q.items():
            assert sorted(ps) == list(range(1, len(ps) + 1)), (q, sorted(ps))
    return scored, rejected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSRANK_FAULT_", "RAY_ADDRESS"))}
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_AUTH_MODE"] = "disabled"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess we started in its own session, and everything it started in that session."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
