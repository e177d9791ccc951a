"""Tokenised micro-batches for the two task types a job trains."""

from __future__ import annotations

import torch

from jobs.training.prompts import prompt_ids


class Batches:
    """Tokenised micro-batches for one task type."""

    def __init__(self, task: str, tokenizer, max_length: int):
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if self.task == "sequence-classification":
            enc = self.tokenizer(
                [t for t, _ in examples], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            enc["labels"] = torch.tensor([y for _, y in examples])
            return dict(enc)
        return self._sft(examples)

    def _sft(self, pairs) -> dict[str, torch.Tensor]:
        """Prompt + response; the loss covers the response (and EOS) only."""
        tok, rows = self.tokenizer, []
        for prompt, response in pairs:
            p = prompt_ids(tok, [{"role": "user", "content": prompt}])
            r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + r)[: self.max_length]
            labels = ([-100] * len(p) + r)[: self.max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
        }
