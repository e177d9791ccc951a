"""The method table: every installed PEFT method on TREC with MiniLM, through the job path
(client → Ray → DeepSpeed → store), with one budget, next to full fine-tuning.

Budget: 2,000 training questions, 1 epoch, batch 16, ≤ 64 tokens, 1 worker with 2 CPUs; 1,000
held-out questions. Learning rates are each method's usual range (prompt tuning needs far larger
steps than LoRA); they are listed in the table. Full fine-tuning runs the same loop in-process.

    python benchmarks/method_table.py                   # ~12 minutes on 2 CPUs; writes benchmarks/results/
    python benchmarks/method_table.py --only far lora   # re-measure some rows of the last table
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TRAIN, EVAL, BATCH, MAX_LEN = 2000, 1000, 16, 64
LR = {
    "lora": 4e-3,
    "bitfit": 4e-3,
    "ia3": 4e-3,
    "bottleneck": 2e-3,
    "adamix": 2e-3,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
    "diff_pruning": 1e-4,
    "far": 2e-3,
    "ipt": 3e-2,
}  # diff pruning moves every weight: full-FT rates
IPT_SOURCES = 2000  # examples per source task of the IPT subspace
IPT_NOTE = (
    "IPT trains in a subspace fitted (an ipt-subspace job, d=8) on five prompt-tuning adapters of other tasks, "
    'trained first as jobs: movie sentiment (3 seeds) and TREC one-vs-rest "location?" and "number?" '
    "({n} examples each); its trainable count is d + the head."
)
FULL_LR = 1e-4


def full_fine_tuning() -> dict:
    """The baseline: every weight trains, plain torch loop, same data and batches."""
    import random

    import torch

    from jobs.base_models import load_base_model
    from jobs.training.batches import Batches
    from jobs.training.data import load_trec
    from jobs.training.recipe import evaluate

    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = load_trec(eval_size=EVAL, train_size=TRAIN)
    model, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=len(data.labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=FULL_LR, weight_decay=0.01)
    order = list(data.train)
    random.Random(0).shuffle(order)
    times = []
    model.train()
    for i in range(0, len(order) - BATCH + 1, BATCH):
        chunk = order[i : i + BATCH]
        start = time.perf_counter()
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        model(**enc, labels=torch.tensor([y for _, y in chunk])).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    batches = Batches("sequence-classification", tokenizer, MAX_LEN)
    accuracy = evaluate(model, batches, data.eval, batch_size=64)["eval_accuracy"]
    total = sum(p.numel() for p in model.parameters())
    return {"method": "full fine-tuning", "eval_accuracy": accuracy, "trainable_pct": 100.0, "trainable": total,
            "adapter_bytes": total * 4, "seconds_per_step": statistics.median(times[5:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lr": FULL_LR,
            "inference_ratio": 1.0, "overhead": "none (a whole new model per task)"}


def forward_ratio(base, adapted, tokenizer, texts) -> float:
    """Median forward time of ``adapted`` over ``base``, measured alternately after a warm-up."""
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    times: dict[int, list[float]] = {id(base): [], id(adapted): []}
    with torch.no_grad():
        for i in range(24):
            for model in (base, adapted):
                model.eval()
                start = time.perf_counter()
                model(**enc)
                if i >= 4:
                    times[id(model)].append(time.perf_counter() - start)
    return statistics.median(times[id(adapted)]) / statistics.median(times[id(base)])


def ipt_subspace(client) -> str:
    """IPT's first step, as jobs: prompt-tuning adapters for tasks other than the 6-way TREC table task
    (movie sentiment with three seeds; TREC's "location?" and "number?" one-vs-rest questions),
    then an ipt-subspace job over them. Returns the subspace's name."""
    from jobs.training.data import trec_rows

    folder = Path(tempfile.mkdtemp())
    rows = trec_rows()
    tasks = [{"name": "movie_sentiment", "seed": s} for s in (0, 1, 2)]
    for target in ("LOC", "NUM"):
        path = folder / f"trec-is-{target.lower()}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"text": q, "label": "yes" if y == target else "no"}) + "\n" for q, y in sorted(rows.items())
            )
        )
        tasks.append({"path": str(path), "seed": 0})
    sources = []
    for i, task in enumerate(tasks):
        seed = task.pop("seed")
        sources.append(
            client.submit(
                {
                    "name": f"ipt-source-{i}",
                    "base_model": "minilm",
                    "task": "sequence-classification",
                    "dataset": {**task, "train_size": IPT_SOURCES},
                    "method": {"method": "prompt_tuning"},
                    "tags": ["ipt-table-source"],
                    "training": {
                        "epochs": 1,
                        "batch_size": BATCH,
                        "lr": LR["prompt_tuning"],
                        "eval_size": 500,
                        "max_length": MAX_LEN,
                        "seed": seed,
                    },
                    "resources": {"num_workers": 1, "cpus_per_worker": 2},
                }
            )
        )
    for handle in sources:
        job = handle.wait(progress=False)
        print(
            f"IPT source {job.name} ({job.task_name}): {job.state}, eval_accuracy "
            f"{handle.metrics('eval_accuracy')[-1].value:.3f}",
            flush=True,
        )
    fit = client.submit(
        {
            "kind": "ipt-subspace",
            "name": "table-subspace",
            "base_model": "minilm",
            "sources": {"tag": "ipt-table-source"},
            "intrinsic_dim": 8,
            "resources": {"num_workers": 1, "cpus_per_worker": 2},
        }
    )
    job = fit.wait(progress=False)
    if job.state.value != "SUCCEEDED":
        raise RuntimeError(f"the IPT subspace job failed: {job.error}")
    subspace = fit.subspace()
    print(f"IPT subspace {subspace.name}: d={subspace.intrinsic_dim}, {len(subspace.sources)} sources, "
          f"reconstruction error {subspace.metrics['reconstruction_relative_error']:.4f}", flush=True)
    return subspace.name


