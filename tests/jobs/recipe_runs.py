"""Runs the training recipe in a fresh process where Ray cannot be imported:
``python -m tests.jobs.recipe_runs SPEC_JSON OUT_JSON [RESUME_FOLDER]``.

The process is the recipe's whole world: a one-rank gloo group (what Ray Train would set up), an
in-memory reporter, and ``import ray`` made to fail, so the recipe provably needs no Ray."""

from __future__ import annotations

import json
import socket
import sys

sys.modules["ray"] = None  # type: ignore[assignment] - any `import ray` now raises ImportError


def main() -> None:
    import torch.distributed as dist

    from jobs.spec import parse_job_spec
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    spec_path, out_path = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    spec = parse_job_spec(json.loads(open(spec_path).read()))
    reporter = InMemoryReporter(resume_from=resume)
    name = Recipe(spec, reporter, metadata={"base_fingerprint": "sha256:test", "job_id": "j1"}).run()
    with open(out_path, "w") as f:
        json.dump({"adapter": name, "events": reporter.events, "recorded": reporter.recorded,
                   "checkpoints": reporter.checkpoints, "adapters": reporter.adapters}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
