"""Feasibility against node shapes: the pure rule over declared shapes, reading the shapes (the
``PEFTFLEET_NODE_TYPES`` override, an autoscaler's cluster config, a running autoscaler), and the
reader against a real local Ray."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import ray
from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, GCS_AUTOSCALER_V2_ENABLED_KEY
from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

from orchestrator.cluster import Cluster
from orchestrator.feasibility import (
    NODE_TYPES_ENV,
    InfeasibleJob,
    NodeShape,
    check_feasible,
    merge_node_shapes,
    node_shapes_from,
    parse_node_types,
    placement_problem,
    read_node_shapes,
)

HEAD = NodeShape({"CPU": 0}, 1, "live")  # KubeRay's head in deploy/: schedules nothing
GPU_GROUP = NodeShape({"CPU": 8, "GPU": 1}, 8, "gpu", declared=True)  # autoscaled from 0 to 8 nodes


def res(num_workers=1, cpus=1.0, gpus=0.0, strategy="PACK"):
    return SimpleNamespace(num_workers=num_workers, cpus_per_worker=cpus, gpus_per_worker=gpus,
                           placement_strategy=strategy)


def job(**kwargs):
    return SimpleNamespace(name="j", resources=res(**kwargs))


# -- the pure rule ---------------------------------------------------------------------------------------------
def test_a_gpu_group_autoscaling_from_zero_can_run_gpu_workers():
    assert placement_problem([HEAD, GPU_GROUP], res(4, cpus=4, gpus=1)) is None
    assert placement_problem([HEAD, GPU_GROUP], res(8, cpus=8, gpus=1, strategy="STRICT_SPREAD")) is None
    # ...but not more than the group can grow to, and not without it
    assert "9 GPU (the cluster has at most 8)" in placement_problem([HEAD, GPU_GROUP], res(9, gpus=1))
    assert placement_problem([HEAD], res(1, gpus=1)).endswith("but the largest node has 0 CPU and 0 GPU")


def test_a_worker_must_fit_on_one_node_whatever_the_cluster_sums_to():
    two_one_gpu_nodes = [NodeShape({"CPU": 8, "GPU": 1}, 2, "live")]  # 2 GPUs in all
    problem = placement_problem(two_one_gpu_nodes, res(1, cpus=2, gpus=2))
    assert problem == "each worker needs 2 CPU and 2 GPU on one node, but the largest node has 1 GPU"
    assert placement_problem([NodeShape({"CPU": 8, "GPU": 2}, 1)], res(1, cpus=2, gpus=2)) is None
    # each resource exists on some node, but never together
    split = [NodeShape({"CPU": 8}, 4), NodeShape({"CPU": 1, "GPU": 1}, 4)]
    assert placement_problem(split, res(1, cpus=4, gpus=1)).endswith("but no node has all of that at once")


def test_strict_spread_counts_nodes_that_each_hold_one_worker():
    live = [HEAD, NodeShape({"CPU": 1}, 2, "live")]
    assert placement_problem(live, res(2, strategy="STRICT_SPREAD")) is None
    problem = placement_problem(live, res(3, strategy="STRICT_SPREAD"))
    assert "only 2 node(s) can hold a worker's 1 CPU" in problem
    # PACK fits 3 workers on one 4-CPU node, STRICT_SPREAD still needs 3 nodes
    big = [NodeShape({"CPU": 4}, 2)]
    assert placement_problem(big, res(3)) is None
    assert "only 2 node(s)" in placement_problem(big, res(3, strategy="STRICT_SPREAD"))
    # an autoscaler's node type counts with its max count, or without limit
    assert placement_problem(live + [NodeShape({"CPU": 1}, 1, declared=True)], res(3, strategy="STRICT_SPREAD")) is None
    assert placement_problem([NodeShape({"CPU": 1}, None, declared=True)], res(500, strategy="STRICT_SPREAD")) is None


def test_strict_pack_needs_one_node_for_every_worker():
    problem = placement_problem([HEAD, GPU_GROUP], res(2, cpus=1, gpus=1, strategy="STRICT_PACK"))
    assert problem == (
        "STRICT_PACK puts all 2 workers on one node (2 CPU and 2 GPU in all), but the largest node has 1 GPU"
    )
    assert placement_problem([NodeShape({"CPU": 8, "GPU": 4})], res(4, cpus=2, gpus=1, strategy="STRICT_PACK")) is None


def test_pack_and_spread_need_room_for_every_worker_across_nodes():
    assert placement_problem([NodeShape({"CPU": 2})], res(8)) == "it needs 8 CPU (the cluster has 2)"
    # the sum suffices (6 CPU) but each 3-CPU node holds only one 2-CPU worker
    problem = placement_problem([NodeShape({"CPU": 3}, 2)], res(3, cpus=2, strategy="SPREAD"))
    assert problem == "its 3 workers need 2 CPU each, and its nodes hold at most 2 of them at once"
    assert placement_problem([NodeShape({"CPU": 3}, 3)], res(3, cpus=2, strategy="SPREAD")) is None
    # a declared type with max_count 0 adds nothing
    assert placement_problem([NodeShape({"CPU": 64}, 0, declared=True)], res(1)) is not None


def test_a_trials_own_process_needs_room_besides_its_workers():
    nodes = [NodeShape({"CPU": 1}, 2)]
    assert placement_problem(nodes, res(2)) is None
    assert placement_problem(nodes, res(2), extra_cpus=0.1) == "it needs 2.1 CPU (the cluster has 2)"
    assert placement_problem(nodes, res(2, cpus=0.9), extra_cpus=0.1) is None  # what docs/sweeps.md advises
    # STRICT_SPREAD: the process takes a node a worker needed, unless a node without a worker has room
    assert "besides its own process's 0.1 CPU" in placement_problem(nodes, res(2, strategy="STRICT_SPREAD"),
                                                                     extra_cpus=0.1)
    assert placement_problem(nodes + [NodeShape({"CPU": 0.5})], res(2, strategy="STRICT_SPREAD"),
                             extra_cpus=0.1) is None
    # STRICT_PACK: on the workers' node, or on another one
    one = [NodeShape({"CPU": 4}, 1)]
    assert "no node is left with 0.1 CPU" in placement_problem(one, res(2, cpus=2, strategy="STRICT_PACK"),
                                                                extra_cpus=0.1)
    assert placement_problem([NodeShape({"CPU": 4}, 2)], res(2, cpus=2, strategy="STRICT_PACK"), extra_cpus=0.1) is None
    assert placement_problem(one + [NodeShape({"CPU": 0.1})], res(2, cpus=2, strategy="STRICT_PACK"),
                             extra_cpus=0.1) is None
    # nowhere at all
    assert placement_problem([HEAD, GPU_GROUP], res(1, gpus=1), extra_cpus=9) == (
        "its own process needs 9 CPU on one node, but the largest node has 8 CPU"
    )


# -- reading the shapes ----------------------------------------------------------------------------------------
def test_live_nodes_of_a_declared_type_are_counted_once():
    live = [{"CPU": 0.0, "memory": 1e9}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0}]
    shapes = merge_node_shapes(live, [GPU_GROUP, NodeShape({"CPU": 2}, 3, "small", declared=True)])
    assert [(dict(s.resources), s.count, s.name) for s in shapes] == [
        ({"CPU": 8, "GPU": 1}, 8, "gpu"), ({"CPU": 2}, 3, "small"), ({"CPU": 0}, 1, "live"), ({"CPU": 4}, 1, "live"),
    ]
    # more live nodes of a type than its max count (the head's own group, say): the live ones count
    assert merge_node_shapes([{"CPU": 2.0}] * 3, [NodeShape({"CPU": 2}, 1, declared=True)])[0].count == 3


def test_the_override_parses_and_names_its_mistakes():
    text = json.dumps([{"resources": {"CPU": 8, "GPU": 1}, "max_count": 8, "name": "gpu"},
                       {"resources": {"CPU": 4}, "max_count": -1}])
    assert parse_node_types(text) == [GPU_GROUP, NodeShape({"CPU": 4.0}, None, "type 1", declared=True)]
    for bad, fragment in [("{", "is not JSON"), ('{"resources": {}}', "must be a JSON list"),
                          ('[{"resources": {"CPU": 8}, "max_count": 1.5}]', "[0].max_count"),
                          ('[{"resources": {"CPU": "many"}}]', "[0].resources"),
                          ('[{"resources": {"CPU": 1}, "count": 2}]', '[0] must be {"resources"')]:
        with pytest.raises(ValueError, match=NODE_TYPES_ENV) as err:
            parse_node_types(bad)
        assert fragment in str(err.value)


def kv(**entries):
    """A stand-in for Ray's internal KV: ``(key, namespace) -> bytes``."""
    return lambda key, namespace=None: entries.get(f"{namespace or ''}/{key}")


