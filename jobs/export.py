"""Export a registered adapter for tools outside peftfleet: HF PEFT, vLLM, plain transformers.

Two forms (``peftfleet export ADAPTER --out DIR [--merge]``, docs/export.md):

* **adapter** (default): the adapter's own files, verified against the registry, with
  ``base_model_name_or_path`` filled in, plus a model card. A LoRA adapter's ``adapter_config.json``
  gets every field HF PEFT and vLLM read for a plain LoRA, so both load the folder unchanged; prompt
  and prefix tuning load in HF PEFT; other methods stay peftfleet's format. ``peftfleet.json`` comes
  along with its hashes updated, so peftfleet can still verify and load the export.
* **merged** (``--merge``, mergeable methods only): the base with the adapter folded in, the method's
  wrappers removed, saved by ``save_pretrained`` (safetensors) with the tokenizer and a model card: a
  standard transformers folder that ``AutoModelFor....from_pretrained`` loads without peftfleet.

Only verified bytes are exported or loaded: every file's sha256 is checked against the manifest the
registry recorded. No Ray here; the CLI calls :func:`export_adapter`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from jobs.base_models import load_base_model
from jobs.store import JobNotFound, JobStore
from jobs.store.adapter_registry import AdapterRecord
from jobs.store.base_model_registry import BaseModelRecord
from peft_methods.adapter_files import (
    ADAPTER_FILES,
    CONFIG_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    read_hashed_files,
    replace_folder,
    sha256_file,
    write_json,
)
from peft_methods.api import FILE_KEY_PREFIX, MergeableLayer, applied_config
from peft_methods.registry import get_method, list_methods
from peft_methods.targeting import replace_module

CARD_FILE = "README.md"
# Fields HF PEFT's LoraConfig writes that decide what a LoRA computes, with the values of a plain LoRA
# (what ours is). vLLM's PEFTHelper reads r, lora_alpha, target_modules, bias, modules_to_save, use_rslora,
# use_dora, lora_bias, init_lora_weights, layer_replication, rank_pattern and alpha_pattern; HF PEFT the rest.
PLAIN_LORA_FIELDS: dict[str, Any] = {
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "inference_mode": True,
}
HF_PEFT_TYPES = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING")  # the adapter configs of ours HF PEFT reads
# Hub ids of the named bases, for the model card (SmolLM2 is trained here from its Q4_1 GGUF, dequantised).
UPSTREAM = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ExportError(ValueError):
    """An export that cannot be made as asked; the message is one line naming the option or adapter."""


@dataclass(frozen=True)
class Export:
    """What :func:`export_adapter` wrote."""

    path: Path
    kind: str  # "adapter" or "merged"
    adapter: str
    method: str
    files: tuple[str, ...]


def export_adapter(
    store: JobStore, name: str, out: str | os.PathLike, *, merge: bool = False, base_model_id: str | None = None,
    overwrite: bool = False,
) -> Export:
    """Export the registered adapter ``name`` into the folder ``out`` (written whole or not at all).

    Args:
        store: the job store whose registry holds the adapter and its base.
        name: the adapter's name (or id).
        out: the folder to create; an existing non-empty one needs ``overwrite``.
        merge: fold the adapter into its base and write a plain transformers model.
        base_model_id: what ``base_model_name_or_path`` says (default: :func:`base_reference`), e.g. a hub id
            when the folder is used on another machine.
        overwrite: replace ``out`` if it exists.

    Raises:
        AdapterNotFound: no such adapter.
        ExportError: ``--merge`` of a method that cannot merge, or ``out`` exists.
        AdapterIntegrityError, BaseModelMismatch: the stored files are not the registered ones.
    """
    record = store.adapters.get(name)
    method = get_method(record.method)
    if merge and not method.mergeable:
        mergeable = ", ".join(m for m in list_methods() if get_method(m).mergeable)
        raise ExportError(f"--merge: adapter {record.name!r} uses {record.method}, which cannot be merged into its "
                          f"base; mergeable methods: {mergeable} (export without --merge instead)")
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"--out: {dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ExportError(f"--out: {dest} exists and is not empty (pass --overwrite to replace it)")
    base = store.base_models.get(record.base_fingerprint)
    folder = store.adapters.local_folder(record.name)
    manifest, blobs = read_hashed_files(folder, MANIFEST_FILE, "adapter", FORMAT_VERSION, ADAPTER_FILES,
                                        manifest_sha256=record.sha256)
    base_id, revision = (base_model_id, None) if base_model_id else base_reference(base)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if merge:
            _write_merged(store, record, base.path, manifest, blobs, tmp)
        else:
            _write_adapter(manifest, blobs, base_id, revision, tmp)
        peft_type = json.loads(blobs[CONFIG_FILE]).get("peft_type")
        (tmp / CARD_FILE).write_text(model_card(store, record, base, base_id, manifest, merged=merge,
                                                peft_type=peft_type))
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(dest, "merged" if merge else "adapter", record.name, record.method,
                  tuple(sorted(p.name for p in dest.iterdir())))


# -- the adapter form -----------------------------------------------------------------------------
def base_reference(base: BaseModelRecord) -> tuple[str, str | None]:
    """(``base_model_name_or_path``, ``revision``) for an adapter config: a Hugging Face base's repo id and the
    commit it resolved to; otherwise the base's local folder (a packaged SmolLM2 is dequantised from GGUF, so
    its hub id would name other weights)."""
    source = base.source or {}
    if source.get("kind") == "hub" and source.get("repo_id"):
        return source["repo_id"], source.get("commit") or source.get("revision")
    return base.path, None


def _write_adapter(manifest: dict[str, Any], blobs: dict[str, bytes], base_id: str, revision: str | None,
                   out: Path) -> None:
    """The verified tensors byte for byte; the config with its base named (and, for LoRA, every field
    HF PEFT and vLLM read); peftfleet.json with the config's new hash."""
    config = json.loads(blobs[CONFIG_FILE])
    if config.get("peft_type") in HF_PEFT_TYPES:
        config["base_model_name_or_path"] = base_id
        config["revision"] = revision
    if config.get("peft_type") == "LORA":
        config = {**PLAIN_LORA_FIELDS, **config}
    (out / WEIGHTS_FILE).write_bytes(blobs[WEIGHTS_FILE])
    write_json(out / CONFIG_FILE, config)
    manifest = {**manifest, "files": {f: sha256_file(out / f) for f in ADAPTER_FILES}}
    write_json(out / MANIFEST_FILE, manifest)


