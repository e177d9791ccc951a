"""Scoring a model outside a job, e.g. an adapter loaded from the registry into a fresh base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def evaluate_classifier(model: nn.Module, tokenizer, examples: Sequence[tuple[str, int]], *, batch_size: int = 64, max_length: int = 64) -> float:
    """Accuracy of a sequence classifier on (text, label) pairs."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor([y for _, y in chunk])).sum().item()
    model.train(was_training)
    return correct / len(examples)
