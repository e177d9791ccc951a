"""deploy/: every manifest validates offline — KubeRay objects against the CRDs' openAPIV3Schema
(`kuberay-schemas/`, extracted from `../shared/kuberay-crds/`; made strict so a misspelt field
fails), plain Kubernetes objects against Kubernetes' own schemas (kubernetes-validate, strict) —
and a broken manifest fails. GPU pods are ready for NCCL (a memory-backed /dev/shm, NCCL settings,
a shape the autoscaler can read), the GPU install (Makefile, Dockerfile, constraints) pins the
same torch as the CPU one, and the manifests keep secrets secret: no Secret or password ships, Ray's
token auth is on and the dashboard listens on the pod's IP only (docs/security.md)."""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from jobs.spec import JobSpecError, parse_job_spec
from orchestrator.serving.deployment import ServeOptions

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
VENDORED = Path(__file__).parent / "kuberay-schemas"
K8S_VERSION = "1.30"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def _strict(schema):
    """A structural schema with unknown fields refused where the CRD lists its fields (the API server
    would silently prune them, hiding typos)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _vendored() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(VENDORED.glob("*.json.gz")):
        data = json.loads(gzip.decompress(path.read_bytes()))
        out[(data["apiVersion"], data["kind"])] = data["openAPIV3Schema"]
    return out


RAW = _vendored()
SCHEMAS = {key: _strict(schema) for key, schema in RAW.items()}
TORCH_VERSION = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(doc: dict) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key[0] and key[0].startswith("ray.io/"):
        if key not in SCHEMAS:
            raise AssertionError(f"no KubeRay CRD schema for {key}")
        jsonschema.validate(doc, SCHEMAS[key], cls=jsonschema.Draft7Validator)
        if doc["kind"] == "RayService":  # the Serve config is YAML inside a string: check what it names
            config = yaml.safe_load(doc["spec"]["serveConfigV2"])
            for app in config["applications"]:
                module, _, attr = app["import_path"].partition(":")
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file() and attr, app["import_path"]
                scaling = {"num_replicas", "autoscaling", "cpus_per_replica", "gpus_per_replica"}
                ServeOptions(
                    **{k: v for k, v in app["args"].items() if k not in scaling}
                )  # unknown or missing fields raise
    elif doc.get("kind") == "ConfigMap" and "job.yaml" in doc.get("data", {}):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        parse_job_spec(yaml.safe_load(doc["data"]["job.yaml"]))  # the RayJob's job spec is a valid JobSpec
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates(path):
    docs = documents(path)
    assert docs, f"{path} holds no objects"
    for doc in docs:
        validate(doc)


def test_the_schemas_are_kuberays_own():
    assert set(RAW) == {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayService")}
    if not SHARED_CRDS.is_dir():
        pytest.skip("../shared/kuberay-crds is not mounted here; the vendored copy is used as is")
    for path in SHARED_CRDS.glob("ray.io_*.yaml"):
        for crd in (d for d in yaml.safe_load_all(path.read_text()) if d):
            v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            assert RAW[("ray.io/v1", crd["spec"]["names"]["kind"])] == v1["schema"]["openAPIV3Schema"]


def test_the_deploy_folder_has_what_a_cluster_needs():
    kinds = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in documents(p)}
    assert {k for k, _ in kinds} >= {
        "RayCluster",
        "RayJob",
        "RayService",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ConfigMap",
    }
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:2.60."), base  # the official image of the Ray we pin
    for src in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / src.rstrip("/")).exists(), f"Dockerfile copies {src}, which the repository does not have"
    assert f'"torch=={TORCH_VERSION}"' in dockerfile and "requirements/no-deps.txt" in dockerfile


BROKEN = [
    (
        "raycluster.yaml",
        lambda d: d["spec"]["headGroupSpec"].update(rayStartParam={"num-cpus": "0"}),
        "rayStartParam",
    ),  # typo
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="eight"), "eight"),
    ("rayjob.yaml", lambda d: d["spec"].pop("entrypoint") and d["spec"].update(entrypoints="x"), "entrypoints"),
    ("rayservice.yaml", lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"].pop("template"), "template"),
    ("postgres.yaml", lambda d: d["spec"].update(replicas="one"), "replicas"),
    ("shared.yaml", lambda d: d["spec"].update(accessMode=["ReadWriteMany"]), "accessMode"),
]


@pytest.mark.parametrize("name,breaks,word", BROKEN, ids=[f"{n}:{w}" for n, _, w in BROKEN])
def test_a_broken_manifest_fails(name, breaks, word):
    docs = documents(DEPLOY / "kuberay" / name)
    target = next(
        d for d in docs if d["kind"] in ("RayCluster", "RayJob", "RayService", "Deployment", "PersistentVolumeClaim")
    )
    broken = copy.deepcopy(target)
    breaks(broken)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)) as err:
        validate(broken)
    assert word in str(err.value)


def test_a_broken_job_spec_or_serve_config_fails():
    docs = documents(DEPLOY / "kuberay" / "rayjob.yaml")
    config_map = copy.deepcopy(next(d for d in docs if d["kind"] == "ConfigMap"))
    config_map["data"]["job.yaml"] = config_map["data"]["job.yaml"].replace("r: 8", "r: 0")
    with pytest.raises(JobSpecError, match="method.r"):
        validate(config_map)
    service = copy.deepcopy(documents(DEPLOY / "kuberay" / "rayservice.yaml")[0])
    service["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("capacity: 64", "capacty: 64")
    with pytest.raises(TypeError, match="capacty"):
        validate(service)


# Secrets and access. None of this can be checked without a cluster beyond what the manifests say.

PASSWORD_IN_URL = re.compile(r"[\w.+-]+://[^/\s@:]*:[^/\s@]+@")
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|API_KEY|SECRET_KEY|STORE_URL")


def strings(node):
    """Every string in a parsed document (keys and values), however deep."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def containers(doc):
    """Every container spec in a document (Deployments, Ray groups), init containers included."""
    if isinstance(doc, dict):
        for key in ("containers", "initContainers"):
            if isinstance(doc.get(key), list):
                yield from doc[key]
        for v in doc.values():
            yield from containers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from containers(v)


