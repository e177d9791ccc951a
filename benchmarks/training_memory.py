"""Trainable-parameter share and peak training memory: full fine-tuning vs LoRA vs BitFit.

Each (model, method) runs in its own process so its peak RSS is its own. A run loads the base in
fp32, applies the method (or trains everything for "full"), takes a few AdamW steps on real data
and reports resident memory before and after training. Results go to benchmarks/results/.

    python benchmarks/training_memory.py            # all six runs, ~3 minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {  # model -> (task, dataset, batch size, max tokens)
    "minilm": ("sequence-classification", "trec", 32, 32),
    "smollm2": ("causal-lm", "chatterbot_qa", 8, 75),
}
METHODS = {"full": None, "lora": {"method": "lora", "r": 8}, "bitfit": {"method": "bitfit"}}
STEPS = 4


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so loading's transient copies are not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_run(model_name: str, method: str) -> dict:
    import torch

    import peft_methods
    from jobs.base_models import load_base_model
    from jobs.training.data import DATASETS

    torch.manual_seed(0)
    task, dataset, batch_size, max_length = MODELS[model_name]
    data = DATASETS[dataset](train_size=batch_size * STEPS)
    labels = getattr(data, "labels", None)
    rss_before = _status_mb("VmRSS")  # interpreter, torch, transformers and data: not the model's doing
    model, tokenizer = load_base_model(model_name, task, num_labels=len(labels) if labels else None)
    total = sum(p.numel() for p in model.parameters())
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if METHODS[method]:
        peft_methods.apply(model, METHODS[method])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    _reset_peak_rss()
    started = time.perf_counter()
    for step in range(STEPS):
        chunk = data.train[step * batch_size : (step + 1) * batch_size]
        if labels:
            batch = tokenizer(
                [t for t, _ in chunk], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            batch["labels"] = torch.tensor([y for _, y in chunk])
        else:
            batch = tokenizer(
                [f"{q}\n{a}" for q, a in chunk],
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / STEPS
    peak = _status_mb("VmHWM")
    return {
        "model": model_name, "method": method, "params": total, "trainable": trainable,
        "trainable_pct": 100 * trainable / total, "weights_mb": weights_mb, "rss_before_model_mb": rss_before,
        "peak_rss_mb": peak, "model_and_training_mb": peak - rss_before, "seconds_per_step": seconds,
        "batch": f"{batch_size}x{max_length}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return
    from jobs.base_models import resolve_base_model

    rows = []
    for model_name in args.models:
        resolve_base_model(model_name)  # convert SmolLM2's GGUF once, outside the measured runs
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", model_name, method], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Training memory: full fine-tuning vs LoRA vs BitFit (CPU, fp32)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), "
        f"torch threads default, {STEPS} AdamW steps. `python benchmarks/training_memory.py`.",
        "`peak RSS` is the peak while training (reset after loading, so load-time copies are not counted);",
        "`model+training` = that peak − RSS before loading the model (interpreter, libraries and data excluded);",
        "its ratio to the fp32 weights' size is what the seed's \"12–20× the weights\" claim is about.",
        "",
        "| model | method | trainable | share | weights MB | peak RSS MB | model+training MB | ÷ weights | s/step | "
        "batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f}% | "
            f"{r['weights_mb']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['model_and_training_mb']:.0f} | "
            f"{r['model_and_training_mb'] / r['weights_mb']:.1f}× | "
            f"{r['seconds_per_step']:.2f} | {r['batch']} |"
        )
    lines += [
        "",
        "What full fine-tuning costs beyond PEFT (fp32 gradients plus AdamW's two moments predict 3× the weights):",
    ]
    by = {(r["model"], r["method"]): r for r in rows}
    for model_name in args.models:
        full, lora = by[(model_name, "full")], by[(model_name, "lora")]
        delta = full["peak_rss_mb"] - lora["peak_rss_mb"]
        lines.append(f"- {model_name}: full − LoRA = {delta:.0f} MB = {delta / full['weights_mb']:.1f}× the weights")
    (RESULTS / "training_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
