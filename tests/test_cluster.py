"""The paths users take on real clusters: a node lost mid-job, `ray job submit` to a `ray start` cluster
(local paths, and s3:// through an S3 server on loopback).

Each test starts its own Ray processes (on loopback, in a temp dir of its own so no other `ray.init()` on
this machine finds them) and stops exactly those: never `ray stop`, which would stop every Ray on the box.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import (
    PY, ROOT, assert_each_row_once, free_port, job_args, kill_session, read_inputs, subprocess_env,
    write_shortlists,
)
from jobs.report import write_report

OBJECT_STORE = 100 * 1024 * 1024
RAY = str(Path(PY).parent / "ray")  # the CLI of the interpreter running the tests


def _shard_workers_running(pid: int) -> list[int]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::ShardActor.score_shard"):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---- a node leaves mid-job ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_node_lost_mid_job(tiny_model, tmp_path):
    """Head (no GPU) + two worker nodes of one logical GPU each; the job runs as a driver connected by
    --address. Once both actors are inside a shard, one worker node is killed outright. The job finishes on
    the node left, nothing lost."""
    from ray import ray_constants
    from ray.cluster_utils import Cluster

    inp = write_shortlists(tmp_path / "in", files=2, n_queries=12, per_query=20)  # 6 shards of 80
    out = tmp_path / "out"
    fast_failure_detection = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                              "health_check_timeout_ms": 1000, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE,
        "_system_config": fast_failure_detection})
    proc = None
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        cmd = [PY, "-m", "jobs.rerank", *job_args(inp, out, tiny_model, "--address", cluster.address)]
        log = tmp_path / "job.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(CROSSRANK_FAULT_SLEEP_S="3"), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            raylets = {n: n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for n in workers}
            victim = None
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                busy = [n for n in workers if _shard_workers_running(raylets[n])]
                if len(busy) == 2:  # both actors inside a shard: take one node away
                    victim = busy[0]
                    break
                time.sleep(0.2)
            assert victim is not None, "both actors never ran at once:\n" + log.read_text()[-3000:]
            cluster.remove_node(victim, allow_graceful=False)
            rc = proc.wait(timeout=300)
        assert rc == 0, log.read_text()[-5000:]
    finally:
        if proc is not None:
            kill_session(proc)
        cluster.shutdown()
    assert_each_row_once(inp, out)
    totals = _manifest(out)["totals"]
    assert totals["retries"] >= 1 and totals["actors_replaced"] >= 1, totals
    assert any(r["attempts"] > 1 for r in pq.read_table(out / "stats.parquet").to_pylist())


# ---- `ray start` + `ray job submit` ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the dashboard (the job submission API lives there), 2 CPUs, 2 logical GPUs."""
    temp_dir = tempfile.mkdtemp(prefix="crr", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    dashboard = free_port()
    cmd = [RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=2", f"--port={free_port()}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--object-store-memory={OBJECT_STORE}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = subprocess_env()
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers once the dashboard is up
            r = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert head.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
            assert time.monotonic() < deadline, r.stderr[-2000:]
            time.sleep(1)
        yield url, env
    finally:
        head.send_signal(signal.SIGINT)  # --block: tears its processes down
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head)
        for p in psutil.process_iter(["pid", "cmdline"]):  # anything that left the session, by our temp dir
            try:
                if temp_dir in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(url: str, env: dict, job_argv: list[str], runtime_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", "."]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", "python", "-m", "jobs.rerank", *job_argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def test_job_submission_comes_with_ray_default():
    """`ray job submit` talks to the dashboard's job API; the dashboard's server and the job client need the
    packages of ray's `default` extra, which crossrank depends on."""
    import importlib
    import importlib.metadata
    import re

    default = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower().replace("-", "_")
               for r in importlib.metadata.requires("ray") or [] if 'extra == "default"' in r}
    assert {"aiohttp", "aiohttp_cors", "requests"} <= default, default
    for module in ("aiohttp", "aiohttp_cors", "requests", "ray.job_submission"):
        importlib.import_module(module)
    assert '"ray[default]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_ray_job_submit_local_paths(ray_head, tiny_model, tmp_path):
    url, env = ray_head
    inp = write_shortlists(tmp_path / "in")
    out = tmp_path / "out"
    r = _submit(url, env, job_args(inp, out, tiny_model))
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert "succeeded" in (r.stdout + r.stderr)
    assert_each_row_once(inp, out)
    assert _manifest(out)["status"] == "complete"


@pytest.mark.slow
def test_ray_job_submit_s3_input_and_output(ray_head, tiny_model, tmp_path):
    """s3:// in and out, through the same pyarrow.fs code, against moto's S3 server on loopback. The job's
    driver and workers get the endpoint and credentials through the job's runtime_env."""
    from moto.server import ThreadedMotoServer

    url, env = ray_head
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # pyarrow's S3FileSystem reads AWS_ENDPOINT_URL
        s3 = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                               endpoint_override=f"{host}:{port}", allow_bucket_creation=True)
        s3.create_dir("crossrank-test")
        local_in = write_shortlists(tmp_path / "in")
        pafs.copy_files(str(local_in), "crossrank-test/shortlists", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
        args = [a for a in job_args("s3://crossrank-test/shortlists", "s3://crossrank-test/out", tiny_model)
                if a != "--no-report"]  # the report too reads and writes s3:// here
        r = _submit(url, env, args, runtime_env={"env_vars": aws})
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        listing = s3.get_file_info(pafs.FileSelector("crossrank-test/out", recursive=True))
        assert not [i.path for i in listing if ".tmp-" in i.path], "half-written files left in the bucket"
        local_out = tmp_path / "out"
        pafs.copy_files("crossrank-test/out", str(local_out), source_filesystem=s3,
                        destination_filesystem=pafs.LocalFileSystem())
    finally:
        server.stop()
    assert_each_row_once(local_in, local_out)
    manifest = _manifest(local_out)
    assert manifest["status"] == "complete"
    assert all(f["uri"].startswith("s3://crossrank-test/shortlists/") for f in manifest["inputs"])
    # The report written to the bucket holds what a report of the downloaded copy computes.
    from_s3 = pl.read_parquet(local_out / "report" / "metrics.parquet")
    assert "report failed" not in r.stdout + r.stderr
    write_report(str(local_out), quiet=True)
    assert pl.read_parquet(local_out / "report" / "metrics.parquet").equals(from_s3)
    per_query = pl.read_parquet(local_out / "report" / "per_query.parquet")
    assert per_query.height == len(set(read_inputs(local_in)["query_id"].to_pylist()))
