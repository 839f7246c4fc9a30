"""The actor pool: one model per GPU, shards fed to whichever actor is free, failures retried elsewhere.

The driver only schedules: actors read their shards and write their outputs; what comes back is a
stats dict per shard. At most `inflight_per_actor` shards wait per actor, so driver memory stays flat
however many shards there are. An actor that dies (process killed, node gone) is replaced, and the shard it
was running goes to a live actor with its attempt count raised (a shard queued behind it goes back as it
was: it never started); a shard that fails `max_retries + 1` times is reported failed, never retried
forever. An actor that dies while loading its model is replaced too (a bounded number of times); one whose
model fails to load stops the job with the loader's error.
"""
from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from jobs.worker import ShardWorker


@dataclass
class _Slot:
    handle: object
    ready_ref: object
    created: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    order: list = field(default_factory=list)  # refs of calls in flight, in submission order


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
        self.start_failures = 0
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
        inflight: dict = {}  # ref -> (shard, attempt, slot)
        failed: list[dict] = []

        def retry_or_fail(shard: dict, attempt: int, reason: str) -> None:
            if attempt <= self.max_retries:
                queue.appendleft((shard, attempt + 1))
            else:
                failed.append(_failed(shard, attempt, reason))

        while queue or inflight:
            for slot in self.slots:
                while slot.ready and queue and len(slot.order) < self.inflight_per_actor:
                    shard, attempt = queue.popleft()
                    ref = slot.handle.process.remote(shard, attempt)
                    inflight[ref] = (shard, attempt, slot)
                    slot.order.append(ref)
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
                    self._started(pending_ready[ref])
                    continue
                if ref not in inflight:  # already settled along with its dead actor
                    continue
                shard, attempt, slot = inflight[ref]
                try:
                    on_done(ray.get(ref))
                except RayActorError:
                    # Every call the dead actor still held, in submission order (this one among them).
                    lost = [(r, *inflight.pop(r)[:2]) for r in slot.order]
                    slot.order.clear()
                    self._settle_dead_actor(slot, lost, on_done, queue, retry_or_fail)
                    continue
                except RayTaskError as e:
                    retry_or_fail(shard, attempt, _short(e))
                except RayError as e:  # e.g. the task's worker was killed by Ray's memory monitor
                    retry_or_fail(shard, attempt, f"{type(e).__name__}: {_first_line(e)}")
                del inflight[ref]
                slot.order.remove(ref)
        return failed

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

    def _settle_dead_actor(self, slot: _Slot, lost: list, on_done, queue: deque, retry_or_fail) -> None:
        """An actor died: replace it, and settle every shard it held, oldest first.

        Ray runs an actor's tasks in submission order, so of the shards whose calls failed with the actor only
        the oldest was running: it is charged an attempt (a shard that kills its actor every time ends up
        reported, not retried forever). Shards queued behind it never started: they go back as they were.
        """
        if slot in self.slots:
            self._drop(slot, replace=True)
        refs = [r for r, _, _ in lost]
        ray.wait(refs, num_returns=len(refs), timeout=60.0)  # a dead actor's calls resolve (to errors) promptly
        charged = False
        requeue = []
        for ref, shard, attempt in lost:
            try:
                on_done(ray.get(ref, timeout=0))
            except RayActorError as e:
                if not charged:
                    charged = True
                    retry_or_fail(shard, attempt, f"actor died: {type(e).__name__}: {_first_line(e)}")
                else:
                    requeue.append((shard, attempt))
            except GetTimeoutError:
                requeue.append((shard, attempt))  # cannot tell yet: it never finished, so it runs again
            except RayTaskError as e:
                retry_or_fail(shard, attempt, _short(e))
            except RayError as e:
                retry_or_fail(shard, attempt, f"{type(e).__name__}: {_first_line(e)}")
        queue.extendleft(reversed(requeue))

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
