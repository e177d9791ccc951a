"""`make demo`'s path, smaller: LoRA and BitFit on the real MiniLM and TREC, through Ray and DeepSpeed."""

from __future__ import annotations

import os
import re
from pathlib import Path

from jobs.states import JobState
from orchestrator.client import Client
from orchestrator.demo import main

# Ray's prefix on what its workers print, which reaches a driver whose Ray was started with log_to_driver on
# (here: the session's ray_cluster fixture, not the demo, started it)
WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\(.*pid=\d+.*\)")


def test_demo_trains_two_methods_on_one_base(ray_cluster, capsys):
    result = main(["--train-size", "480", "--eval-size", "300"])
    captured = capsys.readouterr()
    out = captured.out
    # Quiet by default: the demo's own lines fit on one screen; library log lines went to a file, named once.
    # a line is what a terminal shows: split at newlines only (a progress bar redraws one line with \r)
    lines = (captured.out + captured.err).rstrip("\n").split("\n")
    shown = [line for line in lines if not WORKER_LINE.match(line)]
    assert len(shown) <= 40, "\n".join(shown)
    [named] = [line for line in shown if line.startswith("peftfleet: library logs go to ")]
    log = Path(named.removeprefix("peftfleet: library logs go to ").split(" (--verbose")[0])
    assert log.parent == Path(os.environ["PEFTFLEET_HOME"]) / "logs" and log.is_file()
    ready = "INFO ray.serve: Application 'demo' is ready"  # Ray Serve's line in the driver: in the file only
    assert ready in log.read_text() and not any("Application 'demo' is ready" in line for line in shown)
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