def published_config() -> bytes:
    return ClusterConfig(node_group_configs=[
        NodeGroupConfig(name="headgroup", resources={"CPU": 0}, min_count=1, max_count=1),
        NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=8),
        NodeGroupConfig(name="off", resources={"CPU": 64}, max_count=0),
        NodeGroupConfig(name="cpu", resources={"CPU": 16}, max_count=-1),
    ]).SerializeToString()


def v1_status(*node_types: str) -> bytes:
    report = {"active_nodes": {t: 1 for t in node_types}, "pending_launches": {}}
    return json.dumps({"autoscaler_report": report}).encode()


CONFIG = f"{GCS_AUTOSCALER_STATE_NAMESPACE}/{GCS_AUTOSCALER_CLUSTER_CONFIG_KEY}"
V2 = f"{GCS_AUTOSCALER_STATE_NAMESPACE}/{GCS_AUTOSCALER_V2_ENABLED_KEY}"
V1_STATUS = "/__autoscaling_status"
LIVE = [{"CPU": 0.0}]


def test_an_autoscalers_published_cluster_config_declares_node_types():
    shapes = node_shapes_from(LIVE, kv(**{CONFIG: published_config()}), None)
    assert [(s.name, dict(s.resources), s.count) for s in shapes] == [
        ("headgroup", {"CPU": 0}, 1), ("gpu", {"CPU": 8, "GPU": 1}, 8), ("cpu", {"CPU": 16}, None),
    ]
    assert placement_problem(shapes, res(8, cpus=8, gpus=1, strategy="STRICT_SPREAD")) is None


