"""`SweepSpec`: a hyper-parameter search over job specs, validated before any trial runs.

    name: trec-sweep
    spec: examples/trec-lora.yaml            # a job spec (inline mapping, or a file next to the sweep)
    search_space:
      training.lr: {loguniform: [1.0e-4, 1.0e-2]}
      training.batch_size: {grid: [8, 16]}   # a grid axis: trials with 8 and trials with 16
      method:
        choice:
          - {method: lora, r: {randint: [4, 17]}}
          - {method: bitfit}
    metric: eval_accuracy
    mode: max
    num_samples: 4                           # the grid runs 4 times: 8 trials (default 1 with a grid, else 8)
    scheduler: asha                          # asha | pbt | fifo
    max_concurrent: 2

Search-space keys are dotted paths into the job spec; values are a distribution — ``choice``
(a list; options may hold distributions of their own), ``uniform`` / ``loguniform`` (``[low,
high]``), ``randint`` (``[low, high)``), ``grid`` (a list of constants, only as a key's value) —
or a constant. The trials are the cartesian product of the ``grid`` axes (like Ray Tune's
``grid_search``; last key varying fastest), the whole grid repeated ``num_samples`` times; the
other values are drawn per trial, up front, from ``seed``. Every trial's job spec, and the spec at
every bound, every choice and every grid value, is validated as a :data:`jobs.spec.JobSpec` before
the sweep is stored.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.spec import SEED_LIMIT, JobSpecError, parse_job_spec, validate_name
from jobs.spec_files import DocumentError, check_tree, key, load_document
from jobs.tracking import TrackingSpec

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
MAX_TRIALS = 10_000


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(description="Sweep name; trials are jobs named <name>-t<index>.")
    spec: dict[str, Any] = Field(description="The job spec every trial starts from (validated like any job spec).")
    search_space: dict[str, Any] = Field(min_length=1, description="Dotted spec paths -> distribution or constant.")
    metric: str = Field(
        default="eval_accuracy", min_length=1, description="What trials report and the search optimises."
    )
    mode: Literal["max", "min"] = Field(default="max", description="Whether larger or smaller `metric` is better.")
    num_samples: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TRIALS,
        description="How many configurations to try; with grid axes, how many times the whole grid runs. "
        "Default 1 with a grid, else 8 (filled in at validation: never None on a parsed sweep).",
    )
    scheduler: Literal["asha", "fifo", "pbt"] = Field(
        default="asha",
        description="asha stops weak trials early; pbt has weak trials continue from strong ones' checkpoints with "
        "perturbed hyper-parameters; fifo runs every trial to the end.",
    )
    scheduler_options: dict[str, float] = Field(
        default_factory=dict,
        description="asha: grace_period, reduction_factor; pbt: perturbation_interval (all in evaluations).",
    )
    max_concurrent: int | None = Field(
        default=None, ge=1, description="Trials at once (default: as many as resources allow)."
    )
    seed: int = Field(default=0, ge=0, lt=SEED_LIMIT, description="Seeds the draw of configurations.")
    promote: bool = Field(default=False, description="Promote the best trial's adapter for its task.")
    tracking: TrackingSpec | None = Field(
        default=None,
        description="Log the sweep as one MLflow run with a child run per trial (and each trial to TensorBoard); "
        "overrides the job spec's own `tracking`. Default: the job spec's (docs/tracking.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_num_samples(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("num_samples") is None:
            space = data.get("search_space")
            has_grid = isinstance(space, dict) and any(_is_grid(v) for v in space.values())
            data = {**data, "num_samples": 1 if has_grid else 8}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "sweep name")

    @field_validator("scheduler_options")
    @classmethod
    def _options(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"grace_period", "reduction_factor", "perturbation_interval"}
        if unknown:
            raise ValueError(f"unknown scheduler options {sorted(unknown)}")
        return v


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """A sweep from YAML/JSON; ``spec:`` may name a job-spec file relative to the sweep file. Both files are
    read within :mod:`jobs.spec_files`' limits (no YAML aliases, bounded size and nesting)."""
    path = Path(path)
    try:
        data = load_document(path)
    except DocumentError as e:
        raise JobSpecError([(e.field, str(e))]) from None
    if isinstance(data, dict) and isinstance(data.get("spec"), str):
        try:
            data = {**data, "spec": load_document(path.parent / data["spec"])}
        except DocumentError as e:
            raise JobSpecError([(".".join(p for p in ("spec", e.field) if p), str(e))]) from None
    return parse_sweep_spec(data)


