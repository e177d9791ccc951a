"""Base groups without Ray: jobs packed on one resident base train what they would train alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.spec import parse_job_spec
from jobs.training.base_group import BaseGroup, packing_problem
from jobs.training.reporter import InMemoryReporter
from peft_methods.adapter_files import WEIGHTS_FILE
from tests.jobs.test_recipe import ROOT, losses, run_recipe, store_job


def run_group(tmp_path: Path, plan: dict) -> dict:
    plan_file, out = tmp_path / "plan.json", tmp_path / "packed.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.jobs.group_runs", str(plan_file), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def trec(name: str, method: dict, base: str = "minilm", **training) -> dict:
    return {"name": name, "base_model": base, "task": "sequence-classification",
            "dataset": {"name": "trec", "train_size": 240}, "method": method,
            "training": {"max_steps": 30, "batch_size": 8, "lr": 0.003, "eval_size": 96, "max_length": 32,
                         "eval_every_steps": 15, "seed": 5, "base_dropout": 0.0, **training}}


def adapter_tensors(result: dict) -> dict[str, torch.Tensor]:
    (folder, _), = result["adapters"]
    return load_file(str(Path(folder) / WEIGHTS_FILE))


def accuracy(result: dict) -> float:
    (_, metrics), = result["adapters"]
    return metrics["eval_accuracy"]


def test_four_methods_packed_on_minilm_train_what_each_trains_alone(tmp_path):
    """The issue's equivalence target: LoRA r=4, LoRA r=16, BitFit and bottleneck adapters on MiniLM/TREC,
    30 steps, batch sizes, accumulation and lengths of their own; one joins late and a fifth is
    cancelled part-way. Each adapter equals its solo run's."""
    specs = [
        trec("lora4", {"method": "lora", "r": 4}),
        trec("lora16", {"method": "lora", "r": 16, "alpha": 8}, batch_size=4, grad_accum_steps=2),
        trec("bitfit", {"method": "bitfit"}, batch_size=6, lr=0.002),
        trec("bottleneck", {"method": "bottleneck"}, max_length=24, seed=9),
    ]
    doomed = trec("doomed", {"method": "lora", "r": 8}, lr=0.5)
    packed = run_group(tmp_path, {"specs": [*specs, doomed], "join_at": {"3": 4}, "remove_at": {"4": 10}})
    assert packed["peak"] == 5
    solo = run_recipe(tmp_path, specs)
    for spec, alone, together in zip(specs, solo, packed["members"]):
        assert together["error"] is None
        a, b = adapter_tensors(alone), adapter_tensors(together)
        assert a.keys() == b.keys()
        for key in a:
            worst = (b[key] - a[key]).abs().max()
            assert torch.allclose(b[key], a[key], rtol=1e-4, atol=5e-4), (spec["name"], key, worst)
        assert abs(accuracy(together) - accuracy(alone)) <= 0.002, spec["name"]
        assert sorted(losses(together)) == sorted(losses(alone)) == list(range(1, 31))
    doomed_out = packed["members"][4]
    assert not doomed_out["adapters"] and max(losses(doomed_out)) == 10  # it left after step 10, registering nothing


