"""Fault injection at full count: the suite's kill -9 test (tests/integration/test_faults.py) over more
runs and several seeds, with its tally written down.

Each seed is one pytest run of that file: ``PEFTFLEET_FAULT_RUNS`` jobs, each with a kill at a random
point (runner, Ray Train worker, base group or the standing reconciler), plus one sweep whose driver is
killed; the kill plan (target, delay, state when killed, processes killed) and outcome are collected
from the tests' output.

    python benchmarks/faults.py                       # 5 seeds x (10 + 1) = 55 runs, ~30 minutes on 2 CPUs
    python benchmarks/faults.py --seeds 1 --runs 4    # a quick look
    python benchmarks/faults.py -k kill_9             # the jobs only (no sweep): 50 runs, ~20 minutes

Results: benchmarks/results/faults.{md,json}.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_seed(seed: int, runs: int, select: str | None) -> dict:
    env = {**os.environ, "PEFTFLEET_FAULT_SEED": str(seed), "PEFTFLEET_FAULT_RUNS": str(runs)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/integration/test_faults.py", *(["-k", select] if select else [])],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    out = proc.stdout + proc.stderr
    found = re.search(r"fault plan \(seed \d+\): (\[.*?\]); (\d+) kills", out)
    plan = ast.literal_eval(found.group(1)) if found else []
    driver = re.search(r"sweep driver kill \(seed \d+\): (\d+) processes, ([\d.]+) s", out)
    if driver:
        plan.append(("sweep", "driver", float(driver.group(2)), "RUNNING", int(driver.group(1))))
    return {"seed": seed, "runs": runs, "passed": proc.returncode == 0, "seconds": round(time.monotonic() - start),
            "kills": int(found.group(2)) + bool(driver) if found else None,
            "plan": [{"job": j[:8], "target": t, "delay_s": d, "state": s, "killed": n} for j, t, d, s, n in plan],
            "tail": "" if proc.returncode == 0 else out[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-k", dest="select", help="only the tests pytest -k selects (e.g. kill_9: no sweep)")
    args = parser.parse_args()
    results = [run_seed(seed, args.runs, args.select) for seed in range(args.seeds)]
    targets = Counter(p["target"] for r in results for p in r["plan"] if p["killed"])
    runs = sum(len(r["plan"]) for r in results)
    summary = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs", "runs": runs,
               "seeds_passed": sum(r["passed"] for r in results), "seeds": args.seeds,
               "kills_by_target": dict(targets), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Fault injection (kill -9 at seeded random points)", "",
             f"`python benchmarks/faults.py --seeds {args.seeds} --runs {args.runs}"
             f"{' -k ' + args.select if args.select else ''}` on {summary['machine']}.", "",
             f"{summary['runs']} runs; {summary['seeds_passed']} of {args.seeds} seeds passed every check "
             "(every job settled, no two owners, adapters only on SUCCEEDED jobs and verifying, no stale temp "
             f"folder). Kills that found a live process to kill, by target (a kill planned before its target started "
             f"or after it ended finds none): {dict(targets)}.", "",
             "| seed | runs | kills | passed | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['runs']} | {r['kills']} | {r['passed']} | {r['seconds']} |" for r in results]
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
