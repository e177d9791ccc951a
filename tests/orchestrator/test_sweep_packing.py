"""Whether a sweep's trials pack into a base group, decided over every configuration it can produce."""

from __future__ import annotations

import pytest

from jobs.sweep_spec import parse_sweep_spec
from orchestrator.tune.sweeps import PACKED_TRIAL_CPU, TRIAL_CPU, packing

SPEC = {"name": "s", "base_model": "minilm", "task": "sequence-classification", "dataset": {"name": "trec"},
        "method": {"method": "lora", "r": 8}, "training": {"lr": 0.001}}


def sweep(space: dict, **fields) -> object:
    return parse_sweep_spec({"name": "pack", "spec": SPEC, "search_space": space, **fields})


def test_a_mixed_method_space_packs_with_up_to_the_member_cap_of_trials_at_once(monkeypatch):
    space = {"method": {"choice": [{"method": "lora", "r": {"choice": [4, 16]}}, {"method": "bitfit"},
                                   {"method": "bottleneck"}]}, "training.lr": {"loguniform": [1e-4, 1e-2]}}
    plan = packing(sweep(space, num_samples=20))
    assert plan.solo is None and plan.trial_cpu == PACKED_TRIAL_CPU and plan.max_concurrent == 8
    assert plan.describe().startswith("packed: up to 8 trials")
    monkeypatch.setenv("PEFTFLEET_GROUP_MAX_MEMBERS", "4")
    assert packing(sweep(space, max_concurrent=6)).max_concurrent == 4  # bounded by the cap
    assert packing(sweep(space, max_concurrent=2)).max_concurrent == 2


@pytest.mark.parametrize(("space", "why"), [
    ({"method": {"choice": [{"method": "lora"}, {"method": "prefix_tuning"}]}}, "prefix_tuning does not declare"),
    ({"method.dropout": {"uniform": [0.0, 0.2]}}, "LoRA dropout"),
    ({"resources.num_workers": {"grid": [1, 2]}}, "data-parallel workers"),
])
def test_one_configuration_that_cannot_pack_makes_every_trial_solo(space, why):
    plan = packing(sweep(space))
    assert why in plan.solo and plan.trial_cpu == TRIAL_CPU and plan.max_concurrent is None
    assert plan.describe().startswith("solo: ")


def test_packing_off_in_the_job_spec_keeps_a_sweep_solo():
    plan = packing(parse_sweep_spec({"name": "off", "spec": {**SPEC, "packing": "off"},
                                     "search_space": {"training.lr": {"grid": [0.01, 0.001]}}}))
    assert "packing is off" in plan.solo
