"""The demo end to end on the real MiniLM and real TREC data (smaller than `make demo`)."""

from __future__ import annotations

from jobs.states import JobState
from jobs.store import JobStore
from orchestrator.demo import main


def test_demo_trains_records_and_registers_a_working_adapter(capsys):
    result = main(["--train-size", "600", "--eval-size", "300"])
    assert result["before"] < result["majority"] + 0.05, "an untrained head should be near chance"
    assert result["after"] > result["majority"] + 0.25
    assert result["reloaded"] == result["after"]
    assert "accuracy after LoRA fine-tuning" in capsys.readouterr().out

    store = JobStore()  # the same default store, under this test's PEFTFLEET_HOME
    job = store.get(result["job_id"])
    assert job.state is JobState.SUCCEEDED
    assert [e.to_state for e in store.events(job.id)] == [JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED]
    assert store.metrics(job.id, "eval_accuracy")[-1].value == result["after"]
    assert len(store.metrics(job.id, "train_loss")) == 600 // 16 // 25
    [adapter] = store.adapters.list(base="minilm", task_name="trec")
    assert adapter.name == result["adapter"] and adapter.promoted and adapter.job_id == job.id
    assert adapter.metrics == {"eval_accuracy": result["after"]}
