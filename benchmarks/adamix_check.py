"""AdaMix against one bottleneck adapter on TREC with MiniLM, in-process (the job recipe, no Ray).

Budget: 2,000 training / 500 held-out questions, batch 16, <= 64 tokens, lr 2e-3 for the adapter,
training.head_lr (default) for the head, seed 0. For AdaMix it reports the eval accuracy of the
averaged adapter (what is saved and served) and of randomly routed models (each adapted sublayer
through one random down- and up-expert, as in training, dropout off), to show that averaging is safe.

    python benchmarks/adamix_check.py                      # 3 epochs, writes benchmarks/results/adamix_check.md
    python benchmarks/adamix_check.py --epochs 1 --only adamix-shared
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TRAIN, EVAL, BATCH, MAX_LEN, LR = 2000, 500, 16, 64, 2e-3
VARIANTS = {
    "bottleneck": {"method": "bottleneck"},
    "adamix": {"method": "adamix", "share_up": False},
    "adamix-shared": {"method": "adamix", "share_up": True},
    "adamix-shared-no-kl": {"method": "adamix", "share_up": True, "consistency_weight": 0.0},
    "adamix-no-kl": {"method": "adamix", "share_up": False, "consistency_weight": 0.0},
}
ROUTES = 5  # randomly routed models evaluated per AdaMix run


def routed_accuracy(model, batches, examples, seed: int) -> float:
    """Accuracy with the experts routed at random (their modules in training mode, everything else in eval)."""
    import torch

    from peft_methods.adamix import ExpertBank

    model.eval()
    for m in model.modules():
        if isinstance(m, ExpertBank):
            m.train()
    torch.manual_seed(seed)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(examples), BATCH):  # one route per batch of BATCH questions, as in training
            batch = batches(examples[i : i + BATCH])
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    model.eval()
    return correct / len(examples)


def run(name: str, method: dict, epochs: int) -> dict:
    from jobs.spec import parse_job_spec
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    spec = parse_job_spec({
        "name": f"adamix-check-{name}", "base_model": "minilm", "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": TRAIN}, "method": method,
        "training": {"epochs": epochs, "batch_size": BATCH, "lr": LR, "eval_size": EVAL, "max_length": MAX_LEN,
                     "seed": 0, "checkpoint_every_steps": 10**6},
    })
    reporter = InMemoryReporter()
    recipe = Recipe(spec, reporter, metadata={"base_fingerprint": "sha256:check", "job_id": name})
    start = time.perf_counter()
    recipe.run()
    seconds = time.perf_counter() - start
    accuracy = [v for _, k, v in reporter.recorded if k == "eval_accuracy"]
    row = {"variant": name, "method": method, "epochs": epochs, "eval_accuracy": accuracy[-1],
           "accuracy_per_epoch": accuracy, "seconds": round(seconds, 1)}
    if method["method"] == "adamix":
        model, data = recipe.engine.module, recipe.data.eval
        routed = [routed_accuracy(model, recipe.batches, data, seed) for seed in range(ROUTES)]
        row["routed_accuracy"] = routed
        row["routed_mean"] = statistics.mean(routed)
    return row


def report(rows: list[dict], command: str) -> str:
    lines = ["# AdaMix check: TREC / MiniLM, in-process recipe", "",
             f"`{command}`", "",
             f"{TRAIN} train / {EVAL} eval questions, batch {BATCH}, max_length {MAX_LEN}, adapter lr {LR}, "
             "head lr = training.head_lr default, seed 0, 2 shared CPUs. Routed = the same trained AdaMix "
             f"model with each adapted sublayer routed through a random down/up expert per batch ({ROUTES} "
             "route seeds; min-max). Seconds: wall time on 2 CPUs shared with other jobs whose load varied "
             "a lot between runs, not comparable.", "",
             "| variant | config | epochs | eval accuracy (averaged / served) | per epoch | routed, mean (min-max) "
             "| train+eval s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        routed = (f"{r['routed_mean']:.3f} ({min(r['routed_accuracy']):.3f}-{max(r['routed_accuracy']):.3f})"
                  if "routed_mean" in r else "—")
        config = ", ".join(f"{k}={v}" for k, v in r["method"].items() if k != "method") or "defaults"
        lines.append(f"| {r['variant']} | {config} | {r['epochs']} | {r['eval_accuracy']:.3f} | "
                     f"{' / '.join(f'{a:.3f}' for a in r['accuracy_per_epoch'])} | {routed} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    import torch
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=["adamix-shared", "bottleneck", "adamix"])
    parser.add_argument("--out", default=str(RESULTS / "adamix_check"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed asks for it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(["benchmarks/adamix_check.py", *sys.argv[1:]])
    rows = []
    for name in args.only:
        rows.append(run(name, VARIANTS[name], args.epochs))
        print(json.dumps(rows[-1]), flush=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))  # after every run: partial results survive
        out.with_suffix(".md").write_text(report(rows, command))
    dist.destroy_process_group()
    print(report(rows, command))


if __name__ == "__main__":
    main()
