"""A base group on Ray: one detached actor holding one resident frozen base
(:class:`jobs.training.base_group.BaseGroup`) and training every job that joins it.

The actor reserves its resources like any job's workers (its CPUs, its GPU), so solo jobs and groups
queue against one another in Ray's scheduler. Its training loop runs in a thread of its own; a job's
runner calls :meth:`BaseGroupActor.train`, which queues the join and blocks until the job leaves the
group (finished, failed, cancelled). Joins and leaves take effect between steps, waiting jobs join
highest ``priority`` first, and a full group pauses its lowest-priority member (checkpointed, back to
QUEUED) for a waiting job of higher priority. A member leaves when its job is cancelled in the store
(polled every second) or its runner asks. A group with no
members for ``PEFTFLEET_GROUP_IDLE_S`` seconds (default 300) ends itself; a step that fails for the
group as a whole (not one member's rows) ends it too, and its jobs' runners retry them elsewhere.

The group owns its members' training: it keeps their jobs alive in the store (heartbeats, whether or
not their runners still live) and settles them itself — SUCCEEDED with the adapter registered, FAILED
with the error, CANCELLED when a cancel was asked — so a job whose runner died (a sweep's driver
stopped, a node lost) still ends honestly, and a new runner of the same job re-attaches to it.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import asdict
from typing import Any

import ray

from jobs.spec import parse_job_spec
from jobs.states import IllegalTransition, JobState
from jobs.store import JobStore, OwnershipLost
from jobs.tracking import TrackedReporter
from jobs.training.base_group import BaseGroup, GroupKey, Member
from jobs.training.subspaces import resolve_method_config
from orchestrator.groups.reporter import GroupReporter
from orchestrator.reconciler import HEARTBEAT_INTERVAL_S

NAMESPACE = "peftfleet"
PREFIX = "peftfleet-group-"
STORE_POLL_S = 1.0


class GroupClosing(RuntimeError):
    """The group is ending (idle or broken); join another."""


def idle_timeout_s() -> float:
    return float(os.environ.get("PEFTFLEET_GROUP_IDLE_S", "300"))


class BaseGroupActor:
    """See the module docstring. Created by :func:`orchestrator.groups.group_for` as a named detached
    actor, so every job with the same :class:`GroupKey` finds the same one."""

    def __init__(self, key: dict[str, Any], name: str, base_model: str, store_url: str | None, storage_url: str,
                 home: str | None):
        self.key, self.name = GroupKey(**key), name
        self.store = JobStore(store_url, storage_url=storage_url, home=home)
        self.home = home
        device = None
        if self.key.gpus:
            import torch

            device = torch.device("cuda", 0)  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        key = self.key
        self.group = BaseGroup(base_model, key.task, precision=key.precision, device=device, home=home,
                               base_dropout=key.base_dropout, gradient_checkpointing=key.gradient_checkpointing)
        self.created_at = time.time()
        self._lock = threading.Lock()
        self._joins: list[tuple[str, dict[str, Any]]] = []
        self._leaves: dict[str, str] = {}
        self._waiters: dict[str, tuple[threading.Event, dict[str, Any]]] = {}
        self._members: dict[str, Member] = {}
        self._configs: dict[str, dict[str, Any]] = {}  # each member's join request, to rejoin after a pause
        self._closing: str | None = None
        self._idle_since = time.monotonic()
        self._steps = 0
        threading.Thread(target=self._loop, name="peftfleet-group", daemon=True).start()

    # -- what runners and clients call ---------------------------------------------------------------
    def train(self, job_id: str, config: dict[str, Any]) -> dict[str, Any]:
        """Train job ``job_id`` in this group; returns once it left: ``{"state": "SUCCEEDED" | "FAILED" |
        "CANCELLED", "outcome" | "error": ...}``. Raises :class:`GroupClosing` when the group is ending."""
        with self._lock:
            if self._closing:
                raise GroupClosing(f"base group {self.name} is closing: {self._closing}")
            waiter = self._waiters.get(job_id)
            if waiter is None:  # a second runner of the same job waits on the first one's membership
                waiter = self._waiters[job_id] = (threading.Event(), {})
                if job_id not in self._members:
                    self._joins.append((job_id, config))
        event, box = waiter
        event.wait()
        if box.get("state") == "GROUP_FAILED":
            raise GroupClosing(box["error"])
        return dict(box)

    def leave(self, job_id: str, reason: str) -> None:
        with self._lock:
            self._leaves[job_id] = reason

    def describe(self) -> dict[str, Any]:
        with self._lock:
            members = list(self._members)
            waiting = [job_id for job_id, _ in self._joins]
            idle = 0.0 if members or waiting else time.monotonic() - self._idle_since
        return {
            "name": self.name, **asdict(self.key), "members": members, "waiting": waiting,
            "capacity": self.group.capacity, "idle_s": round(idle, 1), "steps": self._steps,
            "base_mb": round(self.group.base_bytes / 2**20, 1), "created_at": self.created_at,
            "node": ray.get_runtime_context().get_node_id(), "closing": self._closing,
        }

    # -- the training loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        last_poll = last_beat = 0.0
        while True:
            try:
                self._membership()
                if not self._members:
                    with self._lock:
                        idle = not self._joins and time.monotonic() - self._idle_since > idle_timeout_s()
                        if idle:
                            self._closing = f"idle for {idle_timeout_s():.0f} s"
                    if idle:
                        break
                    time.sleep(0.05)
                    continue
                if self.group.active():
                    for member, error in self.group.step():
                        self._left(member, error)
                    self._steps += 1
                else:  # every member held (PBT trials waiting for their scheduler's decisions)
                    time.sleep(0.05)
                if time.monotonic() - last_poll > STORE_POLL_S:
                    last_poll = time.monotonic()
                    self._poll_store()
                if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                    last_beat = time.monotonic()
                    with self._lock:
                        held = list(self._members) + [job_id for job_id, _ in self._joins]
                    self.store.keep_alive(held)
            except BaseException as e:  # noqa: BLE001 - the group as a whole broke: its jobs go elsewhere
                self._closing = f"the group failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                with self._lock:
                    for event, box in self._waiters.values():
                        box.update(state="GROUP_FAILED", error=self._closing)
                        event.set()
                break
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _membership(self) -> None:
        """Between two steps: queued leaves; then, highest priority first, queued joins as long as there is
        room (a full group pauses a lower-priority member for a waiting job)."""
        with self._lock:
            leaves, self._leaves = self._leaves, {}
            waiting = [join for join in self._joins if join[0] in leaves]
            self._joins = [join for join in self._joins if join[0] not in leaves]
        for job_id, reason in leaves.items():
            member = self._members.get(job_id)
            if member is not None:
                self.group.remove(member)
                _end_tracking(member, "KILLED")
                self.store.set_runtime(job_id, left_group={"group": self.name, "step": member.step, "reason": reason})
            if member is not None or any(j == job_id for j, _ in waiting):
                if self.store.get(job_id).state is JobState.CANCELLING:
                    self._settle(job_id, JobState.CANCELLED, "stopped on request")
                self._finish(job_id, {"state": "CANCELLED", "error": reason})
        with self._lock:
            self._joins.sort(key=lambda join: -_priority(join[1]))  # stable: first come first within a priority
            best = _priority(self._joins[0][1]) if self._joins else None
        if best is not None and len(self._members) >= self.group.capacity:
            self._preempt(best)
        with self._lock:
            room = self.group.capacity - len(self._members)
            joins, self._joins = self._joins[:room], self._joins[room:]
        for job_id, config in joins:
            try:
                self._members[job_id] = self._join(job_id, config)
            except Exception as e:  # noqa: BLE001 - the job's own setup failed
                self._failed(job_id, e)

    def _preempt(self, priority: int) -> None:
        """Pause the lowest-priority member below ``priority`` (the latest joined among equals) once it is
        at a step boundary: checkpointed, RUNNING → RETRYING → QUEUED, back in the queue with its runner
        still waiting; it resumes from that checkpoint when there is room for it."""
        candidates = [(j, m) for j, m in self._members.items() if _priority(self._configs[j]) < priority]
        if not candidates:
            return
        job_id, member = min(reversed(candidates), key=lambda c: _priority(self._configs[c[0]]))
        if not member.at_boundary:
            return  # mid-accumulation: next step
        where = member.pause()
        self.group.remove(member)
        _end_tracking(member, None)  # its run stays open: it continues when the job rejoins
        del self._members[job_id]
        mine = _priority(self._configs[job_id])
        self.store.transition(job_id, JobState.RETRYING, reason=f"paused in base group {self.name} for a job of "
                              f"priority {priority} (its own: {mine}); checkpointed at {where}")
        self.store.transition(job_id, JobState.QUEUED, reason=f"waiting for room in base group {self.name}")
        with self._lock:
            self._joins.append((job_id, self._configs[job_id]))

    def _join(self, job_id: str, config: dict[str, Any]) -> Member:
        self._configs[job_id] = config
        spec = parse_job_spec(config["spec"])
        fingerprint = config["base_fingerprint"]
        reporter = GroupReporter(self.store, job_id, spec, fingerprint, self.name, owner=config.get("owner"))
        reporter.members = len(self._members) + 1
        # logged to the spec's trackers as a solo job is; the group trains on: ending a run never waits for it
        tracked = TrackedReporter(reporter, spec, job_id, voice=True, store=self.store, wait=False,
                                  stopped=(OwnershipLost,))
        try:
            method_config, lineage = resolve_method_config(spec.method, self.store, fingerprint)
            metadata = {"base_fingerprint": fingerprint, "job_id": job_id, "base_group": self.name, **lineage}
            return self.group.add(spec, tracked, method_config=method_config, metadata=metadata, home=self.home,
                                  init_checkpoint=config.get("init_checkpoint"))
        except BaseException as e:
            tracked.close_for(e)
            raise

    def _left(self, member: Member, error: BaseException | None) -> None:
        job_id = next(j for j, m in self._members.items() if m is member)
        _end_tracking(member, error or "FINISHED")  # a finished member's run has ended already
        if isinstance(error, OwnershipLost):  # settled elsewhere (e.g. its sweep stopped it): it left, nothing more
            reason = f"its job was settled outside the group ({error})"
            self.store.set_runtime(job_id, left_group={"group": self.name, "step": member.step, "reason": reason})
            self._finish(job_id, {"state": "CANCELLED", "error": reason})
            return
        if error is not None:
            self._failed(job_id, error)
            return
        adapters = self.store.adapters.list(job_id=job_id)
        outcome = f"adapter {adapters[0].name} registered" if adapters else "finished"
        self._settle(job_id, JobState.SUCCEEDED, outcome)
        self._finish(job_id, {"state": "SUCCEEDED", "outcome": outcome})

    def _failed(self, job_id: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(error))
        self._settle(job_id, JobState.FAILED, "training failed (in its base group)", error=message[:20000],
                     traceback=trace)
        self._finish(job_id, {"state": "FAILED", "error": message, "traceback": trace})

    def _settle(self, job_id: str, to: JobState, reason: str, **fields: Any) -> None:
        """Settle a job the group trained (its runner may be gone); someone who settled it first wins."""
        try:
            if not self.store.get(job_id).state.is_terminal:
                self.store.transition(job_id, to, reason=reason, **fields)
        except IllegalTransition:
            pass

    def _finish(self, job_id: str, result: dict[str, Any]) -> None:
        self._members.pop(job_id, None)
        self._configs.pop(job_id, None)
        with self._lock:
            event, box = self._waiters.pop(job_id, (threading.Event(), {}))
            if not self._members and not self._joins:
                self._idle_since = time.monotonic()
        box.update(result)
        event.set()

    def _poll_store(self) -> None:
        """Members whose job is no longer RUNNING in the store (cancelled, settled by someone else) leave."""
        for job_id in list(self._members):
            state = self.store.get(job_id).state
            if state is not JobState.RUNNING:
                self.leave(job_id, f"the job is {state.value} in the store")


def _end_tracking(member: Member, how: BaseException | str | None) -> None:
    """End a member's tracked run: as its error says (FAILED, KILLED), with a status, or (None) left open."""
    reporter = member.reporter
    if isinstance(reporter, TrackedReporter):
        if isinstance(how, BaseException):
            reporter.close_for(how)
        else:
            reporter.close(how)


def _priority(config: dict[str, Any]) -> int:
    return int(config["spec"].get("priority", 0))
