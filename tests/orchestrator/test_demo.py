"""The demo end to end on the real MiniLM and real TREC data (smaller than `make demo`)."""

from __future__ import annotations

from orchestrator.demo import main


def test_demo_lora_learns_trec_and_the_saved_adapter_reproduces_it(capsys):
    result = main(["--train-size", "600", "--eval-size", "300"])
    assert result["before"] < result["majority"] + 0.05, "an untrained head should be near chance"
    assert result["after"] > result["majority"] + 0.25
    assert result["reloaded"] == result["after"]
    assert "accuracy after LoRA fine-tuning" in capsys.readouterr().out
