"""IPT's job-side steps: pick the source adapters, fit and register a subspace (an ``ipt-subspace``
job, run as one Ray task), and resolve a registered subspace for an ``ipt`` training job."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from jobs.spec import NAME_MAX, JobSpecError, SubspaceSourcesSpec, parse_job_spec, validate_name
from jobs.spec_files import shown
from jobs.states import JobState
from jobs.store import JobStore
from jobs.store.adapter_registry import AdapterRecord
from jobs.store.subspace_registry import SubspaceNotFound, SubspaceRecord
from peft_methods.adapter_files import (
    ADAPTER_FILES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    BaseModelMismatch,
    read_hashed_files,
)
from peft_methods.ipt import fit_subspace, save_subspace
from peft_methods.virtual_tokens import PROMPT_KEY

SOURCE_METHOD = "prompt_tuning"


def select_sources(store: JobStore, sources: SubspaceSourcesSpec, base_fingerprint: str) -> list[AdapterRecord]:
    """The prompt-tuning adapters of this base that ``sources`` names, oldest first; at least two."""
    if sources.adapters:
        chosen = [store.adapters.get(name) for name in sources.adapters]
        wrong = [a.name for a in chosen if a.method != SOURCE_METHOD or a.base_fingerprint != base_fingerprint]
        if wrong:
            raise ValueError(
                f"sources.adapters {wrong} are not {SOURCE_METHOD} adapters of base {base_fingerprint[:19]}…"
            )
    else:
        chosen = store.adapters.list(base=base_fingerprint, method=SOURCE_METHOD, tag=sources.tag)
    if sources.task_names:
        chosen = [a for a in chosen if a.task_name in sources.task_names]
    if sources.tag and sources.adapters:
        chosen = [a for a in chosen if sources.tag in a.tags]
    if len(chosen) < 2:
        raise ValueError(
            f"a subspace needs at least 2 {SOURCE_METHOD} adapters of this base; the sources select {len(chosen)}"
        )
    return sorted(chosen, key=lambda a: a.created_at)


def check_intrinsic_dim(intrinsic_dim: int, num_sources: int) -> None:
    """Refuse a subspace of more dimensions than there are source prompts: ``k`` prompts span at most a
    ``k``-dimensional subspace (``k - 1`` around their mean), so the rest of the code would be unconstrained
    by any task (Qin et al. fit theirs from the prompts of many training tasks)."""
    if intrinsic_dim > num_sources:
        raise ValueError(
            f"intrinsic_dim {intrinsic_dim} exceeds the {num_sources} source prompts the sources select: a "
            f"subspace cannot have more dimensions than the prompts it is fitted from; set intrinsic_dim to at "
            f"most {num_sources} or select more {SOURCE_METHOD} adapters"
        )


def check_references(store: JobStore, spec: Any) -> None:
    """Refuse, before anything is stored, a spec that names registry entries that do not fit it."""
    if getattr(spec, "kind", "train") == "ipt-subspace":
        base = store.register_base_model(spec.base_model)
        try:
            sources = select_sources(store, spec.sources, base.fingerprint)
        except (KeyError, ValueError) as e:
            raise JobSpecError([("sources", str(e))]) from None
        try:
            check_intrinsic_dim(spec.intrinsic_dim, len(sources))
        except ValueError as e:
            raise JobSpecError([("intrinsic_dim", str(e))]) from None
    elif spec.method.method == "ipt" and spec.method.subspace:
        try:
            subspace = registered_subspace(store, spec.method.subspace)
        except SubspaceNotFound as e:
            raise JobSpecError([("method.subspace", f"{e}; fit one with an ipt-subspace job")]) from None
        base = store.register_base_model(spec.base_model)
        if subspace.base_fingerprint != base.fingerprint:
            raise JobSpecError(
                [
                    (
                        "method.subspace",
                        f"subspace {subspace.name!r} was fitted for another base ({subspace.base_fingerprint[:19]}…)",
                    )
                ]
            )


def registered_subspace(store: JobStore, name: str) -> SubspaceRecord:
    """The registry's subspace ``name``. A job names subspaces only from the registry, never by folder: a
    folder would skip the registry's file verification and its base check, so a path is refused even when
    such a folder exists (in Python, ``peft_methods.apply`` still takes a folder)."""
    try:
        validate_name(name, "subspace")
    except ValueError:
        raise SubspaceNotFound(
            f"{shown(name)} is not a subspace name: a job names a registered subspace, never a folder, so that its "
            "files are verified and its base is checked"
        ) from None
    return store.subspaces.get(name)


def resolve_method_config(method_config: Any, store: JobStore, base_fingerprint: str) -> tuple[Any, dict[str, Any]]:
    """The method config to apply on a worker, and lineage for the adapter's metadata: an ``ipt``
    config naming a registered subspace gets that subspace's verified local folder (see
    :func:`registered_subspace`: a job never trains in an unregistered folder)."""
    if method_config.method != "ipt" or not method_config.subspace:
        return method_config, {}
    record = registered_subspace(store, method_config.subspace)
    if record.base_fingerprint != base_fingerprint:
        raise BaseModelMismatch(
            f"subspace {record.name!r} was fitted for base {record.base_fingerprint}, this job's base is "
            f"{base_fingerprint}"
        )
    folder = store.subspaces.local_folder(record.name)
    lineage = {"subspace": {"id": record.id, "name": record.name, "sha256": record.sha256}}
    return method_config.model_copy(update={"subspace": str(folder)}), lineage


def fit_subspace_job(config: dict[str, Any]) -> str:
    """The body of an ``ipt-subspace`` job's Ray task. ``config``: job_id, store_url, storage_url, home,
    base_fingerprint. Returns the registered subspace's name."""
    store = JobStore(config["store_url"], storage_url=config["storage_url"], home=config["home"])
    job_id, fingerprint = config["job_id"], config["base_fingerprint"]
    spec = parse_job_spec(store.get(job_id).spec)
    sources = select_sources(store, spec.sources, fingerprint)
    check_intrinsic_dim(spec.intrinsic_dim, len(sources))  # again: adapters may have gone since submission
    store.transition(
        job_id,
        JobState.RUNNING,
        reason=f"fitting on {len(sources)} prompt adapters",
        expected=[JobState.QUEUED, JobState.RETRYING],
    )
    prompts = [_verified_weights(store, a)[PROMPT_KEY].float() for a in sources]
    shapes = {tuple(p.shape) for p in prompts}
    if len(shapes) != 1:
        raise ValueError(
            f"the source prompts differ in shape {sorted(shapes)}; choose adapters with one num_virtual_tokens"
        )
    n, hidden = prompts[0].shape
    started = time.perf_counter()
    tensors, init, stats = fit_subspace(
        torch.stack(prompts),
        intrinsic_dim=spec.intrinsic_dim,
        inner_dim=spec.inner_dim,
        steps=spec.steps,
        lr=spec.lr,
        seed=spec.seed,
    )
    stats["fit_seconds"] = time.perf_counter() - started
    store.record_metrics(job_id, spec.steps, stats)
    lineage = [
        {"id": a.id, "name": a.name, "task_name": a.task_name, "sha256": a.sha256, "job_id": a.job_id} for a in sources
    ]
    name = f"{spec.name[: NAME_MAX - 9]}-{job_id[:8]}"  # a registry name, like the job's: at most NAME_MAX
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_subspace(
            os.path.join(tmp, "subspace"),
            tensors,
            init,
            num_virtual_tokens=n,
            hidden_size=hidden,
            metadata={"base_fingerprint": fingerprint, "job_id": job_id, "sources": lineage, "metrics": stats},
        )
        store.subspaces.register(
            folder, name=name, base_fingerprint=fingerprint, sources=lineage, job_id=job_id, metrics=stats
        )
    print(f"subspace {name} registered: {len(sources)} sources, d={spec.intrinsic_dim}, "
          f"reconstruction error {stats['reconstruction_relative_error']:.4f}", flush=True)
    return name


def _verified_weights(store: Any, adapter: Any) -> dict[str, Any]:
    """An adapter's tensors parsed from the very bytes checked against the hash its record holds."""
    _, blobs = read_hashed_files(store.adapters.local_folder(adapter.name), MANIFEST_FILE, "adapter", FORMAT_VERSION,
                                 ADAPTER_FILES, manifest_sha256=adapter.sha256)
    return load_safetensors(blobs[WEIGHTS_FILE])
