"""`make demo`: two PEFT jobs on one frozen base, through the client, Ray and DeepSpeed, then
both adapters served from one copy of that base.

A local Ray cluster starts; a LoRA job and a BitFit job (MiniLM on TREC) are submitted through the
Python client. Both pack into one base group: one resident copy of MiniLM holding the cluster's
CPUs, each step a batch of both jobs' rows, each job with its own loss, optimizer and adapter (the
output says how much memory the shared copy saved). Both register their adapters against the
same base model.
Then a Ray Serve application serves both adapters over HTTP, and each is asked about the same
questions at once (one mixed batch).

The output is the demo's own lines, progress bars and tables; Ray's, Ray Serve's, DeepSpeed's and
transformers' log lines go to a file under $PEFTFLEET_HOME/logs unless --verbose (orchestrator/quiet.py).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orchestrator.quiet as quiet
from jobs.spec import load_job_spec
from jobs.store import StoreError, redact_url
from jobs.training.data import load_for_job
from orchestrator.cli import render_table
from orchestrator.client import Client

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the serving application")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's, Ray Serve's, DeepSpeed's and transformers' log lines here, not in a log file")
    args = parser.parse_args(argv)
    with quiet.output(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    specs = []
    for name in ("trec-lora.yaml", "trec-bitfit.yaml"):
        spec = load_job_spec(EXAMPLES / name)
        specs.append(spec.model_copy(update={
            "dataset": spec.dataset.model_copy(update={"train_size": args.train_size}),
            "training": spec.training.model_copy(update={"eval_size": args.eval_size}),
        }))

    started = time.perf_counter()
    client = Client(num_cpus=args.num_cpus)
    print(f"store {redact_url(client.store.url)}; Ray dashboard http://{client.cluster.dashboard_url}")
    handles = [client.submit(spec) for spec in specs]
    for spec, handle in zip(specs, handles):
        print(
            f"submitted {spec.name}: job {handle.id[:12]} ({spec.method.method}, {spec.resources.num_workers} "
            f"workers, ZeRO-{spec.deepspeed.zero_stage})"
        )

    watched: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch_group, args=(client, [h.id for h in handles], watched, done), daemon=True)
    watcher.start()
    results = []
    for spec, handle in zip(specs, handles):
        print(f"waiting for {spec.name} (state now {handle.status()})")
        job = handle.wait(progress=True)
        accuracy = handle.metrics("eval_accuracy")
        adapter = handle.adapter()
        results.append(
            {
                "job": job.id[:12],
                "name": job.name,
                "method": job.method,
                "state": job.state.value,
                "eval_accuracy": f"{accuracy[-1].value:.3f}" if accuracy else "-",
                "adapter": adapter.name if adapter else "-",
            }
        )
        if job.error:
            print(f"{job.name} failed: {job.error}\n{handle.logs()[-3000:]}")

    done.set()
    watcher.join()
    group = _report_group(client, watched, handles)
    majority = _trec_majority_rate(specs[0])
    print(f"\nTREC held-out accuracy (majority class {majority:.3f}):")
    print(render_table(results, ["job", "name", "method", "state", "eval_accuracy", "adapter"]))
    adapters = [client.adapters.get(r["adapter"]) for r in results if r["adapter"] != "-"]
    print("\nadapter registry:")
    print(
        render_table(
            [
                {
                    "adapter": a.name,
                    "method": a.method,
                    "base fingerprint": a.base_fingerprint,
                    "params": f"{a.num_parameters:,}",
                }
                for a in adapters
            ],
            ["adapter", "method", "base fingerprint", "params"],
        )
    )
    if len(adapters) == 2 and adapters[0].base_fingerprint == adapters[1].base_fingerprint:
        print(f"both adapters share one frozen base: {adapters[0].base_fingerprint}")
    answers = _serve_and_ask(client, adapters, args.port) if adapters else []
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return {
        "results": results,
        "adapters": adapters,
        "majority": majority,
        "job_ids": [h.id for h in handles],
        "answers": answers,
        "group": group,
    }


def _watch_group(client: Client, job_ids: list[str], seen: dict, done: threading.Event) -> None:
    """Note the base group the jobs train in and the most of them it held at once."""
    while not done.wait(0.5):
        try:
            groups = client.groups.list()
        except Exception:  # noqa: BLE001 - a group ending while we look
            continue
        for g in groups:
            members = set(g["members"]) & set(job_ids)
            if members and len(members) >= len(seen.get("together", ())):
                seen.update(g, together=sorted(members))


def _report_group(client: Client, seen: dict, handles) -> dict:
    """Say which group trained the jobs and what the shared base saved; then end the group, so its CPUs
    go to the serving replica."""
    names = {h.record().runtime.get("base_group") for h in handles}
    if not seen or names != {seen["name"]}:
        print(f"the jobs did not train in one base group ({sorted(map(str, names))})")
        return {}
    together, mb = len(seen["together"]), seen["base_mb"]
    print(f"\nboth jobs trained in base group {seen['name']}: {together} jobs at once on one resident MiniLM "
          f"({mb:.0f} MB of weights) instead of {together} copies, saving {mb * (together - 1):.0f} MB")
    client.groups.stop(seen["name"])
    return {"name": seen["name"], "together": together, "base_mb": mb}


QUESTIONS = [
    "How far is it from Denver to Aspen?",
    "Who wrote the Declaration of Independence?",
    "What does NASA stand for?",
]


def _serve_and_ask(client: Client, adapters, port: int) -> list[dict]:
    """Serve both adapters from one MiniLM and classify the same questions with each, concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    serving = client.serve("minilm", adapters=[a.name for a in adapters], port=port, batch_wait_s=0.05, name="demo")
    try:
        def ask(adapter: str) -> list[dict]:
            r = requests.post(f"{serving.url}/v1/classify", json={"model": adapter, "input": QUESTIONS}, timeout=300)
            r.raise_for_status()
            return [{"adapter": adapter, "question": q, "label": d["label"], "score": f"{d['scores'][d['label']]:.2f}"}
                    for q, d in zip(QUESTIONS, r.json()["data"])]

        with ThreadPoolExecutor(len(adapters)) as pool:
            answers = [row for rows in pool.map(ask, [a.name for a in adapters]) for row in rows]
    finally:
        serving.stop()
    print(f"\nserved at {serving.url}/v1 — POST /v1/classify, both adapters on one base:")
    print(render_table(answers, ["adapter", "question", "label", "score"]))
    return answers


def _trec_majority_rate(spec) -> float:
    held_out = load_for_job(spec.dataset, spec.task, spec.training).eval
    return max(Counter(y for _, y in held_out).values()) / len(held_out)


if __name__ == "__main__":
    try:
        main()
    except StoreError as e:  # e.g. a store of an older schema under ~/.peftfleet: one line saying what to run
        sys.exit(f"make demo: {e}")
