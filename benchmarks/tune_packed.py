"""Packed sweeps against one trial per Ray Train worker group, on TREC with MiniLM, side by side in one run.

Four sweeps of the same 8-configuration LoRA grid (learning rate × rank), then a 32-configuration grid:

- ``solo-fifo``: today's path — every trial its own Ray Train worker (0.9 CPU, 1 thread) and DeepSpeed
  engine, 2 trials at a time, every trial to the end.
- ``packed-fifo``: every trial a member of one base group (1.9 CPUs, 2 threads) on one resident MiniLM,
  all 8 at once, every trial to the end.
- ``packed-asha``: the same with ASHA (grace period 1 evaluation, reduction factor 2).
- ``grid32-packed`` / ``grid32-solo``: a 32-configuration grid (8 learning rates × 4 ranks, one epoch),
  packed (8 at once) and solo (2 at a time).

Every sweep ranks trials by held-out loss. Compared: wall time, trial-steps (the optimizer steps every
trial took: the compute a sweep spent), the best configuration and its held-out accuracy. Targets (issue
"Packed sweeps"): packed FIFO ≤ 0.7× solo FIFO's wall time on 2 CPUs with the same best configuration and
accuracy within 0.5 point; packed ASHA ≤ 50% of packed FIFO's trial-steps with the best accuracy within
1 point; the 32-configuration grid finishes.

    python benchmarks/tune_packed.py            # ~40 minutes on 2 CPUs; writes benchmarks/results/tune_packed.{md,json}
    python benchmarks/tune_packed.py --no-32    # the 8-configuration sweeps only
    python benchmarks/tune_packed.py --report   # the tables again, from results/tune_packed.partial.json
    python benchmarks/tune_packed.py --only grid32-packed   # re-measure some sweeps, keep the others' results
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tune_asha import timed_sweep  # run as a script, so its folder is on the path

RESULTS = Path(__file__).parent / "results"
SPEC = {
    "name": "packed-bench", "base_model": "minilm", "task": "sequence-classification",
    "dataset": {"name": "trec", "train_size": 1000},
    "method": {"method": "lora", "r": 8},
    "training": {"epochs": 3, "batch_size": 16, "eval_size": 500, "max_length": 64, "eval_every_steps": 31,
                 "base_dropout": 0.0},
    "resources": {"num_workers": 1},
}
GRID8 = {"training.lr": {"grid": [3e-4, 1e-3, 3e-3, 1e-2]}, "method.r": {"grid": [4, 16]}}
GRID32 = {"training.lr": {"grid": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2]},
          "method.r": {"grid": [2, 4, 8, 16]}}
SOLO = {"packing": "off", "resources": {"num_workers": 1, "cpus_per_worker": 0.9}}
PACKED = {"packing": "auto", "resources": {"num_workers": 1, "cpus_per_worker": 1.9}}


def sweep(client, label: str, space: dict, how: dict, scheduler: str, *, epochs: int = 3) -> dict:
    # 3 epochs: evaluated every 31 steps; the one-epoch 32-configuration grid: evaluated once, at its end
    training = {**SPEC["training"], "epochs": epochs}
    if epochs == 1:
        training["eval_every_steps"] = None
    spec = {**SPEC, **how, "training": training}
    record, wall, trials = timed_sweep(client, spec, scheduler, search_space=space, name=f"bench-{label}",
                                       max_concurrent=2 if how is SOLO else None)
    for t in trials:
        t["steps"] = steps_taken(client.store, t["job"])
    finished = [t for t in trials if t["state"] == "SUCCEEDED" and t["eval_loss"] is not None]
    best = min(finished, key=lambda t: t["eval_loss"])
    return {
        "sweep": label, "state": record.state, "packing": record.runtime.get("packing"), "wall_seconds": wall,
        "trial_steps": sum(t["steps"] for t in trials), "best_params": best["params"],
        "best_accuracy": best["eval_accuracy"], "best_loss": best["eval_loss"],
        "groups": sorted({t["group"] for t in trials if t["group"]}),
        "trials": [{k: t[k] for k in ("name", "state", "eval_accuracy", "eval_loss", "evaluations", "steps",
                                      "seconds", "params", "group")} for t in trials],
    }


def steps_taken(store, job_id: str) -> int:
    """The optimizer steps a trial's job took: all of them when it finished, else up to where it left."""
    job = store.get(job_id)
    if job.state.value == "SUCCEEDED":
        return int(store.metrics(job_id, "total_steps")[-1].value)
    left = job.runtime.get("left_group")
    if left:
        return int(left["step"])
    return max((m.step for m in store.metrics(job_id)), default=0)


def main() -> None:
    from orchestrator import Client

    if "--report" in sys.argv[1:]:  # only write the tables, from the runs a previous invocation saved
        report(json.loads((RESULTS / "tune_packed.partial.json").read_text()))
        return
    args = sys.argv[1:]
    only = set(args[args.index("--only") + 1].split(",")) if "--only" in args else None
    plan = [("solo-fifo", GRID8, SOLO, "fifo", 3), ("packed-fifo", GRID8, PACKED, "fifo", 3),
            ("packed-asha", GRID8, PACKED, "asha", 3)]
    if "--no-32" not in args:
        plan += [("grid32-packed", GRID32, PACKED, "fifo", 1), ("grid32-solo", GRID32, SOLO, "fifo", 1)]
    saved = RESULTS / "tune_packed.partial.json"
    runs = json.loads(saved.read_text()) if only and saved.exists() else []  # --only re-measures some, keeps others
    client = Client(home=tempfile.mkdtemp(), num_cpus=os.cpu_count())
    RESULTS.mkdir(exist_ok=True)
    for label, space, how, scheduler, epochs in plan:
        if only is None or label in only:
            runs = [r for r in runs if r["sweep"] != label] + [sweep(client, label, space, how, scheduler,
                                                                     epochs=epochs)]
            saved.write_text(json.dumps(runs, indent=2) + "\n")  # survives a crash
    report(runs)


