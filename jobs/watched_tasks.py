"""Ray tasks under a time limit: the ranking pass's work, which gives no sign of life while it runs.

A rank or finish task reads, sorts and writes one query bucket or one shard; one that never returns (a read
from a store that hangs, a wedged node) would hold a finished scoring run forever. Each task says when it
starts (a generator task: its first item is a start mark), so its clock runs from then: time queued behind
other work, or waiting for a node the autoscaler is adding, does not count. A task running past
--ranking-timeout has its process killed and runs again with twice the limit; after `attempts` tries the job
stops and names it. The tasks are idempotent and commit atomically, so rerunning the same command redoes
only the ranking that is missing (the scored shards stay committed).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray

from jobs.time_limits import PROBE_EVERY_S, is_ready, ranking_limit

_STARTED = "started"
SETTLE_S = 30.0  # how long killed tasks get to die before they run again


class RankingTimeout(RuntimeError):
    """A ranking task ran past its limit on every attempt."""


@dataclass
class _Task:
    index: int
    attempt: int
    started: float | None = None  # driver's clock when its start mark arrived


def run_watched(fn, calls: list[tuple[str, tuple]], *, setting: float | None, attempts: int = 3,
                fault: dict | None = None) -> tuple[list, int]:
    """fn(*args) for each (label, args) in `calls`, as Ray tasks all submitted at once (Ray queues them by
    CPU, and the autoscaler sees the demand). Returns their results in call order and how many tasks were
    killed for running too long. A task's own error stops the job as it would without a limit; a process
    that dies is retried by Ray."""
    remote = ray.remote(num_cpus=1, max_retries=2)(_call)
    results: list = [None] * len(calls)
    running: dict = {}  # generator -> _Task
    slowest, timeouts = 0.0, 0

    def submit(i: int, attempt: int) -> None:
        label, args = calls[i]
        running[remote.remote(fn, args, _hangs(fault, label, attempt))] = _Task(i, attempt)

    for i in range(len(calls)):
        submit(i, 1)
    while running:
        limit = ranking_limit(setting, slowest)
        ray.wait(list(running), num_returns=1, timeout=None if limit is None else min(PROBE_EVERY_S, limit / 3))
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        now = time.monotonic()
        for gen in ready:
            task = running[gen]
            item = ray.get(next(gen))  # a task's own error is raised here
            if task.started is None and item == _STARTED:
                task.started = now
                continue
            results[task.index], run_s = item
            slowest = max(slowest, run_s)
            del running[gen]
        if limit is None:
            continue
        overdue = [gen for gen, t in running.items()
                   if t.started is not None and now - t.started > limit * 2 ** (t.attempt - 1) and not is_ready(gen)]
        if not overdue:
            continue
        for gen in overdue:  # kill them all, then let them die together: a store that hangs hangs them all
            ray.cancel(gen, force=True)  # kills the process: its writes are atomic, a rerun of it is safe
        ray.wait(overdue, num_returns=len(overdue), timeout=SETTLE_S)
        for gen in overdue:
            task = running.pop(gen)
            timeouts += 1
            label, mine = calls[task.index][0], limit * 2 ** (task.attempt - 1)
            if task.attempt >= attempts:
                for other in running:  # leave nothing running behind the error
                    ray.cancel(other, force=True)
                raise RankingTimeout(
                    f"{label} ran past its limit on each of {attempts} attempts (the last limit {mine:.0f} s, "
                    f"--ranking-timeout {_setting(setting)}); its process was killed each time. Scored shards "
                    "stay committed: mend the cause (storage, a node), then rerun the same command to redo "
                    "the ranking")
            print(f"warning: {label} timed out after {now - task.started:.0f} s (limit {mine:.0f} s); its "
                  "process was killed and it runs again with twice the limit", file=sys.stderr)
            submit(task.index, task.attempt + 1)
    return results, timeouts


def _call(fn, args: tuple, hang: bool):
    """A start mark, then fn's result and its run time in the task."""
    yield _STARTED
    if hang:  # fault injection (CROSSRANK_FAULT_POINT=hang_in_ranking): a call that never returns
        time.sleep(86_400)
    t0 = time.perf_counter()
    yield fn(*args), time.perf_counter() - t0


def _hangs(fault: dict | None, label: str, attempt: int) -> bool:
    fault = fault or {}
    return (fault.get("point") == "hang_in_ranking" and fault.get("shard", "") in label
            and attempt <= fault.get("attempts", 1))


def _setting(setting: float | None) -> str:
    return "auto" if setting is None else f"{setting:g}"
