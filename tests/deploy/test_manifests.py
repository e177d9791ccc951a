"""deploy/: every manifest validates offline — KubeRay objects against the CRDs' openAPIV3Schema
(`kuberay-schemas/`, extracted from `../shared/kuberay-crds/`; made strict so a misspelt field
fails), plain Kubernetes objects against Kubernetes' own schemas (kubernetes-validate, strict) —
and a broken manifest fails."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

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
        "Secret",
        "ConfigMap",
    }
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert base.startswith("rayproject/ray:2.60."), base  # the official image of the Ray we pin
    for src in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / src.rstrip("/")).exists(), f"Dockerfile copies {src}, which the repository does not have"
    assert '"torch==2.13.0"' in dockerfile and "requirements/no-deps.txt" in dockerfile


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