def report(runs: list[dict]) -> None:
    by = {r["sweep"]: r for r in runs}
    with_32 = "grid32-packed" in by
    solo, packed, asha = by["solo-fifo"], by["packed-fifo"], by["packed-asha"]
    findings = {
        "packed_over_solo_wall": packed["wall_seconds"] / solo["wall_seconds"],
        "same_best_config": packed["best_params"] == solo["best_params"],
        "packed_accuracy_gap_points": 100 * (solo["best_accuracy"] - packed["best_accuracy"]),
        "asha_share_of_packed_fifo_steps": asha["trial_steps"] / packed["trial_steps"],
        "asha_accuracy_gap_points": 100 * (packed["best_accuracy"] - asha["best_accuracy"]),
    }
    if with_32:
        grid_packed = by["grid32-packed"]["wall_seconds"]
        grid_solo = by["grid32-solo"]["wall_seconds"] if "grid32-solo" in by else None
        findings["grid32_packed_over_solo_wall"] = grid_packed / grid_solo if grid_solo else None
    report = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "runs": runs, "findings": findings}
    (RESULTS / "tune_packed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Packed sweeps: TREC / MiniLM LoRA grids, trials packed in one base group vs one worker group each",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs, `python benchmarks/tune_packed.py` (all "
        "sweeps in one run, one after another, on one local Ray cluster). 8-configuration grid: `training.lr` ∈ "
        "{3e-4, 1e-3, 3e-3, 1e-2} × `method.r` ∈ {4, 16}; 1,000 training questions, 3 epochs (186 steps), held-out "
        "loss and accuracy on 500 every 31 steps (trials ranked by loss). Solo: 1 Ray Train worker × 0.9 CPU per "
        "trial, 2 at a time. Packed: one base group of 1.9 CPUs (2 threads), all trials at once. Trial-steps = Σ "
        "optimizer steps each trial took."
        + (" 32-configuration grid: `training.lr` ∈ {1e-4 … 2e-2} (8) × `method.r` ∈ {2, 4, 8, 16}, 1 epoch (62 "
           "steps, held-out accuracy at its end), packed 8 at a time vs solo 2 at a time." if with_32 else ""),
        "",
        "| sweep | state | wall seconds | trial-steps | best config (lr, r) | best accuracy | finished / stopped |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        done = sum(t["state"] == "SUCCEEDED" for t in r["trials"])
        stopped = sum(t["state"] == "STOPPED" for t in r["trials"])
        p = r["best_params"]
        lines.append(f"| {r['sweep']} | {r['state']} | {r['wall_seconds']:.0f} | {r['trial_steps']} | "
                     f"{p['training.lr']:g}, {p['method.r']} | {r['best_accuracy']:.3f} | {done} / {stopped} |")
    f = findings
    gap, asha_gap = f["packed_accuracy_gap_points"], f["asha_accuracy_gap_points"]
    lines += [
        "",
        f"- Packed FIFO took {f['packed_over_solo_wall']:.2f}× solo FIFO's wall time (target ≤ 0.7× on 2 CPUs: "
        f"{'met' if f['packed_over_solo_wall'] <= 0.7 else 'MISSED'}); best configuration "
        f"{'the same' if f['same_best_config'] else 'DIFFERENT'}; its accuracy {gap:+.1f} points below solo's "
        f"(target within 0.5: {'met' if abs(gap) <= 0.5 else 'MISSED'}).",
        f"- Packed ASHA spent {100 * f['asha_share_of_packed_fifo_steps']:.0f}% of packed FIFO's trial-steps (target "
        f"≤ 50%: {'met' if f['asha_share_of_packed_fifo_steps'] <= 0.5 else 'MISSED'}); its best accuracy "
        f"{asha_gap:+.1f} points below packed FIFO's (target within 1: {'met' if abs(asha_gap) <= 1 else 'MISSED'}).",
    ]
    if with_32:
        lines.append(f"- The 32-configuration grid finished packed in {grid_packed:.0f} s" + (
            f", {f['grid32_packed_over_solo_wall']:.2f}× the solo path's {grid_solo:.0f} s." if grid_solo
            else " (the solo path was not run for it)."))
    lines += ["", "| sweep | trial | lr | r | state | steps | held-out accuracy | held-out loss |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in runs[:3]:
        for t in r["trials"]:
            acc = "-" if t["eval_accuracy"] is None else f"{t['eval_accuracy']:.3f}"
            loss = "-" if t["eval_loss"] is None else f"{t['eval_loss']:.4f}"
            lines.append(f"| {r['sweep']} | {t['name'].rsplit('-', 1)[-1]} | {t['params']['training.lr']:g} | "
                         f"{t['params']['method.r']} | {t['state']} | {t['steps']} | {acc} | {loss} |")
    (RESULTS / "tune_packed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
