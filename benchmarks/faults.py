"""Fault injection at full count: the suite's kill -9 test (tests/integration/test_faults.py) over more
runs and several seeds, with its tally written down.

Each seed is one pytest run of that test with ``PEFTFLEET_FAULT_RUNS`` jobs; its kill plan (target,
delay, state when killed, processes killed) and outcome are collected from the test's output.

    python benchmarks/faults.py                       # 5 seeds x 10 runs = 50 runs, ~25 minutes on 2 CPUs
    python benchmarks/faults.py --seeds 1 --runs 4    # a quick look

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


def run_seed(seed: int, runs: int) -> dict:
    env = {**os.environ, "PEFTFLEET_FAULT_SEED": str(seed), "PEFTFLEET_FAULT_RUNS": str(runs)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/integration/test_faults.py"], cwd=ROOT, env=env, capture_output=True, text=True,
    )
    out = proc.stdout + proc.stderr
    found = re.search(r"fault plan \(seed \d+\): (\[.*?\]); (\d+) kills", out)
    plan = ast.literal_eval(found.group(1)) if found else []
    return {"seed": seed, "runs": runs, "passed": proc.returncode == 0, "seconds": round(time.monotonic() - start),
            "kills": int(found.group(2)) if found else None,
            "plan": [{"job": j[:8], "target": t, "delay_s": d, "state": s, "killed": n} for j, t, d, s, n in plan],
            "tail": "" if proc.returncode == 0 else out[-3000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    results = [run_seed(seed, args.runs) for seed in range(args.seeds)]
    targets = Counter(p["target"] for r in results for p in r["plan"] if p["killed"])
    summary = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs", "runs": args.seeds * args.runs,
               "seeds_passed": sum(r["passed"] for r in results), "seeds": args.seeds,
               "kills_by_target": dict(targets), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Fault injection (kill -9 at seeded random points)", "",
             f"`python benchmarks/faults.py --seeds {args.seeds} --runs {args.runs}` on {summary['machine']}.", "",
             f"{summary['runs']} runs; {summary['seeds_passed']} of {args.seeds} seeds passed every check "
             "(every job settled, no two owners, adapters only on SUCCEEDED jobs and verifying, no stale temp "
             f"folder). Processes killed, by target: {dict(targets)}.", "",
             "| seed | runs | kills | passed | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['runs']} | {r['kills']} | {r['passed']} | {r['seconds']} |" for r in results]
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
