"""`make demo`'s path, smaller: LoRA and BitFit on the real MiniLM and TREC, through Ray and DeepSpeed."""

from __future__ import annotations

from jobs.states import JobState
from orchestrator.client import Client
from orchestrator.demo import main


def test_demo_trains_two_methods_on_one_base(ray_cluster, capsys):
    result = main(["--train-size", "480", "--eval-size", "300"])
    out = capsys.readouterr().out
    client = Client()  # the same default store, under this test's PEFTFLEET_HOME
    lora, bitfit = (client.jobs.get(job_id) for job_id in result["job_ids"])
    assert lora.status() is JobState.SUCCEEDED and bitfit.status() is JobState.SUCCEEDED, out
    assert lora.metrics("eval_accuracy")[-1].value > result["majority"] + 0.2
    losses = [m.value for m in bitfit.metrics("train_loss")]
    half = len(losses) // 2  # single micro-batch losses are noisy: compare the halves' means
    late, early = sum(losses[half:]) / (len(losses) - half), sum(losses[:half]) / half
    assert late < early, f"BitFit's loss did not go down: {losses}"
    a, b = result["adapters"]
    assert (a.method, b.method) == ("lora", "bitfit") and a.base_fingerprint == b.base_fingerprint
    assert f"both adapters share one frozen base: {a.base_fingerprint}" in out
    # Both trained at once in one base group, holding one copy of MiniLM.
    group = result["group"]
    assert group and group["together"] == 2 and group["base_mb"] > 50, out
    assert lora.record().runtime["base_group"] == bitfit.record().runtime["base_group"] == group["name"]
    assert f"both jobs trained in base group {group['name']}: 2 jobs at once" in out
    assert {x.name for x in client.adapters.list(base="minilm")} == {a.name, b.name}
    # Both adapters answered over HTTP from one served base, with TREC's class names.
    answers = result["answers"]
    assert sorted({r["adapter"] for r in answers}) == sorted([a.name, b.name]) and len(answers) == 6
    assert {r["label"] for r in answers} <= {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    lora_labels = [r["label"] for r in answers if r["adapter"] == a.name]
    assert lora_labels.count("NUM") + lora_labels.count("HUM") >= 1  # "how far" is NUM, "who wrote" HUM
    assert "served at http://" in out