def test_the_override_wins_over_what_the_cluster_publishes():
    override = json.dumps([{"resources": {"CPU": 4, "GPU": 1}, "max_count": 2}])
    shapes = node_shapes_from(LIVE, kv(**{CONFIG: published_config(), V2: b"1"}), override)
    assert [(dict(s.resources), s.count) for s in shapes] == [({"CPU": 4, "GPU": 1}, 2), ({"CPU": 0}, 1)]


def test_an_autoscaler_whose_node_types_are_unknown_makes_nothing_infeasible():
    assert node_shapes_from(LIVE, kv(**{V2: b"1"}), None) is None
    assert node_shapes_from(LIVE, kv(**{V1_STATUS: v1_status("headgroup")}), None) is None  # KubeRay, v1
    # a local or hand-started cluster's read-only autoscaler names each node node_<id> and adds none
    readonly = v1_status("node_925eaa21dd798699bfbc895670ca096e155e5dfaa0827ecc080d8c64")
    assert node_shapes_from(LIVE, kv(**{V1_STATUS: readonly, V2: b"0"}), None) == [NodeShape({"CPU": 0}, 1, "live")]
    assert node_shapes_from(LIVE, kv(), None) == [NodeShape({"CPU": 0}, 1, "live")]
    # declaring the node types makes the check possible again
    override = json.dumps([{"resources": {"CPU": 8, "GPU": 1}, "max_count": 8}])
    assert len(node_shapes_from(LIVE, kv(**{V1_STATUS: v1_status("headgroup")}), override)) == 2


