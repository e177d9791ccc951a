"""Serving many LoRA adapters from one base: mixed batches against the alternatives.

32 LoRA adapters (rank 8 on q/k/v/o) on SmolLM2-135M; a batch of 32 requests, 64 prompt tokens
each, every request for a different adapter, 16 generated tokens (greedy). Prefill throughput is
prompt tokens / time of a 1-token generation; generation throughput is the 15 further tokens per
row / (time of 16 tokens - time of 1). Compared, on the same prompts in one run:

  peftfleet     AdapterBank + the server's decoding loop: one forward per step, per-row gathered low-rank products
  base          the base alone with no adapters (the limit)
  swap          HF PEFT, one request at a time, `set_adapter` before each (adapter swapping)
  hf-mixed      HF PEFT's mixed-batch inference, `generate(..., adapter_names=[...])`

and end to end through the HTTP server (Ray Serve), to show what serving costs on top.

    python benchmarks/serving_throughput.py            # ~5 minutes on 2 CPUs; writes benchmarks/results/
    python benchmarks/serving_throughput.py --device cuda --dtype bf16 --no-http

--device (auto, cpu, cuda, cuda:N) and --dtype (auto, fp32, bf16, fp16) are the server's own options
(orchestrator/serving/device.py): every system loads the base in that dtype straight onto that device.
Results go to benchmarks/results/serving_throughput_{cpu,gpu}.{md,json} by the device's kind; each
records its dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
N_ADAPTERS, PROMPT_TOKENS, NEW_TOKENS = 32, 64, 16


def make_adapters(base_folder: Path, out: Path) -> list[Path]:
    from transformers import AutoModelForCausalLM

    import peft_methods
    from jobs.store.fingerprint import base_fingerprint

    fingerprint = base_fingerprint(base_folder)
    folders = []
    for i in range(N_ADAPTERS):
        model = AutoModelForCausalLM.from_pretrained(base_folder)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        peft_methods.apply(model, {"method": "lora", "r": 8, "alpha": 16, "target_modules": targets})
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        folders.append(peft_methods.save_adapter(model, out / f"a{i:02d}", metadata={"base_fingerprint": fingerprint}))
    return folders


def prompts(tokenizer) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    high = tokenizer.vocab_size - 100
    return [torch.randint(100, high, (PROMPT_TOKENS,), generator=g).tolist() for _ in range(N_ADAPTERS)]


def synchronize() -> None:
    """Wait for the GPU's queued work, so a timing covers it (HF's generate may return before)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_throughputs(runs: dict, repeats: dict[str, int]) -> dict[str, dict[str, float]]:
    """``runs[name](new_tokens)`` generates for the whole batch. Every repetition times each system in
    turn (A, B, C, A, B, C...), so a slow minute of a shared machine does not land on one system only;
    ``repeats[name]`` repetitions each (the slow ones fewer). Prefill and generation tokens/s per system."""
    for run in runs.values():
        run(2)  # warm-up
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for i in range(max(repeats.values())):
        for name, run in runs.items():
            if i < repeats[name]:
                t1, t16 = times[name]
                t1.append(timed(lambda: run(1), 1))
                t16.append(timed(lambda: run(NEW_TOKENS), 1))
    out = {}
    for name, (t1, t16) in times.items():
        out[name] = rates(statistics.median(t1), statistics.median(t16))
        each = [rates(a, b)["generation_tok_s"] for a, b in zip(t1, t16)]  # per repetition: the spread
        out[name].update(generation_tok_s_min=min(each), generation_tok_s_max=max(each))
    return out


