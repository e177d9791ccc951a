"""Prompt tuning: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

``num_virtual_tokens`` trainable embeddings are prepended to every input's token embeddings; the
whole base model stays frozen. By default the prompt starts as the embeddings of
``num_virtual_tokens`` token ids drawn at random (torch's global RNG, which a job seeds with its
``training.seed``) from the first ``init_vocab_size`` (5,000) ids: Lester et al. found sampled
vocabulary initialisation better than random vectors, drawing from the 5,000 most common tokens of
T5's vocabulary, whose ids are ordered by frequency. We take the lowest ids as the most common; that
holds roughly for SentencePiece and BPE vocabularies (merge order), less well for BERT's WordPiece,
whose first 1,996 ids are 994 reserved ``[unused]`` tokens, a few special ones and single characters
(its words follow, by frequency).

The model is changed in place, so a forward pre-hook does the prepending (see
:mod:`peft_methods.virtual_tokens`); for causal LMs the logits of the virtual positions are dropped
again, so ``logits`` stay aligned with ``input_ids``. Saved in HF PEFT's layout
(``prompt_embeddings`` + ``base_model.<head>.*``), so ``peft.PeftModel.from_pretrained`` loads our
adapters unchanged (HF PEFT's causal-LM logits keep the virtual positions in front).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.row_deltas import Prompt
from peft_methods.targeting import hf_task_type
from peft_methods.virtual_tokens import (
    PROMPT_KEY,
    batch_size,
    extend_attention_mask,
    from_hf_keys,
    hf_prompt_learning_config,
    install_input_hook,
    load_prompt_state,
    prepend,
    to_hf_keys,
)

_ATTR = "peft_prompt"  # the module holding the virtual tokens on the model


class PromptTuningConfig(MethodConfig):
    method: Literal["prompt_tuning"] = Field(default="prompt_tuning", description="Selects prompt tuning.")
    num_virtual_tokens: int = Field(
        default=20,
        gt=0,
        le=1024,
        description="Trainable embeddings prepended to every input (the soft prompt's length).",
    )
    init: Literal["vocab", "random", "text"] = Field(
        default="vocab",
        description=(
            "How the soft prompt starts: 'vocab' (the embeddings of num_virtual_tokens token ids drawn at random "
            "below init_vocab_size, as Lester et al. do), 'random' (normal, at the scale of the model's token "
            "embeddings) or 'text' (the embeddings of `init_text`'s tokens, repeated or cut to num_virtual_tokens)."
        ),
    )
    init_vocab_size: int | None = Field(
        default=5000,
        gt=0,
        description=(
            "init='vocab' draws token ids below this (Lester et al.: the 5,000 most common tokens; lower ids "
            "are taken as the more common); None = the whole vocabulary, as HF PEFT's SAMPLE_VOCAB does."
        ),
    )
    init_text: str | None = Field(
        default=None, min_length=1, validate_default=True,
        description="Text whose token embeddings initialise the prompt; required with init='text', else must be unset.",
    )
    tokenizer_path: str | None = Field(
        default=None, min_length=1,
        description="Tokenizer used to split init_text (a folder or hub id). None = the base model's own folder.",
    )

    @field_validator("init_text")
    @classmethod
    def _text_iff_text_init(cls, value: str | None, info: ValidationInfo) -> str | None:
        wants_text = info.data.get("init") == "text"
        if wants_text and value is None:
            raise ValueError("init='text' needs init_text")
        if not wants_text and value is not None:
            raise ValueError("init_text is only used with init='text'")
        return value


class PromptEmbeddings(nn.Module):
    """The soft prompt. Read through ``forward`` so ZeRO-3 gathers the weight for the call."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, batch: int) -> torch.Tensor:
        # A copy, not an expand() view: ZeRO-3 may reuse the gathered weight's buffer after the call.
        return self.weight.unsqueeze(0).repeat(batch, 1, 1)


