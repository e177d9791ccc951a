"""`make demo`: fine-tune LoRA on MiniLM for TREC question types and show the accuracy it gains.

For now everything runs in this process; later it runs as a job through the client, Ray and
DeepSpeed, and ends by serving the adapter.
"""

from __future__ import annotations

import argparse
from collections import Counter
import time

import torch
import transformers

import peft_methods
from jobs.base_models import load_base_model
from jobs.data import load_trec
from jobs.home import peftfleet_home
from jobs.local_training import evaluate_classifier, train_classifier


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected

    torch.manual_seed(0)
    data = load_trec(eval_size=args.eval_size, train_size=args.train_size)
    model, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=len(data.labels))
    print(f"TREC: {len(data.train)} train / {len(data.eval)} held-out questions, labels {data.labels}")
    before = evaluate_classifier(model, tokenizer, data.eval)
    print(f"accuracy before fine-tuning: {before:.3f}  (majority class {_majority_rate(data.eval):.3f})")

    peft_methods.apply(model, {"method": "lora", "r": args.rank, "alpha": 2 * args.rank})
    method = peft_methods.get_method("lora")
    trainable, total = method.num_adapter_parameters(model), sum(p.numel() for p in model.parameters())
    print(f"LoRA r={args.rank} on query/value + classifier: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    def progress(step: int, loss: float) -> None:
        if step % 25 == 0:
            print(f"  step {step:4d}  loss {loss:.3f}", flush=True)

    stats = train_classifier(model, tokenizer, data.train, epochs=args.epochs, lr=args.lr, on_step=progress)
    after = evaluate_classifier(model, tokenizer, data.eval)
    print(f"trained {stats['steps']} steps in {stats['seconds']:.0f} s")
    print(f"accuracy after LoRA fine-tuning: {after:.3f}")

    out = peftfleet_home() / "adapters" / "demo-trec-lora"
    peft_methods.save_adapter(model, out, metadata={"dataset": "trec", "eval_accuracy": after}, overwrite=True)
    fresh, _ = load_base_model("minilm", "sequence-classification", num_labels=len(data.labels))
    reloaded = evaluate_classifier(peft_methods.load_adapter(fresh, out), tokenizer, data.eval)
    print(f"adapter saved to {out}; reloaded into a fresh base: accuracy {reloaded:.3f}")
    return {"before": before, "after": after, "reloaded": reloaded, "majority": _majority_rate(data.eval)}


def _majority_rate(examples) -> float:
    counts = Counter(y for _, y in examples)
    return max(counts.values()) / len(examples)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