def rates(t1: float, t16: float) -> dict[str, float]:
    """Prefill and generation tokens/s from the times of a 1-token and a 16-token generation."""
    return {"prefill_tok_s": N_ADAPTERS * PROMPT_TOKENS / t1,
            "generation_tok_s": N_ADAPTERS * (NEW_TOKENS - 1) / (t16 - t1),
            "seconds_1_token": t1, "seconds_16_tokens": t16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on CUDA where supported, else fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="skip the end-to-end HTTP measurement")
    args = parser.parse_args()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from jobs.base_models import resolve_base_model
    from orchestrator.serving.decoding import GenerationRequest, generate
    from orchestrator.serving.device import DTYPE_NAMES, load_base, resolve_device, resolve_dtype
    from peft_methods.adapter_bank import AdapterBank
    from peft_methods.adapter_files import read_adapter

    device = resolve_device(args.device)  # CUDA asked for where there is none: a clear error, before any work
    dtype = resolve_dtype(args.dtype, device)
    args.device, args.dtype = str(device), DTYPE_NAMES[dtype]
    base_folder = resolve_base_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    work = Path(tempfile.mkdtemp())
    folders = make_adapters(base_folder, work)
    rows = prompts(tokenizer)
    names = [f"a{i:02d}" for i in range(N_ADAPTERS)]

    def load_base_model():
        return load_base(str(base_folder), "causal-lm", device=device, dtype=dtype)[0]

    results: dict[str, dict[str, float]] = {}

    # peftfleet's mixed batch, and the same loop with no adapter on any row (the base's limit).
    bank = AdapterBank(load_base_model(), capacity=N_ADAPTERS)
    for name, folder in zip(names, folders):
        config, state, _ = read_adapter(folder)
        bank.load(name, config, state)
    mixed = [GenerationRequest(r, k) for r, k in zip(rows, names)]
    plain = AdapterBank(load_base_model(), capacity=1)
    alone = [GenerationRequest(r) for r in rows]

    # HF PEFT: all 32 adapters in one PeftModel.
    hf = PeftModel.from_pretrained(load_base_model(), folders[0], adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        hf.load_adapter(folder, adapter_name=name)
    hf.eval()
    tokenizer.padding_side = "left"
    batch = {"input_ids": torch.tensor(rows, device=device),
             "attention_mask": torch.ones(N_ADAPTERS, PROMPT_TOKENS, dtype=torch.long, device=device)}
    eos = dict(eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0, do_sample=False)

    def hf_mixed(n: int) -> None:
        with torch.no_grad():
            hf.generate(**batch, adapter_names=names, max_new_tokens=n, min_new_tokens=n, **eos)

    def swap(n: int) -> None:
        with torch.no_grad():
            for i, name in enumerate(names):
                hf.set_adapter(name)
                hf.generate(input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1],
                            max_new_tokens=n, min_new_tokens=n, **eos)

    runs = {"peftfleet": lambda n: generate(bank, [replace(q, max_tokens=n) for q in mixed]),
            "base": lambda n: generate(plain, [replace(q, max_tokens=n) for q in alone]),
            "hf-mixed": hf_mixed, "swap": swap}
    results.update(interleaved_throughputs(runs, {**{name: args.repeats for name in runs},
                                                  "swap": max(1, args.repeats - 2)}))
    bank = plain = hf = None

    if not args.no_http:
        results["http"] = http_end_to_end(base_folder, folders, names, rows, tokenizer, args)

    ours = results["peftfleet"]
    ratios = {
        "vs_base_prefill": ours["prefill_tok_s"] / results["base"]["prefill_tok_s"],
        "vs_base_generation": ours["generation_tok_s"] / results["base"]["generation_tok_s"],
        "vs_swap_generation": ours["generation_tok_s"] / results["swap"]["generation_tok_s"],
        "vs_swap_prefill": ours["prefill_tok_s"] / results["swap"]["prefill_tok_s"],
        "vs_hf_mixed_generation": ours["generation_tok_s"] / results["hf-mixed"]["generation_tok_s"],
        "vs_hf_mixed_prefill": ours["prefill_tok_s"] / results["hf-mixed"]["prefill_tok_s"],
    }
    write(results, ratios, args)