def test_soft_prompts_and_far_pack_beside_weight_deltas_for_classifiers_and_decoders(tmp_path, tiny_bert_dir,
                                                                                     tiny_llama_dir):
    """Prompt tuning and IPT (virtual tokens in front of their rows only) and FAR (units picked from the
    job's own batches) on an encoder classifier; LoRA, prompt tuning and BitFit on a decoder learning
    responses (SFT, each row padded to the batch's width)."""
    def job(base: Path, task: str, name: str, method: dict, **training) -> dict:
        return {"name": name, "base_model": str(base), "task": task, "method": method,
                "dataset": {"name": "trec" if task == "sequence-classification" else "chatterbot_qa", "train_size": 64},
                "training": {"max_steps": 4, "batch_size": 8, "lr": 0.01, "eval_size": 8, "max_length": 40, "seed": 3,
                             **training}}
    cls, lm = "sequence-classification", "causal-lm"
    specs = [
        job(tiny_bert_dir, cls, "c-prompt", {"method": "prompt_tuning", "num_virtual_tokens": 4}, batch_size=4),
        job(tiny_bert_dir, cls, "c-ipt", {"method": "ipt", "intrinsic_dim": 6, "num_virtual_tokens": 3},
            grad_accum_steps=2),
        job(tiny_bert_dir, cls, "c-far", {"method": "far", "fraction": 0.2}),  # units picked from its own data
        job(tiny_llama_dir, lm, "d-lora", {"method": "lora", "r": 4}, max_length=96),
        job(tiny_llama_dir, lm, "d-prompt", {"method": "prompt_tuning", "num_virtual_tokens": 5}, batch_size=4,
            max_length=96),
        job(tiny_llama_dir, lm, "d-bitfit", {"method": "bitfit"}, max_length=80),
        # Activation checkpointing (solo and packed): a recomputed layer must see its rows' deltas again.
        job(tiny_llama_dir, lm, "k-lora", {"method": "lora", "r": 4}, max_length=96, gradient_checkpointing=True),
        job(tiny_llama_dir, lm, "k-prompt", {"method": "prompt_tuning", "num_virtual_tokens": 5}, batch_size=4,
            max_length=96, gradient_checkpointing=True),
    ]
    solo = run_recipe(tmp_path, specs)
    for group in (specs[:3], specs[3:6], specs[6:]):  # (FAR's chosen units are saved with it: they are compared too)
        packed = run_group(tmp_path, {"specs": group})["members"]
        for spec, together in zip(group, packed):
            alone = solo[specs.index(spec)]
            a, b = adapter_tensors(alone), adapter_tensors(together)
            assert together["error"] is None and a.keys() == b.keys()
            for key in a:
                assert torch.allclose(b[key], a[key], rtol=1e-4, atol=5e-4), (spec["name"], key)
            (_, mine), = together["adapters"]
            (_, theirs), = alone["adapters"]
            assert mine["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-4), spec["name"]


def test_a_packed_job_resumes_from_its_own_checkpoint_on_the_same_trajectory(tmp_path, tiny_bert_dir):
    spec = trec("resumable", {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=8,
                checkpoint_every_steps=4, lr=0.01)
    neighbour = trec("neighbour", {"method": "bitfit"}, base=str(tiny_bert_dir), max_steps=8)
    job = store_job(tmp_path, spec)  # its checkpoints recorded in a real store; the resume is verified against them
    full = run_group(tmp_path, {"specs": [spec, neighbour], "stores": {"0": job}})["members"][0]
    assert [step for step, _ in full["checkpoints"]] == [4]
    resumed = run_group(tmp_path, {"specs": [spec], "stores": {"0": job}})["members"][0]  # from its latest record
    start = resumed["events"][0][1]
    assert start["resumed"] and start["step"] == 4
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    for step, value in losses(resumed).items():
        assert value == pytest.approx(losses(full)[step], rel=1e-5), step
    a, b = adapter_tensors(full), adapter_tensors(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_member_continues_another_members_checkpoint_with_its_own_hyper_parameters(tmp_path, tiny_bert_dir):
    donor = trec("donor", {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=8, checkpoint_every_steps=4,
                 lr=0.01, lr_schedule="constant")
    full = run_group(tmp_path, {"specs": [donor], "stores": {"0": store_job(tmp_path, donor)}})["members"][0]
    (_, checkpoint), = full["checkpoints"]
    recipient = {**donor, "name": "recipient", "training": {**donor["training"], "lr": 0.05, "head_lr": 0.05}}
    assert packing_problem(parse_job_spec(recipient), init_checkpoint=checkpoint) is None  # a PBT exploit packs
    assert "DeepSpeed" in packing_problem(parse_job_spec(recipient), init_checkpoint=str(tmp_path))
    continued = run_group(tmp_path, {"specs": [recipient], "init": {"0": checkpoint},
                                     "stores": {"0": store_job(tmp_path, recipient)}})["members"][0]
    start = continued["events"][0][1]
    assert start["step"] == 4 and not start["resumed"]
    mine, theirs = losses(continued), losses(full)
    assert sorted(mine) == [5, 6, 7, 8]
    assert mine[5] == pytest.approx(theirs[5], rel=1e-5)  # the donor's tensors at step 4, the same batch
    assert mine[6] != pytest.approx(theirs[6], rel=1e-3)  # its own learning rate from its first step on
    assert [v for _, name, v in continued["recorded"] if name == "lr"] == pytest.approx([0.05] * 4)


def test_a_member_whose_loss_is_not_finite_leaves_alone(tiny_bert_dir):
    group = BaseGroup(str(tiny_bert_dir), "sequence-classification")
    specs = [parse_job_spec(trec(n, {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=4))
             for n in ("sick", "healthy")]
    sick, healthy = (group.add(s, InMemoryReporter()) for s in specs)
    with torch.no_grad():
        next(p for n, p in sick.params.items() if "lora_B" in n).fill_(float("nan"))
    left = group.step()
    assert [(m.slot, type(e).__name__) for m, e in left] == [(sick.slot, "FloatingPointError")]
    assert list(group.members.values()) == [healthy] and healthy.step == 1
    assert all(torch.isfinite(p).all() for p in healthy.params.values())
    while group.members:
        group.step()
    assert healthy.step == 4 and healthy.reporter.events[-1][0] == "finished"
    assert not any(p.requires_grad for p in group.plain.parameters())  # the base stayed frozen throughout


def test_a_member_whose_rows_break_the_shared_step_leaves_and_the_others_restart_that_step(tiny_bert_dir):
    def fresh() -> tuple[BaseGroup, list]:
        group = BaseGroup(str(tiny_bert_dir), "sequence-classification")
        specs = [parse_job_spec(trec(n, {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=3,
                                     grad_accum_steps=2)) for n in ("broken", "healthy")]
        return group, [group.add(s, InMemoryReporter()) for s in specs]

    group, (broken, healthy) = fresh()
    group.step()  # the first micro-batch of step 1: gradients accumulated, no optimizer step yet

    def explode():
        raise RuntimeError("a plugin's per-row deltas failed")

    broken.deltas = explode
    left = group.step()
    assert [(m.slot, str(e)) for m, e in left] == [(broken.slot, "a plugin's per-row deltas failed")]
    while group.members:
        group.step()
    alone, (_, clean) = fresh()
    alone.remove(_)
    while alone.members:
        alone.step()
    mine, theirs = healthy.reporter.values("train_loss"), clean.reporter.values("train_loss")
    assert [s for s, _ in mine] == [s for s, _ in theirs] == [1, 2, 3]
    assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-6)  # its first step was restarted


class HoldingReporter(InMemoryReporter):
    """Holds its job at every checkpoint until the test lets it go (what a PBT trial's reporter does until
    its scheduler decided)."""

    held = False

    def hold(self, step: int) -> None:
        self.held = True


def test_a_held_member_sits_out_while_the_others_train_and_then_goes_on_as_if_never_held(tiny_bert_dir):
    def fresh() -> tuple[BaseGroup, list]:
        group = BaseGroup(str(tiny_bert_dir), "sequence-classification")
        specs = [parse_job_spec(trec(n, {"method": "lora", "r": 4}, base=str(tiny_bert_dir), max_steps=4,
                                     checkpoint_every_steps=2)) for n in ("trial", "other")]
        return group, [group.add(specs[0], HoldingReporter()), group.add(specs[1], InMemoryReporter())]

    group, (trial, other) = fresh()
    group.step(), group.step()
    assert trial.step == other.step == 2 and trial.reporter.held  # held at its checkpoint at step 2
    group.step()
    assert (trial.step, other.step) == (2, 3) and group.active() == [other]
    trial.reporter.held = False  # its scheduler decided: it trains on
    while group.members:
        group.step()
    assert trial.step == 4 and trial.reporter.events[-1][0] == "finished"
    unheld, (alone, _) = fresh()
    alone.reporter.hold = lambda step: None
    while unheld.members:
        unheld.step()
    mine, theirs = trial.reporter.values("train_loss"), alone.reporter.values("train_loss")
    assert [s for s, _ in mine] == [s for s, _ in theirs] == [1, 2, 3, 4]
    assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-6)


@pytest.mark.parametrize(("change", "why"), [
    ({"packing": "off"}, "packing is off"),
    ({"resources": {"num_workers": 2}}, "2 data-parallel workers"),
    ({"deepspeed": {"zero_stage": 3}}, "ZeRO-3"),
    ({"method": {"method": "lora", "dropout": 0.1}}, "LoRA dropout"),
    ({"method": {"method": "prefix_tuning"}}, "prefix_tuning does not declare"),
    ({"method": {"method": "adamix"}}, "adamix does not declare"),
    ({"method": {"method": "far"}}, None),
    ({"method": {"method": "prompt_tuning"}}, None),
    ({"method": {"method": "lora", "modules_to_save": []}}, "task head frozen"),
    ({"method": {"method": "bitfit"}}, None),
    ({"method": {"method": "bottleneck"}}, None),
    ({}, None),
])
def test_who_packs_and_why_not(change, why):
    problem = packing_problem(parse_job_spec({**trec("who", {"method": "lora"}), **change}))
    assert problem is None if why is None else why in problem


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
