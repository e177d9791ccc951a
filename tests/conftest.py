"""Shared fixtures: tiny models built from configs (fast) and the real MiniLM (pretrained)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Offline and CPU-only, whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()


@dataclass
class ModelCase:
    """How to build a fresh, deterministic copy of one base model and a batch for it."""

    name: str
    build: Callable[[], nn.Module]
    vocab_size: int
    classification: bool

    def fresh(self) -> nn.Module:
        torch.manual_seed(1234)
        return self.build().eval()

    def batch(self, seed: int = 0, size: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, self.vocab_size, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # one padded row, so attention masks are exercised
        labels = torch.randint(0, 3, (size,), generator=g) if self.classification else ids.clone()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_labels=3
    )
    return transformers.BertForSequenceClassification(cfg)


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT base without dropout (so data-parallel runs can match exactly) and MiniLM's
    tokenizer, saved as a model folder jobs can name as their base."""
    from jobs.base_models import resolve_base_model

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm")).save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path) -> Path:
    """A 2-layer LLaMA-like decoder with SmolLM2's tokenizer, saved as a model folder jobs can name."""
    from jobs.base_models import resolve_base_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2"))
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


def minilm() -> nn.Module:
    from jobs.base_models import resolve_base_model

    return transformers.AutoModelForSequenceClassification.from_pretrained(resolve_base_model("minilm"), num_labels=3)


# The converted SmolLM2 folder is shared by every test run on this machine: converting the GGUF
# takes ~17 s, loading the converted copy 0.2 s.
SHARED_MODELS = Path(tempfile.gettempdir()) / "peftfleet-test-models"


def smollm2() -> nn.Module:
    from jobs.base_models import resolve_base_model

    return transformers.AutoModelForCausalLM.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS))


TINY_BERT = ModelCase("tiny-bert", tiny_bert, 101, True)
TINY_LLAMA = ModelCase("tiny-llama", tiny_llama, 97, False)
MINILM = ModelCase("minilm", minilm, 30522, True)
SMOLLM2 = ModelCase("smollm2", smollm2, 49152, False)
MODEL_CASES = [TINY_BERT, TINY_LLAMA, MINILM, SMOLLM2]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own PEFTFLEET_HOME; the converted SmolLM2 cache is shared per session."""
    monkeypatch.setenv("PEFTFLEET_HOME", str(tmp_path_factory.mktemp("home")))


def randomize_adapter(model: nn.Module, scale: float = 0.1) -> None:
    """Give the trainable tensors non-trivial values (LoRA's B starts at zero, IA³ at one...)."""
    from peft_methods import applied_config, get_method

    names = get_method(applied_config(model).method).trainable_parameter_names(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(torch.randn(p.shape, generator=g) * scale)
