"""The method table: every installed PEFT method on MiniLM through the job path (client → Ray →
DeepSpeed → store), next to the head-only baseline (the linear probe, also a job) and full fine-tuning
(the same recipe, every weight trainable, in-process), with each method's default learning rates.

Configurations (2,000 training questions, batch 16, ≤ 64 tokens, 1 worker × 2 CPUs, 1,000 held out):
``trec-3ep`` TREC at 3 epochs, seeds 0, 1, 2 (the table's main columns: mean ± spread); ``trec-1ep``
TREC at 1 epoch and ``sentiment-1ep`` movie sentiment at 1 epoch, seed 0 each.

    python benchmarks/method_table.py                       # everything: about 2 hours on 2 CPUs
    python benchmarks/method_table.py --configs trec-3ep --seeds 0
    python benchmarks/method_table.py --only lora far       # re-measure some rows
    python benchmarks/method_table.py --report              # rewrite the table from the raw runs

Every finished run is appended to results/method_table.runs.json at once (a cut-off run loses one job);
a run already there is not repeated unless ``--again``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "method_table.runs.json"
TRAIN, EVAL, BATCH, MAX_LEN = 2000, 1000, 16, 64
CONFIGS = {  # name: (dataset, epochs, seeds)
    "trec-3ep": ("trec", 3, (0, 1, 2)),
    "trec-1ep": ("trec", 1, (0,)),
    "sentiment-1ep": ("movie_sentiment", 1, (0,)),
}
FULL = "full fine-tuning"
# Rows that run a method with other settings than its defaults: row name -> (method config, training settings).
VARIANTS = {
    "bottleneck (norms frozen)": ({"method": "bottleneck", "train_layer_norms": False}, {}),
    "prefix_tuning (MLP)": ({"method": "prefix_tuning", "prefix_projection": True}, {"lr": 5e-4}),
}
FULL_LR = 1e-4
IPT_SOURCES = 2000  # examples per source task of the IPT subspace
# What each paper reports, to read our numbers against (GLUE/SuperGLUE-scale models and budgets).
PAPER = {
    "head_only": "the baseline every method must beat",
    "lora": "≥ full FT on GLUE with RoBERTa/DeBERTa (Hu et al. 2021)",
    "bottleneck": "within 0.4 pt of full FT on GLUE with BERT-large (Houlsby et al. 2019)",
    "bottleneck (norms frozen)": "AdaMix's like-for-like baseline (its experts have this shape, norms frozen)",
    "prefix_tuning (MLP)": "Li & Liang's re-parametrisation (off by default here), at lr 5e-4",
    "adamix": "≥ full FT and > one adapter on GLUE (Wang et al. 2022)",
    "bitfit": "near full FT on GLUE with BERT-base/large, small data (Ben Zaken et al. 2021)",
    "diff_pruning": "within ~1 pt of full FT on GLUE at 0.5% changed (Guo et al. 2021)",
    "far": "≈ full FT on GLUE with DistilBERT/BERT, FFN units only (Vucetic et al. 2022)",
    "prefix_tuning": "≈ full FT on table-to-text, GPT-2/BART (Li & Liang 2021)",
    "prompt_tuning": "reaches full FT only at ~10B parameters; far below at small scale (Lester et al. 2021)",
    "ipt": "recovers most of prompt tuning in a ~5-dim subspace, large models (Qin et al. 2021)",
    "ia3": "> full FT few-shot with T0-3B (Liu et al. 2022)",
    FULL: "the reference",
}


def _spec(method: str, method_config: dict, dataset: str, epochs: int, seed: int, training: dict | None = None) -> dict:
    return {
        "name": f"table-{re.sub('[^a-z0-9]+', '-', method).strip('-')}-{dataset.replace('_', '-')}-{epochs}ep-s{seed}",
        "base_model": "minilm",
        "task": "sequence-classification",
        "dataset": {"name": dataset, "train_size": TRAIN},
        "method": method_config,
        "training": {"epochs": epochs, "batch_size": BATCH, "eval_size": EVAL, "max_length": MAX_LEN, "seed": seed,
                     "eval_every_steps": 10**6, **(training or {})},  # evaluated once, at the end
        "resources": {"num_workers": 1, "cpus_per_worker": 2},
        "packing": "off",  # one job at a time, each its own s/step and memory
    }


def full_fine_tuning(dataset: str, epochs: int, seed: int) -> dict:
    """Every weight trains through the jobs' own recipe (DeepSpeed engine, warm-up + linear decay, the
    fresh head at the head rate, the same batches), in this process: the head-only method with the whole
    base unfrozen, at the full-FT rate."""
    import socket

    import torch
    import torch.distributed as dist

    from jobs.spec import parse_job_spec
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    class FullFineTuning(Recipe):
        step_seconds: list[float] = []

        def setup_model(self) -> None:
            super().setup_model()
            self.model.requires_grad_(True)

        def train_step(self, micro):
            started = time.perf_counter()
            loss = super().train_step(micro)
            loss.item()  # the step is done
            self.step_seconds.append(time.perf_counter() - started)
            return loss

    torch.set_num_threads(2)
    os.environ.setdefault("LOCAL_RANK", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    spec = _spec("head_only", {"method": "head_only"}, dataset, epochs, seed)
    spec["training"]["lr"] = FULL_LR
    reporter = InMemoryReporter()
    recipe = FullFineTuning(parse_job_spec(spec), reporter)
    recipe.run()
    values = {k: v for _, k, v in reporter.recorded}
    total = recipe.summary["trainable_parameters"]
    return {"eval_accuracy": values["eval_accuracy"], "trainable": total, "base_parameters": total,
            "adapter_bytes": total * 4, "seconds_per_step": statistics.median(recipe.step_seconds[5:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lr": FULL_LR,
            "head_lr": recipe.spec.training.head_lr, "inference_ratio": 1.0,
            "overhead": "none (a whole new model per task)"}


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
    (movie sentiment with three seeds; TREC's "location?" and "number?" one-vs-rest questions), then an
    ipt-subspace job over them, at the largest dimension five sources allow. Returns the subspace's name."""
    from jobs.training.data import trec_rows

    folder = Path(tempfile.mkdtemp())
    rows = trec_rows()
    tasks = [({"name": "movie_sentiment"}, s) for s in (0, 1, 2)]
    for target in ("LOC", "NUM"):
        path = folder / f"trec-is-{target.lower()}.jsonl"
        path.write_text("".join(json.dumps({"text": q, "label": "yes" if y == target else "no"}) + "\n"
                                for q, y in sorted(rows.items())))
        tasks.append(({"path": str(path)}, 0))
    handles = []
    for i, (dataset, seed) in enumerate(tasks):
        spec = _spec("prompt_tuning", {"method": "prompt_tuning"}, "trec", 1, seed)
        spec.update(name=f"ipt-source-{i}", tags=["ipt-table-source"], dataset={**dataset, "train_size": IPT_SOURCES})
        spec["training"]["eval_size"] = 500
        handles.append(client.submit(spec))
    for handle in handles:
        job = handle.wait(progress=False)
        print(f"IPT source {job.name} ({job.task_name}): {job.state}, eval_accuracy "
              f"{handle.metrics('eval_accuracy')[-1].value:.3f}", flush=True)
    fit = client.submit({"kind": "ipt-subspace", "name": "table-subspace", "base_model": "minilm",
                         "sources": {"tag": "ipt-table-source"}, "intrinsic_dim": len(tasks),
                         "resources": {"num_workers": 1, "cpus_per_worker": 2}})
    job = fit.wait(progress=False)
    if job.state.value != "SUCCEEDED":
        raise RuntimeError(f"the IPT subspace job failed: {job.error}")
    subspace = fit.subspace()
    print(f"IPT subspace {subspace.name}: d={subspace.intrinsic_dim}, {len(subspace.sources)} sources, "
          f"reconstruction error {subspace.metrics['reconstruction_relative_error']:.4f}", flush=True)
    return subspace.name


