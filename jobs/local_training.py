"""An in-process training loop for sequence classification (plain torch, one process).

This is the smallest honest recipe: tokenise, batch, AdamW over the trainable parameters only,
evaluate on held-out data. The Ray + DeepSpeed recipe builds on the same pieces.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


def batches(examples: Sequence[tuple[str, int]], tokenizer, batch_size: int, max_length: int) -> Iterator[dict]:
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc


@torch.no_grad()
def evaluate_classifier(model: nn.Module, tokenizer, examples, *, batch_size: int = 64, max_length: int = 64) -> float:
    """Accuracy of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches(examples, tokenizer, batch_size, max_length):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return correct / len(examples)


def train_classifier(
    model: nn.Module,
    tokenizer,
    examples,
    *,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 1e-3,
    max_length: int = 64,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train the parameters that require grad; linear warm-up (6%) then linear decay."""
    import peft_methods

    config = peft_methods.applied_config(model)
    method = peft_methods.get_method(config.method) if config is not None else None
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * -(-len(examples) // batch_size)
    warmup = max(1, int(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    model.train()
    order = list(examples)
    step, started, loss = 0, time.perf_counter(), torch.tensor(0.0)
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for batch in batches(order, tokenizer, batch_size, max_length):
            loss = model(**batch).loss
            if method is not None and (extra := method.regularization_loss(model)) is not None:
                loss = loss + extra
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step:
                on_step(step, loss.item())
    return {"steps": step, "final_loss": loss.item(), "seconds": time.perf_counter() - started}