def parse_sweep_spec(data: Any) -> SweepSpec:
    """Validate a sweep and every configuration it can produce; raises JobSpecError naming the path."""
    if isinstance(data, SweepSpec):
        return data
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise JobSpecError([("", f"a sweep spec is a mapping of fields, not {type(data).__name__}")])
    try:
        check_tree(data)
    except DocumentError as e:
        raise JobSpecError([(e.field, str(e))]) from None
    try:
        sweep = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise JobSpecError(
            [(".".join(key(p) for p in err["loc"]), err["msg"].removeprefix("Value error, ")) for err in e.errors()]
        ) from None
    for path, value in sweep.search_space.items():
        _check_distribution(value, f"search_space.{path}", top=True)
    combinations = math.prod(len(options) for _, options in grid_axes(sweep))
    if combinations * sweep.num_samples > MAX_TRIALS:
        raise JobSpecError(
            [
                (
                    "num_samples",
                    f"{combinations} grid combinations x {sweep.num_samples} samples = "
                    f"{combinations * sweep.num_samples} trials; at most {MAX_TRIALS:,}",
                )
            ]
        )
    if sweep.scheduler == "pbt" and not mutable(sweep):
        raise JobSpecError(
            [("search_space", "pbt perturbs continuous parameters: give at least one uniform or loguniform")]
        )
    for label, params in validation_configs(sweep):
        trial_spec(sweep, params, 0, label=label)
    return sweep


def _check_distribution(value: Any, where: str, *, top: bool = False) -> None:
    if not _is_distribution(value):
        if isinstance(value, dict):
            for k, v in value.items():
                _check_distribution(v, f"{where}.{k}")
        return
    (kind, arg), = value.items()
    if kind == "grid":
        if not top:
            raise JobSpecError([(where, "grid only at the top level of the search space")])
        if not isinstance(arg, list) or not arg:
            raise JobSpecError([(where, "grid takes a non-empty list")])
        for i, option in enumerate(arg):
            _check_constant(option, f"{where}.grid[{i}]")
        return
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise JobSpecError([(where, "choice takes a non-empty list")])
        for i, option in enumerate(arg):
            _check_distribution(option, f"{where}.choice[{i}]")
        return
    if not (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(a, (int, float)) and not isinstance(a, bool) and _finite(a) for a in arg)
    ):
        raise JobSpecError([(where, f"{kind} takes [low, high], two finite numbers")])
    low, high = arg
    if not low < high:
        raise JobSpecError([(where, f"{kind} needs low < high, got [{low}, {high}]")])
    if kind == "loguniform" and low <= 0:
        raise JobSpecError([(where, "loguniform needs low > 0")])
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise JobSpecError([(where, "randint takes integers")])


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _check_constant(value: Any, where: str) -> None:
    """Grid options are plain values or mappings of them: no distribution anywhere inside."""
    if _is_distribution(value):
        kind = next(iter(value))
        if kind == "grid":
            raise JobSpecError([(where, "grid only at the top level of the search space")])
        raise JobSpecError([(where, f"grid options are constants: no {kind} inside a grid")])
    if isinstance(value, dict):
        for k, v in value.items():
            _check_constant(v, f"{where}.{k}")


def grid_axes(sweep: SweepSpec) -> list[tuple[str, list[Any]]]:
    """The top-level ``grid`` paths and their values, in search-space order."""
    return [(path, value["grid"]) for path, value in sweep.search_space.items() if _is_grid(value)]


def mutable(sweep: SweepSpec) -> dict[str, tuple[str, float, float]]:
    """The parameters PBT perturbs: top-level uniform / loguniform paths -> (kind, low, high); not grid axes."""
    out = {}
    for path, value in sweep.search_space.items():
        if _is_distribution(value):
            (kind, arg), = value.items()
            if kind in ("uniform", "loguniform"):
                out[path] = (kind, float(arg[0]), float(arg[1]))
    return out


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _is_grid(value: Any) -> bool:
    return _is_distribution(value) and "grid" in value


def sample(value: Any, rng: random.Random) -> Any:
    """A concrete value: distributions drawn (recursively inside choices and mappings), constants kept.

    A ``grid`` is not drawn: :func:`draw` expands top-level grids, and nested ones are refused when parsing.
    """
    if _is_distribution(value):
        (kind, arg), = value.items()
        if kind == "grid":
            raise ValueError("grid only at the top level of the search space (draw() expands it)")
        if kind == "choice":
            return sample(rng.choice(arg), rng)
        low, high = arg
        if kind == "uniform":
            return rng.uniform(low, high)
        if kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.randrange(int(low), int(high))
    if isinstance(value, dict):
        return {k: sample(v, rng) for k, v in value.items()}
    return copy.deepcopy(value)