class Jobs:
    """PEFT rows as jobs on one local Ray cluster; the IPT subspace is fitted once, when first needed."""

    def __init__(self) -> None:
        import torch

        from orchestrator import Client

        torch.set_num_threads(2)
        self.client = Client(home=tempfile.mkdtemp(), num_cpus=2)
        self._subspace: str | None = None

    def run(self, method: str, dataset: str, epochs: int, seed: int) -> dict:
        import peft_methods
        from jobs.base_models import load_base_model

        if method == "ipt" and self._subspace is None:
            self._subspace = ipt_subspace(self.client)
        config, training = VARIANTS.get(method) or ({"method": method}, {})
        if method == "ipt":
            config = {"method": "ipt", "subspace": self._subspace}
        handle = self.client.submit(_spec(method, config, dataset, epochs, seed, training))
        job = handle.wait(progress=False)
        if job.state.value != "SUCCEEDED":
            return {"error": job.error}
        latest = {m.name: m.value for m in handle.metrics()}
        logged = handle.metrics("train_loss")
        per_step = statistics.median((b.at - a.at) / (b.step - a.step) for a, b in zip(logged[1:], logged[2:]))
        adapter = handle.adapter()
        labels = {"trec": 6, "movie_sentiment": 2}[dataset]
        base, tokenizer = load_base_model("minilm", "sequence-classification", num_labels=labels)
        adapted = self.client.adapters.load(adapter.name,
                                            load_base_model("minilm", "sequence-classification", num_labels=labels)[0])
        texts = [f"what is question number {i} about ?" for i in range(64)]
        spec = handle.record().job_spec
        timed = dataset == "trec" and epochs == 3 and seed == 0  # the row's figures come from that run
        return {"eval_accuracy": latest["eval_accuracy"], "trainable": int(latest["trainable_parameters"]),
                "base_parameters": sum(p.numel() for p in base.parameters()),
                "adapter_bytes": adapter.size_bytes, "seconds_per_step": per_step,
                "peak_rss_mb": latest["peak_rss_mb"], "lr": spec.training.lr, "head_lr": spec.training.head_lr,
                "inference_ratio": forward_ratio(base, adapted, tokenizer, texts) if timed else None,
                "overhead": peft_methods.get_method(config["method"]).inference_overhead}


