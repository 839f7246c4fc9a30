"""The actor pool: one model per GPU, shards fed to whichever actor is free, failures retried elsewhere.

The driver only schedules: actors read and score their shards and their outputs get written without it;
what comes back to the driver is a stats dict per shard. Each actor runs one call at a time, and the driver
reserves it one more shard, which the actor reads ahead while it scores (so storage reads stay off the
device's critical path) and which an idle actor may take over at the end of the job.

GPU actors hand each scored shard to a commit task on their node through the object store (the driver
passes the reference along, never the rows) and score their next shard while the last one is compressed
and uploaded; MAX_COMMITS_PER_ACTOR bounds the commits behind an actor (a slow store holds the actor back,
not the node's memory). A CPU actor commits its shards itself: its cores are its device.

One process scores or commits one shard at a time, so a death is charged to exactly one shard: the one the
actor was running, or the one whose commit task died; unless that shard's commit had landed, when its stats
are read back and nothing reruns. A hang is made a death: an actor that stops giving signs of life (it
beats at each step of a shard and after every batch, and the pool asks it for the beat's age on a thread of
its own) or a commit task that runs too long (`commit_limit`) is killed, and that shard's limits double. The
charged shard's attempt count rises and it goes to a live actor; a reserved shard goes back as it was, and
commits in flight go on. A shard that fails `max_retries + 1` times is reported failed, never retried
forever. An actor that dies while loading its model is replaced too (a bounded number of times); one whose
model fails to load stops the job with the loader's error, unless it was a replacement for one that died
or hung after the model had loaded elsewhere (its device may have gone with it): that one is dropped and
the job goes on. Driver memory stays flat: a few shard descriptions per actor.
"""
from __future__ import annotations

import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.commit import commit_shard
from jobs.plan import describe_shard, shard_rows_of, source_fields
from jobs.time_limits import PROBE_EVERY_S, commit_limit, describe, is_ready, stall_limit
from jobs.worker import ShardWorker
from kernels.loading import then_now

# Commits an actor may have in flight before it gets no new shard: one overlapping its next shard's scoring,
# one more to absorb a slow upload; more would only pile scored shards up in the node's object store.
MAX_COMMITS_PER_ACTOR = 2
class ActorStartError(RuntimeError):
    """No actor can run this job as asked: its model fails to load, or it is not the model the driver checked."""


@dataclass
class _Slot:
    handle: object
    ready_ref: object
    created: float
    ready: bool = False
    info: dict = field(default_factory=dict)
    running: tuple | None = None  # (stats ref, output ref, shard, attempt): the one call this actor is executing
    since: float = 0.0  # when that call started (an actor runs one call at a time: it starts when sent)
    probe: tuple | None = None  # (ref, sent at): the actor's answer to "how long since your last beat?"
    probed: float = 0.0  # when that was last asked
    replacement: bool = False  # started in place of an actor that died or hung
    reserved: tuple | None = None  # (shard, attempt): its next shard, which it is reading ahead
    commits: int = 0  # its scored shards whose commit tasks are still running


