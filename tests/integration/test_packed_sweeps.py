"""Packed sweeps on the local Ray cluster: every trial of a sweep trains in one base group on one resident
base; ASHA's stopped trials leave the group, the best finished trial (not merely the last one standing)
is promoted, and a sweep whose driver died resumes its packed trials — re-attached where their group
still trains them, else from their own checkpoints."""

from __future__ import annotations

import time

from orchestrator.cli import main as cli


def _packed(tiny_spec, **training) -> dict:
    return tiny_spec(packing="auto", resources={"num_workers": 1, "cpus_per_worker": 1},
                     training={"eval_every_steps": 4, "epochs": 1, "lr_schedule": "constant", **training})


def _until(condition, what, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.5)


def test_a_packed_asha_sweep_trains_its_trials_in_one_group_stops_weak_ones_there_and_promotes_the_best(
    client, tiny_spec, capsys
):
    base = _packed(tiny_spec)
    # Two trials that learn: the better one (lr 0.05, 3 epochs, evaluated every 8 steps) finishes first; the
    # other (lr 0.002, 6 epochs, evaluated every 96) is the last standing. Two that cannot learn (head and
    # adapter alike; 6 epochs, evaluated every 32 steps, so they meet the best trial's results on their rungs
    # long before their end): ASHA stops them.
    training = base["training"]
    options = [{**training, "lr": 0.05, "head_lr": 0.05, "epochs": 3, "eval_every_steps": 8},
               {**training, "lr": 0.002, "head_lr": 0.002, "epochs": 6, "eval_every_steps": 96},
               {**training, "lr": 1e-7, "head_lr": 1e-7, "epochs": 6, "eval_every_steps": 32},
               {**training, "lr": 2e-7, "head_lr": 2e-7, "epochs": 6, "eval_every_steps": 32}]
    sweep = client.tune(base, search_space={"training": {"grid": options}}, metric="eval_loss", mode="min",
                        scheduler="asha", promote=True, name="packed-asha",
                        scheduler_options={"grace_period": 2, "reduction_factor": 2})
    record = sweep.wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, [client.store.get(t["job"]).error for t in trials])
    assert record.runtime["packing"].startswith("packed: up to 8 trials")
    groups = {t["group"] for t in trials}
    assert len(trials) == 4 and len(groups) == 1 and None not in groups, trials  # one resident base for all

    stopped = [t for t in trials if t["state"] == "STOPPED"]
    assert stopped and all(t["params"]["training"]["lr"] < 1e-6 for t in stopped), trials
    for t in stopped:  # it left the group mid-training: no more steps there, no adapter
        job = client.store.get(t["job"])
        left = job.runtime.get("left_group")
        assert left and left["group"] in groups and 0 < left["step"] < 192, (left, client.store.events(job.id))
        assert max(m.step for m in client.store.metrics(job.id, "train_loss")) <= left["step"]
        assert client.adapters.list(job_id=job.id) == []
    live = [m for g in client.groups.list() for m in g["members"] + g["waiting"]]
    assert not set(live) & {t["job"] for t in trials}

    finished = [t for t in trials if t["state"] == "SUCCEEDED"]
    assert len(finished) >= 2, trials
    best = min(finished, key=lambda t: t["eval_loss"])
    last = max(finished, key=lambda t: client.store.get(t["job"]).finished_at)
    assert best["job"] != last["job"], "the test's configurations no longer finish the best trial first"
    assert record.best_job_id == best["job"] and record.best_value == best["eval_loss"]
    adapter = client.adapters.get(record.best_adapter)
    assert adapter.job_id == best["job"] and adapter.promoted

    assert cli(["sweep", "show", sweep.id[:8], "--home", str(client.home)]) == 0
    out = capsys.readouterr().out
    group = groups.pop()
    assert f"trained together in base group {group}: t000, t001, t002, t003" in out
    assert group.removeprefix("peftfleet-group-") in out.split("trained together")[0]  # the trials' group column


def test_a_packed_sweep_whose_driver_died_resumes_its_trials_in_place_or_from_their_checkpoints(client, tiny_spec):
    base = _packed(tiny_spec, epochs=60, eval_every_steps=480, checkpoint_every_steps=32, lr=0.02)
    methods = [{"method": "lora", "r": 4}, {"method": "bitfit"}, {"method": "bottleneck"}]  # one group for all
    sweep = client.tune(base, search_space={"method": {"grid": methods}}, scheduler="fifo", name="packed-resume")
    jobs_client = client.cluster.jobs_client()

    def checkpoint(job_id: str) -> int:
        found = client.store.metrics(job_id, "checkpoint_step")
        return found[-1].step if found else 0

    def running_from(step: int, every: bool) -> bool:
        trials = sweep.trials()
        past = [t["state"] == "RUNNING" and checkpoint(t["job"]) >= step for t in trials]
        return len(trials) == 3 and (all(past) if every else any(past))

    # 1. The driver dies; the group trains on (and keeps the jobs alive); the resumed sweep re-attaches.
    _until(lambda: running_from(32, every=True), "every trial checkpointed")
    jobs_client.stop_job(sweep.record().runtime["ray_submission_id"])
    assert sweep.wait(timeout=300).state == "INTERRUPTED"
    jobs, gone = {t["job"] for t in sweep.trials()}, time.time()
    steps = {j: client.store.metrics(j, "train_loss")[-1].step for j in jobs}
    _until(lambda: any(client.store.metrics(j, "train_loss")[-1].step > steps[j] for j in jobs),
           "the group trains on without the driver", timeout=120)
    _until(lambda: all(client.store.get(j).heartbeat_at > gone + 10 for j in jobs if client.store.get(j).state.value
                       == "RUNNING"), "the group keeps its jobs alive", timeout=60)  # no orphans to settle
    submission = sweep.resume().record().runtime["ray_submission_id"]
    _until(lambda: all(client.store.get(j).runtime["ray_submission_id"] == submission for j in jobs),
           "every trial taken up by the resumed driver")
    for j in jobs:  # re-attached where they were: never requeued, never restarted from a checkpoint
        events = [e.to_state.value for e in client.store.events(j)]
        assert events.count("RUNNING") == 1 and "RETRYING" not in events, events
        assert client.store.metrics(j, "resumed_from_step") == []

    # 2. The driver dies with the group (a lost node): the resumed sweep continues them from their checkpoints.
    target = max(checkpoint(j) for j in jobs) + 32
    _until(lambda: running_from(target, every=False),
           lambda: f"a trial checkpointed again: {[(t['state'], checkpoint(t['job'])) for t in sweep.trials()]}")
    jobs_client.stop_job(submission)
    (group,) = {t["group"] for t in sweep.trials()}
    client.groups.stop(group)
    assert sweep.wait(timeout=300).state == "INTERRUPTED"
    interrupted = {t["job"]: checkpoint(t["job"]) for t in sweep.trials() if t["state"] != "SUCCEEDED"}
    assert interrupted, sweep.trials()
    record = sweep.resume().wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, trials)
    assert {t["job"] for t in trials} == jobs and all(t["state"] == "SUCCEEDED" for t in trials), trials
    for j, step in interrupted.items():
        resumed = client.store.metrics(j, "resumed_from_step")
        assert resumed and resumed[-1].value >= step > 0, (j, step, resumed)  # its newest checkpoint
        events = [e.to_state.value for e in client.store.events(j)]
        assert events.count("SUCCEEDED") == 1 and "RETRYING" in events