def _load_runs() -> list[dict]:
    return json.loads(RUNS.read_text()) if RUNS.exists() else []


def _key(r: dict) -> tuple:
    return r["method"], r["config"], r["seed"]


def measure(methods: list[str], configs: list[str], seeds: list[int] | None, again: bool) -> None:
    runs = _load_runs()
    done = {_key(r) for r in runs if "error" not in r}
    todo = [(c, s, m) for c in configs for s in CONFIGS[c][2] if seeds is None or s in seeds for m in methods]
    jobs = None
    for config, seed, method in todo:
        if (method, config, seed) in done and not again:
            continue
        dataset, epochs, _ = CONFIGS[config]
        started = time.perf_counter()
        if method == FULL:
            out = subprocess.run([sys.executable, __file__, "--full", dataset, str(epochs), str(seed)],
                                 capture_output=True, text=True)
            row = json.loads(out.stdout.splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
        else:
            jobs = jobs or Jobs()
            row = jobs.run(method, dataset, epochs, seed)
        row.update(method=method, config=config, seed=seed, wall_s=time.perf_counter() - started,
                   measured=time.strftime("%Y-%m-%d %H:%M"))
        print(json.dumps(row), flush=True)
        runs = [r for r in _load_runs() if _key(r) != _key(row)] + [row]
        RESULTS.mkdir(exist_ok=True)
        RUNS.write_text(json.dumps(runs, indent=1) + "\n")


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f} (n={len(values)})"