def test_check_feasible_names_the_problem_and_the_nodes_it_counted():
    cluster = SimpleNamespace(node_shapes=lambda: [HEAD, NodeShape({"CPU": 8, "GPU": 1}, 2, "live")])
    check_feasible(cluster, job(num_workers=2, gpus=1))
    with pytest.raises(InfeasibleJob) as err:
        check_feasible(cluster, job(num_workers=3, gpus=1))
    assert str(err.value).startswith("job 'j' can never run: it needs 3 GPU (the cluster has 2). Nodes counted: "
                                     "0 CPU × 1 (live); 8 CPU and 1 GPU × 2 (live); nodes an autoscaler can add")
    unknown = SimpleNamespace(node_shapes=lambda: None)
    with pytest.warns(RuntimeWarning, match=NODE_TYPES_ENV):
        check_feasible(unknown, job(num_workers=64, gpus=1))


# -- against a real local Ray ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """This process's Ray when a test already started one (the integration tests' session cluster), else a
    small local one for this module."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def test_the_reader_sees_a_local_clusters_nodes_and_no_autoscaler(local_ray, monkeypatch):
    from ray.experimental.internal_kv import _internal_kv_get

    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    deadline = time.monotonic() + 60  # the monitor publishes its read-only autoscaler's report within seconds
    while b"autoscaler_report" not in (_internal_kv_get("__autoscaling_status") or b""):
        assert time.monotonic() < deadline, "Ray's monitor published no autoscaler report"
        time.sleep(0.5)
    shapes = read_node_shapes()
    assert shapes is not None and all(not s.declared for s in shapes)
    assert sum(s.resources["CPU"] * s.count for s in shapes) == ray.cluster_resources()["CPU"]
    cluster = Cluster(dashboard_url="", started_here=False)
    check_feasible(cluster, job(num_workers=1))
    with pytest.raises(InfeasibleJob, match="each worker needs 1 CPU and 1 GPU on one node, but the largest node has"):
        check_feasible(cluster, job(num_workers=1, gpus=1))
    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps([{"resources": {"CPU": 8, "GPU": 1}, "max_count": 2}]))
    check_feasible(cluster, job(num_workers=2, gpus=1))


def test_the_reader_reads_a_cluster_config_where_ray_keeps_it(local_ray, monkeypatch):
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    assert state.get_cluster_config() is None  # nothing in open-source Ray 2.60 publishes one
    _internal_kv_put(key, published_config(), overwrite=True, namespace=namespace)
    try:
        assert [g.name for g in state.get_cluster_config().node_group_configs] == ["headgroup", "gpu", "off", "cpu"]
        shapes = read_node_shapes()
        assert {s.name: s.count for s in shapes if s.declared} == {"headgroup": 1, "gpu": 8, "cpu": None}
        check_feasible(Cluster(dashboard_url="", started_here=False), job(num_workers=8, gpus=1))
    finally:
        _internal_kv_del(key, namespace=namespace)
    assert state.get_cluster_config() is None


def test_a_sweep_is_refused_when_any_trial_can_never_fit(tmp_path):
    from jobs.store import JobStore
    from orchestrator.tune.sweeps import start_sweep
    from tests.jobs.conftest import minilm_spec

    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home")
    cluster = SimpleNamespace(node_shapes=lambda: [NodeShape({"CPU": 4, "GPU": 1}, 2, "live")])
    client = SimpleNamespace(store=store, cluster=cluster)
    # the largest trial by CPUs (4 workers, no GPU) fits; a 3-worker GPU trial does not
    sweep = {"name": "s", "spec": minilm_spec(resources={"cpus_per_worker": 0.9}), "num_samples": 1,
             "search_space": {"resources": {"choice": [{"num_workers": 4, "cpus_per_worker": 0.9},
                                                       {"num_workers": 3, "gpus_per_worker": 1}]}}}
    with pytest.raises(InfeasibleJob, match=r"sweep 's' \(.+: 0.1 CPU for the trial .* it needs 3 GPU \(the"):
        start_sweep(client, sweep)
    assert store.sweeps.list() == []
    store.close()
