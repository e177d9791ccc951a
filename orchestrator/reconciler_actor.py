"""The standing reconciler: one detached Ray actor per cluster that keeps the store true with no client
waiting.

Every ``interval_s`` it settles (or, with ``max_attempts``, resubmits) jobs whose owner went silent,
marks sweeps whose driver ended INTERRUPTED, and cleans temporary folders and unrecorded artifacts
older than ``grace_s`` (see :mod:`orchestrator.reconciler`). It is started by the first client that
connects (``ensure_reconciler``; off with ``PEFTFLEET_RECONCILER=0``), one per store or by ``peftfleet reconciler
start`` (the KubeRay head runs it), and found again by name after that. A tick that fails is logged and
the next one runs; a reconciler that dies is restarted by Ray; two ticks never overlap, and two
reconcilers could not corrupt anything either (every change is a compare-and-swap).

Its silence timeout is its own (``PEFTFLEET_RECONCILER_TIMEOUT_S``, default 120 s), longer than a
waiting client's: it is the backstop, not the first responder.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import traceback
from typing import Any

import ray

from jobs.store import JobStore, redact_url
from orchestrator.cluster import JOB_ENV, Cluster, check_no_secrets
from orchestrator.reconciler import clean_storage, resubmit, settle_orphan_sweeps, settle_orphans

NAMESPACE = "peftfleet"


def reconciler_name(store_url: str) -> str:
    """One standing reconciler per cluster and store (a cluster normally serves one store)."""
    return "peftfleet-reconciler-" + hashlib.sha256(redact_url(store_url).encode()).hexdigest()[:12]


class Reconciler:
    """The actor. ``env``: what processes it launches get (the client's process env: store, storage, home)."""

    def __init__(self, cluster: dict[str, Any], env: dict[str, str], *, interval_s: float, timeout_s: float,
                 max_attempts: int, grace_s: float, checkpoint_root: str | None):
        self.cluster = Cluster(**cluster)
        self.env, self.interval_s, self.timeout_s = dict(env), interval_s, timeout_s
        self.max_attempts, self.grace_s, self.checkpoint_root = max_attempts, grace_s, checkpoint_root
        self.store = JobStore()  # where ``env`` (this actor's runtime env) says
        self.ticks, self.last = 0, {}
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True, name="peftfleet-reconciler").start()

    def tick(self) -> dict[str, Any]:
        """One pass now; what it did (job ids settled or resubmitted, sweeps interrupted, folders removed)."""
        with self._lock:
            jobs = settle_orphans(self.store, timeout_s=self.timeout_s, cluster=self.cluster,
                                  resubmit=lambda job_id: resubmit(self.store, self.cluster, job_id, self.env),
                                  max_attempts=self.max_attempts)
            sweeps = settle_orphan_sweeps(self.store, self.cluster, timeout_s=self.timeout_s)
            cleaned = clean_storage(self.store, grace_s=self.grace_s, checkpoint_root=self.checkpoint_root)
            self.ticks += 1
            self.last = {"at": time.time(), "jobs": {j.id: str(j.state) for j in jobs}, "sweeps": sweeps, **cleaned}
            return self.last

    def status(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "last": self.last, "interval_s": self.interval_s, "timeout_s": self.timeout_s,
                "max_attempts": self.max_attempts, "grace_s": self.grace_s}

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop outlives any one failure; the next tick retries
                print(redact_url(traceback.format_exc()), file=sys.stderr, flush=True)


def ensure_reconciler(cluster: Cluster, store_url: str, env: dict[str, str], *,
                      checkpoint_root: str | None = None):
    """The cluster's standing reconciler, started (detached) if it is not running yet; its handle, or None
    when ``PEFTFLEET_RECONCILER=0``. Settings come from the environment of whoever starts it."""
    if os.environ.get("PEFTFLEET_RECONCILER", "1") == "0" or not ray.is_initialized():
        return None
    check_no_secrets({**JOB_ENV, **env})
    options = {
        "interval_s": float(os.environ.get("PEFTFLEET_RECONCILER_INTERVAL_S", "10")),
        "timeout_s": float(os.environ.get("PEFTFLEET_RECONCILER_TIMEOUT_S", "120")),
        "max_attempts": int(os.environ.get("PEFTFLEET_RESUBMIT_ORPHANS", "0")),
        "grace_s": float(os.environ.get("PEFTFLEET_RECONCILER_GRACE_S", "3600")),
        "checkpoint_root": checkpoint_root,
    }
    where = {"dashboard_url": cluster.dashboard_url, "started_here": cluster.started_here, "address": cluster.address}
    return ray.remote(Reconciler).options(
        name=reconciler_name(store_url), namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_restarts=-1, max_concurrency=4, runtime_env={"env_vars": {**JOB_ENV, **env}},
    ).remote(where, env, **options)
