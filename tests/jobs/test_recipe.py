"""The training recipe on its own: no Ray, no store — an in-memory reporter and a one-rank gloo group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peft_methods
from tests.conftest import save_tiny_bert

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def run_recipe(tmp_path: Path, spec: dict, resume: str | None = None) -> dict:
    spec_file, out = tmp_path / f"spec-{resume is not None}.json", tmp_path / f"out-{resume is not None}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}  # as a launcher would set
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


def losses(result: dict) -> dict[int, float]:
    return {step: value for step, name, value in result["recorded"] if name == "train_loss"}


def test_the_recipe_trains_checkpoints_and_resumes_without_ray(tmp_path, tiny_bert_dir):
    spec = {
        "name": "recipe", "base_model": str(tiny_bert_dir), "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 64}, "method": {"method": "lora", "r": 4},
        "training": {"epochs": 1, "batch_size": 8, "lr": 0.01, "eval_size": 32, "max_length": 32,
                     "checkpoint_every_steps": 4, "eval_every_steps": 4},
    }
    full = run_recipe(tmp_path, spec)
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

    # Resuming from the step-4 checkpoint continues the same trajectory.
    (_, checkpoint), = full["checkpoints"]
    resumed = run_recipe(tmp_path, spec, resume=checkpoint)
    start = resumed["events"][0][1]
    assert start["resumed"] and start["step"] == 4
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-4), step
