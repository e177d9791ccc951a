"""`JobSpec`: what a user asks for, validated completely before anything is stored or scheduled.

>>> spec = load_job_spec("job.yaml")                                  # doctest: +SKIP
>>> spec = parse_job_spec({"name": "trec-lora", "base_model": "minilm",
...     "task": "sequence-classification", "dataset": {"name": "trec"},
...     "method": {"method": "lora", "r": 8}})                        # doctest: +SKIP

A spec's ``kind`` picks its schema: ``train`` (the default; :data:`JobSpec`) or ``ipt-subspace``
(:class:`SubspaceSpec`, the first step of intrinsic prompt tuning). Errors are
:class:`JobSpecError`, one line per bad field with its path, e.g.
``method.r: Input should be greater than 0``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

import peft_methods
from jobs.base_models import (
    BUILTIN_MODELS,
    BaseModelUnavailable,
    check_safetensors_only,
    hub_id_problem,
    hub_ref,
    resolve_base_model,
)
from jobs.hub_cache import hub_offline
from jobs.spec_files import DocumentError, check_tree, key, load_document
from jobs.spec_files import shown as _shown
from jobs.tracking import TrackingSpec
from jobs.training.data import DATASET_TASKS
from jobs.training.sources import check, resolve
from peft_methods.api import HEAD_LR

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 64
SEED_LIMIT = 2**32  # seeds go to torch, random and numpy; numpy takes 0 <= seed < 2**32


def validate_name(value: str, what: str = "name") -> str:
    """Names become folder names and URLs: no separators, no `..`, bounded length."""
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_MAX:
        raise ValueError(f"{what} must be 1–{NAME_MAX} characters")
    if ".." in value or not _NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} may hold only letters, digits, '.', '_' and '-', starting with a letter or digit (no "
            "path separators, no '..')"
        )
    return value


class _At(ValueError):
    """A whole-spec check that blames one field: reported under ``path``, not the spec."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _is_file(value: str, *parts: str) -> bool:
    """Whether a user-given path names a file; one the OS cannot even look up (too long, an unknown ~user, a
    NUL) does not."""
    try:
        return Path(value).expanduser().joinpath(*parts).is_file()
    except (OSError, RuntimeError, ValueError):
        return False


_Scalar = str | int | float | bool | None