def _points(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def report() -> str:
    """results/method_table.{md,json} from the raw runs: per method, accuracy per configuration (mean ±
    population spread over seeds), and the rest from its 3-epoch TREC seed-0 run."""
    runs = [r for r in _load_runs() if "error" not in r]
    failed = [r for r in _load_runs() if "error" in r]
    base_params = next((r["base_parameters"] for r in runs if "base_parameters" in r), None)
    order = sorted({r["method"] for r in runs}, key=lambda m: (m == FULL, m != "head_only", m))
    rows = []
    for m in order:
        mine = [r for r in runs if r["method"] == m]
        main = next((r for r in mine if r["config"] == "trec-3ep" and r["seed"] == 0), mine[0])
        accuracy = {c: [r["eval_accuracy"] for r in mine if r["config"] == c] for c in CONFIGS}
        trainable = main["trainable"]
        rows.append({"method": m, "accuracy": accuracy, "trainable": trainable,
                     "trainable_pct_of_base": 100 * trainable / base_params if base_params else None,
                     **{k: main[k] for k in ("lr", "head_lr", "adapter_bytes", "seconds_per_step", "peak_rss_mb",
                                             "inference_ratio", "overhead")}, "paper": PAPER.get(m, "")})
    full = next((statistics.mean(r["accuracy"]["trec-3ep"]) for r in rows if r["method"] == FULL
                 and r["accuracy"]["trec-3ep"]), None)
    for r in rows:  # where the row is against the reference, in accuracy points (TREC, 3 epochs, means)
        mine = r["accuracy"]["trec-3ep"]
        r["points_vs_full_ft"] = 100 * (statistics.mean(mine) - full) if mine and full is not None else None
    (RESULTS / "method_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# PEFT methods on MiniLM, through the job path (CPU, fp32)",
        "",
        f"Generated {time.strftime('%Y-%m-%d')} by `python benchmarks/method_table.py --report` from "
        f"`method_table.runs.json` (measured on {os.cpu_count()} CPUs, {platform.machine()}). {TRAIN} training / "
        f"{EVAL} held-out examples, batch {BATCH}, ≤ {MAX_LEN} tokens, warm-up 6% then linear decay; every "
        "method at its default learning rates (lr: its own parameters; head: the fresh classifier), 1 Ray Train "
        "worker × 2 CPUs, DeepSpeed ZeRO-0, packing off. Full fine-tuning runs the same recipe in-process with every "
        "weight trainable. Accuracy: mean ± population spread over seeds. Trainable % is over the base's "
        f"{base_params:,} parameters (MiniLM with its 6-way head). s/step, RSS and inference × come from the "
        "TREC 3-epoch seed-0 run; inference ×: unmerged adapter forward time / base forward time, batch 64. "
        "*vs full FT*: the row's mean TREC 3-epoch accuracy minus full fine-tuning's, in points.",
        "",
        "| method | TREC 3 ep | vs full FT | TREC 1 ep | sentiment 1 ep | lr / head lr | trainable | trainable % "
        "| adapter file | s/step | peak RSS MB | inference × | the paper |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        a = r["accuracy"]
        lines.append(
            f"| {r['method']} | {_cell(a['trec-3ep'])} | {_points(r['points_vs_full_ft'])} | {_cell(a['trec-1ep'])} | "
            f"{_cell(a['sentiment-1ep'])} | "
            f"{r['lr']:g} / {r['head_lr']:g} | {r['trainable']:,} | {r['trainable_pct_of_base']:.3f}% | "
            f"{r['adapter_bytes'] / 1024:,.0f} KiB | {r['seconds_per_step']:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['inference_ratio']:.2f} | {r['paper']} |")
    if failed:
        lines += ["", "Failed runs: " + "; ".join(f"{r['method']} {r['config']} seed {r['seed']}: "
                                                  f"{r['error'][:120]}" for r in failed)]
    missing = [m for m in _all_rows() if m not in order]
    if missing:
        lines += ["", "Not measured yet (no recorded run): " + ", ".join(missing) + "."]
    seeds_missing = [c for c, (_, _, seeds) in CONFIGS.items() if any(
        len([r for r in runs if r["method"] == m and r["config"] == c]) < len(seeds) for m in order)]
    if seeds_missing:
        lines += ["", "Incomplete configurations (runs missing for some rows or seeds): " + ", ".join(seeds_missing)
                  + "; a cell with one value is one seed."]
    if "diff_pruning" in order:
        lines += ["", "diff_pruning's trainable count is phase 1's (the dense diff and one gate per entry of the block "
                  "linears); phase 2 trains only the kept 0.5 % of each diffed weight (53,076 entries + the head, "
                  "0.24 % of the base), each from its value at the switch, and that is what the file holds "
                  "(diff_pruning_phases.md)."]
    if "prefix_tuning (MLP)" in order:
        lines += ["", "prefix_tuning (MLP) trains through Li & Liang's re-parametrisation at lr 5e-4; its trainable "
                  "count is the MLP's, its file the folded prefix (the same as the direct prefix's)."]
    if "ipt" in order:
        lines += ["", "IPT trains in a subspace fitted (an ipt-subspace job, d = 5, the most five sources allow) "
                  "on five prompt-tuning adapters of other tasks, trained first as jobs: movie sentiment (3 seeds) "
                  f"and TREC one-vs-rest \"location?\" and \"number?\" ({IPT_SOURCES} examples each, 1 epoch); its "
                  "trainable count is d + the head."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "method_table.md").write_text(text)
    return text


def _all_rows() -> list[str]:
    import peft_methods

    return ["head_only", *[m for m in peft_methods.list_methods() if m != "head_only"], *VARIANTS, FULL]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="methods to (re-)measure (default: all, and full fine-tuning)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: each config's own)")
    parser.add_argument("--again", action="store_true", help="re-run runs already recorded")
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the recorded runs")
    args = parser.parse_args()
    if not args.report:
        methods = args.only or _all_rows()
        measure(methods, args.configs, args.seeds, args.again)
    print(report())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--full"]:
        print(json.dumps(full_fine_tuning(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
