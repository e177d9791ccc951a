"""Whether a job can ever get its resources on a Ray cluster, judged against node *shapes*, not the
cluster's sum: each worker's bundle must fit on one node, and the nodes counted are the live ones plus
the node types an autoscaler may add (declared in ``PEFTFLEET_NODE_TYPES``, or in the cluster config
an autoscaler publishes in GCS). :func:`placement_problem` is the pure rule; :func:`read_node_shapes`
reads the shapes from the connected Ray cluster; :func:`check_feasible` raises :class:`InfeasibleJob`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray

# Node types an autoscaler may add, for clusters whose autoscaler does not publish them (JSON; docs/cluster.md).
NODE_TYPES_ENV = "PEFTFLEET_NODE_TYPES"
EPS = 1e-6  # Ray keeps resource amounts to 1e-4; comparisons forgive float noise below that
# The node type Ray's read-only autoscaler (a local or hand-started cluster: it adds nothing) gives each node.
READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")


class InfeasibleJob(ValueError):
    """The cluster can never give the job the resources it asks for."""


@dataclass(frozen=True)
class NodeShape:
    """One kind of node: what each offers (``{"CPU": 8, "GPU": 1}``) and how many the cluster has or
    can grow to (``None``: no limit). ``declared``: an autoscaler's node type, not only live nodes."""

    resources: Mapping[str, float]
    count: int | None = 1
    name: str = ""
    declared: bool = False


def check_feasible(cluster: Any, spec: Any, *, extra_cpus: float = 0, what: str | None = None) -> None:
    """Raise :class:`InfeasibleJob` when ``cluster``'s nodes (its ``node_shapes()``), live or addable by
    its autoscaler, can never hold ``spec``'s workers (plus ``extra_cpus`` for a process of their own,
    e.g. a sweep trial)."""
    shapes = cluster.node_shapes()
    if shapes is None:
        warnings.warn(
            f"the cluster's autoscaler adds nodes whose types it does not publish, so whether "
            f"{what or f'job {spec.name!r}'} can ever run is not known here; declare the node types in "
            f"{NODE_TYPES_ENV} to have jobs that never fit refused at submit",
            RuntimeWarning, stacklevel=2,
        )
        return
    problem = placement_problem(shapes, spec.resources, extra_cpus=extra_cpus)
    if problem is None:
        return
    hint = "" if any(s.declared for s in shapes) else (
        f"; nodes an autoscaler can add count once their types are declared in {NODE_TYPES_ENV}"
    )
    raise InfeasibleJob(
        f"{what or f'job {spec.name!r}'} can never run: {problem}. Nodes counted: {describe_shapes(shapes)}"
        f"{hint}. Lower resources.num_workers or the per-worker resources, or choose another placement_strategy"
    )


def placement_problem(shapes: Sequence[NodeShape], resources: Any, *, extra_cpus: float = 0) -> str | None:
    """Why workers asking for ``resources`` (num_workers, cpus_per_worker, gpus_per_worker,
    placement_strategy as in a job spec), plus ``extra_cpus`` for a process of their own, can never be
    placed on nodes of ``shapes``, in words; None when they can. Pure: no Ray.

    Every worker's bundle ``{CPU: cpus_per_worker, GPU: gpus_per_worker}`` must fit on one node.
    STRICT_PACK puts all bundles on one node; STRICT_SPREAD each on a node of its own; PACK and
    SPREAD anywhere, so the nodes must hold ``num_workers`` bundles between them. The extra process
    is a Ray task of its own: it needs room on some node besides the workers.
    """
    n, strategy = resources.num_workers, resources.placement_strategy
    bundle = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker:
        bundle["GPU"] = float(resources.gpus_per_worker)
    extra = {"CPU": float(extra_cpus)} if extra_cpus else {}
    shapes = [s for s in shapes if s.count is None or s.count > 0]
    if not any(_fits(s.resources, bundle) for s in shapes):
        return f"each worker needs {_amounts(bundle)} on one node, but {_largest(shapes, bundle)}"
    if extra and not any(_fits(s.resources, extra) for s in shapes):
        return f"its own process needs {_amounts(extra)} on one node, but {_largest(shapes, extra)}"
    if strategy == "STRICT_PACK":
        everything = {k: v * n for k, v in bundle.items()}
        hosts = [s for s in shapes if _fits(s.resources, everything)]
        if not hosts:
            return (f"STRICT_PACK puts all {n} workers on one node ({_amounts(everything)} in all), but "
                    f"{_largest(shapes, everything)}")
        with_extra = {**everything, "CPU": everything["CPU"] + extra.get("CPU", 0)}
        if extra and not any(_fits(h.resources, with_extra) or _room_elsewhere(shapes, h, extra) for h in hosts):
            return (f"STRICT_PACK puts all {n} workers on one node, and no node is left with "
                    f"{_amounts(extra)} for its own process")
        return None
    per_node = 1 if strategy == "STRICT_SPREAD" else math.inf
    room = _workers_held(shapes, bundle, per_node, extra)
    if room >= n:
        return None
    besides = f" besides its own process's {_amounts(extra)}" if extra else ""
    if strategy == "STRICT_SPREAD":
        return (f"STRICT_SPREAD puts each of its {n} workers on a node of its own, but only {room:g} node(s) "
                f"can hold a worker's {_amounts(bundle)}{besides}")
    need = {k: v * n + extra.get(k, 0) for k, v in bundle.items()}
    have = {k: _total(shapes, k) for k in need}
    at_most = "at most " if any(s.declared for s in shapes) else ""
    short = [f"{need[k]:g} {k} (the cluster has {at_most}{have[k]:g})" for k in need if need[k] > have[k] + EPS]
    if short:
        return "it needs " + " and ".join(short)
    return f"its {n} workers need {_amounts(bundle)} each, and its nodes hold at most {room:g} of them at once{besides}"