class DatasetSpec(_Spec):
    """Which data a job trains and evaluates on: exactly one of a built-in ``name``, a ``path`` (local or an
    fsspec URL; a file, folder or glob) or an ``hf`` dataset id. See docs/data.md."""

    name: str | None = Field(default=None, description=f"A built-in dataset: one of {sorted(DATASET_TASKS)}.")
    path: str | None = Field(
        default=None,
        description="A local path or fsspec URL (file://, s3://, gs://, ...) of a Parquet, JSONL/JSON, CSV or Arrow "
        "file, a folder of them, or a glob.",
    )
    hf: str | None = Field(default=None, description="A Hugging Face dataset repository id (org/name).")
    revision: str | None = Field(default=None, description="hf: a branch, tag or commit (default: main).")
    config: str | None = Field(default=None, description="hf: the dataset's configuration (subset) name.")
    data_dir: str | None = Field(default=None, description="hf: a folder inside the repository to read from.")
    split: str | None = Field(
        default=None, description="Which split's files to read (hf, or a local folder laid out as hf datasets are; "
        "default: train)."
    )
    format: Literal["parquet", "jsonl", "json", "csv", "arrow"] | None = Field(
        default=None, description="The files' format (default: from their suffix)."
    )
    filter: dict[str, _Scalar | list[_Scalar]] | None = Field(
        default=None, max_length=32,
        description="Keep only records whose columns hold these values: {column: value or [values]}.",
    )
    streaming: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Stream the training rows through Ray Data shards (solo jobs): auto = when the files exceed "
        "PEFTFLEET_STREAM_BYTES (256 MiB).",
    )
    text_column: str = Field(default="text", description="Column with the input text (sequence classification).")
    label_column: str = Field(default="label", description="Column with the class label (sequence classification).")
    prompt_column: str = Field(default="prompt", description="Column with the prompt (causal-LM SFT).")
    response_column: str = Field(default="response", description="Column with the target response (causal-LM SFT).")
    train_size: int | None = Field(
        default=None, gt=0,
        description="Use at most this many training examples (path/hf: rows sharing a text stay together).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        given = [k for k in ("name", "path", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of `name` (built-in), `path` (a file, folder, glob or URL) or `hf` (a Hugging Face "
                "dataset id)"
            )
        if self.name is not None and self.name not in DATASET_TASKS:
            raise ValueError(f"unknown built-in dataset {self.name!r}; one of {sorted(DATASET_TASKS)}")
        for option in ("revision", "config", "data_dir"):
            if getattr(self, option) is not None and self.hf is None:
                raise _At(option, "is for `hf` datasets only")
        if self.name is not None:
            for option in ("split", "format", "filter"):
                if getattr(self, option) is not None:
                    raise _At(option, "is for `path` and `hf` datasets, not built-ins")
            if self.streaming == "on":
                raise _At("streaming", "built-in datasets are small and load in memory; streaming is for path/hf")
        if self.hf is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.hf)
            except HFValidationError:
                raise _At("hf", f"{_shown(self.hf)} is not a Hugging Face repository id (org/name)") from None
            if self.revision is not None:
                from jobs.hub_cache import check_revision

                try:
                    check_revision(self.revision)
                except ValueError:
                    raise _At("revision", f"{_shown(self.revision)} is not a branch, tag or commit") from None
        if self.path is not None and not self.path.strip():
            raise _At("path", "is empty")
        for column, wanted in (self.filter or {}).items():
            if not column or (isinstance(wanted, list) and not 1 <= len(wanted) <= 1000):
                raise _At("filter", "maps column names to a value or a list of 1–1000 values")
        return self

    def columns_for(self, task: str) -> tuple[str, str]:
        if task == "sequence-classification":
            return self.text_column, self.label_column
        return self.prompt_column, self.response_column


class TrainingSpec(_Spec):
    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(default=16, gt=0, le=4096, description="Micro-batch size per worker.")
    grad_accum_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")
    lr: float | None = Field(
        default=None, gt=0, le=1,
        description="Peak learning rate (AdamW) of the method's own parameters. None = the method's default_lr "
        "(docs/methods.md#learning-rates); the stored spec records the rate used.",
    )
    head_lr: float = Field(
        default=HEAD_LR, gt=0, le=1,
        description="Peak learning rate of the fresh task head (modules_to_save), whatever the method's own `lr`.",
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(default="linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(
        default=0, ge=0, lt=SEED_LIMIT, description="Seeds data order, initialisation and the split."
    )
    eval_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of the data held out for evaluation.")
    eval_size: int | None = Field(
        default=None, gt=0, description="Held-out examples by count (overrides eval_fraction)."
    )
    max_length: int = Field(default=128, ge=8, le=32768, description="Tokens per example after truncation.")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute the base's activations in the backward pass instead of keeping them: much less "
        "memory per example, about a third more compute. Jobs with different values never share a base group.",
    )
    base_dropout: float | None = Field(
        default=None, ge=0, lt=1,
        description="Probability of the base model's own dropout layers while training (None: the checkpoint's). "
        "Jobs with different values never share a base group.",
    )
    eval_every_steps: int | None = Field(
        default=None, gt=0, description="Evaluate every N steps (default: each epoch)."
    )
    checkpoint_every_steps: int | None = Field(
        default=None, gt=0, description="Checkpoint every N steps (default: each epoch)."
    )


class DeepSpeedSpec(_Spec):
    zero_stage: Literal[0, 1, 2, 3] = Field(default=0, description="ZeRO stage 0–3.")
    offload_optimizer: bool = Field(
        default=False, description="Keep optimizer state in CPU memory (ZeRO ≥ 1, GPU jobs)."
    )
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (ZeRO 3, GPU jobs).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision: fp32, bf16 (GPUs, or CPUs that have it), fp16 (GPUs only)."
    )