def actor_resources(num_actors: int | None, engine: dict | None = None) -> tuple[int, dict]:
    """How many actors, and what each asks of Ray: one per GPU, else one CPU actor using a node's cores.
    ActorStartError, before any actor starts, for engine settings no actor of this cluster could run."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = (engine or {}).get("device", "auto")
    if str(device).startswith("cuda") and not gpus:
        raise ActorStartError(f"--device {device}, but the Ray cluster has no GPU")
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
                 start_timeout_s: float = 900.0, recover=None, shard_timeout: float | None = None):
        """`recover(shard) -> stats | None`: a shard's committed stats, asked when the process that was
        committing it died (its reply lost with it). `shard_timeout`: see `stall_limit`."""
        self.spec = spec
        self.target = num_actors
        self.resources = resources
        self.max_retries = max_retries
        self.start_timeout_s = start_timeout_s
        self.recover = recover or (lambda shard: None)
        self.remote_cls = ray.remote(concurrency_groups={"health": 1})(ShardActor)
        # Commits apart only where the actor scores on a GPU: a CPU actor's cores are its device, and a commit
        # beside it only competes for them (measured on 2 cores: job/engine 0.71x apart, 0.89x in the actor).
        self.commit_apart = resources.get("num_gpus", 0) > 0
        # No CPU reserved: a commit is I/O and compression on the cores the GPU actors leave, and
        # MAX_COMMITS_PER_ACTOR bounds how many run. Retries are the pool's.
        self.commit_fn = ray.remote(num_cpus=0, max_retries=0)(commit_shard)
        self.slots: list[_Slot] = []
        self.replaced = 0
        self.start_failures = 0
        self.recovered = 0
        self.first_ready: float | None = None
        self.shard_timeout = shard_timeout
        self.slowest_commit: float | None = None  # seconds per row of the slowest finished commit task
        self.timeouts = 0
        self.timed_out: dict[str, int] = {}  # shard name -> its calls taken for hung: each doubles its limits
        self.last_start_error: str | None = None
        for _ in range(num_actors):
            self._add()

    def _add(self, replacement: bool = False) -> None:
        handle = self.remote_cls.options(max_restarts=0, max_task_retries=0, **self.resources).remote(self.spec)
        self.slots.append(_Slot(handle=handle, ready_ref=handle.describe.remote(), created=time.monotonic(),
                                replacement=replacement))

    def _drop(self, slot: _Slot, replace: bool) -> None:
        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        if replace:
            self.replaced += 1
            self._add(replacement=True)

    def run(self, shards: list[dict], on_done) -> list[dict]:
        """Process every shard; `on_done(stats)` per success. Returns stats rows of failed shards."""
        queue = deque((s, 1) for s in shards)
        failed: list[dict] = []

        charged: dict[str, str] = {}  # shard name -> why its last attempt failed

        def retry_or_fail(shard: dict, attempt: int, reason: str) -> None:
            charged[shard["name"]] = reason
            if attempt <= self.max_retries:
                queue.appendleft((shard, attempt + 1))
            else:
                failed.append(_failed(shard, attempt, reason))

        commits: dict = {}  # commit task ref -> (shard, attempt, slot)
        while True:
            self._assign(queue)
            calls = {s.running[0]: s for s in self.slots if s.running}
            if not calls and not commits and not queue and not any(s.reserved for s in self.slots):
                break  # all done (an actor still starting as a replacement is not waited for)
            pending_ready = {s.ready_ref: s for s in self.slots if not s.ready}
            if not calls and not commits and not pending_ready:  # every actor is gone and none can start
                left = list(queue) + [s.reserved for s in self.slots if s.reserved]
                why = f" (last start failure: {self.last_start_error})" if self.last_start_error else ""
                # (shard, attempt) names the attempt it would have run next: it ran attempt - 1 times, and the
                # last of them failed as `charged` says
                failed += [_failed(s, a - 1, f"no actor could be started to run this shard{why}"
                                   + (f"; before that: {charged[s['name']]}" if s["name"] in charged else ""))
                           for s, a in left]
                break
            done, _ = ray.wait(list(calls) + list(commits) + list(pending_ready), num_returns=1, timeout=1.0)
            for slot in list(self.slots):
                if not slot.ready and time.monotonic() - slot.created > self.start_timeout_s:
                    self._drop(slot, replace=False)  # e.g. the cluster lost the GPU it would need
            for ref in done:
                if ref in pending_ready:
                    self._started(pending_ready[ref])
                elif ref in commits:
                    shard, attempt, slot, since = commits.pop(ref)
                    slot.commits -= 1
                    if self._settle_commit(ref, shard, attempt, on_done, retry_or_fail):
                        per_row = (time.monotonic() - since) / max(shard_rows_of(shard), 1)
                        self.slowest_commit = max(self.slowest_commit or 0.0, per_row)
                else:
                    slot = calls[ref]
                    _, output_ref, shard, attempt = slot.running
                    slot.running = None
                    try:
                        stats = ray.get(ref)
                    except RayActorError as e:
                        self._settle_dead_actor(slot, shard, attempt, f"actor died: {type(e).__name__}: "
                                                f"{_first_line(e)}", on_done, queue, retry_or_fail)
                        continue
                    except RayTaskError as e:
                        # A CPU actor commits itself: an error after its commit landed (an object store's
                        # rename is a copy then a delete) must not leave the shard reported failed.
                        self._recover_or_retry(shard, attempt, _short(e), on_done, retry_or_fail)
                        continue
                    except RayError as e:  # e.g. the actor's worker was killed by Ray's memory monitor
                        retry_or_fail(shard, attempt, f"{type(e).__name__}: {_first_line(e)}")
                        continue
                    if output_ref is None:  # scored and committed by the actor itself
                        on_done(stats)
                        continue
                    commits[self._commit(slot, shard, attempt, stats, output_ref)] = (shard, attempt, slot,
                                                                                      time.monotonic())
                    slot.commits += 1
            self._expire(commits, queue, on_done, retry_or_fail)
        return failed

    def _expire(self, commits: dict, queue: deque, on_done, retry_or_fail) -> None:
        """Hangs are made deaths: an actor silent past `stall_limit` is killed and replaced, a commit task past
        `commit_limit` has its process killed; the shard is charged an attempt and goes to a live actor,
        unless its commit had landed. Without this, one wedged GPU or a read or upload that never returns
        holds the job forever. A call whose result is already in is left to be settled, never taken for hung."""
        now = time.monotonic()
        base = stall_limit(self.shard_timeout)
        for slot in list(self.slots):
            if not slot.running or base is None or is_ready(slot.running[0]):
                continue
            limit = base * self._backoff(slot.running[2])
            silent = self._silence(slot, now, limit)
            if silent is None or silent <= limit:
                continue
            stats_ref, output_ref, shard, attempt = slot.running
            slot.running = None
            self._timed_out(shard)
            reason = (f"timed out: no sign of life from its actor for {silent:.0f} s (limit {limit:.0f} s, "
                      f"--shard-timeout {describe(self.shard_timeout)}); actor killed and replaced")
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass
            if output_ref is None:  # it commits itself: let its death settle, so a commit landing now is seen
                ray.wait([stats_ref], timeout=30)
            self._settle_dead_actor(slot, shard, attempt, reason, on_done, queue, retry_or_fail)
        for ref, (shard, attempt, slot, since) in list(commits.items()):
            climit = commit_limit(self.shard_timeout, self.slowest_commit, shard_rows_of(shard))
            if climit is None or now - since <= climit * self._backoff(shard) or is_ready(ref):
                continue
            climit *= self._backoff(shard)
            ray.cancel(ref, force=True)  # kills the process running it: its writes are atomic
            ray.wait([ref], timeout=30)  # and a commit that landed meanwhile is read back below
            del commits[ref]
            slot.commits -= 1
            self._timed_out(shard)
            self._recover_or_retry(shard, attempt, f"commit timed out: no result after {now - since:.0f} s "
                                   f"(limit {climit:.0f} s, --shard-timeout); its process was killed",
                                   on_done, retry_or_fail)

    def _backoff(self, shard: dict) -> int:
        """A shard's limits double with each of its calls taken for hung: one merely slower than the limit
        (a big commit under a short --shard-timeout) gets through on a retry; a real hang still fails after
        --max-shard-retries, and other shards keep the plain limit."""
        return 2 ** self.timed_out.get(shard["name"], 0)

    def _timed_out(self, shard: dict) -> None:
        self.timeouts += 1
        self.timed_out[shard["name"]] = self.timed_out.get(shard["name"], 0) + 1

    def _silence(self, slot: _Slot, now: float, limit: float) -> float | None:
        """Seconds the actor has been silent in its running call, as far as known now (None: not known yet):
        its last answer to "how long since your last beat?" (asked every few seconds on its "health" thread),
        or how long it has left that question unanswered (a process too wedged to answer is as hung as one
        that answers late). Silence before the call was sent does not count (an actor may idle, held back by
        its commits, and the question may be answered before the call's first beat)."""
        silent = None
        if slot.probe is not None:
            ref, sent = slot.probe
            if is_ready(ref):
                slot.probe = None
                try:
                    silent = ray.get(ref)
                except RayError:
                    return None  # the actor died: its running call's error settles the shard
            elif now - sent > limit:
                silent = now - sent
        if slot.probe is None and now - slot.probed >= min(PROBE_EVERY_S, limit / 3):
            slot.probe, slot.probed = (slot.handle.beat_age.remote(), now), now
        return None if silent is None else min(silent, now - slot.since)

    def _commit(self, slot: _Slot, shard: dict, attempt: int, stats: dict, output_ref):
        """Start the shard's commit task on the actor's node (its output is in that node's object store)."""
        options = {}
        if slot.info.get("node_id"):
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(slot.info["node_id"], soft=True)
        return self.commit_fn.options(**options).remote(self.spec, shard, attempt, stats, output_ref)

    def _settle_commit(self, ref, shard: dict, attempt: int, on_done, retry_or_fail) -> bool:
        """A commit task ended: done; or it failed or its process died, which costs the shard an attempt (it is
        scored again) unless the commit had landed first. A commit whose input was lost with its node is
        charged too, and says so: a node's loss charges each shard it was scoring or committing."""
        try:
            stats = ray.get(ref)
        except RayTaskError as e:
            lost = isinstance(e, ObjectLostError) or isinstance(getattr(e, "cause", None), ObjectLostError)
            reason = "commit lost its input (its node's object store is gone)" if lost else f"commit failed: {_short(e)}"
            self._recover_or_retry(shard, attempt, reason, on_done, retry_or_fail)
        except RayError as e:
            self._recover_or_retry(shard, attempt, f"commit process died: {type(e).__name__}: {_first_line(e)}",
                                   on_done, retry_or_fail)
        else:
            on_done(stats)
            return True
        return False

    def _recover_or_retry(self, shard: dict, attempt: int, reason: str, on_done, retry_or_fail) -> None:
        stats = self.recover(shard)
        if stats is not None:
            self.recovered += 1
            on_done(stats)
        else:
            retry_or_fail(shard, attempt, reason)

    def _assign(self, queue: deque) -> None:
        """Every idle ready actor starts its reserved shard (else the next queued one, else one reserved by a
        busy actor), and reserves the next queued shard to read ahead."""
        for slot in self.slots:
            if not slot.ready or slot.running or slot.commits >= MAX_COMMITS_PER_ACTOR:
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
            if self.commit_apart:
                stats_ref, output_ref = slot.handle.score_shard.options(num_returns=2).remote(job[0], job[1], ahead)
            else:
                stats_ref, output_ref = slot.handle.process.remote(job[0], job[1], ahead), None
            slot.running = (stats_ref, output_ref, *job)
            slot.since, slot.probe = time.monotonic(), None

    def _steal(self) -> tuple | None:
        """A shard reserved by a busy actor (scoring, or held back by its commits in flight), so no actor idles
        while another has work waiting behind it."""
        for other in self.slots:
            if other.reserved and (other.running or other.commits >= MAX_COMMITS_PER_ACTOR):
                job, other.reserved = other.reserved, None
                return job
        return None

    def _started(self, slot: _Slot) -> None:
        try:
            slot.info = ray.get(slot.ready_ref)
            expected, loaded = self.spec.get("model_identity"), slot.info.get("model_identity")
            if expected is not None and loaded != expected:
                raise ActorStartError(
                    f"actor {slot.info.get('actor')} loaded another model than the driver checked "
                    f"({self.spec['model']}: {then_now(expected, loaded)}); every node must see the same "
                    "files under the model's path")
            slot.ready = True
            self.first_ready = self.first_ready or time.monotonic()  # start-up ends: reported apart
        except RayActorError as e:
            if getattr(e, "actor_init_failed", False):
                if slot.replacement and self.first_ready is not None:
                    # The model loaded before: this replacement landed on a device that died with the actor
                    # it replaces (a wedged GPU). The job goes on with the actors it has.
                    self.last_start_error = _short(e)
                    print(f"warning: a replacement actor failed to start ({self.last_start_error}); going on "
                          f"with {sum(1 for s in self.slots if s is not slot)} actor(s)", file=sys.stderr)
                    self._drop(slot, replace=False)
                    return
                # A model that cannot load will not load on a fresh actor either: stop, say why (the actor's
                # traceback is in its log above; the last line is the reason).
                raise ActorStartError(f"actor failed to start: {_short(e)}") from e
            # The process or its node died while the model loaded: start another, a bounded number of times.
            self.start_failures += 1
            if self.start_failures > self.target * (self.max_retries + 1):
                raise ActorStartError(f"actors keep dying while they start ({self.start_failures} so far): {e}") from e
            self._drop(slot, replace=True)
        except ActorStartError:
            raise
        except Exception as e:
            raise ActorStartError(f"actor failed to start: {e}") from e

    def _settle_dead_actor(self, slot: _Slot, shard: dict, attempt: int, reason: str, on_done,
                           queue: deque, retry_or_fail) -> None:
        """An actor died running `shard`: replace it; the shard is charged an attempt (a shard that kills its
        actor every time ends up reported, not retried forever) unless, committing in the actor, it had
        committed before the death. The shard reserved to the actor never started: it goes back to the queue
        as it was. Its commits in flight (GPU actors) are tasks of their own: they go on."""
        if slot.reserved:
            queue.appendleft(slot.reserved)
            slot.reserved = None
        if slot in self.slots:
            self._drop(slot, replace=True)
        self._recover_or_retry(shard, attempt, reason, on_done, retry_or_fail)

    def actor_info(self) -> list[dict]:
        return [s.info for s in self.slots if s.ready]

    def shutdown(self) -> None:
        for slot in list(self.slots):
            self._drop(slot, replace=False)


class ShardActor(ShardWorker):
    """The pool's actor: a ShardWorker that answers "how long since your last beat?" on a thread of its own,
    while its one working thread scores (or hangs)."""

    @ray.method(concurrency_group="health")
    def beat_age(self) -> float:
        return ShardWorker.beat_age(self)


def _short(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    lines = "".join(traceback.format_exception_only(type(cause), cause)).strip().splitlines()
    return lines[-1] if lines else repr(cause)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _failed(shard: dict, attempts: int, error: str) -> dict:
    return {"shard": shard["name"], **source_fields(shard), "source": describe_shard(shard), "status": "failed",
            "error": error, "attempts": attempts, "rows_in": shard_rows_of(shard)}