def draw(sweep: SweepSpec) -> list[dict[str, Any]]:
    """The configurations the sweep will run: every combination of its grid axes (the cartesian product in
    search-space order, last key varying fastest; one empty combination without a grid), the whole grid repeated
    ``num_samples`` times, with the other paths drawn per configuration from the sweep's seed."""
    rng = random.Random(sweep.seed)
    axes = grid_axes(sweep)
    combinations = list(itertools.product(*(options for _, options in axes)))
    out = []
    for _ in range(sweep.num_samples):
        for combination in combinations:
            fixed = dict(zip((path for path, _ in axes), combination))
            out.append(
                {
                    path: copy.deepcopy(fixed[path]) if path in fixed else sample(value, rng)
                    for path, value in sweep.search_space.items()
                }
            )
    return out


def validation_configs(sweep: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """The drawn configurations plus, per distribution, its bounds, each choice option and each grid value.

    Grid values come first, so that a bad one is reported as such (``lr = grid[1]``) rather than as a sample.
    """
    drawn = draw(sweep)
    grid = [
        (f"{path} = grid[{i}]", {**drawn[0], path: copy.deepcopy(option)})
        for path, options in grid_axes(sweep)
        for i, option in enumerate(options)
    ]
    out = grid + [(f"sample {i}", params) for i, params in enumerate(drawn)]
    rng = random.Random(sweep.seed + 1)
    for path, value in sweep.search_space.items():
        for label, extreme in _extremes(value, rng):
            out.append((f"{path} = {label}", {**drawn[0], path: extreme}))
    return out


def _extremes(value: Any, rng: random.Random) -> list[tuple[str, Any]]:
    if not _is_distribution(value) or _is_grid(value):  # grid values: validation_configs puts them first
        return []
    (kind, arg), = value.items()
    if kind == "choice":
        return [(f"choice[{i}]", sample(option, rng)) for i, option in enumerate(arg)]
    low, high = arg
    return [("low", int(low) if kind == "randint" else low), ("high", int(high) - 1 if kind == "randint" else high)]


def sweep_tracking(sweep: SweepSpec) -> TrackingSpec | None:
    """Where the sweep and its trials are tracked: the sweep's ``tracking``, else its job spec's."""
    if sweep.tracking is not None:
        return sweep.tracking
    own = sweep.spec.get("tracking")
    return None if own is None else TrackingSpec.model_validate(own)


def trial_spec(
    sweep: SweepSpec, params: dict[str, Any], index: int, *, label: str | None = None, sweep_id: str | None = None,
    parent_run_id: str | None = None,
):
    """The job spec of one trial: the sweep's spec with ``params`` set at their paths, tracked where the sweep
    is (:func:`sweep_tracking`), its MLflow run a child of ``parent_run_id`` (the sweep's run) when given."""
    data = copy.deepcopy(sweep.spec)
    for path, value in params.items():
        _set_path(data, path.split("."), value, path)
    if sweep.tracking is not None:
        data["tracking"] = sweep.tracking.model_dump(mode="json")
    if parent_run_id is not None and isinstance((data.get("tracking") or {}).get("mlflow"), dict):
        mlflow = {**data["tracking"]["mlflow"], "parent_run_id": parent_run_id}
        data["tracking"] = {**data["tracking"], "mlflow": mlflow}
    data["name"] = validate_name(f"{sweep.name}-t{index:03d}"[:64], "trial name")
    if sweep.scheduler == "pbt":  # every evaluation PBT sees must come with a checkpoint to continue from
        training = data.setdefault("training", {})
        training["checkpoint_every_steps"] = training.get("eval_every_steps")
    if sweep_id is not None:
        data["idempotency_key"] = f"sweep-{sweep_id}-{index}"
        data["tags"] = sorted(set(data.get("tags") or []) | {f"sweep-{sweep_id[:12]}"})
    try:
        return parse_job_spec(data)
    except JobSpecError as e:
        where = f"search_space ({label})" if label else "spec"
        raise JobSpecError([(f"{where}: {p}" if p else where, m) for p, m in e.problems]) from None


def _set_path(data: dict[str, Any], parts: list[str], value: Any, path: str) -> None:
    *heads, last = parts
    for head in heads:
        data = data.setdefault(head, {})
        if not isinstance(data, dict):
            raise JobSpecError([(f"search_space.{path}", f"{head!r} is not a mapping in the job spec")])
    data[last] = value