class ResourcesSpec(_Spec):
    num_workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(default=1, gt=0, le=1024, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(
        default=0,
        ge=0,
        allow_inf_nan=False,
        description="GPUs per worker: 0 (CPU training), 1 (one GPU per rank), or a fraction below 1 to share a GPU "
        "with other jobs (one worker per GPU: num_workers 1 or STRICT_SPREAD).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How workers are placed on nodes (Ray placement groups): STRICT_SPREAD = one per node.",
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_device_per_rank(cls, v: float, info: ValidationInfo) -> float:
        if v > 1 and v.is_integer():
            workers = info.data.get("num_workers")
            instead = f"num_workers: {workers * int(v)}" if isinstance(workers, int) else "num_workers: N"
            raise ValueError(
                f"a worker drives one GPU, so {v:g} GPUs per worker would leave {v - 1:g} of each worker's GPUs idle; "
                f"use one worker per GPU instead ({instead}, gpus_per_worker: 1)"
            )
        if v > 1:
            raise ValueError(
                f"{v:g} GPUs per worker is not a whole number: a worker drives one GPU (1), or shares one with other "
                "jobs (a fraction below 1)"
            )
        return v

    @model_validator(mode="after")
    def _no_two_ranks_on_one_gpu(self) -> ResourcesSpec:
        gpus = self.gpus_per_worker
        if 0 < gpus < 1 and self.num_workers > 1 and self.placement_strategy != "STRICT_SPREAD":
            raise _At(
                "gpus_per_worker",
                f"a fraction of a GPU ({gpus:g}) with {self.num_workers} workers could put two ranks of this job on "
                "one GPU, which NCCL refuses; a fraction is for sharing a GPU with other jobs, one worker per GPU: "
                "use num_workers 1, placement_strategy STRICT_SPREAD (one worker per node), or gpus_per_worker 1",
            )
        return self


class _Submission(_Spec):
    """What every kind of job has: a name, a base model, labels, an idempotency key."""

    name: str = Field(description="Job name; also the default adapter name prefix.")
    base_model: str = Field(
        description=f"A named model {list(BUILTIN_MODELS)}, a local folder with config.json and safetensors weights, "
        "or a Hugging Face id org/name[@branch|tag|commit] (from the cache only when HF_HUB_OFFLINE is set)."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="What each job reserves on Ray.")
    tags: list[str] = Field(default_factory=list, max_length=32, description="Free-form labels for queries.")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description="Resubmitting with the same key returns the same job."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "job name")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            validate_name(tag, "tag")
        return v

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str) -> str:
        if v in BUILTIN_MODELS:
            return v
        if hub_ref(v) is not None:
            if hub_offline():  # nothing will be fetched later either: the cache must hold it now
                try:
                    resolve_base_model(v)
                except BaseModelUnavailable as e:
                    raise ValueError(str(e)) from None
            return v
        if not _is_file(v, "config.json"):
            why = hub_id_problem(v)
            raise ValueError(
                f"{_shown(v)} is neither a named model {list(BUILTIN_MODELS)}, a folder with config.json, nor a "
                "Hugging Face id org/name[@revision]" + (f" ({why})" if why else "")
            )
        try:
            check_safetensors_only(Path(v).expanduser())  # a pickle-only folder is refused before it is stored
        except BaseModelUnavailable as e:
            raise ValueError(str(e)) from None
        return v


class SubspaceSourcesSpec(_Spec):
    adapters: list[str] | None = Field(
        default=None, min_length=2, description="Registered prompt-tuning adapters, by name."
    )
    task_names: list[str] | None = Field(
        default=None, min_length=1, description="Every prompt-tuning adapter of these tasks."
    )
    tag: str | None = Field(default=None, description="Every prompt-tuning adapter with this tag.")


