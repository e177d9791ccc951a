"""Every installed PEFT method — ours and the third-party plugin — trains as a job on Ray + DeepSpeed
and its registered adapter reloads into a fresh base with the accuracy the job recorded."""

from __future__ import annotations

import pytest
import transformers

import peft_methods
from jobs.data import load_for_job
from jobs.evaluation import evaluate_classifier
from jobs.states import JobState
from orchestrator import Client

METHODS = peft_methods.list_methods()


@pytest.fixture(scope="module")
def submitted(ray_cluster, tiny_bert_dir, tmp_path_factory):
    """All methods' jobs at once: the cluster runs two at a time and queues the rest."""
    client = Client(home=tmp_path_factory.mktemp("methods-home"))
    handles = {}
    for method in METHODS:
        handles[method] = client.submit({
            "name": f"m-{method.replace('_', '-')}", "base_model": str(tiny_bert_dir), "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 256}, "method": {"method": method},
            "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 128, "max_length": 32},
            "deepspeed": {"zero_stage": 2},
        })
    yield client, handles
    for job in client.jobs.list(state=["PENDING", "QUEUED", "RUNNING", "RETRYING", "CANCELLING"]):
        client.cancel(job.id)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_as_a_job_and_its_adapter_reloads(submitted, tiny_bert_dir, method):
    client, handles = submitted
    handle = handles[method]
    job = handle.wait(timeout=900, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{method}: {job.error}\n{handle.logs()[-3000:]}"
    adapter = handle.adapter()
    assert adapter.method == method
    spec = job.job_spec
    data = load_for_job(spec.dataset, spec.task, spec.training)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(data.labels))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = client.adapters.load(adapter.name, base)
    reloaded = evaluate_classifier(model, tokenizer, data.eval, batch_size=8, max_length=32)
    recorded = handle.metrics("eval_accuracy")[-1].value
    assert abs(reloaded - recorded) <= 1 / 128, f"{method}: reloaded {reloaded}, job recorded {recorded}"
