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


def _until(condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_packed_asha_sweep_trains_its_trials_in_one_group_stops_weak_ones_there_and_promotes_the_best(
    client, tiny_spec, capsys
):
    base = _packed(tiny_spec)
    # Two trials that learn: the better one (lr 0.05, one epoch) finishes first; the other (lr 0.005, two epochs)
    # is the last standing: evaluating twice as often, it reaches every rung first, so it meets no competition
    # there. Two trials that cannot learn: ASHA stops them.
    options = [{**base["training"], "lr": 0.05}, {**base["training"], "lr": 0.005, "epochs": 2, "eval_every_steps": 2},
               {**base["training"], "lr": 1e-7}, {**base["training"], "lr": 2e-7}]
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
        left = job.runtime["left_group"]
        assert left["group"] in groups and 0 < left["step"] < 32, left
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
    base = _packed(tiny_spec, epochs=4, checkpoint_every_steps=8)
    sweep = client.tune(base, search_space={"training.lr": {"grid": [0.05, 0.02, 0.01]}}, scheduler="fifo",
                        name="packed-resume")
    jobs_client = client.cluster.jobs_client()

    def checkpointed(at_least: int) -> bool:
        trials = sweep.trials()
        return len(trials) == 3 and all(
            t["state"] == "RUNNING" and client.store.metrics(t["job"], "checkpoint_step")[-1:]
            and client.store.metrics(t["job"], "checkpoint_step")[-1].step >= at_least for t in trials)

    # 1. The driver dies; the group trains on (and keeps the jobs alive); the resumed sweep re-attaches.
    _until(lambda: checkpointed(8), "every trial checkpointed")
    jobs_client.stop_job(sweep.record().runtime["ray_submission_id"])
    assert sweep.wait(timeout=300).state == "INTERRUPTED"
    jobs, gone = {t["job"] for t in sweep.trials()}, time.time()
    steps = {j: client.store.metrics(j, "train_loss")[-1].step for j in jobs}
    _until(lambda: any(client.store.metrics(j, "train_loss")[-1].step > steps[j] for j in jobs),
           "the group trains on without the driver", timeout=120)
    _until(lambda: all(client.store.get(j).heartbeat_at > gone + 1 for j in jobs if client.store.get(j).state.value
                       == "RUNNING"), "the group keeps its jobs alive", timeout=60)  # no orphans to settle
    sweep.resume()
    _until(lambda: sweep.record().state == "RUNNING" and len(sweep.trials()) == 3, "the sweep resumed")
    for j in jobs:  # re-attached where they were: never requeued, never restarted from a checkpoint
        events = [e.to_state.value for e in client.store.events(j)]
        assert events.count("RUNNING") == 1 and "RETRYING" not in events, events
        assert client.store.metrics(j, "resumed_from_step") == []

    # 2. The driver dies with the group (a lost node): the resumed sweep continues them from their checkpoints.
    _until(lambda: checkpointed(24), "every trial checkpointed again")
    jobs_client.stop_job(sweep.record().runtime["ray_submission_id"])
    (group,) = {t["group"] for t in sweep.trials()}
    client.groups.stop(group)
    assert sweep.wait(timeout=300).state == "INTERRUPTED"
    interrupted = {t["job"] for t in sweep.trials() if t["state"] != "SUCCEEDED"}
    assert interrupted, sweep.trials()
    record = sweep.resume().wait(timeout=900)
    trials = sweep.trials()
    assert record.state == "SUCCEEDED", (record.error, trials)
    assert {t["job"] for t in trials} == jobs and all(t["state"] == "SUCCEEDED" for t in trials), trials
    for j in interrupted:
        resumed = client.store.metrics(j, "resumed_from_step")
        assert resumed and resumed[-1].value >= 24, (j, resumed)
        events = [e.to_state.value for e in client.store.events(j)]
        assert events.count("SUCCEEDED") == 1 and "RETRYING" in events