class SubspaceSpec(_Submission):
    """An IPT subspace fit (Qin et al. 2021): an autoencoder over the soft prompts of the prompt-tuning
    adapters registered for one base; its decoder is registered as a subspace that `ipt` jobs train in."""

    kind: Literal["ipt-subspace"] = Field(description="Selects this kind of job.")
    sources: SubspaceSourcesSpec = Field(
        default_factory=SubspaceSourcesSpec,
        description=(
            "Which adapters to learn from (filters combine); none given = every prompt-tuning adapter of the base."
        ),
    )
    intrinsic_dim: int = Field(
        default=8, gt=0, le=1024, description="Size of the code, i.e. of what an IPT job trains."
    )
    inner_dim: int = Field(default=256, gt=0, le=16384, description="Width of the autoencoder's hidden layer.")
    steps: int = Field(default=2000, gt=0, le=1_000_000, description="Optimizer steps of the fit (full batch, Adam).")
    lr: float = Field(default=1e-3, gt=0, le=1, description="Adam learning rate of the fit.")
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT, description="Seeds the autoencoder's initialisation.")

    @field_validator("resources")
    @classmethod
    def _one_worker(cls, v: ResourcesSpec) -> ResourcesSpec:
        if v.num_workers != 1:
            raise ValueError("a subspace fit runs in one worker (num_workers 1)")
        return v

    @property
    def effective_task_name(self) -> str:
        return self.name

    @property
    def method_name(self) -> str:
        return self.kind


def _build_job_spec() -> type[BaseModel]:
    method_type = peft_methods.method_config_type()

    class JobSpec(_Submission):
        """A fine-tuning job: which base, which data, which PEFT method, how to train, where to run."""

        kind: Literal["train"] = Field(default="train", description="A training job (the default kind).")
        task: Literal["sequence-classification", "causal-lm"] = Field(description="What the model learns.")
        dataset: DatasetSpec = Field(description="Training and evaluation data.")
        method: method_type = Field(description="The PEFT method and its settings; `method` picks the plugin.")  # type: ignore[valid-type]
        training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
        deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine settings.")
        task_name: str | None = Field(
            default=None, description="Groups adapters for promotion (default: dataset name)."
        )
        priority: int = Field(
            default=0, ge=-100, le=100,
            description="Higher first: in a full base group, a waiting job with a higher priority pauses the "
            "lowest-priority member at its next step boundary (checkpointed; it waits QUEUED and resumes later).",
        )
        packing: Literal["auto", "off"] = Field(
            default="auto",
            description="auto: train in a base group (one resident frozen base shared with other jobs, see "
            "docs/groups.md) when the job is compatible, else solo, saying why in its events; off: always solo.",
        )
        tracking: TrackingSpec | None = Field(
            default=None,
            description="Also log params, metrics and the adapter to MLflow and/or TensorBoard (docs/tracking.md); "
            "never part of what a base group's members must share.",
        )

        @field_validator("task_name")
        @classmethod
        def _task_name(cls, v: str | None) -> str | None:
            return None if v is None else validate_name(v, "task name")

        @property
        def method_name(self) -> str:
            return self.method.method

        @model_validator(mode="after")
        def _consistent(self) -> JobSpec:
            if self.training.lr is None:  # filled in here, so every reader of training.lr gets a number
                lr = peft_methods.get_method(self.method.method).default_lr
                object.__setattr__(self, "training", self.training.model_copy(update={"lr": lr}))
            if self.dataset.name is not None and DATASET_TASKS[self.dataset.name] != self.task:
                raise _At(
                    "dataset.name",
                    f"dataset {self.dataset.name!r} is for {DATASET_TASKS[self.dataset.name]}, not {self.task}",
                )
            if self.dataset.name is None:
                _check_source(self.dataset, self.task)
            if getattr(self.method, "decoded", False):
                raise _At(
                    "method.decoded", "is the form a trained IPT adapter loads in; a job trains z inside the subspace"
                )
            ds, gpus = self.deepspeed, self.resources.gpus_per_worker
            if ds.precision == "fp16" and gpus == 0:
                raise _At(
                    "deepspeed.precision",
                    "fp16 needs GPUs (resources.gpus_per_worker > 0); CPU training runs in fp32 or bf16",
                )
            if ds.precision == "fp16" and ds.zero_stage == 0:
                raise _At(
                    "deepspeed.precision",
                    "fp16 needs zero_stage 1, 2 or 3: only there does DeepSpeed keep the fp32 master weights the "
                    "adapter is saved from (bf16 works at every stage)",
                )
            if ds.offload_params and ds.zero_stage != 3:
                raise _At("deepspeed.offload_params", "needs zero_stage 3")
            if ds.offload_optimizer and ds.zero_stage == 0:
                raise _At("deepspeed.offload_optimizer", "needs zero_stage 1, 2 or 3")
            if (ds.offload_optimizer or ds.offload_params) and gpus == 0:
                raise _At(
                    "deepspeed",
                    "offload moves GPU memory to the CPU; a CPU job (resources.gpus_per_worker 0) has nothing to "
                    "offload",
                )
            return self

        @property
        def effective_task_name(self) -> str:
            if self.task_name:
                return self.task_name
            stem = self.dataset.hf.rpartition("/")[2] if self.dataset.hf else Path(self.dataset.path or "").stem
            return self.dataset.name or validate_name(
                re.sub(r"[^A-Za-z0-9._-]", "-", stem)[:NAME_MAX].strip("-._") or "data", "task name"
            )

    return JobSpec