# -- the merged form ------------------------------------------------------------------------------
def _write_merged(store: JobStore, record: AdapterRecord, base_path: str, manifest: dict[str, Any],
                  blobs: dict[str, bytes], out: Path) -> None:
    labels = manifest.get("metadata", {}).get("labels")
    num_labels = None
    if record.task == "sequence-classification":
        num_labels = len(labels) if labels else _head_size(load_safetensors(blobs[WEIGHTS_FILE]))
    model, tokenizer = load_base_model(base_path, record.task, num_labels=num_labels, home=store.home)
    store.adapters.load(record.name, model, base_path=base_path)  # verified bytes, base fingerprint checked
    model = merged_plain_model(model)
    if labels:
        model.config.id2label = {i: str(label) for i, label in enumerate(labels)}
        model.config.label2id = {str(label): i for i, label in enumerate(labels)}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def merged_plain_model(model: nn.Module) -> nn.Module:
    """Fold the adapter applied to ``model`` into its weights and take every trace of the method out: each
    wrapper layer gives way to its base layer and the method's markers go. What remains must be exactly the
    module tree and state-dict names of ``type(model)`` built from its config, so plain transformers loads
    it; a method that added tensors the class has a config switch for (BitFit's biases on a LLaMA) gets the
    switch, missing siblings zero."""
    config = applied_config(model)
    if config is None:
        raise ValueError("no PEFT method is applied to this model; nothing to merge")
    method = get_method(config.method)
    method.merge(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MergeableLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
            replace_module(model, name, module.base_layer)
    for attr in [a for a in vars(model) if a.startswith("peftfleet_")]:
        delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(False)
    leftovers = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft_methods")})
    if leftovers:
        raise ExportError(f"--merge: {method.name} left modules of its own after merging ({', '.join(leftovers)})")
    _match_plain_layout(model)
    return model


BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # LLaMA-like configs: biases on attention / MLP projections


def _match_plain_layout(model: nn.Module) -> None:
    """Make ``model``'s tensor names those of its class built from its config (see merged_plain_model)."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    switches = [s for s in BIAS_SWITCHES if getattr(model.config, s, None) is False]
    for chosen in (c for n in range(len(switches) + 1) for c in itertools.combinations(switches, n)):
        config = model.config.__class__.from_dict({**model.config.to_dict(), **dict.fromkeys(chosen, True)})
        with torch.device("meta"):
            plain = type(model)(config)
        want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        missing = set(want) - set(have)
        if set(have) <= set(want) and all(have[k] == want[k] for k in have) and all(
            k.endswith(".bias") and isinstance(model.get_submodule(k[: -len(".bias")]), nn.Linear) for k in missing
        ):
            for key in sorted(missing):  # a sibling projection BitFit left alone: its bias is zero
                layer = model.get_submodule(key[: -len(".bias")])
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                      device=layer.weight.device), requires_grad=False)
            for switch in chosen:
                setattr(model.config, switch, True)
            return
    unknown = sorted(k for k in have if k not in _plain_keys(model))
    raise ExportError(f"--merge: the merged model has tensors plain {type(model).__name__} does not load "
                      f"({', '.join(unknown[:4])}); export without --merge instead")


def _plain_keys(model: nn.Module) -> set[str]:
    with torch.device("meta"):
        return set(type(model)(model.config).state_dict())


def _head_size(tensors: dict[str, torch.Tensor]) -> int:
    """The number of labels of a classification adapter without recorded labels: its head's output size."""
    for head in ("classifier", "score"):
        for key in (f"{FILE_KEY_PREFIX}{head}.weight", f"{FILE_KEY_PREFIX}{head}.out_proj.weight"):
            if key in tensors:
                return int(tensors[key].shape[0])
    raise ExportError("--merge: the adapter records no labels and holds no classification head to count them by")


# -- the model card -------------------------------------------------------------------------------
def model_card(store: JobStore, record: AdapterRecord, base: BaseModelRecord, base_id: str,
               manifest: dict[str, Any], *, merged: bool, peft_type: str | None = None) -> str:
    """A model card (README.md with Hugging Face's YAML header) naming the base (name, fingerprint), the
    data (the dataset's fingerprint when the adapter records one, else the job's dataset spec), the method
    and its config, the metrics and the job."""
    meta = manifest.get("metadata", {})
    metrics = meta.get("metrics") or record.metrics
    library = "transformers" if merged else ("peft" if peft_type in HF_PEFT_TYPES else "peftfleet")
    header = ["---", f"library_name: {library}", "tags:", "- peftfleet", f"- {record.method}"]
    source = base.source or {}
    upstream = source.get("repo_id") if source.get("kind") == "hub" else UPSTREAM.get(base.name)
    if upstream:
        header.append(f"base_model: {upstream}")
    header.append("---")
    lines = [
        f"# {record.name}",
        "",
        ("The base model with this adapter merged into its weights; a plain transformers model."
         if merged else "A PEFT adapter; load it onto its base model."),
        "",
        f"- **base model**: {base.name} (`{base_id}`)",
        f"- **base source**: `{json.dumps({k: v for k, v in source.items() if k != 'files'}, sort_keys=True)}`",
        f"- **base fingerprint**: `{record.base_fingerprint}`",
        f"- **task**: {record.task} (`{record.task_name}`)",
        f"- **data**: {_data_line(store, meta, record.job_id)}",
        f"- **method**: {record.method} — `{json.dumps(manifest.get('config', {}), sort_keys=True)}`",
        f"- **metrics**: {', '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items())) or 'none recorded'}",
        f"- **job**: {record.job_id or 'none (registered by hand)'}",
    ]
    if meta.get("labels"):
        lines.append(f"- **labels**: {', '.join(map(str, meta['labels']))}")
    for key in ("sources", "lineage"):
        if meta.get(key):
            lines.append(f"- **{key}**: `{json.dumps(meta[key], sort_keys=True, default=str)}`")
    lines += ["", "Exported by peftfleet (docs/export.md)."]
    return "\n".join(header + lines) + "\n"


def _data_line(store: JobStore, meta: dict[str, Any], job_id: str | None) -> str:
    dataset = meta.get("dataset")
    if dataset:
        return f"`{json.dumps(dataset, sort_keys=True, default=str)}`"
    if job_id:
        try:
            job = store.get(job_id)
        except JobNotFound:
            return f"unknown (job {job_id} is no longer in the store)"
        fingerprint = (job.runtime or {}).get("dataset")  # recorded by the job once its data was read
        if fingerprint:
            return f"`{json.dumps(fingerprint, sort_keys=True, default=str)}` (the job's dataset fingerprint)"
        dataset = job.spec.get("dataset")  # as stored: a dataset file may be gone since
        if dataset:
            dataset = {k: v for k, v in dataset.items() if v is not None}
            return f"`{json.dumps(dataset, sort_keys=True, default=str)}` (the job's spec)"
    return "unknown"

