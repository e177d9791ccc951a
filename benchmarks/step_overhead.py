"""peftfleet's overhead: seconds per training step vs a hand-written HF PEFT + torch loop, and the
time from `submit` to the first training step on a warm cluster.

Same model (MiniLM), data (TREC), LoRA (r=8 on query/value + head), batch (16 × ≤64 tokens) and
thread count (1) on both sides. Steady state = after the first logged interval, before evaluation.

    python benchmarks/step_overhead.py          # ~3 minutes on 2 CPUs; writes benchmarks/results/
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BATCH, MAX_LEN, STEPS, THREADS = 16, 64, 100, 1


def plain_hf_peft_loop() -> float:
    """Median seconds per step of the simplest loop a user would write by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jobs.base_models import resolve_base_model
    from jobs.training.data import load_trec

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    data = load_trec(eval_size=1000, train_size=BATCH * STEPS)
    path = resolve_base_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    model.train()
    times = []
    for i in range(STEPS):
        chunk = data.train[i * BATCH : (i + 1) * BATCH]
        start = time.perf_counter()
        batch = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor([y for _, y in chunk])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


def through_peftfleet() -> dict[str, float]:
    from orchestrator import Client

    spec = {
        "name": "bench", "base_model": "minilm", "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": BATCH * STEPS},
        "method": {"method": "lora", "r": 8, "alpha": 16},
        "training": {"epochs": 1, "batch_size": BATCH, "lr": 4e-3, "eval_size": 1000, "max_length": MAX_LEN},
        "resources": {"num_workers": 1, "cpus_per_worker": THREADS},
    }
    client = Client(home=tempfile.mkdtemp(), num_cpus=2)
    client.submit({**spec, "name": "warm-up", "training": {**spec["training"], "max_steps": 2}}).wait(
        progress=False
    )  # warm cluster and caches
    submitted = time.time()
    handle = client.submit(spec)
    job = handle.wait(progress=False)
    assert job.state.value == "SUCCEEDED", job.error
    events = {e.to_state.value: e.at for e in client.store.events(job.id)}
    logged = handle.metrics("train_loss")
    per_step = [(b.at - a.at) / (b.step - a.step) for a, b in zip(logged[1:], logged[2:])]
    first_step_at = logged[0].at - logged[0].step * statistics.median(per_step)
    return {"seconds_per_step": statistics.median(per_step), "submit_to_queued_s": events["QUEUED"] - submitted,
            "submit_to_running_s": events["RUNNING"] - submitted,
            "submit_to_first_step_s": first_step_at - submitted}


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    plain = float(
        subprocess.run(
            [sys.executable, __file__, "--plain"], env=env, capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    ours = through_peftfleet()
    ratio = ours["seconds_per_step"] / plain
    rows = {"plain_hf_peft_seconds_per_step": plain, **ours, "ratio": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = f"""# peftfleet step overhead vs a plain HF PEFT loop (CPU, fp32)

Measured {time.strftime("%Y-%m-%d")} on {os.cpu_count()} CPUs ({platform.machine()}),
`python benchmarks/step_overhead.py`. MiniLM + LoRA r=8 (query, value, classifier), TREC,
batch {BATCH} × ≤{MAX_LEN} tokens, {THREADS} thread, {STEPS} steps; median step time after warm-up.
peftfleet = 1 Ray Train worker, DeepSpeed ZeRO-0, metrics written to the SQLite store every few steps.

| measure | value | target |
|---|---:|---|
| plain HF PEFT + torch loop, s/step | {plain:.4f} | |
| peftfleet (client → Ray → DeepSpeed), s/step | {ours["seconds_per_step"]:.4f} | |
| ratio peftfleet / plain | {ratio:.3f}× | ≤ 1.05× |
| submit → job QUEUED (Ray job started, runner process up), warm cluster | {ours["submit_to_queued_s"]:.1f} s | |
| submit → job RUNNING (Train controller, workers, model, engine up) | {ours["submit_to_running_s"]:.1f} s | |
| submit → first training step, warm cluster | {ours["submit_to_first_step_s"]:.1f} s | ≤ 10 s |
"""
    (RESULTS / "step_overhead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--plain"]:
        print(plain_hf_peft_loop())
    else:
        main()