JobSpec = _build_job_spec()
KINDS: dict[str, type[BaseModel]] = {"train": JobSpec, "ipt-subspace": SubspaceSpec}


def _check_source(dataset: DatasetSpec, task: str) -> None:
    """Resolve a path/hf source and read its first file's schema or first record only: enough to name a
    missing source or column before the job is stored (never what a record holds)."""
    where = "dataset.hf" if dataset.hf is not None else "dataset.path"
    try:
        check(resolve(dataset), dataset.columns_for(task), dataset.filter)
    except ValueError as e:
        raise _At(where, str(e)) from None
    except OSError as e:
        raise _At(where, f"cannot read the dataset ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - fsspec and friends raise their own kinds for odd URLs
        raise _At(where, f"cannot read the dataset ({type(e).__name__})") from None


class JobSpecError(ValueError):
    """An invalid job spec; ``problems`` lists (field path, message), one per bad field, each one line of
    bounded length (whatever the input held)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = [(_one_line(str(path), 200), _one_line(str(msg), 500)) for path, msg in problems]
        lines = (f"  {path or '(spec)'}: {msg}" for path, msg in self.problems)
        super().__init__("invalid job spec:\n" + "\n".join(lines))


def _one_line(text: str, limit: int) -> str:
    """``text`` with line breaks and other control characters escaped, cut to ``limit`` characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if (
        len(parts) >= 2
        and parts[0] == "method"
        and isinstance(parts[1], str)
        and parts[1] in peft_methods.list_methods()
    ):
        del parts[1]  # pydantic puts the union's tag in the path; users think of `method.r`
    return ".".join(key(p) for p in parts)


def parse_job_spec(data: Any) -> JobSpec | SubspaceSpec:  # type: ignore[valid-type]
    """Validate ``data`` (a dict, JobSpec or SubspaceSpec) into the spec of its ``kind`` (default
    ``train``), or raise :class:`JobSpecError`."""
    if isinstance(data, (JobSpec, SubspaceSpec)):
        return data
    if not isinstance(data, dict):
        raise JobSpecError([("", f"a job spec is a mapping of fields, not {type(data).__name__}")])
    try:
        check_tree(data)
    except DocumentError as e:
        raise JobSpecError([(e.field, str(e))]) from None
    kind = data.get("kind", "train")
    if not isinstance(kind, str) or kind not in KINDS:
        shown = _shown(kind) if isinstance(kind, str) else f"a {type(kind).__name__}"
        raise JobSpecError([("kind", f"unknown kind {shown}; one of {sorted(KINDS)}")])
    try:
        return KINDS[kind].model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _At):
                problems.append((".".join(p for p in (_field_path(err["loc"]), cause.path) if p), str(cause)))
            else:
                problems.append((_field_path(err["loc"]), err["msg"].removeprefix("Value error, ")))
        raise JobSpecError(problems) from None


def load_job_spec(path: str | os.PathLike) -> JobSpec:  # type: ignore[valid-type]
    """Read a job spec from a .yaml/.yml or .json file (within :mod:`jobs.spec_files`' limits)."""
    try:
        data = load_document(path)
    except DocumentError as e:
        raise JobSpecError([(e.field, str(e))]) from None
    return parse_job_spec(data)