def created_secrets() -> set[str]:
    """The Secrets shared.yaml tells the user to create (`kubectl create secret generic NAME`)."""
    return set(re.findall(r"kubectl create secret generic ([\w-]+)", (DEPLOY / "kuberay" / "shared.yaml").read_text()))


def check_no_shipped_secrets(docs_by_file=None):
    docs_by_file = docs_by_file or {p.name: documents(p) for p in MANIFESTS}
    for name, docs in docs_by_file.items():
        for doc in docs:
            assert doc.get("kind") != "Secret", f"{name}: ships the Secret {doc['metadata']['name']}; document it"
            for s in strings(doc):
                assert not PASSWORD_IN_URL.search(s), f"{name}: a URL with a password: {s[:40]}..."
                assert "change-me" not in s, f"{name}: a default password"
            for c in containers(doc):
                for e in c.get("env", []):
                    if SECRET_ENV.search(e["name"]) and e["name"] != "RAY_AUTH_MODE":
                        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                        assert ref and "value" not in e, f"{name}: {e['name']} is not read from a Secret"
                        assert not ref.get("optional"), f"{name}: {e['name']} is optional: the pod would run without it"
                        assert ref["name"] in created_secrets(), f"{name}: shared.yaml does not say how to create " \
                                                                  f"the Secret {ref['name']}"


def check_ray_token_auth(docs_by_file=None):
    for name, cluster, _ in ray_clusters(docs_by_file):
        assert (cluster.get("authOptions") or {}).get("mode") == "token", f"{name}: Ray token auth is off"
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE") == "token", f"{name}: {c['name']} may start without token auth"


