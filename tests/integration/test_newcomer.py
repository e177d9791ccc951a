"""What a new user does on day one, offline: a job naming a Hugging Face id from the local cache and a
Parquet file given as a file:// URL, logged to MLflow (read back through MLflow's own client), exported
merged, and loaded with plain transformers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.states import JobState
from jobs.training.data import trec_rows
from orchestrator.cli import main

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def test_a_hub_model_a_parquet_url_mlflow_and_a_merged_export(client, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    common = ["--store-url", client.store.url, "--home", str(client.store.home)]
    assert main(["hub-seed", "minilm", HUB_ID, *common]) == 0
    rows = sorted(trec_rows().items())[:360]
    path = tmp_path / "questions.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": q, "label": lab} for q, lab in rows]), path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "name": "newcomer", "base_model": HUB_ID, "task": "sequence-classification",
        "dataset": {"path": path.as_uri(), "text_column": "question"},
        "method": {"method": "lora", "r": 4},
        "training": {"epochs": 1, "batch_size": 8, "eval_size": 40, "max_length": 32},
        "resources": {"num_workers": 1},
        "tracking": {"mlflow": {"uri": tracking_uri, "experiment": "day-one"}},
    }
    handle = client.submit(spec)
    job = handle.wait(timeout=600, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{job.error}\n{handle.logs()[-3000:]}"

    base = client.store.get_base_model(HUB_ID)
    assert base.source["kind"] == "hub" and base.source["repo_id"] == HUB_ID and len(base.source["commit"]) == 40
    assert job.runtime["dataset"]["source"] == path.as_uri() and job.runtime["dataset"]["rows"]["eval"] == 40

    mlflow = MlflowClient(tracking_uri)
    experiment = mlflow.get_experiment_by_name("day-one")
    [run] = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`peftfleet.job_id` = '{job.id}'")
    assert run.info.status == "FINISHED" and run.data.params["base_model"] == HUB_ID
    assert len(mlflow.get_metric_history(run.info.run_id, "train_loss")) >= 10
    assert "eval_accuracy" in run.data.metrics
    assert any(a.path == "adapter" for a in mlflow.list_artifacts(run.info.run_id))

    adapter = client.adapters.list(job_id=job.id)[0]
    out = tmp_path / "merged"
    assert main(["export", adapter.name, "--merge", "--out", str(out), *common]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours, _ = _ours(client, adapter.name, num_labels=plain.config.num_labels)
    batch = tokenizer([q for q, _ in rows[:6]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours(**batch).logits, atol=1e-4, rtol=1e-4)
    assert HUB_ID in (out / "README.md").read_text()


def _ours(client, name: str, *, num_labels: int):
    """The adapter on a fresh base, the way peftfleet itself loads it (the oracle the export must match)."""
    from jobs.base_models import load_base_model

    model, tokenizer = load_base_model(HUB_ID, "sequence-classification", num_labels=num_labels)
    client.store.adapters.load(name, model, base_path=model.config._name_or_path)
    return model.eval(), tokenizer
