"""Base groups vs solo jobs: memory, throughput and join latency, side by side.

N LoRA jobs (r=8, dropout 0) on SmolLM2-135M, chatterbot_qa SFT, batch 4 × ≤128 tokens, trained

* packed: one process, one :class:`jobs.training.base_group.BaseGroup` holding the base once, N members;
* solo, concurrently: N processes at once, each one :class:`jobs.training.recipe.Recipe` (one-rank
  DeepSpeed, gloo/NCCL) with its own copy of the base, threads split so they add up to the CPU count;
* solo, one after another: the same N processes, each alone with every thread.

Memory is PSS and USS (``/proc/<pid>/smaps_rollup``) of every process that holds the base, sampled
every 0.5 s while training and summed across processes at each sample; the peak sum is reported
(on CUDA, each process's ``torch.cuda.max_memory_allocated`` while training too, summed). Throughput
is training tokens (non-padding input tokens of the micro-batches trained) per second of the steady
state: each process's first 2 steps are skipped; evaluation and adapter writing are not timed.
Every run is a fresh subprocess; training starts in all of a run's processes at once (a barrier
after loading). Latency is through Ray: submit → first ``train_loss`` of a packable MiniLM/TREC job
when its group is cold (cluster up, no group) and warm (a group resident from the previous job).

    python benchmarks/base_groups.py --quick   # every part, 3 steps a job: ~13 min on 2 CPUs shared with other work
    python benchmarks/base_groups.py           # 4 jobs × 12 steps, 8 packed (6 steps): ~10-15 min on 2 quiet CPUs
    python benchmarks/base_groups.py --device cuda --precision bf16     # the same on a GPU

Results go to benchmarks/results/base_groups.md and .json (``--out NAME`` changes the name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SKIP = 2  # warm-up steps left out of throughput
SAMPLE_S = 0.5
TARGETS = {"packed_mem": 1.3, "packed8_mem": 1.5, "vs_concurrent": 1.3, "vs_sequential": 1.0, "warm_s": 2.0}


# ---------------------------------------------------------------------------------------------------
# job specs
# ---------------------------------------------------------------------------------------------------
def sft_spec(i: int, steps: int, precision: str, device: str, checkpointing: bool = False) -> dict:
    """Job i of the memory/throughput runs: SmolLM2 + LoRA r=8 on chatterbot_qa, its own seed (data order)."""
    return {
        "name": f"bench-{i}", "base_model": "smollm2", "task": "causal-lm",
        "dataset": {"name": "chatterbot_qa", "train_size": 4 * steps},
        "method": {"method": "lora", "r": 8, "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 4, "max_length": 128, "eval_size": 4, "seed": i,
                     "base_dropout": 0.0, "gradient_checkpointing": checkpointing},
        "deepspeed": {"zero_stage": 0, "precision": precision},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1 if device == "cuda" else 0},
        "packing": "auto",
    }


def latency_spec(name: str, precision: str, device: str) -> dict:
    return {
        "name": name, "base_model": "minilm", "task": "sequence-classification",
        "dataset": {"name": "trec", "train_size": 64},
        "method": {"method": "lora", "r": 4, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 8, "max_length": 32, "eval_size": 16, "base_dropout": 0.0},
        "deepspeed": {"precision": precision},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1 if device == "cuda" else 0},
        "packing": "auto",
    }


# ---------------------------------------------------------------------------------------------------
# children (each a fresh process: python -m benchmarks.base_groups --child KIND CONFIG_JSON)
# ---------------------------------------------------------------------------------------------------
def _barrier(config: dict) -> None:
    """Say we are loaded; wait for the parent's go (so every process of a run trains at once)."""
    Path(config["ready"]).write_text("ready")
    while not os.path.exists(config["go"]):
        time.sleep(0.05)


