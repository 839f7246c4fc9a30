"""Ray tasks under a time limit: the ranking pass's work, which gives no sign of life while it runs.

A rank or finish task reads, sorts and writes one query bucket or one shard; one that never returns (a read
from a store that hangs, a wedged node) would hold a finished scoring run forever. Each task says when it
starts (a generator task: its first item is a start mark), so its clock runs from then: time queued behind
other work, or waiting for a node the autoscaler is adding, does not count. A task running past
--ranking-timeout has its process killed and runs again with twice the limit; one whose process dies (out of
memory, a lost node) runs again too. After `attempts` tries the job stops and names it. The tasks are
idempotent and commit atomically, so rerunning the same command redoes only the ranking that is missing (the
scored shards stay committed).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray
from ray.exceptions import RayError, RayTaskError

from jobs import storage
from jobs.time_limits import PROBE_EVERY_S, describe, is_ready, ranking_limit

_STARTED = "started"
SETTLE_S = 30.0  # how long killed tasks get to die before they run again


class RankingFailed(RuntimeError):
    """A ranking task timed out or lost its process on every attempt."""


@dataclass
class _Task:
    index: int
    attempt: int
    started: float | None = None  # the driver's clock when its start mark arrived

    def limit(self, first: float) -> float:
        return first * 2 ** (self.attempt - 1)  # doubles on each attempt


@dataclass
class WatchCounts:
    timeouts: int = 0  # tasks killed for running past their limit
    deaths: int = 0  # tasks whose process died


def run_watched(fn, calls: list[tuple[str, tuple]], *, setting: float | None, attempts: int = 3,
                fault: dict | None = None) -> tuple[list, WatchCounts]:
    """fn(*args) for each (label, args) in `calls`, as Ray tasks all submitted at once (Ray queues them by
    CPU, and an autoscaler sees the demand). Returns their results in call order, and how many tasks were
    killed or died. A task's own error stops the job as it would without a limit."""
    remote = ray.remote(num_cpus=1, max_retries=0)(_call)  # deaths are retried here, where the clock restarts
    results: list = [None] * len(calls)
    running: dict = {}  # generator -> _Task
    counts, slowest = WatchCounts(), 0.0

    def submit(i: int, attempt: int) -> None:
        label, args = calls[i]
        running[remote.remote(fn, args, _hangs(fault, label, attempt))] = _Task(i, attempt)

    def again(task: _Task, why: str) -> None:
        label = calls[task.index][0]
        if task.attempt >= attempts:
            raise RankingFailed(
                f"{label} failed on each of {attempts} attempts, the last time {why}. Scored shards stay "
                "committed: mend the cause (storage, a node, memory), then rerun the same command to redo the "
                "ranking")
        print(f"warning: {label} {why}; it runs again", file=sys.stderr)
        submit(task.index, task.attempt + 1)

    def settle(gen, task: _Task, item) -> None:
        nonlocal slowest
        results[task.index], run_s = item
        slowest = max(slowest, run_s)
        del running[gen]

    for i in range(len(calls)):
        submit(i, 1)
    try:
        while running:
            limit = ranking_limit(setting, slowest)
            wait_s = None if limit is None else min(PROBE_EVERY_S, max(limit / 3, 0.1))
            ray.wait(list(running), num_returns=1, timeout=wait_s)
            ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            now = time.monotonic()
            for gen in ready:
                task = running[gen]
                item = _next_item(gen)
                if isinstance(item, RayError):  # its process died (out of memory, a lost node)
                    del running[gen]
                    counts.deaths += 1
                    again(task, f"lost its process ({type(item).__name__})")
                elif task.started is None and item == _STARTED:
                    task.started = now
                else:
                    settle(gen, task, item)
            if limit is None:
                continue
            overdue = [gen for gen, t in running.items()
                       if t.started is not None and now - t.started > t.limit(limit) and not is_ready(gen)]
            for gen in overdue:  # kill them all, then let them die together: a store that hangs hangs them all
                ray.cancel(gen, force=True)  # kills the process: its writes are atomic, a rerun of it is safe
            if overdue:
                ray.wait(overdue, num_returns=len(overdue), timeout=SETTLE_S)
            for gen in overdue:
                task = running[gen]
                item = _next_item(gen) if is_ready(gen) else None
                if isinstance(item, tuple):  # it finished just before the kill: keep its result
                    settle(gen, task, item)
                    continue
                del running[gen]
                counts.timeouts += 1
                again(task, f"timed out after {now - task.started:.0f} s (limit {task.limit(limit):.0f} s, "
                            f"--ranking-timeout {describe(setting)}; the limit doubles on each attempt) and its "
                            "process was killed")
    except BaseException:
        for gen in running:  # leave nothing running behind the error
            ray.cancel(gen, force=True)
        raise
    return results, counts


def _next_item(gen):
    """The generator's next item; a system error (its process died, or was killed) is returned, a task's own
    error raised."""
    try:
        return ray.get(next(gen))
    except RayTaskError:
        raise
    except RayError as e:
        return e


def _call(fn, args: tuple, hang: bool):
    """A start mark, then fn's result and its run time in the task."""
    yield _STARTED
    if hang:  # fault injection (CROSSRANK_FAULT_POINT=hang_in_ranking): a write whose rename never returns
        storage.before_rename = lambda: time.sleep(86_400)
    t0 = time.perf_counter()
    try:
        yield fn(*args), time.perf_counter() - t0
    finally:
        storage.before_rename = None


def _hangs(fault: dict | None, label: str, attempt: int) -> bool:
    fault = fault or {}
    return (fault.get("point") == "hang_in_ranking" and fault.get("shard", "") in label
            and attempt <= fault.get("attempts", 1))
