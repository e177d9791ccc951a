"""Base groups on the cluster: finding (or starting) the group a job packs into, training a job in it
from the job's runner, and listing and stopping groups. See docs/groups.md.

>>> handle = group_for(spec, fingerprint, store)          # the one for this base/task/precision  # doctest: +SKIP
>>> train_in_group(job_id, raw, spec, shared, store)          # blocks until the job leaves it        # doctest: +SKIP
>>> list_groups()                                          # what is resident, and who trains     # doctest: +SKIP
>>> holds(job)                                             # its group still trains it            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from jobs.secrets import has_password
from jobs.states import JobState
from jobs.store import JobStore, redact_url
from jobs.training.base_group import GroupKey
from orchestrator.cluster import JOB_ENV, worker_env
from orchestrator.groups.actor import NAMESPACE, PREFIX, BaseGroupActor, GroupClosing

# What looking a group up raises when it ended meanwhile: no such name, died, no answer in time, or (Ray
# 2.60, a dying detached actor whose class its creator's finished job took along) an AssertionError from
# Ray's actor-class loader.
GONE = (ValueError, RayActorError, GetTimeoutError, AssertionError)
GROUP_RETRIES = int(os.environ.get("PEFTFLEET_GROUP_RETRIES", "3"))  # a job survives this many group deaths


def group_name(key: GroupKey, store: JobStore) -> str:
    digest = hashlib.sha256(json.dumps([asdict(key), redact_url(store.url)], sort_keys=True).encode()).hexdigest()
    return PREFIX + digest[:12]


def group_for(spec: Any, base_fingerprint: str, store: JobStore):
    """The live group for jobs like ``spec`` (started here if there is none); an actor handle."""
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")  # inside a Ray job: its cluster
    key = GroupKey.of(spec, base_fingerprint)
    name = group_name(key, store)
    actor = ray.remote(BaseGroupActor).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=key.cpus, num_gpus=key.gpus, max_concurrency=64, max_restarts=0,
        # Never inside the caller's placement group (a sweep trial's): the group outlives it and reserves its own.
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        runtime_env={"env_vars": {**JOB_ENV, **worker_env(key.cpus, key.gpus)}},
    )
    home = str(store.home) if store.home else os.environ.get("PEFTFLEET_HOME")
    store_url = None if has_password(store.url) else store.url  # a secret: the actor reads its own env
    args = (asdict(key), name, spec.base_model, store_url, store.artifacts.url, home)
    # Threads of one process (a sweep driver's trials) getting-or-creating one named actor at once can catch
    # Ray between registering its name and its class (ray-project/ray#41324): one at a time here, and a
    # half-registered actor is looked up again a moment later.
    for attempt in range(4):
        with _GET_OR_CREATE:
            try:
                return actor.remote(*args)
            except AssertionError:
                pass
        time.sleep(0.5 * (attempt + 1))
    with _GET_OR_CREATE:
        return actor.remote(*args)


_GET_OR_CREATE = threading.Lock()


def train_in_group(job_id: str, raw_spec: dict, spec: Any, shared: dict[str, Any], store: JobStore) -> str:
    """Train the job in its base group (the runner's side); returns what it produced, in words. A group
    that dies under it sends it RETRYING; it resumes from its own last checkpoint in a new group."""
    deaths = 0
    config = {**shared, "spec": raw_spec}
    store.set_runtime(job_id, base_group=group_name(GroupKey.of(spec, shared["base_fingerprint"]), store))
    while True:  # a group that died is started again under the same name
        group = group_for(spec, shared["base_fingerprint"], store)
        try:
            result = ray.get(group.train.remote(job_id, config))
        except (GroupClosing, RayActorError) as e:
            if store.get(job_id).state is JobState.RUNNING:
                deaths += 1
                if deaths > GROUP_RETRIES:
                    raise RuntimeError(f"its base group died {deaths} times; last: {e}") from e
                store.transition(job_id, JobState.RETRYING, reason=f"its base group ended ({_why(e)}); it resumes "
                                 "from its last checkpoint in another")
            time.sleep(0.5)
            continue
        except BaseException:
            group.leave.remote(job_id, "its runner stopped")  # a cancel: the group drops its rows
            raise
        if result["state"] == "SUCCEEDED":
            return result["outcome"]
        if result["state"] == "CANCELLED":
            raise KeyboardInterrupt(result.get("error"))  # the runner settles it as stopped on request
        raise RuntimeError(f"{result['error']}\n(in base group; its traceback:)\n{result.get('traceback', '')}")


def holds(job: Any, timeout: float = 10) -> bool:
    """Whether the job's base group is alive and still trains it (or has it queued): a new runner of the
    job then re-attaches to it there rather than starting it again."""
    name = job.runtime.get("base_group")
    if not name or job.state not in (JobState.QUEUED, JobState.RUNNING):
        return False
    try:
        seen = ray.get(ray.get_actor(name, namespace=NAMESPACE).describe.remote(), timeout=timeout)
    except GONE:
        return False
    return job.id in seen["members"] or job.id in seen["waiting"]


def leave(job: Any, reason: str) -> None:
    """Take the job out of its base group at the group's next step (no-op if it is in none)."""
    name = job.runtime.get("base_group")
    if name:
        try:
            ray.get_actor(name, namespace=NAMESPACE).leave.remote(job.id, reason)
        except GONE:
            pass  # the group is gone


def _why(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def list_groups(timeout: float = 10) -> list[dict[str, Any]]:
    """Every live base group on the cluster: its key, members, waiting jobs, idle time, base size."""
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or not entry.get("name", "").startswith(PREFIX):
            continue
        try:
            found.append(ray.get(ray.get_actor(entry["name"], namespace=NAMESPACE).describe.remote(), timeout=timeout))
        except GONE:
            continue  # ended while we looked
    return sorted(found, key=lambda g: g["created_at"])


def stop_group(name: str) -> bool:
    """End a group now (its members' runners retry them in a new one); False if there is none."""
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except GONE:
        return False
    return True


__all__ = ["GroupClosing", "group_for", "group_name", "holds", "leave", "list_groups", "stop_group", "train_in_group"]
