"""`make demo`: fine-tune LoRA on MiniLM for TREC question types, tracked in the job store.

The job is submitted to the store (SQLite under $PEFTFLEET_HOME), trained in this process, its
metrics recorded, and its adapter registered and promoted for the task. Later the training runs
on Ray workers with DeepSpeed and the demo ends by serving the adapter.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections import Counter

import torch
import transformers

import peft_methods
from jobs.base_models import load_base_model
from jobs.data import load_for_job
from jobs.local_training import evaluate_classifier, train_classifier
from jobs.spec import parse_job_spec
from jobs.states import JobState
from jobs.store import JobStore


def demo_spec(train_size: int, eval_size: int, epochs: int, rank: int, lr: float) -> dict:
    return {
        "name": "demo-trec-lora",
        "base_model": "minilm",
        "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": train_size},
        "method": {"method": "lora", "r": rank, "alpha": 2 * rank},
        "training": {"epochs": epochs, "batch_size": 16, "lr": lr, "eval_size": eval_size, "max_length": 64},
        "tags": ["demo"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected

    store = JobStore()
    spec = parse_job_spec(demo_spec(args.train_size, args.eval_size, args.epochs, args.rank, args.lr))
    job = store.submit(spec)
    base = store.register_base_model(spec.base_model)
    print(f"job {job.id[:8]} submitted to {store.url}; base {spec.base_model} = {base.fingerprint[:19]}…")
    try:
        result = _run(store, job.id, spec, base.fingerprint)
    except BaseException as e:
        store.transition(job.id, JobState.FAILED, reason="demo crashed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        raise
    store.transition(job.id, JobState.SUCCEEDED, reason="adapter registered")
    print(f"job {job.id[:8]}: {store.get(job.id).state}; adapter {result['adapter']!r} promoted for task 'trec'")
    return result


def _run(store: JobStore, job_id: str, spec, fingerprint: str) -> dict:
    store.transition(job_id, JobState.RUNNING, reason="training in the demo process")
    torch.manual_seed(spec.training.seed)
    data = load_for_job(spec.dataset, spec.task, spec.training)
    majority = max(Counter(y for _, y in data.eval).values()) / len(data.eval)
    model, tokenizer = load_base_model(spec.base_model, spec.task, num_labels=len(data.labels))
    print(f"TREC: {len(data.train)} train / {len(data.eval)} held-out questions, labels {data.labels}")
    before = evaluate_classifier(model, tokenizer, data.eval, max_length=spec.training.max_length)
    print(f"accuracy before fine-tuning: {before:.3f}  (majority class {majority:.3f})")

    peft_methods.apply(model, spec.method)
    trainable, total = peft_methods.get_method("lora").num_adapter_parameters(model), sum(p.numel() for p in model.parameters())
    print(f"LoRA r={spec.method.r} on query/value + classifier: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    def progress(step: int, loss: float) -> None:
        if step % 25 == 0:
            store.record_metrics(job_id, step, {"train_loss": loss})
            print(f"  step {step:4d}  loss {loss:.3f}", flush=True)

    t = spec.training
    stats = train_classifier(model, tokenizer, data.train, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, max_length=t.max_length, seed=t.seed, on_step=progress)
    after = evaluate_classifier(model, tokenizer, data.eval, max_length=t.max_length)
    store.record_metrics(job_id, stats["steps"], {"eval_accuracy": after})
    print(f"trained {stats['steps']} steps in {stats['seconds']:.0f} s")
    print(f"accuracy after LoRA fine-tuning: {after:.3f}")

    name = f"{spec.name}-{job_id[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = peft_methods.save_adapter(model, f"{tmp}/adapter", metadata={"base_fingerprint": fingerprint, "job_id": job_id, "eval_accuracy": after})
        record = store.adapters.register(
            folder, name=name, base_fingerprint=fingerprint, task=spec.task, task_name=spec.effective_task_name,
            job_id=job_id, metrics={"eval_accuracy": after}, tags=spec.tags,
        )
    store.adapters.promote(name)
    fresh, _ = load_base_model(spec.base_model, spec.task, num_labels=len(data.labels))
    reloaded = evaluate_classifier(store.adapters.load(name, fresh), tokenizer, data.eval, max_length=t.max_length)
    print(f"adapter stored at {record.uri} ({record.size_bytes:,} bytes); reloaded into a fresh base: accuracy {reloaded:.3f}")
    return {"job_id": job_id, "adapter": name, "before": before, "after": after, "reloaded": reloaded, "majority": majority}


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
