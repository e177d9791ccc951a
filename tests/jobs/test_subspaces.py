"""IPT's job-side steps on a real store: specs, source selection, fitting and registering a
subspace, resolving it for an ipt job, and refusing bad references before anything is stored."""

from __future__ import annotations

import pytest
import torch

from jobs.spec import JobSpecError, SubspaceSpec, parse_job_spec
from jobs.states import JobState
from jobs.store.subspace_registry import SubspaceNotFound
from jobs.training.subspaces import check_references, fit_subspace_job, resolve_method_config, select_sources
from peft_methods import AdapterIntegrityError, BaseModelMismatch
from peft_methods.ipt import SUBSPACE_TENSORS, load_subspace
from tests.jobs.test_adapter_registry import bases, register  # noqa: F401 - fixture


def subspace_spec(base_folder, **overrides) -> dict:
    spec = {
        "kind": "ipt-subspace",
        "name": "subspace",
        "base_model": str(base_folder),
        "intrinsic_dim": 2,
        "inner_dim": 8,
        "steps": 300,
        "lr": 1e-2,
    }
    spec.update(overrides)
    return spec


def ipt_spec(base_folder, subspace: str) -> dict:
    return {
        "name": "ipt",
        "base_model": str(base_folder),
        "task": "sequence-classification",
        "dataset": {"name": "trec"},
        "method": {"method": "ipt", "subspace": subspace},
    }


@pytest.fixture
def prompts(store, bases, tmp_path):  # noqa: F811
    """Three prompt-tuning adapters on base a (two tasks), one on base b, one LoRA on base a."""
    made = [
        register(
            store,
            tmp_path,
            bases["a"],
            f"pt-{i}",
            method="prompt_tuning",
            task_name=t,
            tags=("src",) if i else (),
            seed=i,
        )
        for i, t in enumerate(["trec", "trec", "sentiment"])
    ]
    register(store, tmp_path, bases["b"], "pt-other-base", method="prompt_tuning")
    register(store, tmp_path, bases["a"], "lora-a", method="lora")
    return made


def fit(store, bases, spec):  # noqa: F811
    job = store.submit(spec)
    store.transition(job.id, JobState.QUEUED)
    name = fit_subspace_job({"job_id": job.id, "store_url": store.url, "storage_url": store.artifacts.url,
                             "home": str(store.home), "base_fingerprint": bases["a"][1]})
    return job, store.subspaces.get(name)


def test_subspace_specs_are_validated_like_job_specs(tmp_path):
    spec = parse_job_spec(subspace_spec(tmp_path, base_model="minilm"))
    assert (
        isinstance(spec, SubspaceSpec) and spec.method_name == "ipt-subspace" and spec.effective_task_name == "subspace"
    )
    for bad, path in [
        ({"kind": "nonsense"}, "kind"),
        ({"intrinsic_dim": 0}, "intrinsic_dim"),
        ({"resources": {"num_workers": 2}}, "resources"),
        ({"sources": {"adapters": ["one"]}}, "sources.adapters"),
        ({"task": "causal-lm"}, "task"),
    ]:
        with pytest.raises(JobSpecError) as err:
            parse_job_spec(subspace_spec(tmp_path, base_model="minilm", **bad))
        assert err.value.problems[0][0] == path, err.value.problems
    with pytest.raises(JobSpecError, match="method.decoded"):  # the load form of a trained adapter
        parse_job_spec(
            {
                **ipt_spec("minilm", "x"),
                "method": {"method": "ipt", "decoded": True, "intrinsic_dim": 2, "num_virtual_tokens": 2},
            }
        )


def test_sources_are_the_prompt_adapters_of_the_base_filtered(store, bases, prompts):  # noqa: F811
    spec = parse_job_spec(subspace_spec(bases["a"][0]))
    fingerprint = bases["a"][1]
    assert [a.name for a in select_sources(store, spec.sources, fingerprint)] == ["pt-0", "pt-1", "pt-2"]

    def by(**sources):
        spec = parse_job_spec(subspace_spec(bases["a"][0], sources=sources))
        chosen = select_sources(store, spec.sources, fingerprint)
        return [a.name for a in chosen]

    assert by(task_names=["trec"]) == ["pt-0", "pt-1"]
    assert by(tag="src") == ["pt-1", "pt-2"]
    assert by(adapters=["pt-2", "pt-0"]) == ["pt-0", "pt-2"]
    with pytest.raises(ValueError, match=r"\['lora-a', 'pt-other-base'\] are not prompt_tuning adapters"):
        by(adapters=["lora-a", "pt-other-base"])
    with pytest.raises(ValueError, match="select 1"):
        by(task_names=["sentiment"])


def test_fit_job_registers_a_subspace_tied_to_base_and_sources(store, bases, prompts):  # noqa: F811
    job, record = fit(store, bases, subspace_spec(bases["a"][0]))
    assert store.get(job.id).state is JobState.RUNNING  # the runner settles it
    assert record.base_fingerprint == bases["a"][1] and record.job_id == job.id
    assert [s["name"] for s in record.sources] == ["pt-0", "pt-1", "pt-2"]
    assert [s["sha256"] for s in record.sources] == [a.sha256 for a in prompts]
    assert (record.intrinsic_dim, record.num_virtual_tokens) == (2, 20)
    assert 0 <= record.metrics["reconstruction_relative_error"] < 1
    assert {m.name for m in store.metrics(job.id)} >= {"reconstruction_relative_error", "fit_seconds"}
    assert store.subspaces.list(base=str(bases["a"][0])) == [record] and store.subspaces.list(base=bases["b"][1]) == []

    # The registered decoder turns the source codes back into prompts: its start is near the sources' mean.
    decoder, init = load_subspace(store.subspaces.local_folder(record.name), 32)
    sources = torch.stack([_prompt(store, a.name) for a in prompts])
    assert (decoder(init) - sources.mean(0)).norm() < (sources - sources.mean(0)).norm(dim=(1, 2)).max()


