"""A job whose Parquet data streams through Ray Data shards on a real Ray cluster: each of its two workers trains
on a shard of its own, and the dataset's fingerprint reaches the store, `peftfleet status` and the adapter."""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.states import JobState
from orchestrator.cli import main


def test_a_parquet_source_streams_through_ray_data_shards(client, tiny_spec, tmp_path, capsys):
    path = tmp_path / "questions.parquet"
    rows = [{"question": f"what is item number {i}?", "kind": ["LOC", "NUM"][i % 2]} for i in range(200)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    spec = tiny_spec(name="streamed", training={"batch_size": 4, "eval_size": 40},
                     resources={"num_workers": 2, "cpus_per_worker": 0.5})  # a CPU left for Ray Data's reads
    spec["dataset"] = {"path": str(path), "streaming": "on", "text_column": "question", "label_column": "kind"}
    _wait_for_job_agent(client)
    handle = client.submit(spec)
    job = handle.wait(timeout=600, progress=False)
    assert job.state is JobState.SUCCEEDED, f"{job.error}\n{handle.logs()[-3000:]}"

    # 160 training rows, 2 workers × batch 4: 20 steps; each worker read 80 rows of its own, none the other's
    latest = {m.name: m.value for m in handle.metrics()}
    assert latest["total_steps"] == 20
    assert (latest["stream_rows_rank0"], latest["stream_rows_rank1"], latest["stream_rows_shared"]) == (80, 80, 0)
    assert "streaming 160 training rows through Ray Data shards; 40 held out" in handle.logs()

    recorded = job.runtime["dataset"]
    assert recorded["streaming"] is True and recorded["rows"] == {"total": 200, "train": 160, "eval": 40}
    assert (recorded["hash"], recorded["hash_of"]) == (hashlib.sha256(path.read_bytes()).hexdigest(), "bytes")
    adapter = client.adapters.list(job_id=job.id)[0]
    saved = json.loads((client.store.adapters.local_folder(adapter.name) / "peftfleet.json").read_text())
    assert saved["metadata"]["dataset"] == recorded

    capsys.readouterr()
    assert main(["status", job.id, "--store-url", client.store.url, "--home", str(client.store.home)]) == 0
    shown = capsys.readouterr().out
    assert f"dataset: {path} (parquet, sha256 {recorded['hash'][:12]}" in shown and "160 train, 40 eval of 200" in shown


def _wait_for_job_agent(client, timeout: float = 120) -> None:
    """A cluster just started accepts Ray job submissions once its dashboard agent registered (as
    tests/cluster/conftest.py waits): a no-op job is submitted until it is taken."""
    jobs, deadline = client.cluster.jobs_client(), time.monotonic() + timeout
    while True:
        try:
            jobs.submit_job(entrypoint="python -c pass", entrypoint_num_cpus=0)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)
