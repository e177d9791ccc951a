"""Trains jobs packed in one base group, in a fresh process where Ray cannot be imported:
``python -m tests.jobs.group_runs PLAN_JSON OUT_JSON``.

PLAN_JSON: ``{"specs": [...], "join_at": {index: group step}, "remove_at": {index: group step},
"resume": {index: checkpoint folder}, "init": {index: another member's checkpoint folder}}`` — every spec
joins at step 0 unless ``join_at`` says later; a member listed in ``remove_at`` leaves (as a cancel does)
before that group step; ``init`` starts one from another's checkpoint (a PBT exploit). OUT_JSON holds, per spec, what
its in-memory reporter was told, plus the group's peak member count."""

from __future__ import annotations

import json
import sys

sys.modules["ray"] = None  # type: ignore[assignment] - any `import ray` now raises ImportError


def main() -> None:
    from jobs.spec import parse_job_spec
    from jobs.training.base_group import BaseGroup
    from jobs.training.reporter import InMemoryReporter

    plan = json.loads(open(sys.argv[1]).read())
    specs = [parse_job_spec(raw) for raw in plan["specs"]]
    join_at = {int(k): v for k, v in plan.get("join_at", {}).items()}
    remove_at = {int(k): v for k, v in plan.get("remove_at", {}).items()}
    resume = {int(k): v for k, v in plan.get("resume", {}).items()}
    init = {int(k): v for k, v in plan.get("init", {}).items()}
    first = specs[0]
    group = BaseGroup(first.base_model, first.task, precision=first.deepspeed.precision,
                      base_dropout=first.training.base_dropout,
                      gradient_checkpointing=first.training.gradient_checkpointing)
    reporters = [InMemoryReporter(resume_from=resume.get(i)) for i in range(len(specs))]
    members: dict[int, object] = {}
    errors: dict[int, str] = {}
    waiting = set(range(len(specs)))
    step, peak = 0, 0
    while waiting or group.members:
        for i in sorted(waiting):
            if join_at.get(i, 0) <= step:
                members[i] = group.add(specs[i], reporters[i], init_checkpoint=init.get(i),
                                       metadata={"base_fingerprint": "sha256:test", "job_id": f"j{i}"})
                waiting.discard(i)
        for i, at in remove_at.items():
            if at == step and i in members:
                group.remove(members[i])
        peak = max(peak, len(group.members))
        for member, error in group.step():
            if error is not None:
                errors[next(i for i, m in members.items() if m is member)] = f"{type(error).__name__}: {error}"
        step += 1
    out = [{"events": r.events, "recorded": r.recorded, "checkpoints": r.checkpoints, "adapters": r.adapters,
            "error": errors.get(i)} for i, r in enumerate(reporters)]
    with open(sys.argv[2], "w") as f:
        json.dump({"members": out, "peak": peak, "steps": step}, f)


if __name__ == "__main__":
    main()
