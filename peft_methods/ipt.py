"""Intrinsic prompt tuning (IPT): Qin et al. 2021, "Exploring Universal Intrinsic Task Subspace via
Prompt Tuning" (arXiv:2110.07867).

Two stages. *Subspace finding*: an autoencoder learns to squeeze the soft prompts of several tasks
(prompt-tuning adapters of one base) through a ``intrinsic_dim``-sized code; its decoder, a small
MLP from the code to a whole prompt, is the intrinsic subspace (:func:`fit_subspace`, saved as a
folder by :func:`save_subspace`). *Subspace tuning*: a new task trains only a vector ``z`` of that
size; the frozen decoder turns it into the soft prompt prepended to the input, as in prompt tuning.

Without a fitted subspace the decoder is a fixed random linear map around a random prompt — the
random-projection baseline of intrinsic-dimension studies (Aghajanyan et al. 2021), which IPT
improves on. The saved adapter holds the decoded prompt (HF PEFT's prompt-tuning layout) plus ``z``,
so loading and serving need neither the decoder nor the subspace: a trained IPT adapter runs
exactly like a prompt-tuning adapter of the same length.

Here the autoencoder learns from the prompts alone (reconstruction); the paper's subspace finding
also back-propagates the source tasks' losses through the decoder, which needs their data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import save_file
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.prompt_tuning import PromptEmbeddings, input_embedding_table, install_prompt
from peft_methods.row_deltas import Prompt
from peft_methods.virtual_tokens import (
    PROMPT_KEY,
    from_hf_keys,
    hf_prompt_learning_config,
    load_prompt_state,
    to_hf_keys,
)

_ATTR = "peft_prompt"
VECTOR_KEY = "intrinsic_vector"
SUBSPACE_FORMAT = 1
SUBSPACE_JSON = "subspace.json"
SUBSPACE_TENSORS = "subspace.safetensors"
_DECODER_KEYS = ("in_weight", "in_bias", "out_weight", "out_bias")
RANDOM_DIM, RANDOM_TOKENS = 16, 20


class IPTConfig(MethodConfig):
    method: Literal["ipt"] = Field(default="ipt", description="Selects intrinsic prompt tuning.")
    subspace: str | None = Field(
        default=None, min_length=1,
        description=(
            "The intrinsic subspace: in a job spec the name of a registered subspace (fitted by an "
            "`ipt-subspace` job); in Python a subspace folder. None = a random linear subspace (the baseline)."
        ),
    )
    intrinsic_dim: int | None = Field(
        default=None,
        gt=0,
        le=4096,
        description=f"Size of the trained vector z. With a subspace: its dimension (unset or equal). "
        f"Without: default {RANDOM_DIM}.",
    )
    num_virtual_tokens: int | None = Field(
        default=None,
        gt=0,
        le=1024,
        description=f"Length of the decoded prompt. With a subspace: its length (unset or equal). "
        f"Without: default {RANDOM_TOKENS}.",
    )
    seed: int = Field(
        default=0, ge=0, lt=2**32, description="Seeds the random subspace (used only without `subspace`)."
    )
    decoded: bool = Field(
        default=False,
        description=(
            "Load form, set by load_adapter: the saved decoded prompt is used as is, no subspace is needed. "
            "Training in this form would be plain prompt tuning."
        ),
    )

    @model_validator(mode="after")
    def _decoded_knows_its_size(self) -> IPTConfig:
        if self.decoded and (self.intrinsic_dim is None or self.num_virtual_tokens is None):
            raise ValueError("decoded=True needs intrinsic_dim and num_virtual_tokens")
        return self


class PromptDecoder(nn.Module):
    """z (d,) -> prompt (n, hidden): ``out(tanh(in(z)))``, or ``out(z)`` for a linear subspace.
    The weights are buffers: frozen, moved with the model, never partitioned by ZeRO-3."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_virtual_tokens: int, hidden: int):
        super().__init__()
        self.shape = (num_virtual_tokens, hidden)
        for key in _DECODER_KEYS:
            self.register_buffer(key, tensors.get(key))

    @property
    def intrinsic_dim(self) -> int:
        return (self.in_weight if self.in_weight is not None else self.out_weight).shape[1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Computed in ``z``'s dtype: bf16 while a bf16 engine trains (it casts parameters, not buffers),
        fp32 when the adapter is saved from the optimizer's fp32 master of ``z``."""
        h = z
        if self.in_weight is not None:
            h = torch.tanh(F.linear(h, *self._weights("in", z.dtype)))
        return F.linear(h, *self._weights("out", z.dtype)).view(self.shape)

    def _weights(self, which: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = getattr(self, f"{which}_weight"), getattr(self, f"{which}_bias")
        return weight.to(dtype), None if bias is None else bias.to(dtype)


class IntrinsicPrompt(nn.Module):
    """The trainable vector and the frozen decoder; called like PromptEmbeddings."""

    def __init__(self, decoder: PromptDecoder, z: torch.Tensor):
        super().__init__()
        self.intrinsic = nn.Parameter(z)
        self.decoder = decoder

    def prompt(self) -> torch.Tensor:
        return self.decoder(self.intrinsic)

    def forward(self, batch: int) -> torch.Tensor:
        return self.prompt().unsqueeze(0).repeat(batch, 1, 1)


class DecodedPrompt(PromptEmbeddings):
    """A trained IPT prompt loaded for inference: the decoded prompt, with z kept for the record."""

    def __init__(self, weight: torch.Tensor, z: torch.Tensor):
        super().__init__(weight)
        self.register_buffer("intrinsic", z)


class IPT(PeftMethod):
    name = "ipt"
    Config = IPTConfig
    mergeable = False
    inference_overhead = (
        "the same as prompt tuning: num_virtual_tokens extra positions per sequence (the decoder runs once, "
        "at save time; served adapters hold the decoded prompt)"
    )
    paper = "Qin et al. 2021, arXiv:2110.07867"
    default_lr = 3e-2

    def _inject(self, model: nn.Module, config: IPTConfig) -> None:
        table = input_embedding_table(model, self.name)
        hidden = table.shape[1]
        like = {"device": table.device, "dtype": table.dtype}
        if config.decoded:
            prompt: nn.Module = DecodedPrompt(torch.zeros(config.num_virtual_tokens, hidden, **like),
                                              torch.zeros(config.intrinsic_dim, **like))
        else:
            if config.subspace is None:
                decoder, z = random_subspace(
                    table, config.intrinsic_dim or RANDOM_DIM, config.num_virtual_tokens or RANDOM_TOKENS, config.seed
                )
            else:
                decoder, z = load_subspace(config.subspace, hidden)
            _check_matches(config, decoder)
            prompt = IntrinsicPrompt(decoder.to(**like), z.to(**like))
        install_prompt(model, prompt, _prompt_shape(prompt)[0])

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return name in (f"{_ATTR}.intrinsic", f"{_ATTR}.weight")

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().training_state(model)
        module = getattr(model, _ATTR)
        if isinstance(module, IntrinsicPrompt):
            state.pop(f"{_ATTR}.intrinsic")
            prompt = module.prompt()  # decoded from z: the gradient reaches z through the frozen decoder
        else:
            prompt = state.pop(f"{_ATTR}.weight")
        return {PROMPT_KEY: prompt, VECTOR_KEY: module.intrinsic, **state}

    def packing_problem(self, config: IPTConfig) -> str | None:
        return None

    def loading_config(self, config: IPTConfig, state: dict[str, torch.Tensor]) -> IPTConfig:
        prompt, z = state.get(PROMPT_KEY), state.get(VECTOR_KEY)
        if prompt is None or z is None or prompt.dim() != 2 or z.dim() != 1:
            raise ValueError(f"ipt: an adapter needs a 2-D {PROMPT_KEY} and a 1-D {VECTOR_KEY}")
        return config.model_copy(
            update={"decoded": True, "num_virtual_tokens": prompt.shape[0], "intrinsic_dim": z.shape[0]}
        )

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module = getattr(model, _ATTR)
        if not isinstance(module, DecodedPrompt):
            raise ValueError("ipt: adapters load into the decoded form (peft_methods.load_adapter does this)")

        def setter(target: torch.Tensor):
            def set_(t: torch.Tensor) -> None:
                with torch.no_grad():
                    target.copy_(t)
            return set_

        load_prompt_state(self, model, state, {
            PROMPT_KEY: (tuple(module.weight.shape), setter(module.weight)),
            VECTOR_KEY: (tuple(module.intrinsic.shape), setter(module.intrinsic)),
        })

    def row_deltas(self, base: nn.Module, config: IPTConfig, state: dict[str, torch.Tensor]) -> list[Prompt]:
        return [Prompt(state[PROMPT_KEY])]  # the decoded prompt: served like prompt tuning

    def to_file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_hf_keys(state)

    def from_file_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return from_hf_keys(self.name, tensors)

    def adapter_config(self, model: nn.Module, config: IPTConfig) -> dict[str, Any]:
        """HF PEFT's PromptTuningConfig for the decoded prompt (its loader ignores `intrinsic_vector`);
        where the prompt came from is in peftfleet.json."""
        module = getattr(model, _ATTR)
        n, hidden = _prompt_shape(module)
        return {
            **hf_prompt_learning_config(model, "PROMPT_TUNING", n, hidden, model.config.num_attention_heads),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }


def _prompt_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(module.decoder.shape) if isinstance(module, IntrinsicPrompt) else tuple(module.weight.shape)


def _check_matches(config: IPTConfig, decoder: PromptDecoder) -> None:
    for field, actual in (("intrinsic_dim", decoder.intrinsic_dim), ("num_virtual_tokens", decoder.shape[0])):
        wanted = getattr(config, field)
        if wanted is not None and wanted != actual:
            raise ValueError(f"ipt: {field}={wanted}, but the subspace has {actual}; leave it unset")


def random_subspace(table: torch.Tensor, dim: int, n: int, seed: int) -> tuple[PromptDecoder, torch.Tensor]:
    """A fixed random linear subspace around a random prompt, both at the scale of the token embeddings."""
    g = torch.Generator().manual_seed(seed)
    hidden, scale = table.shape[1], table.detach().float().std().item()
    tensors = {
        "out_weight": torch.randn(n * hidden, dim, generator=g) * scale / dim**0.5,
        "out_bias": torch.randn(n * hidden, generator=g) * scale,
    }
    return PromptDecoder(tensors, n, hidden), torch.zeros(dim)


# -- the subspace: fitting, saving, loading ----------------------------------------------------

def fit_subspace(
    prompts: torch.Tensor, *, intrinsic_dim: int, inner_dim: int, steps: int, lr: float, seed: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Fit the autoencoder on ``prompts`` (tasks, n, hidden); returns the decoder's tensors, the mean
    code of the tasks (where a new task's z starts) and fit statistics.

    Prompts are centred and scaled to unit spread while fitting; the decoder's output layer absorbs
    that, so it maps a code straight to a prompt at the prompts' own scale.
    """
    k, n, hidden = prompts.shape
    if k < 2:
        raise ValueError(f"fitting a subspace needs the prompts of at least 2 tasks, got {k}")
    if intrinsic_dim > k:
        raise ValueError(f"intrinsic_dim {intrinsic_dim} exceeds the {k} source prompts: a subspace cannot have "
                         "more dimensions than the prompts it is fitted from")
    x = prompts.reshape(k, n * hidden).double()
    mean = x.mean(0)
    if (x - mean).norm() <= 1e-6 * x.norm():
        raise ValueError(f"the {k} source prompts are identical: a subspace needs tasks whose prompts differ")
    spread = (x - mean).std()
    xn = ((x - mean) / spread).float()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = nn.Sequential(nn.Linear(n * hidden, inner_dim), nn.Tanh(), nn.Linear(inner_dim, intrinsic_dim))
        decoder = nn.Sequential(nn.Linear(intrinsic_dim, inner_dim), nn.Tanh(), nn.Linear(inner_dim, n * hidden))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(decoder(encoder(xn)), xn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        codes = encoder(xn)
        rebuilt = decoder(codes)
        relative_error = ((rebuilt - xn).norm() / xn.norm()).item()  # of the prompts' spread around their mean
        out = decoder[2]
        tensors = {
            "in_weight": decoder[0].weight.detach().clone(),
            "in_bias": decoder[0].bias.detach().clone(),
            "out_weight": (out.weight.double() * spread).float(),
            "out_bias": (out.bias.double() * spread + mean).float(),
        }
    stats = {"reconstruction_relative_error": relative_error, "final_loss": loss.item(), "num_sources": float(k)}
    return tensors, codes.mean(0).detach().clone(), stats


def save_subspace(
    folder: str | os.PathLike, tensors: dict[str, torch.Tensor], init_code: torch.Tensor, *,
    num_virtual_tokens: int, hidden_size: int, metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a subspace folder: the decoder and initial code (safetensors) and a JSON description
    holding their sha256 and ``metadata`` (base fingerprint, sources, fit statistics)."""
    from peft_methods.adapter_files import sha256_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    save_file({**{k: v.contiguous() for k, v in tensors.items()}, "init_code": init_code.contiguous()},
              folder / SUBSPACE_TENSORS, metadata={"format": "pt"})
    info = {
        "format_version": SUBSPACE_FORMAT, "intrinsic_dim": int(init_code.shape[0]),
        "num_virtual_tokens": num_virtual_tokens, "hidden_size": hidden_size,
        "files": {SUBSPACE_TENSORS: sha256_file(folder / SUBSPACE_TENSORS)}, "metadata": metadata or {},
    }
    (folder / SUBSPACE_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def read_subspace_info(folder: str | os.PathLike) -> dict[str, Any]:
    """subspace.json, after checking the tensors' sha256."""
    from peft_methods.adapter_files import read_hashed_json

    return read_hashed_json(folder, SUBSPACE_JSON, "IPT subspace", SUBSPACE_FORMAT, (SUBSPACE_TENSORS,))


def load_subspace(folder: str | os.PathLike, hidden_size: int) -> tuple[PromptDecoder, torch.Tensor]:
    """The frozen decoder and the initial code of a verified subspace folder for a model of ``hidden_size``."""
    if not Path(folder).is_dir():
        raise ValueError(
            f"ipt: subspace {str(folder)!r} is not a folder (job specs resolve registered names; Python needs the "
            "folder)"
        )
    from safetensors.torch import load as load_safetensors

    from peft_methods.adapter_files import read_hashed_files

    # The tensors parsed are the bytes whose hash was checked (the file is read once).
    info, blobs = read_hashed_files(folder, SUBSPACE_JSON, "IPT subspace", SUBSPACE_FORMAT, (SUBSPACE_TENSORS,))
    if info["hidden_size"] != hidden_size:
        raise ValueError(
            f"ipt: the subspace decodes prompts of width {info['hidden_size']}, the model's embeddings are "
            f"{hidden_size} wide"
        )
    tensors = load_safetensors(blobs[SUBSPACE_TENSORS])
    n, d, width = info["num_virtual_tokens"], info["intrinsic_dim"], info["num_virtual_tokens"] * hidden_size
    inner = tensors["in_weight"].shape[0] if "in_weight" in tensors else -1
    expected = {
        "in_weight": (inner, d),
        "in_bias": (inner,),
        "out_weight": (width, inner),
        "out_bias": (width,),
        "init_code": (d,),
    }
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ValueError(f"ipt: subspace {folder} holds tensors of unexpected names or shapes")
    init = tensors.pop("init_code")
    return PromptDecoder(tensors, n, hidden_size), init