def check_dashboard_on_pod_network(docs_by_file=None):
    for name, cluster, _ in ray_clusters(docs_by_file):
        head = cluster["headGroupSpec"]
        host = head.get("rayStartParams", {}).get("dashboard-host", "")
        assert host == "$(POD_IP)", f"{name}: the dashboard listens on {host or 'its default'!r}, not the pod's IP"
        env = {e["name"]: e for e in head["template"]["spec"]["containers"][0].get("env", [])}
        field = ((env.get("POD_IP") or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        assert field == "status.podIP", f"{name}: POD_IP is not the pod's IP (downward API)"


def test_the_long_lived_cluster_starts_the_standing_reconciler():
    [cluster] = [c for name, c, _ in ray_clusters(None) if name == "raycluster.yaml"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    command = " ".join(head["lifecycle"]["postStart"]["exec"]["command"])
    assert "peftfleet reconciler start --address auto" in command
    # the command parses: `reconciler start` is a real CLI action
    from orchestrator.cli import build_parser

    assert build_parser().parse_args(["reconciler", "start", "--address", "auto"]).action == "start"


SECURITY_CHECKS = {"no_shipped_secrets": check_no_shipped_secrets, "ray_token_auth": check_ray_token_auth,
                   "dashboard_on_pod_network": check_dashboard_on_pod_network}


@pytest.mark.parametrize("check", SECURITY_CHECKS.values(), ids=SECURITY_CHECKS.keys())
def test_secrets_and_access(check):
    check()


def _cluster(docs, kind):
    doc = next(d for d in docs if d["kind"] == kind)
    return {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
            "RayService": doc["spec"].get("rayClusterConfig")}[kind]


def _env(cluster):
    return cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]


def _drop_env(cluster, name):
    _env(cluster)[:] = [e for e in _env(cluster) if e["name"] != name]


SECURITY_BREAKS = [  # (check, file, how to break it): mostly what the manifests shipped before
    ("no_shipped_secrets", "shared.yaml", lambda docs: docs.append({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "peftfleet-store"},
        "stringData": {"url": "postgresql+psycopg2://peftfleet:change-me@peftfleet-postgres:5432/peftfleet"}})),
    ("no_shipped_secrets", "raycluster.yaml", lambda docs: _env(_cluster(docs, "RayCluster")).append(
        {"name": "PEFTFLEET_STORE_URL", "value": "postgresql://peftfleet@db/peftfleet"})),
    ("no_shipped_secrets", "rayservice.yaml", lambda docs: next(
        e for e in _env(_cluster(docs, "RayService")) if e["name"] == "PEFTFLEET_API_KEY"
    )["valueFrom"]["secretKeyRef"].update(optional=True)),
    ("ray_token_auth", "rayjob.yaml", lambda docs: _cluster(docs, "RayJob").pop("authOptions")),
    ("ray_token_auth", "raycluster.yaml", lambda docs: _drop_env(_cluster(docs, "RayCluster"), "RAY_AUTH_MODE")),
    ("ray_token_auth", "rayservice.yaml", lambda docs: _cluster(docs, "RayService").update(
        authOptions={"mode": "disabled"})),
    ("dashboard_on_pod_network", "raycluster.yaml", lambda docs: _cluster(docs, "RayCluster")[
        "headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"})),
    ("dashboard_on_pod_network", "rayjob.yaml", lambda docs: _drop_env(_cluster(docs, "RayJob"), "POD_IP")),
]


@pytest.mark.parametrize("check,name,breaks", SECURITY_BREAKS,
                         ids=[f"{c}-{i}" for i, (c, *_) in enumerate(SECURITY_BREAKS)])
def test_a_manifest_that_leaks_or_opens_access_fails(check, name, breaks):
    docs_by_file = {p.name: documents(p) for p in MANIFESTS}
    SECURITY_CHECKS[check](docs_by_file)  # passes as shipped
    breaks(docs_by_file[name])
    with pytest.raises(AssertionError):
        SECURITY_CHECKS[check](docs_by_file)


# GPU pods and the GPU install. Nothing here has run on a GPU: these are the properties a first GPU
# run depends on that can be checked without one.

