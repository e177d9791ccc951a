"""Every registered method learns: on the pretrained MiniLM and a small fixed TREC slice, each method's job
beats the head-only baseline (the linear probe, trained the same way) by at least 3 accuracy points, and its
training loss falls. A method whose own parameters stopped mattering (a zeroed delta, a detached adapter)
scores like the head-only row and fails here.

The jobs run the real recipe (DeepSpeed engine, gloo, the method's default learning rates and the job's
default head rate) in one process without Ray (tests/jobs/recipe_runs.py), about half a minute each on
2 CPUs.
IPT trains in a subspace fitted, as its paper does, on prompt-tuning adapters of other tasks (trained here
first, on the same budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peft_methods
from jobs.spec import SubspaceSpec
from peft_methods.adapter_files import WEIGHTS_FILE
from peft_methods.ipt import fit_subspace, save_subspace
from peft_methods.virtual_tokens import PROMPT_KEY

pytestmark = pytest.mark.learning

MARGIN = 0.03  # accuracy points over the head-only row
METHODS = [m for m in peft_methods.list_methods() if m != "head_only"]
TRAINING = {"epochs": 3, "batch_size": 16, "eval_size": 200, "max_length": 32, "seed": 0}
SLICE = 480  # TREC training questions: 30 steps per epoch
# Method settings other than the defaults, for this budget (90 steps): at the default 0.5% the gates of a
# 45-step first phase cannot close, so the projection at the switch discards most of a dense diff (loss
# 1.28 -> 1.63, measured 2026-12-02); at 5% both phases still run and the projection keeps what was learned.
# The method table's 375-step jobs use the default.
SETTINGS = {"diff_pruning": {"target_sparsity": 0.05}}


def _spec(name: str, method: dict, dataset: dict | None = None) -> dict:
    return {"name": name, "base_model": "minilm", "task": "sequence-classification",
            "dataset": dataset or {"name": "trec", "train_size": SLICE}, "method": method, "training": TRAINING}


def _run(specs: list[dict], folder: Path) -> list[dict]:
    """The specs' jobs, one after another, in one fresh process (see tests/jobs/recipe_runs.py)."""
    spec_file, out = folder / "specs.json", folder / "out.json"
    spec_file.write_text(json.dumps(specs))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.jobs.recipe_runs", str(spec_file), str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _source_tasks(folder: Path) -> list[dict]:
    """Other tasks than the 6-way TREC one, for IPT's subspace: movie sentiment, and TREC one-vs-rest
    "is it a location?" / "is it a number?" questions (a JSONL file each)."""
    from jobs.training.data import trec_rows

    rows = sorted(trec_rows().items())[:SLICE]
    tasks = [{"name": "movie_sentiment", "train_size": SLICE}]
    for target in ("LOC", "NUM"):
        path = folder / f"trec-is-{target.lower()}.jsonl"
        path.write_text("".join(json.dumps({"text": q, "label": "yes" if y == target else "no"}) + "\n"
                                for q, y in rows))
        tasks.append({"path": str(path)})
    return tasks


def _subspace(sources: list[dict], folder: Path) -> Path:
    prompts = torch.stack([load_file(Path(r["adapters"][0][0]) / WEIGHTS_FILE)[PROMPT_KEY].float() for r in sources])
    fields = SubspaceSpec.model_fields  # an ipt-subspace job's defaults
    tensors, init, _ = fit_subspace(prompts, intrinsic_dim=len(sources), inner_dim=fields["inner_dim"].default,
                                    steps=fields["steps"].default, lr=fields["lr"].default, seed=0)
    n, hidden = prompts.shape[1:]
    return save_subspace(folder / "subspace", tensors, init, num_virtual_tokens=n, hidden_size=hidden)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("learn")
    tasks = _source_tasks(folder)
    first = [_spec(f"learn-{m.replace('_', '-')}", {"method": m, **SETTINGS.get(m, {})})
             for m in ["head_only", *METHODS] if m != "ipt"]
    first += [_spec(f"ipt-source-{i}", {"method": "prompt_tuning"}, task) for i, task in enumerate(tasks)]
    ran = _run(first, folder)
    by_method = {spec["method"]["method"]: r for spec, r in zip(first, ran) if spec["name"].startswith("learn-")}
    if "ipt" in METHODS:
        subspace = _subspace(ran[-len(tasks):], folder)
        (by_method["ipt"],) = _run([_spec("learn-ipt", {"method": "ipt", "subspace": str(subspace)})], folder)
    return by_method


def _final(result: dict, metric: str) -> float:
    return [v for _, k, v in result["recorded"] if k == metric][-1]


# Measured misses (2026-12-02, this budget, head only 0.330): strict, so a method that starts to learn here
# fails the suite until its mark is removed.
MISSES = {
    "ipt": "0.265 < head only 0.330 at its default lr 0.03 (0.28, 0.255, 0.265 at 0.1, 0.3, 0.01). The fresh head "
           "is what fails: reading the pooled first position, now a decoded virtual token, it learns nothing in 90 "
           "steps even with z pinned at the exact prompt of a source trained on another half of TREC (0.235; that "
           "source's own job, whose head co-adapted, scored 0.71); at head_lr 0.02 IPT reaches 0.295-0.335 and head "
           "only 0.38. Three to four numbers cannot adapt the prompt to a random head the way prompt tuning's 7,680 do",
}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=MISSES[m]))
                                    if m in MISSES else m for m in METHODS])
def test_method_beats_the_head_only_baseline_and_its_loss_falls(results, method):
    accuracy, probe = _final(results[method], "eval_accuracy"), _final(results["head_only"], "eval_accuracy")
    assert accuracy >= probe + MARGIN, f"{method}: eval accuracy {accuracy:.3f}, head only {probe:.3f}"
    losses = [v for _, k, v in results[method]["recorded"] if k == "train_loss"]
    # The last third of the steps against the first, by at least 2%: with the head at its default rate the
    # cross-entropy of slowly learning methods falls little in 90 steps (head only: 4%, prompt tuning: 3%)
    # even while their accuracy rises; a method that destabilises training (loss flat or rising) fails.
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    assert last < 0.98 * first, f"{method}: training loss went from {first:.3f} to {last:.3f}"


def test_head_only_trains_only_the_head(results):
    started = dict(results["head_only"]["events"][0][1])
    assert 0 < started["trainable_parameters"] < 0.001 * started["total_parameters"]  # 384 × 6 + 6 of 22.7M
