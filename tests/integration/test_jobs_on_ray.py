"""The whole path on a real Ray cluster: client → Ray job → Ray Train workers → DeepSpeed → store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import transformers

from jobs.spec import JobSpecError
from jobs.states import JobState
from jobs.training.batches import Batches
from jobs.training.data import load_for_job
from jobs.training.recipe import evaluate
from orchestrator import InfeasibleJob
from tests.integration.conftest import CLUSTER_CPUS

S = JobState


def _reload_accuracy(client, job, tiny_bert_dir) -> float:
    spec = job.job_spec
    data = load_for_job(spec.dataset, spec.task, spec.training)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(data.labels))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = client.adapters.load(client.adapters.list(job_id=job.id)[0].name, base)
    batches = Batches(spec.task, tokenizer, spec.training.max_length)
    return evaluate(model, batches, data.eval, batch_size=spec.training.batch_size)["eval_accuracy"]


def test_every_zero_stage_trains_and_saves_a_reloadable_adapter(client, tiny_spec, tiny_bert_dir):
    handles = {
        stage: client.submit(tiny_spec(name=f"zero{stage}", deepspeed={"zero_stage": stage},
                                       resources={"num_workers": 2 if stage == 3 else 1}))
        for stage in (0, 1, 2, 3)
    }
    for stage, handle in handles.items():
        job = handle.wait(timeout=600, progress=False)
        assert job.state is S.SUCCEEDED, f"ZeRO-{stage}: {job.error}\n{handle.logs()[-3000:]}"
        assert [e.to_state for e in client.store.events(job.id)] == [S.PENDING, S.QUEUED, S.RUNNING, S.SUCCEEDED]
        adapter = handle.adapter()
        assert (
            adapter is not None and adapter.num_parameters == 2 * 2 * 4 * (32 + 32) + 32 * 6 + 6
        )  # q,v × 2 layers + head
        recorded = handle.metrics("eval_accuracy")[-1].value
        reloaded = _reload_accuracy(client, job, tiny_bert_dir)
        assert abs(reloaded - recorded) <= 1 / 128, (
            f"ZeRO-{stage}: reloaded adapter scores {reloaded}, the job recorded {recorded}"
        )


def test_two_workers_follow_the_one_worker_loss_trajectory(client, tiny_spec):
    one = client.submit(tiny_spec(name="dp1", training={"batch_size": 8}, resources={"num_workers": 1}))
    two = client.submit(tiny_spec(name="dp2", training={"batch_size": 4}, resources={"num_workers": 2}))
    for handle in (one, two):
        assert handle.wait(timeout=600, progress=False).state is S.SUCCEEDED, handle.logs()[-3000:]
    losses = [[(m.step, m.value) for m in h.metrics("train_loss")] for h in (one, two)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] and len(losses[0]) == 32
    for (step, a), (_, b) in zip(*losses):
        assert abs(a - b) < 1e-4, f"step {step}: 1 worker {a}, 2 workers {b}"
    assert losses[0][-1][1] < losses[0][0][1], "the loss did not go down"


def test_cancel_stops_a_running_job_and_frees_its_resources(client, tiny_spec):
    handle = client.submit(tiny_spec(name="long", training={"epochs": 1000}, resources={"num_workers": 2}))
    deadline = time.monotonic() + 300
    while handle.status() is not S.RUNNING:
        assert time.monotonic() < deadline and not handle.status().is_terminal, handle.logs()[-3000:]
        time.sleep(0.5)
    job = handle.cancel()
    assert job.state is S.CANCELLED
    assert S.CANCELLING in [e.to_state for e in client.store.events(job.id)]
    assert str(client.cluster.jobs_client().get_job_status(job.runtime["ray_submission_id"])) == "STOPPED"
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < CLUSTER_CPUS:
        assert time.monotonic() < deadline, f"resources not freed: {ray.available_resources()}"
        time.sleep(0.5)


def test_a_job_that_raises_is_failed_with_its_traceback(client, tiny_spec):
    # valid as a spec, impossible at run time: 4 examples cannot fill one global batch of 8
    handle = client.submit(tiny_spec(name="doomed", dataset={"name": "trec", "train_size": 4}))
    job = handle.wait(timeout=600, progress=False)
    assert job.state is S.FAILED
    assert "cannot fill one global batch of 8" in job.error
    assert "Traceback" in job.traceback and "train_worker" in job.traceback
    assert client.adapters.list(job_id=job.id) == []


def test_checkpoints_hold_adapter_and_optimizer_state_but_never_the_base(client, tiny_spec, tiny_bert_dir):
    handle = client.submit(tiny_spec(name="ckpt", training={"epochs": 2}))
    assert handle.wait(timeout=600, progress=False).state is S.SUCCEEDED, handle.logs()[-3000:]
    records = client.store.checkpoints.list(handle.id)  # each with the hashes a restore verifies
    assert records, "no checkpoint was written after epoch 1"
    folder = Path(records[0].folder)
    assert folder.parent == client.home / "artifacts" / "checkpoints" / f"peftfleet-{handle.id}-a0"  # its attempt's
    assert {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()} == set(records[0].files)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    base = (tiny_bert_dir / "model.safetensors").stat().st_size
    assert size < base / 4, f"checkpoint of {size} bytes looks like it holds the {base}-byte base"


def test_a_second_process_finds_and_waits_on_a_job(client, tiny_spec, tmp_path):
    handle = client.submit(tiny_spec(name="shared"))
    code = (
        "from orchestrator import Client;"
        f"c = Client(store_url={client.store.url!r}, home={str(client.home)!r});"
        f"print(c.jobs.get({handle.id[:10]!r}).wait(timeout=600, progress=False).state.value)"
    )
    waited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert waited.stdout.strip().splitlines()[-1] == "SUCCEEDED", waited.stderr[-3000:]
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "status",
            handle.id,
            "--json",
            "--store-url",
            client.store.url,
            "--home",
            str(client.home),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    info = json.loads(status.stdout)
    assert info["state"] == "SUCCEEDED" and info["adapter"] == f"shared-{handle.id[:8]}"
    assert "step 32/32" in handle.logs()


def test_bad_specs_are_refused_before_anything_is_scheduled(client, tiny_spec):
    ray_jobs_before = len(client.cluster.jobs_client().list_jobs())
    with pytest.raises(JobSpecError, match="method.r"):
        client.submit(tiny_spec(method={"method": "lora", "r": 0}))
    with pytest.raises(InfeasibleJob, match=r"needs 8 CPU \(the cluster has 2\)"):
        client.submit(tiny_spec(resources={"num_workers": 8}))
    assert client.store.count_jobs() == 0
    assert len(client.cluster.jobs_client().list_jobs()) == ray_jobs_before
