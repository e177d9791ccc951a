"""Every installed PEFT method — ours and the third-party plugin — trains as a job on Ray + DeepSpeed
and its registered adapter reloads into a fresh base with the accuracy the job recorded."""

from __future__ import annotations

import pytest
import transformers

import peft_methods
from jobs.spec import JobSpecError
from jobs.states import JobState
from jobs.training.batches import Batches
from jobs.training.data import load_for_job
from jobs.training.recipe import evaluate
from orchestrator import Client

METHODS = peft_methods.list_methods()


@pytest.fixture(scope="module")
def submitted(ray_cluster, tiny_bert_dir, tmp_path_factory):
    """All methods' jobs at once: the cluster runs two at a time and queues the rest."""
    client = Client(home=tmp_path_factory.mktemp("methods-home"))
    handles = {}
    for method in METHODS:
        handles[method] = client.submit(
            {
                "name": f"m-{method.replace('_', '-')}",
                "base_model": str(tiny_bert_dir),
                "task": "sequence-classification",
                # short (12 steps): the recipe's own tests train every method longer and in bf16 without Ray
                "dataset": {"name": "trec", "train_size": 96},
                "method": {"method": method},
                "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 64, "max_length": 32},
                "deepspeed": {"zero_stage": 2},
            }
        )
    yield client, handles
    for job in client.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        client.cancel(job.id)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_as_a_job_and_its_adapter_reloads(submitted, tiny_bert_dir, method):
    client, handles = submitted
    handle = handles[method]
    job = handle.wait(timeout=900, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{method}: {job.error}\n{handle.logs()[-3000:]}"
    assert handle.adapter().method == method
    _reloads_with_the_recorded_accuracy(client, handle, tiny_bert_dir)


def _reloads_with_the_recorded_accuracy(client, handle, tiny_bert_dir):
    spec = handle.record().job_spec
    data = load_for_job(spec.dataset, spec.task, spec.training)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(data.labels))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = client.adapters.load(handle.adapter().name, base)
    reloaded = evaluate(model, Batches(spec.task, tokenizer, 32), data.eval, batch_size=8)["eval_accuracy"]
    recorded = handle.metrics("eval_accuracy")[-1].value
    assert abs(reloaded - recorded) <= 1 / spec.training.eval_size, (
        f"{spec.method.method}: reloaded {reloaded}, job recorded {recorded}"
    )


def test_ipt_fits_a_subspace_on_registered_prompt_adapters_then_trains_only_z_in_it(submitted, tiny_bert_dir):
    """Both IPT steps as jobs: prompt-tuning adapters -> ipt-subspace job -> ipt job."""
    client, handles = submitted
    base = str(tiny_bert_dir)
    job_count = client.store.count_jobs()
    with pytest.raises(JobSpecError, match="method.subspace.*no subspace named 'nope'"):
        client.submit({**_tiny(base, "ipt-early"), "method": {"method": "ipt", "subspace": "nope"}})
    assert client.store.count_jobs() == job_count  # refused before anything was stored

    second = client.submit(
        {**_tiny(base, "pt-second", seed=1), "method": {"method": "prompt_tuning"}, "task_name": "trec-b"}
    )
    sources = [handles["prompt_tuning"], second]
    for h in sources:
        assert h.wait(timeout=900, progress=False).state is JobState.SUCCEEDED, h.logs()[-3000:]

    fit_spec = {"kind": "ipt-subspace", "name": "trec-sub", "base_model": base, "intrinsic_dim": 2, "inner_dim": 32,
                "steps": 200}
    job_count = client.store.count_jobs()
    with pytest.raises(JobSpecError, match="intrinsic_dim 3 exceeds the 2 source prompts"):
        client.submit({**fit_spec, "intrinsic_dim": 3})  # two prompts span at most two dimensions
    assert client.store.count_jobs() == job_count
    fit = client.submit(fit_spec)
    job = fit.wait(timeout=600, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{job.error}\n{fit.logs()[-3000:]}"
    subspace = fit.subspace()
    assert subspace.base_fingerprint == client.store.get_base_model(base).fingerprint
    assert sorted(s["name"] for s in subspace.sources) == sorted(h.adapter().name for h in sources)
    assert [e.to_state for e in client.store.events(job.id)] == ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED"]

    ipt = client.submit({**_tiny(base, "ipt"), "method": {"method": "ipt", "subspace": subspace.name}})
    job = ipt.wait(timeout=900, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{job.error}\n{ipt.logs()[-3000:]}"
    head = 32 * 6 + 6  # TREC's six classes on a 32-wide encoder
    assert ipt.metrics("trainable_parameters")[-1].value == 2 + head
    adapter = ipt.adapter()
    lineage = peft_methods.read_manifest(client.adapters.local_folder(adapter.name))["metadata"]["subspace"]
    assert lineage == {"id": subspace.id, "name": subspace.name, "sha256": subspace.sha256}
    _reloads_with_the_recorded_accuracy(client, ipt, tiny_bert_dir)


def _tiny(base: str, name: str, seed: int = 0) -> dict:
    return {
        "name": name,
        "base_model": base,
        "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 256},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 128, "max_length": 32, "seed": seed},
    }
