"""Serving under open load: the continuous-batching engine against the static one, through HTTP.

An open-loop client sends Poisson arrivals of streamed completions at rising rates: each request for
one of 32 adapters of mixed methods (LoRA, BitFit, bottleneck, prompt tuning, prefix tuning) on
SmolLM2-135M, a prompt of 16–256 tokens and ``max_tokens`` 8–128 (uniform, greedy). Arrivals do not
wait for answers (open loop), so a server that falls behind builds a queue, as under real traffic.
The engines are interleaved: at each rate the static engine, then the continuous one, each deployed
alone (one replica with every CPU, or the GPU, to itself, adapters loaded first) on the same arrivals,
so a slow minute of a shared machine does not land on one engine's whole column.

Per engine and rate: output tokens/s, time to first token (TTFT) and inter-token latency (ITL), p50
and p99, and whether p99 TTFT stays ≤ 2 s; then the highest rate each engine holds that way.

    python benchmarks/serving_load.py                      # CPU: ~15 minutes on 2 CPUs
    python benchmarks/serving_load.py --rates 1 2 4 8 16 --requests 200 --device cuda --dtype bf16

Results: benchmarks/results/serving_load_{cpu,gpu}.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
N_ADAPTERS = 32
METHODS = [{"method": "lora", "r": 8}, {"method": "bitfit"}, {"method": "bottleneck"},
           {"method": "prompt_tuning", "num_virtual_tokens": 8}, {"method": "prefix_tuning", "num_virtual_tokens": 8}]
TTFT_LIMIT_S = 2.0


def make_adapters(client, base_folder: Path, out: Path) -> list[str]:
    """32 adapters cycling through METHODS, with small random weights, registered for the base."""
    from transformers import AutoModelForCausalLM

    import peft_methods

    fingerprint = client.store.register_base_model(str(base_folder)).fingerprint
    names = []
    for i in range(N_ADAPTERS):
        config = METHODS[i % len(METHODS)]
        model = peft_methods.apply(AutoModelForCausalLM.from_pretrained(base_folder), dict(config))
        trainable = peft_methods.get_method(config["method"]).trainable_parameter_names(model)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trainable:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        folder = peft_methods.save_adapter(model, out / f"a{i:02d}", metadata={"base_fingerprint": fingerprint})
        name = f"load-{config['method'].replace('_', '-')}-{i:02d}"
        client.adapters.register(folder, name=name, base_fingerprint=fingerprint, task="causal-lm", task_name=name)
        names.append(name)
    return names


def arrivals(rate: float, n: int, names: list[str], tokenizer, seed: int) -> list[dict]:
    """``n`` requests at Poisson rate ``rate``: send time, adapter, prompt text, max_tokens."""
    rng = random.Random(seed)
    at, out = 0.0, []
    high = tokenizer.vocab_size - 100
    for _ in range(n):
        at += rng.expovariate(rate)
        ids = [rng.randrange(100, high) for _ in range(rng.randint(16, 256))]
        out.append({"at": at, "model": rng.choice(names), "prompt": tokenizer.decode(ids),
                    "max_tokens": rng.randint(8, 128)})
    return out


async def one(session, url: str, key: str, request: dict, start: float) -> dict:
    """Send one streamed completion at its time; when its first text and every later piece arrived."""
    import aiohttp

    await asyncio.sleep(max(0.0, start + request["at"] - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": request["model"], "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "stream": True}
    stamps, error = [], None
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                                timeout=aiohttp.ClientTimeout(total=900)) as response:
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for line in response.content:
                    line = line.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                    elif chunk["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        error = f"{type(e).__name__}: {e}"
    done = time.perf_counter()
    return {"sent": sent, "done": done, "stamps": stamps, "error": error}


async def run_load(url: str, key: str, requests: list[dict]) -> list[dict]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter() + 0.5
        return await asyncio.gather(*(one(session, url, key, r, start) for r in requests))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if not r["error"] and r["stamps"]]
    ttft = [r["stamps"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    pieces = sum(len(r["stamps"]) for r in ok)
    window = max(r["done"] for r in results) - min(r["sent"] for r in results)
    return {"requests": len(results), "failed": len(results) - len(ok), "pieces_per_s": pieces / window,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99), "window_s": window,
            "holds": bool(ok) and len(ok) == len(results) and percentile(ttft, 99) <= TTFT_LIMIT_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0], help="requests per second")
    parser.add_argument("--requests", type=int, default=30, help="requests per rate and engine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from jobs.base_models import resolve_base_model
    from orchestrator import Client

    key = "load-benchmark"
    base_folder = resolve_base_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    cuda = args.device.startswith("cuda")
    client = Client(home=tempfile.mkdtemp(), num_cpus=os.cpu_count())
    names = make_adapters(client, base_folder, Path(tempfile.mkdtemp()))
    warm = arrivals(8.0, N_ADAPTERS, names, tokenizer, seed=99)
    for i, request in enumerate(warm):  # every adapter loaded before timing
        request.update(model=names[i], max_tokens=2)
    table: dict[str, dict[float, dict]] = {"static": {}, "continuous": {}}
    for rate in args.rates:  # interleaved: at each rate both engines, on the same arrivals
        requests = arrivals(rate, args.requests, names, tokenizer, seed=int(rate * 1000))
        for engine in table:  # one replica at a time, with every CPU / the GPU to itself
            serving = client.serve(
                str(base_folder), name=f"load-{engine}", capacity=N_ADAPTERS, max_batch_size=args.max_batch_size,
                batch_wait_s=0.01, api_key=key, port=8312, scheduler=engine, cpus_per_replica=os.cpu_count(),
                gpus_per_replica=1 if cuda else 0, device=args.device, dtype=args.dtype)
            asyncio.run(run_load(serving.url, key, warm))
            summary = summarize(asyncio.run(run_load(serving.url, key, requests)))
            table[engine][rate] = summary
            print(json.dumps({"engine": engine, "rate": rate, **summary}), flush=True)
            serving.stop()
    write(table, args)


def write(table: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    held = {e: max((rate for rate, s in rows.items() if s["holds"]), default=None) for e, rows in table.items()}
    info = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "dtype": args.dtype, "cpus": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__, "requests_per_rate": args.requests,
            "results": {e: {str(k): v for k, v in rows.items()} for e, rows in table.items()},
            "highest_rate_held": held}
    (RESULTS / f"serving_load_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# Serving under open load: continuous vs static batching ({args.device})", "",
             f"Measured {info['date']}, {info['cpus']} CPUs, `python benchmarks/serving_load.py "
             f"--rates {' '.join(map(str, args.rates))} --requests {args.requests} --device {args.device}`. "
             f"SmolLM2-135M, {N_ADAPTERS} adapters (LoRA, BitFit, bottleneck, prompt and prefix tuning), Poisson "
             "arrivals of streamed greedy completions, prompts 16–256 tokens, max_tokens 8–128, through HTTP "
             "(Ray Serve, one replica each). Pieces/s counts streamed text pieces (≈ tokens).", "",
             "| rate (req/s) | engine | pieces/s | TTFT p50 s | TTFT p99 s | ITL p50 s | ITL p99 s | failed | "
             f"p99 TTFT ≤ {TTFT_LIMIT_S:g} s |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for rate in args.rates:
        for engine in table:
            s = table[engine][rate]
            lines.append(f"| {rate:g} | {engine} | {s['pieces_per_s']:.1f} | {s['ttft_p50_s']:.2f} | "
                         f"{s['ttft_p99_s']:.2f} | {s['itl_p50_s']:.3f} | {s['itl_p99_s']:.3f} | {s['failed']} | "
                         f"{'yes' if s['holds'] else 'no'} |")
    lines += ["", f"Highest rate held (p99 TTFT ≤ {TTFT_LIMIT_S:g} s, no failures): static {held['static']}, "
              f"continuous {held['continuous']} req/s."]
    if held["static"] is not None:
        s, c = table["static"][held["static"]], table["continuous"][held["static"]]
        lines.append(f"At {held['static']:g} req/s (the static engine's highest), p99 TTFT: static "
                     f"{s['ttft_p99_s']:.2f} s, continuous {c['ttft_p99_s']:.2f} s "
                     f"({s['ttft_p99_s'] / c['ttft_p99_s']:.1f}× lower; target ≥ 3×).")
    (RESULTS / f"serving_load_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
