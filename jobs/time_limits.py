"""How long a call may run before the job takes it for hung: the rules behind --shard-timeout and
--ranking-timeout. No torch here: the ranking tasks import this, and they should not load a model library.

Lenient on purpose: a false alarm costs a shard's or a bucket's work, a true one a job that would otherwise
wait forever (a wedged GPU, a read or an upload that never returns).
"""
from __future__ import annotations

import ray

AUTO_TIMEOUT_S = 600.0  # both settings' `auto`
# A call that cannot beat (a commit, a ranking task) may also run this many times the slowest of its kind.
SLOWEST_FACTOR = 20
PROBE_EVERY_S = 5.0  # how often a busy actor is asked for its beat (more often under a short limit)


def seconds(setting: float | None) -> float | None:
    """A --shard-timeout or --ranking-timeout setting in seconds: None (auto) = 600, 0 = never (None)."""
    return AUTO_TIMEOUT_S if setting is None else (setting or None)


def describe(setting: float | None) -> str:
    return "auto" if setting is None else f"{setting:g}"


def stall_limit(setting: float | None) -> float | None:
    """Seconds an actor may stay silent (no batch done, no step of its shard) before it is taken for hung;
    `setting` is --shard-timeout. Silence, not duration: a shard slow in every batch (long passages, a big
    model on a CPU) still beats, however long it takes."""
    return seconds(setting)


def commit_limit(setting: float | None, slowest_s_per_row: float | None, rows: int) -> float | None:
    """Seconds a commit of `rows` rows may run: the stall limit, or 20x the slowest commit so far per row
    if longer (a commit cannot beat; it writes a shard's files)."""
    return _or_slowest(stall_limit(setting), (slowest_s_per_row or 0.0) * max(rows, 1))


def ranking_limit(setting: float | None, slowest_s: float) -> float | None:
    """Seconds a ranking task may run once started: --ranking-timeout, or 20x the slowest task of its kind so
    far if longer (buckets are of a size, and so are shards)."""
    return _or_slowest(seconds(setting), slowest_s)


def _or_slowest(base: float | None, slowest_s: float) -> float | None:
    return None if base is None else max(base, SLOWEST_FACTOR * slowest_s)


def is_ready(ref) -> bool:
    return bool(ray.wait([ref], timeout=0)[0])
