"""The actor pool: one model per GPU, shards fed to whichever actor is free, failures retried elsewhere.

The driver only schedules: actors read their shards and write their outputs; what comes back is a
stats dict per shard. Each actor runs one call at a time and the driver reserves it one more shard, which
the actor reads ahead while it scores (so storage reads stay off the device's critical path) and which an
idle actor may take over at the end of the job. With one call per actor, a death is charged to exactly the
shard that was running: its attempt count rises and it goes to a live actor (unless its commit landed
before the actor died: then its stats are read back and nothing reruns); the reserved shard goes back as
it was. A shard that fails `max_retries + 1` times is reported failed, never retried forever. An actor that
dies while loading its model is replaced too (a bounded number of times); one whose model fails to load
stops the job with the loader's error. Driver memory stays flat: two shard descriptions per actor.
"""
from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from jobs.worker import ShardWorker


@dataclass
class _Slot:
    handle: object
    ready_ref: object
    created: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    running: tuple | None = None  # (ref, shard, attempt): the one call this actor is executing
    reserved: tuple | None = None  # (shard, attempt): its next shard, which it is reading ahead


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
                 start_timeout_s: float = 900.0, recover=None):
        """`recover(shard) -> stats | None`: a shard's committed stats, asked when its actor died mid-call."""
        self.spec = spec
        self.target = num_actors
        self.resources = resources
        self.max_retries = max_retries
        self.start_timeout_s = start_timeout_s
        self.recover = recover or (lambda shard: None)
        self.remote_cls = ray.remote(ShardWorker)
        self.slots: list[_Slot] = []
        self.replaced = 0
        self.start_failures = 0
        self.recovered = 0
        self.first_ready: float | None = None
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
        failed: list[dict] = []

        def retry_or_fail(shard: dict, attempt: int, reason: str) -> None:
            if attempt <= self.max_retries:
                queue.appendleft((shard, attempt + 1))
            else:
                failed.append(_failed(shard, attempt, reason))

        while True:
            self._assign(queue)
            calls = {s.running[0]: s for s in self.slots if s.running}
            if not calls and not queue and not any(s.reserved for s in self.slots):
                break  # all done (an actor still starting as a replacement is not waited for)
            pending_ready = {s.ready_ref: s for s in self.slots if not s.ready}
            if not calls and not pending_ready:  # every actor is gone and none can start: report what is left
                left = list(queue) + [s.reserved for s in self.slots if s.reserved]
                failed += [_failed(s, a, "no actor could be started to run this shard") for s, a in left]
                break
            done, _ = ray.wait(list(calls) + list(pending_ready), num_returns=1, timeout=1.0)
            for slot in list(self.slots):
                if not slot.ready and time.monotonic() - slot.created > self.start_timeout_s:
                    self._drop(slot, replace=False)  # e.g. the cluster lost the GPU it would need
            for ref in done:
                if ref in pending_ready:
                    self._started(pending_ready[ref])
                    continue
                slot = calls[ref]
                _, shard, attempt = slot.running
                slot.running = None
                try:
                    on_done(ray.get(ref))
                except RayActorError as e:
                    self._settle_dead_actor(slot, shard, attempt, e, on_done, queue, retry_or_fail)
                except RayTaskError as e:
                    retry_or_fail(shard, attempt, _short(e))
                except RayError as e:  # e.g. the task's worker was killed by Ray's memory monitor
                    retry_or_fail(shard, attempt, f"{type(e).__name__}: {_first_line(e)}")
        return failed

    def _assign(self, queue: deque) -> None:
        """Every idle ready actor starts its reserved shard (else the next queued one, else one reserved by a
        busy actor), and reserves the next queued shard to read ahead."""
        for slot in self.slots:
            if not slot.ready or slot.running:
                continue
            job, slot.reserved = slot.reserved, None
            if job is None and queue:
                job = queue.popleft()
            if job is None:
                job = self._steal()
            if job is None:
                continue
            slot.reserved = queue.popleft() if queue else None
            ahead = slot.reserved[0] if slot.reserved else None
            ref = slot.handle.process.remote(job[0], job[1], ahead)
            slot.running = (ref, *job)

    def _steal(self) -> tuple | None:
        """A shard reserved by a busy actor, so no actor idles while another has work waiting behind it."""
        for other in self.slots:
            if other.running and other.reserved:
                job, other.reserved = other.reserved, None
                return job
        return None

    def _started(self, slot: _Slot) -> None:
        try:
            slot.info = ray.get(slot.ready_ref)
            slot.ready = True
            self.first_ready = self.first_ready or time.monotonic()  # start-up ends: reported apart
        except RayActorError as e:
            if getattr(e, "actor_init_failed", False):
                # A model that cannot load will not load on a fresh actor either: stop, say why.
                raise RuntimeError(f"actor failed to start: {e}") from e
            # The process or its node died while the model loaded: start another, a bounded number of times.
            self.start_failures += 1
            if self.start_failures > self.target * (self.max_retries + 1):
                raise RuntimeError(f"actors keep dying while they start ({self.start_failures} so far): {e}") from e
            self._drop(slot, replace=True)
        except Exception as e:
            raise RuntimeError(f"actor failed to start: {e}") from e

    def _settle_dead_actor(self, slot: _Slot, shard: dict, attempt: int, error: RayActorError, on_done,
                           queue: deque, retry_or_fail) -> None:
        """An actor died running `shard`: replace it; the shard is charged an attempt (a shard that kills its
        actor every time ends up reported, not retried forever) unless it had committed before the death.
        The shard reserved to the actor never started: it goes back to the queue as it was."""
        if slot.reserved:
            queue.appendleft(slot.reserved)
            slot.reserved = None
        if slot in self.slots:
            self._drop(slot, replace=True)
        stats = self.recover(shard)
        if stats is not None:
            self.recovered += 1
            on_done(stats)
        else:
            retry_or_fail(shard, attempt, f"actor died: {type(error).__name__}: {_first_line(error)}")

    def actor_info(self) -> list[dict]:
        return [s.info for s in self.slots if s.ready]

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self._drop(slot, replace=False)


def _short(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    lines = "".join(traceback.format_exception_only(type(cause), cause)).strip().splitlines()
    return lines[-1] if lines else repr(cause)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _failed(shard: dict, attempts: int, error: str) -> dict:
    return {"shard": shard["name"], "input_path": shard["uri"], "row_start": shard["row_start"],
            "row_end": shard["row_end"], "status": "failed", "error": error, "attempts": attempts,
            "rows_in": shard["row_end"] - shard["row_start"]}