def describe_shapes(shapes: Sequence[NodeShape]) -> str:
    """``"2 CPU × 1 (live); 8 CPU and 1 GPU × up to 8 (gpu)"``: the shapes a feasibility check counted."""
    if not shapes:
        return "none"
    parts = []
    for s in shapes:
        how_many = "any number" if s.count is None else f"{'up to ' if s.declared else ''}{s.count}"
        amounts = _amounts({k: s.resources.get(k, 0) for k in ("CPU", "GPU") if s.resources.get(k, 0)}) or "0 CPU"
        parts.append(f"{amounts} × {how_many}" + (f" ({s.name})" if s.name else ""))
    return "; ".join(parts)


def read_node_shapes() -> list[NodeShape] | None:
    """The connected Ray cluster's nodes by shape: the live ones, plus the node types declared in
    ``PEFTFLEET_NODE_TYPES`` or else in the cluster config an autoscaler published in GCS. None when an
    autoscaler is running whose node types are declared nowhere: nothing can be called infeasible then."""
    from ray.experimental.internal_kv import _internal_kv_get

    live = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]

    def kv_get(key: str, namespace: str | None = None) -> bytes | None:
        try:
            return _internal_kv_get(key, namespace=namespace)
        except Exception:  # noqa: BLE001 - an older or partial cluster: treat as not published
            return None

    return node_shapes_from(live, kv_get, os.environ.get(NODE_TYPES_ENV))


def node_shapes_from(
    live: Sequence[Mapping[str, float]], kv_get: Callable[..., bytes | None], declared_json: str | None
) -> list[NodeShape] | None:
    """:func:`read_node_shapes` given the live nodes' resources, a reader of Ray's internal KV
    (``kv_get(key, namespace)``) and the ``PEFTFLEET_NODE_TYPES`` text."""
    if declared_json and declared_json.strip():
        declared = parse_node_types(declared_json)
    else:
        declared = autoscaler_node_types(kv_get)
        if not declared and running_autoscaler(kv_get):
            return None
    return merge_node_shapes(live, declared)


def parse_node_types(text: str) -> list[NodeShape]:
    """``PEFTFLEET_NODE_TYPES``: a JSON list of ``{"resources": {"CPU": 8, "GPU": 1}, "max_count": 8,
    "name": "gpu"}``; ``max_count`` -1 or null means no limit."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{NODE_TYPES_ENV} is not JSON: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{NODE_TYPES_ENV} must be a JSON list of node types, not {type(items).__name__}")
    shapes = []
    for i, item in enumerate(items):
        where = f"{NODE_TYPES_ENV}[{i}]"
        if not isinstance(item, dict) or set(item) - {"resources", "max_count", "name"}:
            raise ValueError(f'{where} must be {{"resources": {{...}}, "max_count": N, "name": "..."}}, not {item!r}')
        resources, count = item.get("resources"), item.get("max_count", -1)
        if not isinstance(resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in resources.items()
        ):
            raise ValueError(f"{where}.resources must map resource names to amounts >= 0, not {resources!r}")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < -1):
            raise ValueError(f"{where}.max_count must be a whole number >= 0 (or -1 / null: no limit), not {count!r}")
        name = str(item.get("name") or f"type {i}")
        shapes.append(NodeShape(
            {k: float(v) for k, v in resources.items()}, None if count in (None, -1) else count, name, declared=True,
        ))
    return shapes


def autoscaler_node_types(kv_get: Callable[..., bytes | None]) -> list[NodeShape]:
    """The node groups of the cluster config an autoscaler published in GCS (what
    ``ray._private.state.state.get_cluster_config()`` reads); [] when none was published, which is
    the case with the open-source autoscalers of Ray 2.60, KubeRay's included."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig

    raw = kv_get(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE)
    if not raw:
        return []
    config = ClusterConfig.FromString(raw)
    return [
        NodeShape({k: float(v) for k, v in group.resources.items()}, None if group.max_count < 0 else group.max_count,
                  group.name, declared=True)
        for group in config.node_group_configs
        if group.resources and group.max_count != 0
    ]


