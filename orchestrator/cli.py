"""`peftfleet`: submit jobs and inspect jobs and adapters from a shell.

    peftfleet submit job.yaml [--wait]      peftfleet jobs [--state RUNNING] [--json]
    peftfleet status JOB [--json]           peftfleet adapters [--base minilm] [--json]
    peftfleet logs JOB                      peftfleet cancel JOB
    peftfleet subspaces [--base minilm]     peftfleet serve --base smollm2 [--adapters A B] [--port 8000]
    peftfleet tune sweep.yaml [--wait]      peftfleet sweeps / sweep show|resume|cancel|plot SWEEP
    peftfleet db version|upgrade            peftfleet reconciler start|status|tick
    peftfleet export ADAPTER --out DIR [--merge]   (docs/export.md)
    peftfleet hub-seed SOURCE ORG/NAME [--dataset] [--revision main]   (docs/models.md)

Every command takes --store-url, --storage-url, --address, --home and --secrets (defaults from
PEFTFLEET_STORE_URL, PEFTFLEET_STORAGE_URL, RAY_ADDRESS, PEFTFLEET_HOME and PEFTFLEET_SECRETS). A
store URL with a password goes in PEFTFLEET_STORE_URL, never on the command line. Errors go to
stderr, passwords masked: exit code 2 for a bad spec or request, 1 for a missing job, an unreachable
store or a job that did not succeed. Ray's, Ray Serve's, DeepSpeed's and transformers' log lines go to a
file under PEFTFLEET_HOME/logs (its path printed once) unless --verbose (orchestrator/quiet.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

import orchestrator.quiet as quiet
from jobs.secrets import SecretsError, api_key_from_file, has_password, redact
from jobs.secrets import store_url as store_url_from_env
from jobs.spec import JobSpecError
from jobs.states import JobState
from jobs.store import JobNotFound, StoreError
from jobs.store.adapter_registry import AdapterNotFound
from jobs.sweep_spec import draw
from jobs.training.subspaces import check_references
from orchestrator.client import Client
from orchestrator.feasibility import InfeasibleJob
from orchestrator.serving.device import check_device, check_placement, resolve_device


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def render_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _job_row(client: Client, job) -> dict[str, Any]:
    accuracy = client.store.metrics(job.id, "eval_accuracy")
    return {
        "id": job.id[:12], "name": job.name, "state": job.state.value, "method": job.method,
        "base": job.base_model, "created": _when(job.created_at),
        "eval_accuracy": f"{accuracy[-1].value:.4f}" if accuracy else "",
    }


def _job_json(client: Client, job) -> dict[str, Any]:
    out = {k: (v.value if isinstance(v, JobState) else v) for k, v in asdict(job).items()}
    latest: dict[str, float] = {}
    for m in client.store.metrics(job.id):
        latest[m.name] = m.value
    out["latest_metrics"] = latest
    adapter = client.adapters.list(job_id=job.id)
    out["adapter"] = adapter[0].name if adapter else None
    return out


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_submit(client: Client, args) -> int:
    handle = client.submit(args.spec, idempotency_key=args.idempotency_key)
    print(f"submitted job {handle.id} ({handle.record().name})", file=sys.stderr if args.json else sys.stdout)
    wait = args.wait
    if not wait and client.cluster.started_here:
        print("no Ray address given: this command started a local cluster that ends with it, so it waits for the job "
              "(run `ray start --head` and pass --address auto to submit and leave)", file=sys.stderr)
        wait = True
    if not wait:
        if args.json:
            _print_json(_job_json(client, handle.record()))
        return 0
    job = handle.wait()
    if args.json:
        _print_json(_job_json(client, job))
    else:
        made = handle.adapter() or handle.subspace()
        kind = "subspace" if job.method == "ipt-subspace" else "adapter"
        print(
            f"job {job.id[:12]} {job.state}"
            + (f"; {kind} {made.name}" if made else "")
            + (f"; error: {job.error}" if job.error else "")
        )
    return 0 if job.state is JobState.SUCCEEDED else 1


def cmd_run(client: Client, args) -> int:
    """Validate, record and run a job in this process, as its owner: the entrypoint of a KubeRay
    RayJob (or any Ray job), where the driver is already on the cluster."""
    from jobs.spec import load_job_spec
    from orchestrator.runner import run

    spec = load_job_spec(args.spec)
    check_references(client.store, spec)
    job = client.store.submit(spec, idempotency_key=args.idempotency_key)
    print(f"running job {job.id} ({job.name})", flush=True)
    try:
        state = run(job.id, f"peftfleet-run-pid-{os.getpid()}", store=client.store)
    except Exception as e:  # noqa: BLE001 - recorded in the store by run(); say it and exit non-zero
        print(f"job {job.id[:12]} failed: {e}", file=sys.stderr)
        return 1
    adapter = client.adapters.list(job_id=job.id)
    print(f"job {job.id[:12]} {state}" + (f"; adapter {adapter[0].name}" if adapter else ""))
    return 0 if state is JobState.SUCCEEDED else 1


def cmd_status(client: Client, args) -> int:
    job = client.jobs.get(args.job).record()
    if args.json:
        _print_json(_job_json(client, job))
        return 0
    info = _job_json(client, job)
    for key in ("id", "name", "state", "method", "base_model", "task_name", "attempt", "owner", "adapter", "error"):
        print(f"{key:>12}: {info.get(key) if info.get(key) is not None else '-'}")
    print(f"{'metrics':>12}: " + (", ".join(f"{k}={v:.4g}" for k, v in info["latest_metrics"].items()) or "-"))
    data = (job.runtime or {}).get("dataset")  # its fingerprint (docs/data.md), once training started
    if data:
        pin = f"revision {data['revision'][:12]}" if data.get("revision") else f"sha256 {data['hash'][:12]}"
        rows = data.get("rows") or {}
        print(f"{'dataset':>12}: {data['source']} ({data['format']}, {pin} of its {data['hash_of']}; rows "
              f"{rows.get('train')} train, {rows.get('eval')} eval of {rows.get('total')}, split seed "
              f"{data.get('split_seed')}{', streamed' if data.get('streaming') else ''})")
    for event in client.store.events(job.id):
        print(f"{'':>12}  {_when(event.at)}  {event.from_state or '-'} → {event.to_state}  {event.reason}")
    return 0


def cmd_logs(client: Client, args) -> int:
    sys.stdout.write(client.jobs.get(args.job).logs())
    return 0


def cmd_cancel(client: Client, args) -> int:
    job = client.jobs.get(args.job).cancel()
    print(f"job {job.id[:12]} {job.state}")
    return 0


def cmd_jobs(client: Client, args) -> int:
    jobs = client.jobs.list(state=args.state, limit=args.limit)
    if args.json:
        _print_json([_job_json(client, j) for j in jobs])
    else:
        print(
            render_table(
                [_job_row(client, j) for j in jobs],
                ["id", "name", "state", "method", "base", "eval_accuracy", "created"],
            )
        )
    return 0


def cmd_groups(client: Client, args) -> int:
    if args.stop:
        found = client.groups.stop(args.stop)
        print(f"group {args.stop} {'stopped' if found else 'not found'}")
        return 0 if found else 1
    groups = client.groups.list()
    if args.json:
        _print_json(groups)
        return 0
    rows = [{"name": g["name"], "base": g["base_model"][:19], "task": g["task"], "precision": g["precision"],
             "resources": f"{g['cpus']:g} CPU" + (f", {g['gpus']:g} GPU" if g["gpus"] else ""),
             "members": f"{len(g['members'])}/{g['capacity']}"
             + (f" (+{len(g['waiting'])} waiting)" if g["waiting"] else ""),
             "jobs": " ".join(j[:8] for j in g["members"]) or "-", "idle_s": g["idle_s"], "base_mb": g["base_mb"]}
            for g in groups]
    print(render_table(rows, ["name", "base", "task", "precision", "resources", "members", "jobs", "idle_s", "base_mb"])
          if rows else "no base groups are resident")
    return 0


def cmd_adapters(client: Client, args) -> int:
    adapters = client.adapters.list(base=args.base, task_name=args.task_name, method=args.method, tag=args.tag)
    if args.json:
        _print_json([asdict(a) for a in adapters])
        return 0
    rows = [
        {
            "name": a.name,
            "method": a.method,
            "task": a.task_name,
            "base": a.base_fingerprint[:19],
            "job": (a.job_id or "")[:12],
            "params": f"{a.num_parameters:,}",
            "size": f"{a.size_bytes / 1024:.0f} KiB",
            "promoted": "yes" if a.promoted else "",
            "metrics": ", ".join(f"{k}={v:.4f}" for k, v in a.metrics.items()),
        }
        for a in adapters
    ]
    print(render_table(rows, ["name", "method", "task", "base", "job", "params", "size", "promoted", "metrics"]))
    return 0


def cmd_export(client: Client, args) -> int:
    from jobs.export import export_adapter

    if args.merge:
        import transformers  # noqa: F401 - its logger exists before the quiet sweep, not after the load it reports

        quiet.sweep()
    result = export_adapter(client.store, args.adapter, args.out, merge=args.merge, base_model_id=args.base_model_id,
                            overwrite=args.overwrite)
    if args.json:
        _print_json({**asdict(result), "path": str(result.path)})
    else:
        what = "merged into its base: a transformers model" if result.kind == "merged" else "an adapter"
        print(f"exported {result.adapter} ({result.method}) as {what} to {result.path}: {', '.join(result.files)}")
    return 0


def cmd_subspaces(client: Client, args) -> int:
    subspaces = client.subspaces.list(base=args.base)
    if args.json:
        _print_json([asdict(s) for s in subspaces])
        return 0
    rows = [
        {"name": s.name, "base": s.base_fingerprint[:19], "job": (s.job_id or "")[:12], "dim": s.intrinsic_dim,
         "tokens": s.num_virtual_tokens, "sources": ", ".join(src["name"] for src in s.sources),
         "error": f"{s.metrics.get('reconstruction_relative_error', float('nan')):.4f}"}
        for s in subspaces
    ]
    print(render_table(rows, ["name", "base", "job", "dim", "tokens", "sources", "error"]))
    return 0


# ServeOptions' limits (docs/serving.md#limits), each a `serve` flag; a flag not given keeps its default.
SERVE_LIMITS = {
    "max_body_bytes": (int, "largest request body, in bytes (default 1 MiB; over it: 413)"),
    "max_prompt_tokens": (int, "longest prompt, in tokens (default: the model's positions, else 4096)"),
    "max_tokens_limit": (int, "largest max_tokens a request may ask for (default 1024)"),
    "request_timeout_s": (float, "a request still running after this is ended (default 120; 504)"),
    "max_classify_inputs": (int, "most inputs in one /v1/classify request (default 256)"),
}


def wait_for_stop_signal(poll_s: float = 0.5) -> signal.Signals:
    """Block until SIGTERM or SIGINT; returns which came. The handlers only set an event (the caller
    does the stopping, outside any handler); they stay installed, so another such signal while the
    caller stops is ignored rather than killing it halfway. They also replace Ray's own, which dumps
    a native stack trace on SIGTERM."""
    received: list[int] = []
    stop = threading.Event()

    def record(signum, frame) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, record)
    while not stop.wait(poll_s):
        pass
    return signal.Signals(received[0])


def cmd_serve(client: Client, args) -> int:
    import ray
    from ray import serve

    from orchestrator.serving.deployment import check_binding

    api_key = args.api_key or (api_key_from_file(args.api_key_file) if args.api_key_file else None) or \
        os.environ.get("PEFTFLEET_API_KEY")
    check_binding(args.host, api_key, args.insecure)
    device = check_device(args.device)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1 if device.startswith("cuda") else 0)
    check_placement(device, gpus)
    if not client.ray_connected():  # the replicas will run on this machine: ask it now, not after Ray starts
        resolve_device(device)
    limits = {name: getattr(args, name) for name in SERVE_LIMITS if getattr(args, name) is not None}
    serving = client.serve(
        args.base,
        adapters=args.adapters or "all",
        task=args.task,
        capacity=args.capacity,
        num_replicas=args.replicas,
        api_key=api_key,
        host=args.host,
        port=args.port,
        name=args.name,
        max_batch_size=args.max_batch_size,
        scheduler=args.scheduler,
        max_prefill_tokens=args.max_prefill_tokens,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=gpus,
        device=device,
        dtype=args.dtype,
        insecure=args.insecure,
        grace_s=args.grace_s,
        **limits,
    )
    if args.json:
        _print_json({"name": serving.name, "url": serving.url, "openai_base_url": f"{serving.url}/v1"})
    if not client.cluster.started_here:
        return 0  # the application lives on the cluster; `serve shutdown` or another deploy replaces it
    print("serving until SIGTERM or Ctrl-C; the local Ray cluster ends with this command", file=sys.stderr, flush=True)
    received = wait_for_stop_signal()
    print(f"{received.name}: taking no new requests; those in flight have {args.grace_s:g} s to finish",
          file=sys.stderr, flush=True)
    serving.stop()  # returns once every replica finished its requests or its grace period ran out
    serve.shutdown()
    ray.shutdown()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def cmd_tune(client: Client, args) -> int:
    sweep = client.submit_sweep(args.sweep)
    record = sweep.record()
    print(f"submitted sweep {record.id} ({record.name}: {len(draw(record.sweep_spec))} trials, {record.scheduler})",
          file=sys.stderr if args.json else sys.stdout)
    wait = args.wait or client.cluster.started_here
    if not wait:
        return 0
    record = sweep.wait()
    return (
        _show_sweep(client, sweep, args.json)
        if record.state == "SUCCEEDED"
        else (_show_sweep(client, sweep, args.json) or 1)
    )


def cmd_sweeps(client: Client, args) -> int:
    sweeps = client.sweeps.list()
    if args.json:
        _print_json([asdict(s) for s in sweeps])
        return 0
    rows = [
        {
            "id": s.id[:12],
            "name": s.name,
            "state": s.state,
            "scheduler": s.scheduler,
            "metric": s.metric,
            "best": f"{s.best_value:.4f}" if s.best_value is not None else "-",
            "best_adapter": s.best_adapter or "-",
            "created": _when(s.created_at),
        }
        for s in sweeps
    ]
    print(render_table(rows, ["id", "name", "state", "scheduler", "metric", "best", "best_adapter", "created"]))
    return 0


def cmd_sweep(client: Client, args) -> int:
    sweep = client.sweeps.get(args.sweep_id)
    if args.action == "show":
        return _show_sweep(client, sweep, args.json)
    if args.action == "resume":
        sweep.resume()
        print(f"sweep {sweep.id[:12]} resumed")
        if args.wait or client.cluster.started_here:
            sweep.wait()
            return _show_sweep(client, sweep, args.json)
        return 0
    if args.action == "cancel":
        print(f"sweep {sweep.id[:12]} {sweep.cancel().state}")
        return 0
    print(sweep.plot(args.out))
    return 0


def _show_sweep(client: Client, sweep, as_json: bool) -> int:
    record, trials = sweep.record(), sweep.trials()
    if as_json:
        _print_json({"sweep": asdict(record), "trials": trials})
        return 0
    print(f"sweep {record.id} {record.name}: {record.state}; {record.metric} ({record.mode}), {record.scheduler}"
          + (f"; error: {record.error.splitlines()[0]}" if record.error else ""))
    rows = [
        {
            "trial": t["name"].rsplit("-", 1)[-1],
            "job": t["job"][:12],
            "state": t["state"],
            record.metric: f"{t[record.metric]:.4f}" if t[record.metric] is not None else "-",
            "evals": t["evaluations"],
            "seconds": f"{t['seconds']:.0f}",
            "group": (t["group"] or "solo").removeprefix("peftfleet-group-"),
            "params": ", ".join(f"{k}={_short(v)}" for k, v in t["params"].items()),
        }
        for t in trials
    ]
    print(render_table(rows, ["trial", "job", "state", record.metric, "evals", "seconds", "group", "params"]))
    if record.runtime.get("packing"):
        print(record.runtime["packing"])
    together: dict[str, list[str]] = {}
    for row, t in zip(rows, trials):
        if t["group"]:
            together.setdefault(t["group"], []).append(row["trial"])
    for group, names in together.items():
        print(f"trained together in base group {group}: {', '.join(names)}")
    if record.best_adapter:
        print(f"best: {record.best_adapter} ({record.metric} {record.best_value:.4f}, job {record.best_job_id[:12]})")
    return 0


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store-url", help="job store SQLAlchemy URL (default: SQLite under PEFTFLEET_HOME)")
    common.add_argument("--storage-url", help="artifact storage folder or fsspec URL")
    common.add_argument("--address", help="Ray cluster address, e.g. auto or ray://head:10001")
    common.add_argument("--home", help="peftfleet's local folder (default ~/.peftfleet)")
    common.add_argument("--secrets", choices=["auto", "cluster"],
                        help="how jobs get the store password and API key: auto (a 0600 file, local Ray only) or "
                        "cluster (its pods hold them; default $PEFTFLEET_SECRETS, else auto)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's, Ray Serve's, DeepSpeed's and transformers' log lines here, not in a log file")
    parser = argparse.ArgumentParser(
        prog="peftfleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's, Ray Serve's, DeepSpeed's and transformers' log lines here, not in a log file")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", parents=[common], help="submit a job spec (YAML or JSON)")
    p.add_argument("spec")
    p.add_argument("--wait", action="store_true", help="wait for the job, with progress")
    p.add_argument("--idempotency-key")
    p.set_defaults(run=cmd_submit)
    p = sub.add_parser(
        "run", parents=[common], help="run a job spec in this process (a RayJob's entrypoint on the cluster)"
    )
    p.add_argument("spec")
    p.add_argument("--idempotency-key")
    p.set_defaults(run=cmd_run)
    for name, fn, text in (
        ("status", cmd_status, "one job: state, metrics, events"),
        ("logs", cmd_logs, "a job's logs"),
        ("cancel", cmd_cancel, "stop a job"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job", help="job id or unique prefix")
        p.set_defaults(run=fn)
    p = sub.add_parser("jobs", parents=[common], help="list jobs")
    p.add_argument("--state", nargs="+", choices=[s.value for s in JobState])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(run=cmd_jobs)
    p = sub.add_parser("groups", parents=[common], help="list the base groups resident on the cluster (docs/groups.md)")
    p.add_argument("--stop", metavar="NAME", help="end this group now (its jobs resume in a new one)")
    p.set_defaults(run=cmd_groups)
    p = sub.add_parser("adapters", parents=[common], help="list adapters")
    p.add_argument("--base", help="base model name or fingerprint")
    p.add_argument("--task-name")
    p.add_argument("--method")
    p.add_argument("--tag")
    p.set_defaults(run=cmd_adapters)
    p = sub.add_parser("serve", parents=[common], help="serve adapters of one base over an OpenAI-shaped HTTP API")
    p.add_argument("--base", required=True, help="base model name or folder")
    p.add_argument(
        "--adapters", nargs="+", help="adapter names (default: every adapter registered for the base, now and later)"
    )
    p.add_argument(
        "--task", choices=["causal-lm", "sequence-classification"], help="default: from the base's architecture"
    )
    p.add_argument("--capacity", type=int, default=32, help="adapters kept loaded per replica (LRU)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1)
    p.add_argument("--gpus-per-replica", type=float, help="default: 1 with --device cuda, else 0")
    p.add_argument("--device", default="auto", help="auto (CUDA when the replica reserved a GPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="the base's dtype; auto: bf16 on CUDA where supported, else fp32")
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows a replica decodes together")
    p.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                   help="continuous: requests join the running batch at every step; static: a new batch only "
                   "once the running one is empty")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens that may join the running batch in one step")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="peftfleet", help="Ray Serve application name")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $PEFTFLEET_API_KEY, else none); "
                   "other users can read a command line: prefer PEFTFLEET_API_KEY or --api-key-file")
    p.add_argument("--api-key-file", help="read the API key from this file (one line)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without an API key (anyone who reaches it can use it)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C (or any stop), how long requests in flight have to finish")
    for name, (kind, meaning) in SERVE_LIMITS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=meaning)
    p.set_defaults(run=cmd_serve)
    p = sub.add_parser(
        "tune", parents=[common], help="start a hyper-parameter sweep (a sweep YAML, see jobs/sweep_spec.py)"
    )
    p.add_argument("sweep")
    p.add_argument("--wait", action="store_true", help="wait for the sweep and print its trials")
    p.set_defaults(run=cmd_tune)
    p = sub.add_parser("sweeps", parents=[common], help="list sweeps")
    p.set_defaults(run=cmd_sweeps)
    p = sub.add_parser("sweep", parents=[common], help="one sweep: show its trials, resume, cancel or plot it")
    p.add_argument("action", choices=["show", "resume", "cancel", "plot"])
    p.add_argument("sweep_id", help="sweep id, unique prefix or name")
    p.add_argument("--out", help="plot: the PNG to write (default under PEFTFLEET_HOME/sweeps/)")
    p.add_argument("--wait", action="store_true", help="resume: wait for the sweep")
    p.set_defaults(run=cmd_sweep)
    p = sub.add_parser("export", parents=[common],
                       help="write an adapter for HF PEFT / vLLM, or merged into its base as a transformers model")
    p.add_argument("adapter", help="a registered adapter's name")
    p.add_argument("--out", required=True, help="the folder to create")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into its base (mergeable methods) and write a plain transformers model")
    p.add_argument("--base-model-id", help="base_model_name_or_path to write (default: the base's hub id or folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_export)
    p = sub.add_parser("subspaces", parents=[common], help="list IPT subspaces (fitted by ipt-subspace jobs)")
    p.add_argument("--base", help="base model name or fingerprint")
    p.set_defaults(run=cmd_subspaces)
    p = sub.add_parser("hub-seed", parents=[common],
                       help="put a local model or dataset folder into the Hugging Face cache under a Hub id (offline)")
    p.add_argument("source", help="a named model (minilm, smollm2) or a local folder")
    p.add_argument("repo_id", help="the Hub id to file it under, ORG/NAME")
    p.add_argument("--dataset", action="store_true", help="a dataset repository (default: a model)")
    p.add_argument("--revision", default="main", help="the branch or tag to point at it (default main)")
    p.set_defaults(run=None)
    p = sub.add_parser("db", parents=[common], help="the store's schema: its version, or upgrade it (back up first)")
    p.add_argument("action", choices=["version", "upgrade"])
    p.set_defaults(run=None)
    p = sub.add_parser("reconciler", parents=[common],
                       help="start the cluster's standing reconciler if it is not running, and show what it did last")
    p.add_argument("action", choices=["start", "status", "tick"])
    p.set_defaults(run=cmd_reconciler)
    return parser


def cmd_db(args: argparse.Namespace) -> int:
    """``peftfleet db version|upgrade``: opens the database without the version check (which refuses an
    older schema) and reports or migrates it."""
    from jobs.store.db import Database, default_store_url
    from jobs.store.schema import SCHEMA_VERSION

    db = Database(args.store_url or store_url_from_env() or default_store_url(args.home), check=False)
    try:
        if args.action == "version":
            print(f"schema version {db.schema_version()}; this peftfleet uses {SCHEMA_VERSION}")
        else:
            before, after = db.upgrade()
            print(f"schema version {before} → {after}" if before != after else f"schema version {after}: up to date")
        return 0
    finally:
        db.close()


def cmd_hub_seed(args: argparse.Namespace) -> int:
    """``peftfleet hub-seed``: file a local folder in the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``)
    under a Hub id, so specs on this machine (or every node sharing that cache) can name the id offline."""
    from jobs.base_models import BUILTIN_MODELS, parse_hub_id, resolve_base_model
    from jobs.hub_cache import hub_cache_dir, seed_hub_cache

    if "@" in args.repo_id:
        raise ValueError(f"{args.repo_id!r}: give the revision with --revision, not after '@'")
    parse_hub_id(args.repo_id)
    folder = resolve_base_model(args.source, home=args.home) if args.source in BUILTIN_MODELS else Path(args.source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{args.source}: no such folder")
    commit = seed_hub_cache(folder, args.repo_id, repo_type="dataset" if args.dataset else "model",
                            revision=args.revision)
    print(f"{args.repo_id}@{args.revision} → commit {commit} in {hub_cache_dir()}")
    return 0


def cmd_reconciler(client: Client, args: argparse.Namespace) -> int:
    import ray

    handle = client.reconciler()
    if handle is None:
        print("PEFTFLEET_RECONCILER=0: no standing reconciler")
        return 1
    result = ray.get(handle.tick.remote() if args.action == "tick" else handle.status.remote())
    print(json.dumps(result, indent=2, default=str) if args.json or args.action != "start" else
          f"standing reconciler running: {result['ticks']} ticks, every {result['interval_s']:g} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: Any, code: int) -> int:
        print(redact(f"peftfleet {args.command}: {message}"), file=sys.stderr)
        return code

    if has_password(args.store_url):
        return fail("--store-url holds a password, which other users of this machine can read in its process "
                    "list; set PEFTFLEET_STORE_URL in the environment instead", 2)
    try:
        if args.command == "db":
            return cmd_db(args)
        if args.command == "hub-seed":
            return cmd_hub_seed(args)
        client = Client(address=args.address, store_url=args.store_url, storage_url=args.storage_url, home=args.home,
                        secrets=args.secrets)
        with quiet.output(args.verbose, home=args.home):
            return args.run(client, args)
    except (JobSpecError, InfeasibleJob, ValueError) as e:
        return fail(e, 2)
    except (JobNotFound, AdapterNotFound, KeyError) as e:
        return fail(e.args[0] if e.args else e, 1)
    except FileNotFoundError as e:
        return fail(e, 2)
    except (StoreError, SecretsError) as e:
        return fail(e, 1)
    except DBAPIError as e:  # its text names the store; only the driver's first line is useful
        url = args.store_url or os.environ.get("PEFTFLEET_STORE_URL") or "the default SQLite store"
        return fail(f"cannot use the job store {url}: {str(e.orig or e).strip().splitlines()[0]}", 1)


if __name__ == "__main__":
    sys.exit(main())
