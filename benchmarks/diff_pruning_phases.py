"""Diff pruning's two phases on TREC with MiniLM, run in-process through the training recipe (no Ray).

Each run trains one job (2000 training / 1000 held-out examples, batch 16, max_length 64, seed 0) and
records: held-out accuracy of the dense gated diff at the end of phase 1 (deterministic gates, not
projected), accuracy right after the projection to ``target_sparsity`` at the switch, final accuracy
after phase 2 (fine-tuning the kept entries with the mask fixed); the expected fraction of open gates
over phase 1; the fraction of entries changed; trainable parameters in each phase; adapter file size.

    python benchmarks/diff_pruning_phases.py --label default            # one run at the method's defaults
    python benchmarks/diff_pruning_phases.py --label lr3e-3 --lr 3e-3 --l0-weight 100 --epochs 1
    python benchmarks/diff_pruning_phases.py --full-ft --lr 5e-5         # full fine-tuning reference
    python benchmarks/diff_pruning_phases.py --report                    # the markdown table from the json

Runs append to benchmarks/results/diff_pruning_phases.json; --report writes diff_pruning_phases.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
JSON, MD = RESULTS / "diff_pruning_phases.json", RESULTS / "diff_pruning_phases.md"


def spec(args: argparse.Namespace) -> dict:
    method = {"method": "diff_pruning"}
    for key in ("l0_weight", "gate_lr", "fix_mask_at", "init_log_alpha", "target_sparsity"):
        if getattr(args, key) is not None:
            method[key] = getattr(args, key)
    training = {"epochs": args.epochs, "batch_size": 16, "eval_size": args.eval_size, "max_length": 64, "seed": 0,
                "checkpoint_every_steps": 10**6}
    if args.lr is not None:
        training["lr"] = args.lr
    if args.head_lr is not None:
        training["head_lr"] = args.head_lr
    return {"name": f"diff-phases-{args.label}", "base_model": "minilm", "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": args.train_size}, "method": method, "training": training}


def gate_stats(model) -> dict[str, float]:
    """Over all gates: the expected fraction open (P(z ≠ 0)) and the fraction whose deterministic gate is open."""
    import torch

    from peft_methods.diff_pruning import _diff_layers

    expected = opened = count = 0.0
    with torch.no_grad():
        for _, m in _diff_layers(model):
            expected += m.expected_l0().item()
            opened += (m.diff_log_alpha > 0).sum().item()  # deterministic gate > 0 iff log_alpha > 0 here
            count += m.diff_log_alpha.numel()
    return {"expected_open": expected / count, "deterministic_open": opened / count}


def run_diff(args: argparse.Namespace) -> dict:
    import torch

    import peft_methods
    from jobs.spec import parse_job_spec
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter
    from peft_methods.adapter_files import WEIGHTS_FILE
    from peft_methods.diff_pruning import _diff_layers, dense_diff, fix_mask_step

    record: dict = {"label": args.label, "spec": spec(args), "trace": []}

    class PhasedRecipe(Recipe):
        def begin_training(self) -> None:
            super().begin_training()
            self.eval_every = self.total_steps  # only the final evaluation; the switch is measured below
            self.switch = fix_mask_step(self.method_config, self.total_steps)
            self.trace_every = max(1, self.total_steps // 24)

        def train_step(self, micro):
            model = self.engine.module
            if self.step % self.trace_every == 0 or self.step == self.switch:
                record["trace"].append({"step": self.step, **gate_stats(model)})
                print(f"gates at step {self.step}: {record['trace'][-1]}", flush=True)
            if self.step == self.switch:  # end of phase 1: dense, then projected (what phase 2 starts from)
                with dense_diff(model):
                    record["phase1_dense"] = self.evaluate()
                record["phase1_projected"] = self.evaluate()
                record["switch_step"] = self.step
                print(f"switch at step {self.step}: dense {record['phase1_dense']}, "
                      f"projected {record['phase1_projected']}", flush=True)
            return super().train_step(micro)

    reporter = InMemoryReporter()
    recipe = PhasedRecipe(parse_job_spec(record["spec"]), reporter)
    started = time.perf_counter()
    recipe.run()
    record["seconds"] = round(time.perf_counter() - started, 1)
    model = recipe.engine.module
    layers = [m for _, m in _diff_layers(model)]
    targeted = sum(m.diff_delta.numel() for m in layers)
    kept = sum(m.keep for m in layers)
    base = sum(p.numel() for n, p in model.named_parameters() if not recipe.method.owns(model, n))
    head = recipe.summary["trainable_parameters"] - 2 * targeted
    with torch.no_grad():
        changed = sum(int(torch.count_nonzero(m.pruned_diff())) for m in layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = peft_methods.save_adapter(model, os.path.join(tmp, "a"))
        size = (Path(folder) / WEIGHTS_FILE).stat().st_size
    record.update({
        "final": reporter.values("eval_accuracy")[-1][1],
        "final_loss": reporter.values("eval_loss")[-1][1],
        "phase2_active": all(m.fixed for m in layers),
        "total_steps": recipe.total_steps,
        "targeted_entries": targeted, "kept_entries": kept, "nonzero_entries": changed,
        "fraction_of_targeted_changed": changed / targeted, "fraction_of_base_changed": changed / base,
        "trainable_phase1": recipe.summary["trainable_parameters"], "trainable_phase2": kept + head,
        "head_parameters": head, "adapter_bytes": size,
    })
    return record


def run_full_ft(args: argparse.Namespace) -> dict:
    """Full fine-tuning reference: every base weight and the head train (AdamW, the recipe's schedule,
    warm-up and gradient clipping; the head at head_lr), on the same data and batches."""
    import random

    import torch

    from jobs.base_models import init_task_head, load_base_model
    from jobs.spec import parse_job_spec
    from jobs.training.batches import Batches
    from jobs.training.data import load_for_job
    from jobs.training.recipe import evaluate, lr_lambda

    job = parse_job_spec(spec(args))
    t = job.training
    data = load_for_job(job.dataset, job.task, t)
    torch.manual_seed(t.seed)
    model, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=len(data.labels))
    init_task_head(model, t.seed)
    batches = Batches(job.task, tokenizer, t.max_length)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": t.lr}, {"params": head, "lr": t.head_lr}],
                                  weight_decay=t.weight_decay)
    per_epoch = len(data.train) // t.batch_size
    total = t.epochs * per_epoch
    warmup = int(t.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, warmup, total))
    started = time.perf_counter()
    model.train()
    for step in range(total):
        epoch, index = divmod(step, per_epoch)
        if index == 0:
            order = list(data.train)
            random.Random(t.seed + epoch).shuffle(order)
        loss = model(**batches(order[index * t.batch_size:(index + 1) * t.batch_size])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    metrics = evaluate(model, batches, data.eval, batch_size=t.batch_size)
    return {"label": args.label, "spec": spec(args), "full_ft": True, "final": float(metrics["eval_accuracy"]),
            "final_loss": float(metrics["eval_loss"]), "total_steps": total,
            "seconds": round(time.perf_counter() - started, 1)}


def report() -> None:
    runs = json.loads(JSON.read_text()) if JSON.exists() else []
    lines = [
        "# Diff pruning: phase 1 (gated diff + L0) then phase 2 (fixed mask), TREC / MiniLM",
        "",
        "2000 training / 1000 held-out examples, batch 16, max_length 64, seed 0, one CPU process through",
        "`jobs.training.recipe.Recipe` (no Ray). Produced by `python benchmarks/diff_pruning_phases.py ...`",
        "(each row's flags are its columns); `--report` writes this file from",
        "`diff_pruning_phases.json`.",
        "",
        "Columns: *dense* = held-out accuracy at the end of phase 1 with deterministic gates, unprojected;",
        "*projected* = the same model projected to the kept entries (what phase 2 starts from); *final* =",
        "after phase 2; *open* = expected fraction of open gates at the switch (P(z≠0), mean over gates);",
        "*changed* = nonzero entries of the final diff / entries of the targeted weights.",
        "",
        "| run | epochs | lr | head_lr | gate_lr | l0_weight | fix_mask_at | dense | projected | final | open "
        "| changed | trainable ph1 / ph2 | adapter | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if not r.get("completed", True):
            continue
        s, m = r["spec"]["training"], r["spec"]["method"]
        if r.get("full_ft"):
            lines.append(f"| {r['label']} (full FT) | {s['epochs']} | {s.get('lr', 1e-3):g} | "
                         f"{s.get('head_lr', 2e-3):g} | – | – | – | – | – | {r['final']:.3f} | – | 100% | all | – "
                         f"| {r['seconds']:.0f} |")
            continue
        switch = next((t for t in r["trace"] if t["step"] == r.get("switch_step")), None)
        open_at_switch = f"{switch['expected_open']:.4f}" if switch else "–"

        def acc(key, r=r):
            return f"{r[key]['eval_accuracy']:.3f}" if key in r else "–"

        lines.append(
            f"| {r['label']} | {s['epochs']} | {s.get('lr', 1e-3):g} | {s.get('head_lr', 2e-3):g} | "
            f"{m.get('gate_lr', 0.1):g} | {m.get('l0_weight', 1000.0):g} | {m.get('fix_mask_at', 0.5):g} | "
            f"{acc('phase1_dense')} | {acc('phase1_projected')} | {r['final']:.3f} | "
            f"{open_at_switch} | "
            f"{100 * r['fraction_of_targeted_changed']:.2f}% | "
            f"{r['trainable_phase1']:,} / {r['trainable_phase2']:,} | {r['adapter_bytes'] / 1024:.0f} KiB | "
            f"{r['seconds']:.0f} |"
        )
    unfinished = [r for r in runs if not r.get("completed", True)]
    if unfinished:
        lines += ["", "Runs stopped before their end (not in the table):", ""]
        lines += [f"- {r['label']}: {r['note']}" for r in unfinished]
    traced = [r for r in runs if r.get("trace") and r.get("completed", True)]
    if traced:
        lines += ["", "Expected fraction of open gates over phase 1 (step: P(z≠0) / deterministic gate open):", ""]
        for r in traced:
            points = ", ".join(f"{t['step']}: {t['expected_open']:.3f}/{t['deterministic_open']:.3f}"
                               for t in r["trace"] if r.get("switch_step") is None or t["step"] <= r["switch_step"])
            lines.append(f"- {r['label']}: {points}")
    MD.write_text("\n".join(lines) + "\n")
    print(MD.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=None, help="training.lr (the diff; full FT: the body)")
    p.add_argument("--head-lr", type=float, default=None)
    p.add_argument("--gate-lr", dest="gate_lr", type=float, default=None)
    p.add_argument("--l0-weight", dest="l0_weight", type=float, default=None)
    p.add_argument("--fix-mask-at", dest="fix_mask_at", type=float, default=None)
    p.add_argument("--init-log-alpha", dest="init_log_alpha", type=float, default=None)
    p.add_argument("--target-sparsity", dest="target_sparsity", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-ft", action="store_true", help="the full fine-tuning reference instead")
    p.add_argument("--report", action="store_true", help="only write the markdown from the json")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the json and markdown (smoke runs)")
    args = p.parse_args()
    global JSON, MD
    JSON, MD = args.results / JSON.name, args.results / MD.name
    if args.report:
        report()
        return
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    if not args.full_ft:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    record = run_full_ft(args) if args.full_ft else run_diff(args)
    if dist.is_initialized():
        dist.destroy_process_group()
    args.results.mkdir(parents=True, exist_ok=True)
    runs = json.loads(JSON.read_text()) if JSON.exists() else []
    JSON.write_text(json.dumps([*runs, record], indent=1) + "\n")
    summary = {k: v for k, v in record.items() if k not in ("trace", "spec")}
    print(json.dumps(summary, indent=1, default=str))
    if not math.isnan(record["final"]):
        report()


if __name__ == "__main__":
    main()
