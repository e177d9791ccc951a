"""The training recipe on its own: no Ray, no store — an in-memory reporter and a one-rank gloo group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_methods
from peft_methods.adapter_files import WEIGHTS_FILE
from tests.conftest import save_tiny_bert

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def run_recipe(tmp_path: Path, spec: dict | list[dict], resume: str | None = None,
               store: dict | list[dict] | None = None):
    """Run ``spec`` in a fresh process (see ``tests.jobs.recipe_runs``); ``store``: ``{"url", "job_id", "root"}``
    (and ``"resume"``, ``"init"``), or one per spec, makes it that job in a real store, its checkpoints recorded
    there."""
    n = len(list(tmp_path.glob("spec-*.json")))
    spec_file, out = tmp_path / f"spec-{n}.json", tmp_path / f"out-{n}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0",  # as a launcher would set
           "RECIPE_RUNS_STORE": json.dumps(store) if store else ""}
    done = subprocess.run(
        [sys.executable, "-m", "tests.jobs.recipe_runs", str(spec_file), str(out), *([resume] if resume else [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def store_job(tmp_path: Path, spec: dict, **extra) -> dict:
    """``spec`` submitted to a real SQLite store under ``tmp_path`` (a new job each call): what
    :func:`run_recipe` takes as ``store``, with ``extra`` (``resume``, ``init``)."""
    from jobs.store import JobStore

    root, url = tmp_path / "checkpoints", f"sqlite:///{tmp_path / 'store.db'}"
    store = JobStore(url, storage_url=root / "artifacts", home=root / "home")
    try:
        job = store.submit({**spec, "idempotency_key": uuid.uuid4().hex})
    finally:
        store.close()
    return {"url": url, "job_id": job.id, "root": str(root), **extra}


def losses(result: dict) -> dict[int, float]:
    return {step: value for step, name, value in result["recorded"] if name == "train_loss"}


def test_the_recipe_trains_checkpoints_and_resumes_without_ray(tmp_path, tiny_bert_dir):
    spec = {
        "name": "recipe", "base_model": str(tiny_bert_dir), "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 64}, "method": {"method": "lora", "r": 4},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 32, "max_length": 32,
                     "checkpoint_every_steps": 4, "eval_every_steps": 4},
    }
    job = store_job(tmp_path, spec)  # its checkpoints recorded in a real store: a restore is verified against them
    full = run_recipe(tmp_path, spec, store=job)
    kinds = [kind for kind, _ in full["events"]]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert full["events"][0][1]["total_steps"] == 8 and not full["events"][0][1]["resumed"]
    assert [step for step, _ in full["checkpoints"]] == [4]  # the last step is saved as the adapter instead
    assert sorted(losses(full)) == [1, 2, 3, 4, 5, 6, 7, 8]  # 8 steps: one loss logged per step
    accuracy = [value for _, name, value in full["recorded"] if name == "eval_accuracy"]
    assert len(accuracy) == 2 and 0 <= accuracy[-1] <= 1

    # The adapter it registered is a complete artifact that loads into a fresh base.
    (folder, metrics), = full["adapters"]
    assert full["adapter"] == "adapter-1" and metrics["eval_accuracy"] == accuracy[-1]
    manifest = peft_methods.read_manifest(folder)
    assert manifest["method"] == "lora" and manifest["metadata"]["base_fingerprint"] == "sha256:test"

    # Resuming from the step-4 checkpoint (the job's latest record) continues the same trajectory.
    resumed = run_recipe(tmp_path, spec, store=job)
    start = resumed["events"][0][1]
    assert start["resumed"] and start["step"] == 4
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-4), step


def bf16_spec(base: Path, method: str, zero_stage: int) -> dict:
    return {
        "name": f"bf16-{method.replace('_', '-')}", "base_model": str(base), "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 32}, "method": {"method": method},
        "training": {"max_steps": 3, "batch_size": 8, "lr": 0.01, "eval_size": 16, "max_length": 16},
        "deepspeed": {"precision": "bf16", "zero_stage": zero_stage},
    }


def fp32_eval_loss(spec: dict, adapter: str) -> float:
    """The saved adapter in a fresh fp32 base, evaluated on the job's own held-out examples."""
    from jobs.base_models import load_base_model
    from jobs.spec import parse_job_spec
    from jobs.training.batches import Batches
    from jobs.training.data import load_for_job
    from jobs.training.recipe import evaluate

    job = parse_job_spec(spec)
    data = load_for_job(job.dataset, job.task, job.training)
    model, tokenizer = load_base_model(spec["base_model"], job.task, num_labels=len(data.labels))
    assert next(model.parameters()).dtype == torch.float32
    peft_methods.load_adapter(model, adapter)
    metrics = evaluate(model, Batches(job.task, tokenizer, job.training.max_length), data.eval, batch_size=8)
    return metrics["eval_loss"]


def check_bf16_result(spec: dict, result: dict) -> None:
    assert result["forwards_checked"] > 0  # the device hook saw the model's inputs
    (folder, metrics), = result["adapters"]
    tensors = load_file(Path(folder) / WEIGHTS_FILE)
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    assert floats and all(t.dtype == torch.float32 for t in floats.values()), {k: t.dtype for k, t in floats.items()}
    # Saved from the optimizer's fp32 masters: a bf16 module's values would all round-trip through bf16.
    assert any((t != t.bfloat16().float()).any() for t in floats.values())
    assert fp32_eval_loss(spec, folder) == pytest.approx(metrics["eval_loss"], abs=0.05)


def test_every_method_trains_in_bf16_and_its_adapter_loads_into_an_fp32_base(tmp_path, tiny_bert_dir):
    """bf16 under DeepSpeed's CPU accelerator (ZeRO-2) catches the dtype bugs a GPU would: buffers a
    method owns meeting bf16 parameters, adapters saved in bf16, inputs that never reach the device."""
    methods = peft_methods.list_methods()
    specs = [bf16_spec(tiny_bert_dir, method, zero_stage=2) for method in methods]
    results = run_recipe(tmp_path, specs)
    assert len(results) == len(methods)
    for method, spec, result in zip(methods, specs, results):
        try:
            check_bf16_result(spec, result)
        except AssertionError as e:
            raise AssertionError(f"{method}: {e}") from e


@pytest.mark.parametrize("method", ["lora", "far"])
def test_zero3_bf16_loads_partitioned_and_saves_fp32_masters(tmp_path, tiny_bert_dir, method):
    """ZeRO-3 in its own process (one bf16 ZeRO-3 engine per process, see STACK-NOTES): the base loads
    under zero.Init (asserted in the run), FAR reads the gathered base weights to choose its rows."""
    spec = bf16_spec(tiny_bert_dir, method, zero_stage=3)
    check_bf16_result(spec, run_recipe(tmp_path, spec))