class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    Config = PromptTuningConfig
    mergeable = False
    inference_overhead = (
        "num_virtual_tokens extra positions in every sequence: attention and MLP cost grow as if each input "
        "were that many tokens longer, and they use up the model's maximum length"
    )
    paper = "Lester et al. 2021, arXiv:2104.08691"
    default_lr = 3e-2

    def _inject(self, model: nn.Module, config: PromptTuningConfig) -> None:
        table = input_embedding_table(model, self.name)
        install_prompt(model, PromptEmbeddings(_initial_prompt(model, table, config)), config.num_virtual_tokens)

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name.startswith(_ATTR + ".")

    def row_deltas(self, base: nn.Module, config: MethodConfig, state: dict[str, torch.Tensor]) -> list[Prompt]:
        return [Prompt(state[PROMPT_KEY])]

    # -- HF PEFT's layout: `prompt_embeddings` (num_virtual_tokens, hidden) plus the task head --
    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().training_state(model)
        return {PROMPT_KEY: state.pop(f"{_ATTR}.weight"), **state}

    def packing_problem(self, config: PromptTuningConfig) -> str | None:
        return None

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        weight = getattr(model, _ATTR).weight

        def set_prompt(t: torch.Tensor) -> None:
            with torch.no_grad():
                weight.copy_(t)

        load_prompt_state(self, model, state, {PROMPT_KEY: (tuple(weight.shape), set_prompt)})

    def to_file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_hf_keys(state)

    def from_file_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_hf_keys(self.name, tensors)

    def adapter_config(self, model: nn.Module, config: PromptTuningConfig) -> dict[str, Any]:
        """HF PEFT's PromptTuningConfig. The init is recorded as RANDOM whatever ours was: the saved tensor
        already holds the trained prompt, and TEXT would make HF PEFT load a tokenizer (SAMPLE_VOCAB sample
        tokens) only to overwrite its result."""
        hidden = getattr(model, _ATTR).weight.shape[1]
        return {
            **hf_prompt_learning_config(model, "PROMPT_TUNING", config.num_virtual_tokens, hidden,
                                        model.config.num_attention_heads),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }


def input_embedding_table(model: nn.Module, method: str) -> torch.Tensor:
    """The token-embedding matrix a soft prompt lives beside; a clear error if the model has none."""
    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise ValueError(f"{method}: {type(model).__name__} exposes no input embeddings")
    return embeddings.weight


def install_prompt(model: nn.Module, prompt: nn.Module, n: int) -> None:
    """Attach ``prompt`` (``prompt(batch)`` -> (batch, n, hidden)) as ``model.peft_prompt`` and prepend
    its output to every forward's input embeddings."""
    setattr(model, _ATTR, prompt)
    install_input_hook(model, lambda m, kwargs: _add_virtual_tokens(m, kwargs, n))
    if hf_task_type(model) == "CAUSAL_LM":
        model.register_forward_hook(lambda m, args, out: _drop_virtual_logits(out, n))


def _initial_prompt(model: nn.Module, table: torch.Tensor, config: PromptTuningConfig) -> torch.Tensor:
    n = config.num_virtual_tokens
    if config.init == "vocab":
        vocabulary = table.shape[0] if config.init_vocab_size is None else min(config.init_vocab_size, table.shape[0])
        ids = torch.randint(vocabulary, (n,))  # on the CPU generator: the same draw on every device
        return table.detach()[ids.to(table.device)].clone()
    if config.init == "random":
        # At the scale of real token embeddings, so the first forwards see inputs of familiar magnitude.
        scale = table.detach().float().std()
        return (torch.randn(n, table.shape[1], device=table.device) * scale).to(table.dtype)
    from transformers import AutoTokenizer

    source = config.tokenizer_path or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError("prompt_tuning: init='text' needs tokenizer_path (the model records no folder of its own)")
    ids = AutoTokenizer.from_pretrained(source)(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning: init_text {config.init_text!r} tokenizes to nothing")
    if max(ids) >= table.shape[0]:
        raise ValueError(
            f"prompt_tuning: tokenizer {source!r} yields ids beyond the model's vocabulary of {table.shape[0]}"
        )
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return table.detach()[torch.tensor(ids, device=table.device)].clone()


def _add_virtual_tokens(model: nn.Module, kwargs: dict[str, Any], n: int) -> None:
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if (ids is None) == (embeds is None):
        raise ValueError("prompt_tuning: give exactly one of input_ids or inputs_embeds")
    b = batch_size({"input_ids": ids, "inputs_embeds": embeds})
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    prompt = getattr(model, _ATTR)(b).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    extend_attention_mask(kwargs, n)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
    if kwargs.get("position_ids") is not None:
        # Virtual tokens take positions 0..n-1 and push the real ones back, as when positions are implicit.
        pos = kwargs["position_ids"]
        front = torch.arange(n, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], n)
        kwargs["position_ids"] = torch.cat([front, pos + n], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2:  # per-token labels: nothing to predict at virtual positions
        kwargs["labels"] = prepend(labels, n, -100)


def _drop_virtual_logits(output: Any, n: int) -> Any:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        output.logits = logits[:, n:]
    return output