def running_autoscaler(kv_get: Callable[..., bytes | None]) -> str | None:
    """Which autoscaler can add nodes to this cluster, or None when none can: Ray's autoscaler v2, or
    the v1 autoscaler reporting node types of its own (a local or hand-started cluster's read-only
    autoscaler names each node ``node_<id>`` and adds none)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE, GCS_AUTOSCALER_V2_ENABLED_KEY

    if kv_get(GCS_AUTOSCALER_V2_ENABLED_KEY, GCS_AUTOSCALER_STATE_NAMESPACE) == b"1":
        return "Ray's autoscaler v2"
    raw = kv_get(DEBUG_AUTOSCALING_STATUS, None)
    try:
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return None
    types = {*(report.get("active_nodes") or {}), *(report.get("idle_nodes") or {}),
             *(report.get("pending_launches") or {}), *(report.get("node_type_mapping") or {}).values()}
    own = sorted(t for t in types if isinstance(t, str) and not READONLY_NODE_TYPE.match(t))
    return f"Ray's autoscaler with node types {', '.join(own)}" if own else None


def merge_node_shapes(live: Sequence[Mapping[str, float]], declared: Sequence[NodeShape]) -> list[NodeShape]:
    """Live nodes plus declared node types, each node counted once: a live node with a declared type's
    CPUs and GPUs is one of that type's ``count`` nodes."""
    def key(resources: Mapping[str, float]) -> tuple[float, float]:
        return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))

    owner: dict[tuple[float, float], int] = {}
    for i, shape in enumerate(declared):
        owner.setdefault(key(shape.resources), i)
    absorbed: Counter[int] = Counter()
    others: Counter[tuple[float, float]] = Counter()
    for resources in live:
        if key(resources) in owner:
            absorbed[owner[key(resources)]] += 1
        else:
            others[key(resources)] += 1
    shapes = [s if s.count is None else replace(s, count=max(s.count, absorbed[i])) for i, s in enumerate(declared)]
    shapes += [NodeShape({"CPU": cpu, **({"GPU": gpu} if gpu else {})}, count, "live") for (cpu, gpu), count
               in sorted(others.items())]
    return shapes


def _fits(have: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(have.get(k, 0) + EPS >= v for k, v in need.items())


def _held(have: Mapping[str, float], need: Mapping[str, float]) -> float:
    """How many ``need`` bundles one node with ``have`` holds at once."""
    return min((math.floor((have.get(k, 0) + EPS) / v) for k, v in need.items() if v > 0), default=math.inf)


def _workers_held(shapes: Sequence[NodeShape], bundle: Mapping[str, float], per_node: float,
                  extra: Mapping[str, float]) -> float:
    """The most bundles the nodes hold at once, at most ``per_node`` on a node, with ``extra`` on one of them."""
    def on(resources: Mapping[str, float]) -> float:
        return min(_held(resources, bundle), per_node)

    total = sum(on(s.resources) * (math.inf if s.count is None else s.count) for s in shapes if on(s.resources))
    if not extra:
        return total
    return max(total - on(s.resources) + on({k: v - extra.get(k, 0) for k, v in s.resources.items()})
               for s in shapes if _fits(s.resources, extra))


def _room_elsewhere(shapes: Sequence[NodeShape], host: NodeShape, extra: Mapping[str, float]) -> bool:
    """A node other than the one ``host`` lends to all the workers holds ``extra``."""
    more_of_host = host.count is None or host.count >= 2
    return any(_fits(s.resources, extra) for s in shapes if s is not host or more_of_host)


def _total(shapes: Sequence[NodeShape], resource: str) -> float:
    return sum(s.resources.get(resource, 0) * (math.inf if s.count is None else s.count)
               for s in shapes if s.resources.get(resource, 0))


def _largest(shapes: Sequence[NodeShape], need: Mapping[str, float]) -> str:
    most = {k: max((s.resources.get(k, 0) for s in shapes), default=0) for k in need}
    short = {k: v for k, v in most.items() if v + EPS < need[k]}
    if short:
        return f"the largest node has {_amounts(short, zero=True)}"
    return "no node has all of that at once"


def _amounts(resources: Mapping[str, float], *, zero: bool = False) -> str:
    return " and ".join(f"{v:g} {k}" for k, v in resources.items() if v or zero)
