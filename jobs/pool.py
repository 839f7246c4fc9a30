"""The actor pool: one model per GPU, shards fed to whichever actor is free, failures retried elsewhere.

The driver only schedules: actors read their shards and write their outputs; what comes back is a
stats dict per shard. At most `inflight_per_actor` shards wait per actor, so driver memory stays flat
however many shards there are. An actor that dies (process killed, node gone) is replaced, and its shard
goes to a live actor with its attempt count raised; a shard that fails `max_retries + 1` times is reported
failed, never retried forever.
"""
from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from jobs.worker import ShardWorker


@dataclass
class _Slot:
    handle: object
    ready_ref: object
    created: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    inflight: int = 0


def actor_resources(num_actors: int | None) -> tuple[int, dict]:
    """How many actors, and what each asks of Ray: one per GPU, else one CPU actor using a node's cores."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    total_cpus = sum(node_cpus)
    if gpus:
        n = num_actors or gpus
        # Tokenization runs on the actor's own threads: give each its share of the cores, at least one.
        return n, {"num_gpus": 1, "num_cpus": max(1, min(8, total_cpus // max(n, 1)))}
    n = num_actors or 1
    per = max(1, (max(node_cpus) if n == 1 else total_cpus // n))
    return n, {"num_gpus": 0, "num_cpus": per}


class ActorPool:
    def __init__(self, spec: dict, num_actors: int, resources: dict, *, max_retries: int,
                 inflight_per_actor: int = 2, start_timeout_s: float = 900.0):
        self.spec = spec
        self.target = num_actors
        self.resources = resources
        self.max_retries = max_retries
        self.inflight_per_actor = inflight_per_actor
        self.start_timeout_s = start_timeout_s
        self.remote_cls = ray.remote(ShardWorker)
        self.slots: list[_Slot] = []
        self.replaced = 0
        for _ in range(num_actors):
            self._add()

    def _add(self) -> None:
        handle = self.remote_cls.options(max_restarts=0, max_task_retries=0, **self.resources).remote(self.spec)
        self.slots.append(_Slot(handle=handle, ready_ref=handle.describe.remote(), created=time.monotonic()))

    def _drop(self, slot: _Slot, replace: bool) -> None:
        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        if replace:
            self.replaced += 1
            self._add()

    def run(self, shards: list[dict], on_done) -> list[dict]:
        """Process every shard; `on_done(stats)` per success. Returns stats rows of failed shards."""
        queue = deque((s, 1) for s in shards)
        inflight: dict = {}  # ref -> (shard, attempt, slot)
        failed: list[dict] = []
        while queue or inflight:
            for slot in self.slots:
                while slot.ready and queue and slot.inflight < self.inflight_per_actor:
                    shard, attempt = queue.popleft()
                    inflight[slot.handle.process.remote(shard, attempt)] = (shard, attempt, slot)
                    slot.inflight += 1
            pending_ready = {s.ready_ref: s for s in self.slots if not s.ready}
            refs = list(inflight) + list(pending_ready)
            if not refs:
                if queue:  # every actor is gone and none can start: report what is left
                    failed += [_failed(s, a, "no actor could be started to run this shard") for s, a in queue]
                    queue.clear()
                break
            done, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for slot in list(self.slots):
                if not slot.ready and time.monotonic() - slot.created > self.start_timeout_s:
                    self._drop(slot, replace=False)  # e.g. the cluster lost the GPU it would need
            for ref in done:
                if ref in pending_ready:
                    slot = pending_ready[ref]
                    try:
                        slot.info = ray.get(ref)
                        slot.ready = True
                    except Exception as e:
                        # A model that cannot load will not load on a fresh actor either: stop, say why.
                        raise RuntimeError(f"actor failed to start: {e}") from e
                    continue
                shard, attempt, slot = inflight.pop(ref)
                slot.inflight -= 1
                try:
                    on_done(ray.get(ref))
                    continue
                except RayActorError as e:
                    reason = f"actor died: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    if slot in self.slots:
                        self._drop(slot, replace=True)
                except RayTaskError as e:
                    reason = _short(e)
                if attempt <= self.max_retries:
                    queue.appendleft((shard, attempt + 1))
                else:
                    failed.append(_failed(shard, attempt, reason))
        return failed

    def actor_info(self) -> list[dict]:
        return [s.info for s in self.slots if s.ready]

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self._drop(slot, replace=False)


def _short(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    lines = "".join(traceback.format_exception_only(type(cause), cause)).strip().splitlines()
    return lines[-1] if lines else repr(cause)


def _failed(shard: dict, attempts: int, error: str) -> dict:
    return {"shard": shard["name"], "input_path": shard["uri"], "row_start": shard["row_start"],
            "row_end": shard["row_end"], "status": "failed", "error": error, "attempts": attempts,
            "rows_in": shard["row_end"] - shard["row_start"]}