def test_a_subspace_of_more_dimensions_than_source_prompts_is_refused_before_anything_runs(
        store, bases, prompts):  # noqa: F811
    """Three source prompts cannot pin down a 4-dimensional subspace: refused at submission (nothing stored),
    and by the job itself before it starts fitting (sources may have gone since it was submitted)."""
    spec = subspace_spec(bases["a"][0], intrinsic_dim=4)
    jobs_before = store.count_jobs()
    with pytest.raises(JobSpecError, match="intrinsic_dim 4 exceeds the 3 source prompts") as err:
        check_references(store, parse_job_spec(spec))
    assert err.value.problems[0][0] == "intrinsic_dim"
    assert store.count_jobs() == jobs_before
    check_references(store, parse_job_spec(subspace_spec(bases["a"][0], intrinsic_dim=3)))  # as many: allowed
    with pytest.raises(JobSpecError, match="intrinsic_dim 3 exceeds the 2 source prompts"):
        check_references(store, parse_job_spec(subspace_spec(bases["a"][0], intrinsic_dim=3,
                                                             sources={"task_names": ["trec"]})))

    job = store.submit(spec)  # as if its sources shrank after submission
    store.transition(job.id, JobState.QUEUED)
    with pytest.raises(ValueError, match="intrinsic_dim 4 exceeds the 3 source prompts"):
        fit_subspace_job({"job_id": job.id, "store_url": store.url, "storage_url": store.artifacts.url,
                          "home": str(store.home), "base_fingerprint": bases["a"][1]})
    assert store.get(job.id).state is JobState.QUEUED and store.subspaces.list() == []  # it never started


def _prompt(store, name):
    from safetensors.torch import load_file

    return load_file(store.adapters.local_folder(name) / "adapter_model.safetensors")["prompt_embeddings"]


def test_ipt_jobs_resolve_a_registered_subspace_and_refuse_bad_references(store, bases, prompts):  # noqa: F811
    _, record = fit(store, bases, subspace_spec(bases["a"][0]))
    spec = parse_job_spec(ipt_spec(bases["a"][0], record.name))
    check_references(store, spec)
    config, lineage = resolve_method_config(spec.method, store, bases["a"][1])
    assert config.subspace == str(store.subspaces.local_folder(record.name))
    assert lineage == {"subspace": {"id": record.id, "name": record.name, "sha256": record.sha256}}
    with pytest.raises(BaseModelMismatch):
        resolve_method_config(spec.method, store, bases["b"][1])
    with pytest.raises(SubspaceNotFound):
        resolve_method_config(parse_job_spec(ipt_spec(bases["a"][0], "x")).method, store, bases["a"][1])

    jobs_before = store.count_jobs()
    for bad, message in [(ipt_spec(bases["a"][0], "no-such"), "no subspace named 'no-such'"),
                         (ipt_spec(bases["b"][0], record.name), "fitted for another base"),
                         (subspace_spec(bases["b"][0]), "select 1")]:
        with pytest.raises(JobSpecError, match=message):
            check_references(store, parse_job_spec(bad))
    assert store.count_jobs() == jobs_before

    with open(store.subspaces.local_folder(record.name) / SUBSPACE_TENSORS, "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    with pytest.raises(AdapterIntegrityError):
        resolve_method_config(spec.method, store, bases["a"][1])
    store.subspaces.delete(record.name)
    assert store.subspaces.list() == []


def test_a_job_names_a_registered_subspace_never_a_folder(store, bases, prompts, tmp_path):  # noqa: F811
    """A folder would skip the registry's verification and base check, so it is refused even when it holds a
    real subspace of this very base; and a fit job's longest name still makes a valid registry name."""
    import shutil

    _, record = fit(store, bases, subspace_spec(bases["a"][0], name="n" * 64))
    assert record.name.startswith("n" * 55 + "-") and len(record.name) == 64
    folder = shutil.copytree(store.subspaces.local_folder(record.name), tmp_path / "copy")
    spec = parse_job_spec(ipt_spec(bases["a"][0], str(folder)))
    jobs_before = store.count_jobs()
    with pytest.raises(JobSpecError, match="is not a subspace name: a job names a registered subspace") as err:
        check_references(store, spec)
    assert err.value.problems[0][0] == "method.subspace" and store.count_jobs() == jobs_before
    with pytest.raises(SubspaceNotFound, match="never a folder"):
        resolve_method_config(spec.method, store, bases["a"][1])
    config, lineage = resolve_method_config(parse_job_spec(ipt_spec(bases["a"][0], record.name)).method, store,
                                            bases["a"][1])
    assert config.subspace == str(store.subspaces.local_folder(record.name)) and lineage["subspace"]["id"] == record.id