def _tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _cuda_peaks(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    return {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "cuda_max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def _reset_cuda_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _drop_kept(reporters) -> None:
    import shutil

    for reporter in reporters:  # InMemoryReporter copies each adapter/checkpoint to a folder of its own
        for folder, *_ in [*reporter.adapters, *((f, s) for s, f in reporter.checkpoints)]:
            shutil.rmtree(folder, ignore_errors=True)


def child_solo(config: dict) -> dict:
    """One job alone, as a one-rank worker runs it: Recipe + DeepSpeed, its own copy of the base."""
    import socket

    import torch
    import torch.distributed as dist

    from jobs.spec import parse_job_spec
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    torch.set_num_threads(config["threads"])
    device = config["device"]
    steps: list[tuple[float, float, int]] = []

    class TimedRecipe(Recipe):
        def train_step(self, micro):
            _sync(device)
            start = time.monotonic()
            loss = super().train_step(micro)
            loss.item()  # the step is done (the packed path waits for its losses every step too)
            steps.append((start, time.monotonic(), sum(_tokens(b) for b in micro),
                          sum(b["input_ids"].numel() for b in micro)))
            return loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what a launcher (Ray Train, torchrun) sets for a one-rank worker; DeepSpeed asks for LOCAL_RANK
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://", rank=0, world_size=1)
    reporter = InMemoryReporter()
    recipe = TimedRecipe(parse_job_spec(config["spec"]), reporter,
                         metadata={"base_fingerprint": "sha256:bench", "job_id": config["spec"]["name"]})
    recipe.setup_data()
    recipe.setup_model()
    recipe.setup_optimizer()
    _barrier(config)
    _reset_cuda_peak(device)
    metrics = recipe.train()
    recipe.save(metrics)
    out = {"steps": [steps], "evals": 0.0, "losses": [[v for _, v in reporter.values("train_loss")]],
           "threads": torch.get_num_threads(), **_cuda_peaks(device)}
    _drop_kept([reporter])
    dist.destroy_process_group()
    return out


def child_packed(config: dict) -> dict:
    """N jobs in one BaseGroup: one resident base, one packed forward/backward per step."""
    import torch

    from jobs.spec import parse_job_spec
    from jobs.training.base_group import BaseGroup
    from jobs.training.reporter import InMemoryReporter

    torch.set_num_threads(config["threads"])
    device = config["device"]
    specs = [parse_job_spec(raw) for raw in config["specs"]]
    first = specs[0]
    capacity = max(int(os.environ.get("PEFTFLEET_GROUP_MAX_MEMBERS", "8")), len(specs))
    group = BaseGroup(first.base_model, first.task, precision=first.deepspeed.precision,
                      device=torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"),
                      base_dropout=first.training.base_dropout, capacity=capacity,
                      gradient_checkpointing=first.training.gradient_checkpointing)
    reporters = [InMemoryReporter() for _ in specs]
    untimed = [0.0]  # seconds of the current group step spent evaluating, logging, writing adapters
    tokens, shapes = [0], []  # this step's non-padding tokens; each member's (rows, width)

    def timed_out(fn):
        def wrapper(*a, **k):
            start = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                untimed[0] += time.monotonic() - start
        return wrapper

    def counted(fn):
        def wrapper():
            batch = fn()
            tokens[0] += _tokens(batch)
            shapes.append(tuple(batch["input_ids"].shape))
            return batch
        return wrapper

    for i, (spec, reporter) in enumerate(zip(specs, reporters)):
        member = group.add(spec, reporter, metadata={"base_fingerprint": "sha256:bench", "job_id": spec.name})
        member.next_micro = counted(member.next_micro)
        member.after_step = timed_out(member.after_step)
        member.finish = timed_out(member.finish)
    _barrier(config)
    _reset_cuda_peak(device)
    steps, errors = [], []
    while group.members:
        untimed[0], tokens[0] = 0.0, 0
        shapes.clear()
        _sync(device)
        start = time.monotonic()
        left = group.step()
        _sync(device)
        end = time.monotonic()
        errors += [f"{type(e).__name__}: {e}" for _, e in left if e is not None]
        # the untimed work is moved out of the step: the step's training ends that much earlier
        # positions computed: every member's rows at the widest member's width (the group pads to it)
        steps.append((start, end - untimed[0], tokens[0], sum(r for r, _ in shapes) * max(w for _, w in shapes)))
    out = {"steps": [steps], "errors": errors, "losses": [[v for _, v in r.values("train_loss")] for r in reporters],
           "threads": torch.get_num_threads(), "base_mb": group.base_bytes / 2**20,
           **_cuda_peaks(device)}
    _drop_kept(reporters)
    return out


def child_latency(config: dict) -> dict:
    """Submit → first packed step through Ray, with no group (cold) and with a warm one."""
    os.environ["PEFTFLEET_GROUP_IDLE_S"] = "120"  # before the client (and its cluster) exist
    import ray

    from jobs.states import JobState
    from orchestrator.client import Client

    client = Client(num_cpus=2, home=config["home"])
    client.cluster  # noqa: B018 - the cluster is up before anything is timed: "cold" is the group's
    out: dict = {}
    try:
        for case, name in (("cold", "lat-cold"), ("warm", "lat-warm")):
            spec = latency_spec(name, config["precision"], config["device"])
            submitted = time.time()
            handle = client.submit(spec)
            returned = time.time()
            first = None
            deadline = time.monotonic() + 600
            while first is None:
                logged = handle.metrics("train_loss")
                if logged:
                    first = min(logged, key=lambda m: m.step)
                    break
                state = handle.status()
                if state.is_terminal:
                    raise RuntimeError(f"{name} ended {state.value} before a step: {handle.record().error}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: no train_loss after 600 s")
                time.sleep(0.05)
            seen = time.time()
            record = handle.wait(timeout=600, progress=False)
            if record.state is not JobState.SUCCEEDED:
                raise RuntimeError(f"{name} ended {record.state.value}: {record.error}")
            events = {e.to_state.value: e.at for e in client.store.events(handle.id)}
            out[case] = {
                "submit_returned_s": returned - submitted,
                "submit_to_queued_s": events.get("QUEUED", float("nan")) - submitted,
                "submit_to_running_s": events.get("RUNNING", float("nan")) - submitted,
                "submit_to_first_step_s": first.at - submitted,
                "first_step_seen_s": seen - submitted,
                "first_logged_step": first.step,
                "base_group": record.runtime.get("base_group"),
            }
            print(case, out[case], file=sys.stderr, flush=True)
    finally:
        try:
            for group in client.groups.list():
                client.groups.stop(group["name"])
        finally:
            ray.shutdown()
    out["same_group"] = out.get("cold", {}).get("base_group") == out.get("warm", {}).get("base_group")
    return out


CHILDREN = {"solo": child_solo, "packed": child_packed, "latency": child_latency}


# ---------------------------------------------------------------------------------------------------
# the parent: run children, sample their memory, put the table together
# ---------------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def _pss_uss_kb(pid: int) -> tuple[int, int]:
    pss = private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss":
                    pss = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    private += int(rest.split()[0])
    except (OSError, ValueError):
        pass  # gone
    return pss, private


class Sampler(threading.Thread):
    """Every SAMPLE_S: PSS and USS summed over the given processes (and their children)."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.samples, self.training = pids, [], False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pss = uss = 0
            for root in self.pids:
                for pid in _tree(root):
                    p, u = _pss_uss_kb(pid)
                    pss, uss = pss + p, uss + u
            self.samples.append({"t": time.monotonic(), "training": self.training, "pss_mb": pss / 1024,
                                 "uss_mb": uss / 1024})
            self.done.wait(SAMPLE_S)

    def peaks(self) -> dict:
        training = [s for s in self.samples if s["training"]] or self.samples
        return {"peak_pss_mb": max(s["pss_mb"] for s in training), "peak_uss_mb": max(s["uss_mb"] for s in training),
                "pss_at_start_of_training_mb": training[0]["pss_mb"],
                "peak_pss_mb_incl_loading": max(s["pss_mb"] for s in self.samples),
                "samples_while_training": sum(s["training"] for s in self.samples)}


def run_children(kind: str, configs: list[dict], *, device: str, threads: int, work: Path, label: str) -> dict:
    """Start one child per config at once, let them all load, then release them together; their
    results, the summed memory peaks and their wall time."""
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    folder = work / label
    folder.mkdir(parents=True)
    go = folder / "go"
    procs = []
    for i, config in enumerate(configs):
        config = {**config, "device": device, "threads": threads, "ready": str(folder / f"ready-{i}"), "go": str(go)}
        cfg, out = folder / f"config-{i}.json", folder / f"out-{i}.json"
        cfg.write_text(json.dumps(config))
        log = open(folder / f"log-{i}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "benchmarks.base_groups", "--child", kind, str(cfg),
                                        str(out)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out, log,
                      folder / f"ready-{i}"))
    sampler = Sampler([p.pid for p, *_ in procs])
    sampler.start()
    started = time.monotonic()
    while not all(ready.exists() for *_, ready in procs):
        for p, _, log, _ in procs:
            if p.poll() is not None:
                _fail(label, procs)
        time.sleep(0.1)
    loaded = time.monotonic()
    sampler.training = True
    go.write_text("go")
    for p, *_ in procs:
        p.wait()
    sampler.done.set()
    sampler.join()
    for p, _, log, _ in procs:
        log.close()
        if p.returncode != 0:
            _fail(label, procs)
    results = [json.loads(out.read_text()) for _, out, _, _ in procs]
    merged = {"steps": [s for r in results for s in r["steps"]], "losses": [x for r in results for x in r["losses"]],
              "errors": [e for r in results for e in r.get("errors", [])], "threads_each": results[0]["threads"],
              "processes": len(procs), "load_s": loaded - started, "train_wall_s": time.monotonic() - loaded,
              **sampler.peaks()}
    for key in ("cuda_max_allocated_mb", "cuda_max_reserved_mb"):
        if key in results[0]:
            merged[key] = sum(r[key] for r in results)
    if "base_mb" in results[0]:
        merged["base_mb"] = results[0]["base_mb"]
    print(f"  {label}: {len(procs)} process(es), load {merged['load_s']:.0f} s, train {merged['train_wall_s']:.0f} s, "
          f"peak PSS {merged['peak_pss_mb']:.0f} MB, USS {merged['peak_uss_mb']:.0f} MB", flush=True)
    return merged


def _fail(label: str, procs) -> None:
    for p, *_ in procs:
        if p.poll() is None:
            p.kill()
    tails = []
    for _, out, log, _ in procs:
        if not log.closed:
            log.flush()
        text = Path(log.name).read_text()[-3000:]
        tails.append(f"--- {log.name}\n{text}")
    raise RuntimeError(f"{label} failed:\n" + "\n".join(tails))


def steady_rate(steps_per_process: list[list], *, concurrent: bool) -> dict:
    """Training tokens/s after each process's first SKIP steps. Concurrent processes: all their steady
    tokens over the wall span that covers them; sequential ones: over the sum of their own spans."""
    steady = [s[SKIP:] for s in steps_per_process]
    if any(not s for s in steady):
        raise ValueError(f"throughput needs more than {SKIP} steps per job")
    tokens = sum(step[2] for s in steady for step in s)
    positions = sum(step[3] for s in steady for step in s)
    busy = sum(step[1] - step[0] for s in steady for step in s)
    if concurrent:
        span = max(step[1] for s in steady for step in s) - min(step[0] for s in steady for step in s)
    else:
        span = sum(s[-1][1] - s[0][0] for s in steady)
    return {"tokens": tokens, "positions": positions, "padding_share": 1 - tokens / positions, "seconds": span,
            "tokens_per_s": tokens / span, "busy_seconds": busy, "steps_timed": sum(len(s) for s in steady)}


def latency_run(args, work: Path) -> dict:
    cfg, out = work / "latency.json", work / "latency-out.json"
    cfg.write_text(json.dumps({"home": str(work / "home"), "precision": args.precision, "device": args.device}))
    env = {**os.environ, "PEFTFLEET_GROUP_IDLE_S": "120"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.base_groups", "--child", "latency", str(cfg), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"latency run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    print(f"  latency: cold {result['cold']['submit_to_first_step_s']:.1f} s, "
          f"warm {result['warm']['submit_to_first_step_s']:.1f} s", flush=True)
    return result


def machine(device: str) -> dict:
    import torch

    info = {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def _verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return "met" if ok else "missed"


def report(args, rows: dict, info: dict, command: str, minutes: float) -> str:
    n, cpus = args.jobs, info["cpus"]
    solo1, soloN = rows["solo_sequential_first"], rows["solo_concurrent"]
    packed, packed8 = rows["packed"], rows.get("packed_8")
    t = rows["throughput"]
    lat = rows.get("latency")
    table = ["| measure | packed | solo | ratio | target | |", "|---|---:|---:|---:|---|---|"]
    notes = []

    def mem_row(what, p, s, target=None, key="peak_pss_mb"):
        ratio = p[key] / s[key]
        verdict = _verdict(ratio, target, False) if target else ""
        table.append(f"| {what} | {p[key]:.0f} MB | {s[key]:.0f} MB | {ratio:.2f}× | "
                     f"{f'≤ {target}×' if target else ''} | {verdict} |")
        return ratio, verdict

    r4, v4 = mem_row(f"peak PSS, {n} jobs packed vs 1 solo job", packed, solo1, TARGETS["packed_mem"])
    mem_row(f"peak USS, {n} jobs packed vs 1 solo job", packed, solo1, key="peak_uss_mb")
    if packed8 is not None:
        r8, v8 = mem_row("peak PSS, 8 jobs packed vs 1 solo job", packed8, solo1, TARGETS["packed8_mem"])
        mem_row("peak USS, 8 jobs packed vs 1 solo job", packed8, solo1, key="peak_uss_mb")
    mem_row(f"peak PSS, {n} jobs: packed vs {n} solo processes at once", packed, soloN)
    mem_row(f"peak USS, {n} jobs: packed vs {n} solo processes at once", packed, soloN, key="peak_uss_mb")
    if "cuda_max_allocated_mb" in packed:
        mem_row(f"CUDA max allocated, {n} jobs packed vs 1 solo job", packed, solo1, key="cuda_max_allocated_mb")
        mem_row(f"CUDA max allocated, {n} jobs packed vs {n} solo at once", packed, soloN, key="cuda_max_allocated_mb")
    each = soloN["threads_each"]
    rc = t["packed"]["tokens_per_s"] / t["solo_concurrent"]["tokens_per_s"]
    rs = t["packed"]["tokens_per_s"] / t["solo_sequential"]["tokens_per_s"]
    vc = _verdict(rc, TARGETS["vs_concurrent"], True)
    vs = _verdict(rs, TARGETS["vs_sequential"], True)
    table.append(f"| tokens/s, {n} jobs: packed vs {n} solo at once ({each} thread{'s' if each > 1 else ''} each) | "
                 f"{t['packed']['tokens_per_s']:.0f} | {t['solo_concurrent']['tokens_per_s']:.0f} | {rc:.2f}× | "
                 f"≥ {TARGETS['vs_concurrent']}× | {vc} |")
    table.append(f"| tokens/s, {n} jobs: packed vs {n} solo one after another ({cpus} threads each) | "
                 f"{t['packed']['tokens_per_s']:.0f} | {t['solo_sequential']['tokens_per_s']:.0f} | {rs:.2f}× | "
                 f"≥ {TARGETS['vs_sequential']}× | {vs} |")
    if lat:
        warm, cold = lat["warm"], lat["cold"]
        vw = _verdict(warm["submit_to_first_step_s"], TARGETS["warm_s"], False)
        table.append(f"| submit → first packed step, warm group | {warm['submit_to_first_step_s']:.2f} s | | | "
                     f"≤ {TARGETS['warm_s']:.0f} s | {vw} |")
        table.append(f"| submit → RUNNING, warm group | {warm['submit_to_running_s']:.2f} s | | | | |")
        table.append(f"| submit → first packed step, cold (cluster up, no group) | "
                     f"{cold['submit_to_first_step_s']:.2f} s | | | | |")
        if vw == "missed":
            notes.append(f"- warm latency missed: submit → QUEUED alone took {warm['submit_to_queued_s']:.2f} s "
                         f"(the job's runner is a fresh Ray-job process that imports torch before it reaches the "
                         f"group); QUEUED → RUNNING {warm['submit_to_running_s'] - warm['submit_to_queued_s']:.2f} s, "
                         f"RUNNING → first logged loss "
                         f"{warm['submit_to_first_step_s'] - warm['submit_to_running_s']:.2f} s.")
    base = packed.get("base_mb", 0)
    if v4 == "missed":
        extra = (packed["peak_pss_mb"] - solo1["peak_pss_mb"]) / max(1, n - 1)
        notes.append(f"- packed {n} memory missed: each extra member costs ≈ {extra:.0f} MB PSS over one solo job "
                     f"(base {base:.0f} MB); activations of the packed batch ({n}× one job's rows) dominate.")
    if packed8 is not None and v8 == "missed":
        extra = (packed8["peak_pss_mb"] - solo1["peak_pss_mb"]) / 7
        notes.append(f"- packed 8 memory missed: ≈ {extra:.0f} MB PSS per extra member.")
    if vc == "missed":
        notes.append(f"- vs concurrent solo missed: {n} processes × {each} thread(s) on {cpus} CPUs"
                     + (" (oversubscribed)" if n * each > cpus else "") + "; packing pads every member's rows to "
                     "the widest member's length, so it computes more tokens than it counts.")
    if vs == "missed":
        notes.append("- vs sequential solo missed: one process with every thread on short sequences already keeps "
                     "the cores busy; packing adds the per-step delta rebuild and padding to the widest member.")
    notes.append(f"- padding: {t['packed']['padding_share']:.0%} of the positions the packed steps computed were "
                 f"padding (every member padded to the widest member), vs {t['solo_sequential']['padding_share']:.0%} "
                 "for the solo jobs (each padded to its own widest row).")
    grow = [(f"packed ×{n}", packed), *([("packed ×8", packed8)] if packed8 is not None and n != 8 else []),
            ("solo ×1", solo1), (f"solo ×{n} at once", soloN)]
    notes.append("- PSS at the start of training → peak while training: " + "; ".join(
        f"{what} {r['pss_at_start_of_training_mb']:.0f} → {r['peak_pss_mb']:.0f} MB" for what, r in grow)
        + " (the growth is activations, gradients and optimizer state).")
    if args.quick:
        notes.append(f"- --quick: {args.steps} steps per job, {args.steps - SKIP} of them timed; the numbers are "
                     "noisy — a smoke test of the benchmark, not a measurement.")
    load = info.get("load_avg_at_start")
    text = "\n".join([
        f"# Base groups vs solo jobs ({args.device}, {args.precision}"
        + (", activation checkpointing" if args.gradient_checkpointing else "") + ")",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpus} CPUs ({info['cpu']})"
        + (f", {info['gpu']}" if "gpu" in info else "") + f", torch {info['torch']}"
        + (f", DeepSpeed {info['deepspeed']}" if "deepspeed" in info else "") + f", device {args.device}"
        + (f", load average at start {load[0]:.1f}" if load else "") + f"; {minutes:.1f} minutes in all.",
        f"`{command}`",
        "",
        f"{n} jobs: SmolLM2-135M + LoRA r=8 (dropout 0), chatterbot_qa SFT, batch 4 × ≤128 tokens, "
        f"{args.steps} steps each ({args.steps_8} for the 8-job memory run), {args.precision}"
        + ("; every job, solo and packed, with activation checkpointing. " if args.gradient_checkpointing else ". ")
        +
        f"packed = one process, one BaseGroup, {cpus} threads; solo = one process per job, Recipe + DeepSpeed "
        f"ZeRO-0 on a one-rank {'NCCL' if args.device == 'cuda' else 'gloo'} group, each with its own copy of "
        f"the base; \"at once\" = {n} processes together with OMP_NUM_THREADS={each} each"
        + (f" ({n * each} threads on {cpus} CPUs: about {cpus / n:.2g} CPU each)" if n * each != cpus else "")
        + f"; \"one after another\" = each alone with {cpus} threads.",
        "Memory: PSS and USS (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup of every process "
        f"holding the base, sampled every {SAMPLE_S} s while training and summed across processes; peak of "
        "the sums. \"1 solo job\" = the median of the one-after-another runs' peaks.",
        f"Throughput: non-padding input tokens trained per second, steady state (each job's first {SKIP} steps "
        "skipped; evaluation and adapter writing not timed); for processes at once, all their steady tokens "
        "over the wall-clock span covering them.",
        "Latency: through Ray (local cluster, 2 CPUs), MiniLM/TREC LoRA r=4 job, packing auto, group idle "
        "timeout 120 s; time from just before `client.submit` to the first `train_loss` in the store (its "
        "timestamp) and to the RUNNING event; warm = a second job while the first job's group is resident.",
        "",
        *table,
        "",
        *(["Notes:", *notes, ""] if notes else []),
    ])
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="steps per job (default 12, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="3 steps a job: check every part runs")
    parser.add_argument("--skip-latency", action="store_true", help="leave out the Ray part")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every job (solo and packed) recomputes the base's activations in its backward")
    parser.add_argument("--out", default="base_groups", help="results file name under benchmarks/results/")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, cfg, out = args.child
        result = CHILDREN[kind](json.loads(Path(cfg).read_text()))
        Path(out).write_text(json.dumps(result))
        return
    args.steps = args.steps or (3 if args.quick else 12)
    args.steps_8 = 2 if args.quick else 6
    if args.steps <= SKIP:
        parser.error(f"--steps must be more than {SKIP}")
    command = "python benchmarks/base_groups.py " + " ".join(sys.argv[1:])
    began = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    info = machine(args.device)
    from jobs.base_models import resolve_base_model

    resolve_base_model("smollm2")  # convert the GGUF once, outside every measured run
    cpus, n = info["cpus"], args.jobs
    specs = [sft_spec(i, args.steps, args.precision, args.device, args.gradient_checkpointing) for i in range(n)]
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="peftfleet-bench-") as tmp:
        work = Path(tmp)
        print(f"{n} jobs × {args.steps} steps on {cpus} CPUs, {args.device} {args.precision}", flush=True)
        sequential = [run_children("solo", [{"spec": s}], device=args.device, threads=cpus, work=work,
                                   label=f"solo-sequential-{i}") for i, s in enumerate(specs)]
        rows["solo_concurrent"] = run_children("solo", [{"spec": s} for s in specs], device=args.device,
                                               threads=max(1, cpus // n), work=work, label="solo-concurrent")
        rows["packed"] = run_children("packed", [{"specs": specs}], device=args.device, threads=cpus, work=work,
                                      label=f"packed-{n}")
        if n != 8:
            specs8 = [sft_spec(i, args.steps_8, args.precision, args.device, args.gradient_checkpointing)
                      for i in range(8)]
            rows["packed_8"] = run_children("packed", [{"specs": specs8}], device=args.device, threads=cpus,
                                            work=work, label="packed-8")
        else:
            rows["packed_8"] = rows["packed"]
        if not args.skip_latency:
            rows["latency"] = latency_run(args, work)
    first = dict(sequential[0])
    for key in ("peak_pss_mb", "peak_uss_mb", "peak_pss_mb_incl_loading", "pss_at_start_of_training_mb",
                "cuda_max_allocated_mb"):
        if key in first:
            first[key] = statistics.median(r[key] for r in sequential)
    rows["solo_sequential_first"] = first
    rows["solo_sequential"] = {"runs": sequential, "steps": [s for r in sequential for s in r["steps"]]}
    rows["throughput"] = {
        "packed": steady_rate(rows["packed"]["steps"], concurrent=True),
        "solo_concurrent": steady_rate(rows["solo_concurrent"]["steps"], concurrent=True),
        "solo_sequential": steady_rate(rows["solo_sequential"]["steps"], concurrent=False),
    }
    errors = rows["packed"]["errors"] + rows["packed_8"]["errors"]
    if errors:
        raise RuntimeError(f"packed members failed: {errors}")
    minutes = (time.monotonic() - began) / 60
    text = report(args, rows, info, command, minutes)
    RESULTS.mkdir(exist_ok=True)
    for r in [rows["packed"], rows["packed_8"], rows["solo_concurrent"], *sequential]:
        r.pop("steps", None)  # per-step timestamps: summarised in "throughput"
    rows["solo_sequential"].pop("steps", None)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(
        {"command": command, "machine": info, "jobs": n, "steps": args.steps, "steps_8": args.steps_8,
         "quick": args.quick, "targets": TARGETS, "minutes": minutes, **rows}, indent=2, default=float) + "\n")
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
