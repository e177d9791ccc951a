"""Trains jobs packed in one base group, in a fresh process where Ray cannot be imported:
``python -m tests.jobs.group_runs PLAN_JSON OUT_JSON``.

PLAN_JSON: ``{"specs": [...], "join_at": {index: group step}, "remove_at": {index: group step},
"resume": {index: checkpoint folder}, "init": {index: another member's checkpoint folder}}`` — every spec
joins at step 0 unless ``join_at`` says later; a member listed in ``remove_at`` leaves (as a cancel does)
before that group step; ``init`` starts one from another's checkpoint (a PBT exploit). With ``"stores": {index:
{"url", "job_id", "root"}}`` that member is a job in a real store, its checkpoints recorded there and every
restore verified against them (``tests.jobs.recipe_runs.StoreReporter``); a member a restore refused gets
``rejected`` instead of joining. OUT_JSON holds, per spec, what its in-memory reporter was told, plus the
group's peak member count."""

from __future__ import annotations

import json
import sys

sys.modules["ray"] = None  # type: ignore[assignment] - any `import ray` now raises ImportError


def main() -> None:
    from jobs.spec import parse_job_spec
    from jobs.training.base_group import BaseGroup
    from jobs.training.checkpoints import CheckpointRejected
    from jobs.training.reporter import InMemoryReporter
    from tests.jobs.recipe_runs import make_reporter

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
    stores = {int(k): v for k, v in plan.get("stores", {}).items()}
    reporters: list[InMemoryReporter] = [make_reporter(stores.get(i), resume.get(i), f"j{i}")
                                          for i in range(len(specs))]
    members: dict[int, object] = {}
    errors: dict[int, str] = {}
    rejected: dict[int, str] = {}
    waiting = set(range(len(specs)))
    step, peak = 0, 0
    while waiting or group.members:
        for i in sorted(waiting):
            if join_at.get(i, 0) <= step:
                waiting.discard(i)
                try:
                    members[i] = group.add(specs[i], reporters[i], init_checkpoint=init.get(i),
                                           metadata={"base_fingerprint": "sha256:test", "job_id": reporters[i].job_id})
                except CheckpointRejected as e:
                    rejected[i] = str(e)
        for i, at in remove_at.items():
            if at == step and i in members:
                group.remove(members[i])
        peak = max(peak, len(group.members))
        for member, error in group.step():
            if error is not None:
                errors[next(i for i, m in members.items() if m is member)] = f"{type(error).__name__}: {error}"
        step += 1
    out = [{"events": r.events, "recorded": r.recorded, "checkpoints": r.checkpoints, "adapters": r.adapters,
            "error": errors.get(i), "rejected": rejected.get(i)} for i, r in enumerate(reporters)]
    with open(sys.argv[2], "w") as f:
        json.dump({"members": out, "peak": peak, "steps": step}, f)


if __name__ == "__main__":
    main()