def http_end_to_end(base_folder, folders, names, rows, tokenizer, args) -> dict[str, float]:
    """The same 32 requests (16 tokens) through Ray Serve, all at once; requests/s and tokens/s. The
    replica serves on the same device and dtype."""
    import requests

    from orchestrator import Client

    cuda = args.device.startswith("cuda")
    client = Client(home=tempfile.mkdtemp(), num_cpus=os.cpu_count())  # a local Ray finds the GPUs itself
    fingerprint = client.store.register_base_model(str(base_folder)).fingerprint
    for name, folder in zip(names, folders):
        client.adapters.register(folder, name=f"bench-{name}", base_fingerprint=fingerprint, task="causal-lm",
                                 task_name=f"t{name}")
    serving = client.serve(str(base_folder), capacity=N_ADAPTERS, max_batch_size=N_ADAPTERS, batch_wait_s=0.5,
                           port=8311, cpus_per_replica=os.cpu_count(), gpus_per_replica=1 if cuda else 0,
                           name="bench", device="cuda" if cuda else "cpu", dtype=args.dtype)  # cuda:0 in the replica
    texts = [tokenizer.decode(r) for r in rows]

    def one(i: int, n: int) -> None:
        body = {"model": f"bench-{names[i]}", "prompt": texts[i], "max_tokens": n, "temperature": 0}
        requests.post(f"{serving.url}/v1/completions", json=body, timeout=600).raise_for_status()

    def all_at_once(n: int) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(N_ADAPTERS) as pool:
            list(pool.map(lambda i: one(i, n), range(N_ADAPTERS)))
        return time.perf_counter() - start

    all_at_once(2)  # load every adapter, warm up
    t1 = statistics.median(all_at_once(1) for _ in range(3))
    t16 = statistics.median(all_at_once(NEW_TOKENS) for _ in range(3))
    serving.stop()
    return rates(t1, t16)


def write(results: dict, ratios: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    cuda = args.device.startswith("cuda")
    tag = "gpu" if cuda else "cpu"  # the names benchmarks/gpu_smoke.py reads
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if cuda else None
    info = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "dtype": args.dtype, "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "results": results, "ratios": ratios}
    (RESULTS / f"serving_throughput_{tag}.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        f"# Serving {N_ADAPTERS} LoRA adapters on SmolLM2-135M ({args.device}, {args.dtype})", "",
        f"Measured {info['date']}, {gpu + ', ' if gpu else ''}{info['cpus']} CPUs, torch threads "
        f"{info['torch_threads']}, "
        f"`python benchmarks/serving_throughput.py --device {args.device} --dtype {args.dtype}`. "
        f"Batch of {N_ADAPTERS} requests × {PROMPT_TOKENS} prompt tokens, each for a different LoRA adapter "
        f"(r=8, q/k/v/o), {NEW_TOKENS} greedy tokens. Medians of {args.repeats} runs.", "",
        "Systems are timed in turn within every repetition (interleaved); generation tok/s is the median "
        "and, in brackets, the lowest and highest repetition.", "",
        "| system | prefill tok/s | generation tok/s | s (1 token) | s (16 tokens) |", "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        spread = (f" [{r['generation_tok_s_min']:.1f}–{r['generation_tok_s_max']:.1f}]"
                  if "generation_tok_s_min" in r else "")
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['generation_tok_s']:.1f}{spread} | "
                     f"{r['seconds_1_token']:.2f} | {r['seconds_16_tokens']:.2f} |")
    lines += ["", "| ratio (peftfleet / other) | value | target |", "|---|---:|---:|",
              f"| vs base, prefill | {ratios['vs_base_prefill']:.3f} | ≥ 0.93 |",
              f"| vs base, generation | {ratios['vs_base_generation']:.3f} | ≥ 0.93 |",
              f"| vs swapping per request, generation | {ratios['vs_swap_generation']:.2f} | ≥ 6 |",
              f"| vs swapping per request, prefill | {ratios['vs_swap_prefill']:.2f} | — |",
              f"| vs HF PEFT mixed batch, generation | {ratios['vs_hf_mixed_generation']:.2f} | ≥ 1.6 |",
              f"| vs HF PEFT mixed batch, prefill | {ratios['vs_hf_mixed_prefill']:.2f} | — |"]
    if "http" in results:
        http = results["http"]["generation_tok_s"] / results["peftfleet"]["generation_tok_s"]
        lines.append(f"| HTTP end to end / in-process, generation | {http:.2f} | — |")
    (RESULTS / f"serving_throughput_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