GIB = 2**30
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(value) -> float:
    """A Kubernetes quantity (``"16Gi"``, ``"8"``, ``"500m"``) as a number (bytes, cores)."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) / 1000 if unit == "m" else float(number) * UNITS.get(unit, 1)


def ray_clusters(docs_by_file=None):
    """(file, cluster spec, autoscaled) for every Ray cluster the manifests describe."""
    docs_by_file = docs_by_file or {p.name: documents(p) for p in MANIFESTS}
    for name, docs in docs_by_file.items():
        for doc in docs:
            spec = doc.get("spec", {})
            cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                       "RayService": spec.get("rayClusterConfig")}.get(doc.get("kind"))
            if cluster:
                yield name, cluster, bool(cluster.get("enableInTreeAutoscaling"))


def gpu_groups(cluster):
    """(group, its pod spec, its GPU containers) for each group of a cluster whose pods ask for GPUs."""
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        containers = [
            c for c in pod["containers"]
            if any("nvidia.com/gpu" in c.get("resources", {}).get(k, {}) for k in ("requests", "limits"))
        ]
        if containers:
            yield group, pod, containers


def all_gpu_groups(docs_by_file=None):
    return [(name, auto, *g) for name, cluster, auto in ray_clusters(docs_by_file) for g in gpu_groups(cluster)]


def test_every_ray_manifest_has_gpu_workers_and_no_gpu_head():
    files = {name for name, *_ in all_gpu_groups()}
    assert files == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}  # the checks below are not vacuous
    for name, cluster, _ in ray_clusters():
        assert not list(gpu_groups({"headGroupSpec": cluster["headGroupSpec"]})), f"{name}: the head asks for a GPU"


def check_dev_shm(docs_by_file=None):
    for name, _, group, pod, containers in all_gpu_groups(docs_by_file):
        where = f"{name}: group {group.get('groupName', 'head')}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in containers:
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
            assert mount, f"{where}: {c['name']} does not mount /dev/shm (64 MiB by default; NCCL needs more)"
            empty_dir = volumes[mount["name"]].get("emptyDir")
            assert empty_dir and empty_dir.get("medium") == "Memory", f"{where}: /dev/shm is not a Memory emptyDir"
            size, memory = quantity(empty_dir["sizeLimit"]), quantity(c["resources"]["limits"]["memory"])
            # Ray's object store lives in /dev/shm (30% of the pod's memory by default, falling back
            # to a slow /tmp when it does not fit), and tmpfs pages count against the memory limit.
            assert 0.3 * memory <= size < memory, f"{where}: /dev/shm {empty_dir['sizeLimit']} for {memory / GIB} Gi"


def check_nccl_env(docs_by_file=None):
    for name, _, group, _, containers in all_gpu_groups(docs_by_file):
        for c in containers:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("NCCL_DEBUG") == "WARN", f"{name}: {c['name']} lacks NCCL_DEBUG=WARN"
            assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1", f"{name}: {c['name']}: a failed collective hangs"


def check_gpu_group_shape(docs_by_file=None):
    for name, autoscaled, group, _, containers in all_gpu_groups(docs_by_file):
        where = f"{name}: group {group.get('groupName', 'head')}"
        res = containers[0]["resources"]
        assert res["requests"] == res["limits"], f"{where}: GPU pod requests differ from its limits"
        params = group.get("rayStartParams", {})  # what the autoscaler reads first
        for param, limit in (("num-gpus", "nvidia.com/gpu"), ("num-cpus", "cpu")):
            assert param in params, f"{where}: rayStartParams does not declare {param}"
            assert quantity(params[param]) == quantity(res["limits"][limit]), f"{where}: {param} vs its limit"
        if autoscaled:  # the autoscaler reads the group's shape; it need not keep a node to show it
            assert group["minReplicas"] == 0, f"{where}: an autoscaled GPU group should start at 0"
        else:  # no autoscaler: the group is what it starts with
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], where


def check_declared_node_types(docs_by_file=None):
    """KubeRay's autoscaler does not publish its worker groups to Ray, so the feasibility check reads them
    from PEFTFLEET_NODE_TYPES: every pod's copy must describe exactly the cluster's worker groups."""
    from orchestrator.feasibility import NODE_TYPES_ENV, parse_node_types

    for name, cluster, _ in ray_clusters(docs_by_file):
        groups = cluster.get("workerGroupSpecs", [])
        expected = sorted((g["groupName"], quantity(g["rayStartParams"]["num-cpus"]),
                           quantity(g["rayStartParams"].get("num-gpus", 0)), g["maxReplicas"]) for g in groups)
        for group in [cluster["headGroupSpec"], *groups]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get(NODE_TYPES_ENV), f"{name}: {c['name']} does not declare {NODE_TYPES_ENV}"
                declared = sorted((t.name, t.resources.get("CPU", 0), t.resources.get("GPU", 0), t.count)
                                  for t in parse_node_types(env[NODE_TYPES_ENV]))
                assert declared == expected, f"{name}: {NODE_TYPES_ENV} says {declared}, the groups are {expected}"


GPU_CHECKS = {"dev_shm": check_dev_shm, "nccl_env": check_nccl_env, "gpu_group_shape": check_gpu_group_shape,
              "node_types": check_declared_node_types}


@pytest.mark.parametrize("check", GPU_CHECKS.values(), ids=GPU_CHECKS.keys())
def test_gpu_pods(check):
    check()


def _shm(pod):
    return next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]


def _worker(docs, kind="RayCluster"):
    doc = next(d for d in docs if d["kind"] == kind)
    cluster = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
               "RayService": doc["spec"].get("rayClusterConfig")}[kind]
    return cluster["workerGroupSpecs"][0]


GPU_BREAKS = [
    ("dev_shm", "rayjob.yaml", lambda g: g["template"]["spec"]["containers"][0]["volumeMounts"].pop()),
    ("dev_shm", "raycluster.yaml", lambda g: _shm(g["template"]["spec"]).pop("medium")),
    ("dev_shm", "rayservice.yaml", lambda g: _shm(g["template"]["spec"]).update(sizeLimit="2Gi")),
    ("nccl_env", "rayservice.yaml", lambda g: g["template"]["spec"]["containers"][0].update(env=[])),
    ("gpu_group_shape", "raycluster.yaml",
     lambda g: g["template"]["spec"]["containers"][0]["resources"]["requests"].update({"nvidia.com/gpu": "0"})),
    ("gpu_group_shape", "raycluster.yaml", lambda g: g.update(rayStartParams={})),
    ("gpu_group_shape", "raycluster.yaml", lambda g: g.update(minReplicas=1)),
    ("gpu_group_shape", "rayjob.yaml", lambda g: g.update(minReplicas=0)),
    ("node_types", "raycluster.yaml", lambda g: g.update(maxReplicas=16)),
    ("node_types", "rayservice.yaml", lambda g: g["rayStartParams"].update({"num-gpus": "2"})),
]


@pytest.mark.parametrize("check,name,breaks", GPU_BREAKS, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(GPU_BREAKS)])
def test_a_gpu_pod_without_what_it_needs_fails(check, name, breaks):
    docs_by_file = {p.name: documents(p) for p in MANIFESTS}  # fresh copies: anchors are shared objects
    kind = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}[name]
    breaks(_worker(docs_by_file[name], kind))
    with pytest.raises(AssertionError):
        GPU_CHECKS[check](docs_by_file)


def constraints(path: Path) -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name.lower(): r for r in reqs}


def check_constraints_agree(cpu: dict[str, Requirement], gpu: dict[str, Requirement]) -> None:
    assert set(cpu) == set(gpu), f"only in one constraints file: {set(cpu) ^ set(gpu)}"
    for name in set(cpu) - {"torch"}:
        assert str(cpu[name]) == str(gpu[name]), f"{name}: {cpu[name]} (CPU) vs {gpu[name]} (GPU)"
    assert str(cpu["torch"].specifier) == f"=={TORCH_VERSION}+cpu"
    spec = gpu["torch"].specifier
    assert spec.contains(TORCH_VERSION) and spec.contains(f"{TORCH_VERSION}+cu128"), spec  # PyPI's, PyTorch's
    assert not spec.contains(f"{TORCH_VERSION}+cpu"), f"{spec} lets the local CPU wheel in"
    assert not spec.contains("2.99.0"), f"{spec} does not pin torch"


def test_gpu_constraints_are_the_cpu_constraints_but_for_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"torch=={TORCH_VERSION}" in pyproject["project"]["dependencies"]  # one torch version everywhere
    cpu = constraints(ROOT / "requirements" / "constraints.txt")
    gpu = constraints(ROOT / "requirements" / "constraints-gpu.txt")
    check_constraints_agree(cpu, gpu)
    drifted = {**gpu, "numpy": Requirement("numpy==2.0")}  # a pin added to one file only
    with pytest.raises(AssertionError, match="only in one"):
        check_constraints_agree(cpu, drifted)
    with pytest.raises(AssertionError, match="lets the local CPU wheel in"):
        check_constraints_agree(cpu, {**gpu, "torch": Requirement(f"torch=={TORCH_VERSION}")})


def make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run (-n: none is run), as if on a fresh machine (-B), outside any `make test`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_INDEX_URL")}
    out = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_setup_gpu_installs_a_cuda_torch_in_its_own_venv_and_leaves_the_cpu_install_alone():
    cpu = make_dry_run("setup-test", "VENV=/tmp/cpu-venv", "GPU_VENV=/tmp/gpu-venv")
    gpu = make_dry_run("setup-gpu", "VENV=/tmp/cpu-venv", "GPU_VENV=/tmp/gpu-venv")
    assert not any("gpu-venv" in line or "constraints-gpu" in line for line in cpu)
    assert not any("cpu-venv" in line or "constraints.txt" in line for line in gpu)
    assert [line for line in cpu if "torch.version.cuda is None" in line], "the CPU guard rejects CUDA builds"
    pips = [line for line in gpu if " -m pip install" in line and "--no-deps" not in line]
    assert pips and all("-c requirements/constraints-gpu.txt" in line for line in pips), pips
    assert pips[0].endswith(f"torch=={TORCH_VERSION}"), "torch first"
    checks = [i for i, line in enumerate(gpu) if "torch.version.cuda is not None" in line]
    assert len(checks) == 2 and checks[0] == gpu.index(pips[0]) + 1 and checks[1] == len(gpu) - 2, gpu
    with_index = make_dry_run("setup-gpu", "GPU_VENV=/tmp/gpu-venv", "TORCH_INDEX_URL=https://example.org/whl/cu128")
    assert [line for line in with_index if " -m pip install" in line][0].count("--index-url") == 1
    assert sum("--index-url" in line for line in with_index) == 1  # only torch comes from that index


def test_the_image_builds_torch_and_deepspeed_ops_for_its_own_cuda():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cuda = re.search(r"^ARG CUDA=(cu\d+)$", dockerfile, re.M)
    assert cuda, "one build argument names the CUDA"
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-\$\{CUDA\}$", dockerfile, re.M), "Ray's image for it"
    assert "--index-url \"https://download.pytorch.org/whl/${CUDA}\" \"torch==" in dockerfile, "torch's wheel for it"
    assert "torch and the image disagree on CUDA" in dockerfile  # and the build compares them
    assert re.search(r'^ARG TORCH_CUDA_ARCH_LIST="[0-9.;+PTX]+"$', dockerfile, re.M)
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    runs = re.sub(r"\\\n", " ", code).split("\nRUN ")  # one item per instruction, continuations joined
    build = next((r for r in runs if "--no-build-isolation" in r), "")  # DeepSpeed against the torch above
    for flag in ("DS_BUILD_OPS=0", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=", "DS_ACCELERATOR=cuda"):
        assert flag in build.split("pip install --no-cache-dir --no-build-isolation")[0], flag
    assert re.search(r"^ARG DS_BUILD_CPU_ADAM=1$", dockerfile, re.M)
    assert "CPUAdamBuilder" in dockerfile and "FusedAdamBuilder" in dockerfile  # loaded once built
    deepspeed = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("deepspeed"))
    assert f'"{deepspeed}"' in dockerfile, f"the image's DeepSpeed is not pyproject's {deepspeed}"
    assert dockerfile.count("-c requirements/constraints-gpu.txt -c /tmp/torch-build.txt") == 2