def through_jobs(methods: list[str]) -> list[dict]:
    import torch

    import peft_methods
    from jobs.base_models import load_base_model
    from orchestrator import Client

    torch.set_num_threads(2)
    client = Client(home=tempfile.mkdtemp(), num_cpus=2)
    rows = []
    for method in methods:
        handle = client.submit(
            {
                "name": f"table-{method.replace('_', '-')}",
                "base_model": "minilm",
                "task": "sequence-classification",
                "dataset": {"name": "trec", "train_size": TRAIN},
                "method": {"method": "ipt", "subspace": ipt_subspace(client)}
                if method == "ipt"
                else {"method": method},
                "training": {
                    "epochs": 1,
                    "batch_size": BATCH,
                    "lr": LR.get(method, 4e-3),
                    "eval_size": EVAL,
                    "max_length": MAX_LEN,
                },
                "resources": {"num_workers": 1, "cpus_per_worker": 2},
            }
        )
        job = handle.wait(progress=False)
        if job.state.value != "SUCCEEDED":
            rows.append({"method": method, "error": job.error})
            continue
        latest = {m.name: m.value for m in handle.metrics()}
        logged = handle.metrics("train_loss")
        per_step = statistics.median((b.at - a.at) / (b.step - a.step) for a, b in zip(logged[1:], logged[2:]))
        adapter = handle.adapter()
        base, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=6)
        texts = [f"what is question number {i} about ?" for i in range(64)]
        adapted = client.adapters.load(
            adapter.name, load_base_model("minilm", "sequence-classification", num_labels=6)[0]
        )
        rows.append(
            {
                "method": method,
                "eval_accuracy": latest["eval_accuracy"],
                "trainable_pct": 100 * latest["trainable_parameters"] / latest["total_parameters"],
                "trainable": int(latest["trainable_parameters"]),
                "adapter_bytes": adapter.size_bytes,
                "seconds_per_step": per_step,
                "peak_rss_mb": latest["peak_rss_mb"],
                "lr": LR.get(method, 4e-3),
                "inference_ratio": forward_ratio(base, adapted, tokenizer, texts),
                "overhead": peft_methods.get_method(method).inference_overhead,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(only: list[str]) -> None:
    """All methods and full fine-tuning, or (``--only m1 m2``) re-measure some rows of the last table."""
    import peft_methods

    if only:
        previous = {r["method"]: r for r in json.loads((RESULTS / "method_table.json").read_text())}
        previous.update({r["method"]: r for r in through_jobs(only)})
        rows = list(previous.values())
    else:
        full = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--full"], capture_output=True, text=True, check=True
            ).stdout.splitlines()[-1]
        )
        rows = through_jobs(peft_methods.list_methods()) + [full]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "method_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# PEFT methods on TREC with MiniLM, one budget (CPU, fp32)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs ({platform.machine()}), `python "
        "benchmarks/method_table.py`.",
        f"{TRAIN} training / {EVAL} held-out questions, 1 epoch, batch {BATCH}, ≤ {MAX_LEN} tokens; PEFT rows ran as "
        "jobs "
        "(1 Ray Train worker × 2 CPUs, DeepSpeed ZeRO-0); peak RSS is the training worker's. Inference ×: unmerged "
        "adapter forward time / base forward time, batch 64, measured alternately (mergeable methods cost 1.0× once "
        "merged).",
        "",
        "| method | lr | eval accuracy | trainable | trainable % | adapter file | s/step | peak RSS MB | inference × "
        "| overhead (declared) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['eval_accuracy']:.3f} | {r['trainable']:,} | "
            f"{r['trainable_pct']:.3f}% | "
            f"{r['adapter_bytes'] / 1024:,.0f} KiB | {r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['inference_ratio']:.2f} | {r['overhead']} |"
        )
    if any(r["method"] == "ipt" for r in rows):
        lines += ["", IPT_NOTE.format(n=IPT_SOURCES)]
    (RESULTS / "method_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--full"]:
        print(json.dumps(full_fine_tuning()))
    else:
        main(sys.argv[2:] if sys.argv[1:2] == ["--only"] else [])
