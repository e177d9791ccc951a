"""JobSpec: YAML/JSON loading, field-path errors, cross-field checks, and fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.spec import JobSpecError, load_job_spec, parse_job_spec
from tests.jobs.conftest import minilm_spec

YAML_SPEC = """
name: trec-lora
base_model: minilm
task: sequence-classification
dataset: {name: trec}
method: {method: lora, r: 8, alpha: 16}
training: {epochs: 1, batch_size: 16, lr: 0.004, eval_size: 1000}
deepspeed: {zero_stage: 2}
resources: {num_workers: 2, cpus_per_worker: 1}
tags: [demo, trec]
"""


def test_yaml_and_json_give_the_same_spec(tmp_path):
    (tmp_path / "job.yaml").write_text(YAML_SPEC)
    from_yaml = load_job_spec(tmp_path / "job.yaml")
    (tmp_path / "job.json").write_text(json.dumps(from_yaml.model_dump(mode="json")))
    assert load_job_spec(tmp_path / "job.json") == from_yaml
    assert from_yaml.method.r == 8 and from_yaml.deepspeed.zero_stage == 2 and from_yaml.resources.num_workers == 2
    assert from_yaml.effective_task_name == "trec"


def problems(data) -> dict[str, str]:
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(data)
    return dict(err.value.problems)


@pytest.mark.parametrize(
    "overrides,path,fragment",
    [
        ({"method": {"method": "lora", "r": 0}}, "method.r", "greater than 0"),
        ({"method": {"method": "lora", "rank": 8}}, "method.rank", "Extra inputs are not permitted"),
        ({"method": {"method": "prefix"}}, "method", "does not match any of the expected tags"),
        ({"name": "../etc"}, "name", "no path separators"),
        ({"name": "x" * 65}, "name", "1–64 characters"),
        ({"base_model": "/nowhere"}, "base_model", "neither a named model"),
        ({"task": "translation"}, "task", "Input should be"),
        ({"task": "causal-lm"}, "dataset.name", "is for sequence-classification"),
        ({"dataset": {"name": "trec", "path": "x.csv"}}, "dataset", "exactly one of"),
        ({"dataset": {"name": "imdb"}}, "dataset", "unknown built-in dataset"),
        ({"training": {"lr": -1}}, "training.lr", "greater than 0"),
        ({"training": {"eval_fraction": 1.5}}, "training.eval_fraction", "less than 1"),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage", "Input should be 0, 1, 2 or 3"),
        ({"deepspeed": {"precision": "fp16"}}, "deepspeed.precision", "needs GPUs"),
        (
            {"deepspeed": {"precision": "fp16"}, "resources": {"gpus_per_worker": 1}},
            "deepspeed.precision",
            "fp16 needs zero_stage 1, 2 or 3",
        ),
        (
            {"deepspeed": {"offload_params": True, "zero_stage": 2}, "resources": {"gpus_per_worker": 1}},
            "deepspeed.offload_params",
            "zero_stage 3",
        ),
        ({"deepspeed": {"zero_stage": 3, "offload_params": True}}, "deepspeed", "nothing to offload"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers", "greater than or equal to 1"),
        ({"tags": ["a b"]}, "tags", "may hold only"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_reported_with_its_path(overrides, path, fragment):
    found = problems(minilm_spec(**overrides))
    assert path in found, found
    assert fragment in found[path]


def test_several_bad_fields_are_all_reported():
    found = problems(minilm_spec(name="a/b", method={"method": "lora", "r": -1, "dropout": 2}))
    assert {"name", "method.r", "method.dropout"} <= set(found)


# -- gpus_per_worker: a worker drives one device; a fraction shares a GPU with other jobs, one rank per GPU ----
@pytest.mark.parametrize(
    "resources,fragment",
    [
        (
            {"num_workers": 2, "gpus_per_worker": 2},
            "a worker drives one GPU, so 2 GPUs per worker would leave 1 of each worker's GPUs idle; use one worker "
            "per GPU instead (num_workers: 4, gpus_per_worker: 1)",
        ),
        ({"gpus_per_worker": 1.5}, "1.5 GPUs per worker is not a whole number"),
        ({"gpus_per_worker": 16.5}, "16.5 GPUs per worker is not a whole number"),
        ({"num_workers": 2, "gpus_per_worker": 0.5}, "could put two ranks of this job on one GPU"),
        (
            {"num_workers": 4, "gpus_per_worker": 0.25, "placement_strategy": "SPREAD"},
            "use num_workers 1, placement_strategy STRICT_SPREAD (one worker per node), or gpus_per_worker 1",
        ),
        ({"gpus_per_worker": float("inf")}, "finite number"),
        ({"gpus_per_worker": -1}, "greater than or equal to 0"),
    ],
)
def test_gpus_per_worker_refuses_idle_or_shared_devices_within_a_job(resources, fragment):
    found = problems(minilm_spec(resources=resources))
    assert fragment in found["resources.gpus_per_worker"], found


@pytest.mark.parametrize(
    "resources",
    [
        {"num_workers": 4, "gpus_per_worker": 0},
        {"num_workers": 8, "gpus_per_worker": 1, "placement_strategy": "PACK"},
        {"gpus_per_worker": 0.5},
        {"num_workers": 3, "gpus_per_worker": 0.25, "placement_strategy": "STRICT_SPREAD"},
    ],
)
def test_whole_gpus_and_one_rank_per_shared_gpu_are_accepted(resources):
    assert parse_job_spec(minilm_spec(resources=resources)).resources.gpus_per_worker == resources["gpus_per_worker"]


@settings(max_examples=200, deadline=None)
@given(
    gpus=st.one_of(st.floats(allow_nan=True), st.integers(-2, 40), st.sampled_from([0.5, 1, 1.0, 2, 0.999])),
    workers=st.integers(1, 9),
    strategy=st.sampled_from(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]),
)
def test_gpus_per_worker_is_accepted_exactly_when_no_device_idles_or_hosts_two_ranks(gpus, workers, strategy):
    data = minilm_spec(resources={"num_workers": workers, "gpus_per_worker": gpus, "placement_strategy": strategy})
    one_rank_per_gpu = gpus in (0, 1) or (0 < gpus < 1 and (workers == 1 or strategy == "STRICT_SPREAD"))
    try:
        parse_job_spec(data)
    except JobSpecError as e:
        assert not one_rank_per_gpu and [p for p, _ in e.problems] == ["resources.gpus_per_worker"]
    else:
        assert one_rank_per_gpu


def test_subspace_fits_and_sweep_trials_follow_the_gpu_rules():
    from jobs.sweep_spec import parse_sweep_spec

    subspace = {"kind": "ipt-subspace", "name": "sub", "base_model": "minilm"}
    assert parse_job_spec({**subspace, "resources": {"gpus_per_worker": 0.5}}).resources.gpus_per_worker == 0.5
    assert "resources.gpus_per_worker" in problems({**subspace, "resources": {"gpus_per_worker": 2}})
    sweep = {"name": "s", "spec": minilm_spec(resources={"num_workers": 2}),
             "search_space": {"resources.gpus_per_worker": {"choice": [1, 0.5]}}}
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep)
    (path, message), = err.value.problems  # the first trial that draws 0.5 is refused, naming the field
    assert path.startswith("search_space (") and path.endswith("): resources.gpus_per_worker")
    assert "could put two ranks of this job on one GPU" in message


def test_local_csv_and_jsonl_with_column_mapping(tmp_path):
    (tmp_path / "d.csv").write_text("question,kind\nwhat is x ?,DESC\n")
    spec = parse_job_spec(
        minilm_spec(dataset={"path": str(tmp_path / "d.csv"), "text_column": "question", "label_column": "kind"})
    )
    assert spec.effective_task_name == "d"
    (tmp_path / "d.jsonl").write_text('{"q": "hi", "a": "hello"}\n')
    found = problems(
        minilm_spec(
            task="causal-lm", base_model="smollm2", dataset={"path": str(tmp_path / "d.jsonl"), "prompt_column": "q"}
        )
    )
    assert "no column(s) ['response']" in found["dataset.path"]
    assert "is not valid YAML" in str(
        pytest.raises(JobSpecError, load_job_spec, _write(tmp_path / "bad.yaml", "name: [")).value
    )


def _write(path, text):
    path.write_text(text)
    return path


# -- fuzzing: arbitrary input is either a valid spec or a JobSpecError, and nothing is stored ----
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "name",
    "base_model",
    "task",
    "dataset",
    "method",
    "training",
    "deepspeed",
    "resources",
    "tags",
    "task_name",
    "idempotency_key",
]
mutations = st.dictionaries(st.sampled_from(FIELDS + ["extra"]), json_values, max_size=4)
method_mutations = st.dictionaries(
    st.sampled_from(["method", "r", "alpha", "dropout", "target_modules", "modules_to_save", "add_missing_biases"]),
    json_values,
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=mutations, method=method_mutations)
def test_fuzzed_specs_never_crash_and_failures_store_nothing(tmp_path_factory, top, method):
    from jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 's.db'}", home=tmp_path_factory.mktemp("home"))
    data = minilm_spec()
    data["method"] = {**data["method"], **method}
    data.update(top)
    try:
        job = store.submit(data)
    except JobSpecError as e:
        assert e.problems and all(isinstance(p, str) and isinstance(m, str) for p, m in e.problems)
        assert store.count_jobs() == 0
    else:
        assert store.count_jobs() == 1 and store.get(job.id).spec == job.spec
    finally:
        store.close()


# -- what used to get past validation or crash it (issue 18) ----
def test_a_trailing_newline_is_not_part_of_a_valid_name():
    found = problems(minilm_spec(name="my-job\n", tags=["demo\n"], task_name="trec\n"))
    assert {"name", "tags", "task_name"} <= set(found), found
    assert "'my-job\\n' may hold only" in found["name"]


@pytest.mark.parametrize(
    "overrides,path",
    [
        ({"kind": ["train"]}, "kind"),
        ({"kind": {"a": 1}}, "kind"),
        ({"dataset": {"path": "d" * 5000 + ".csv"}}, "dataset"),
        ({"base_model": "m" * 5000}, "base_model"),
        ({"base_model": "~no-such-user-here/model"}, "base_model"),
        ({"base_model": "a\x00b"}, "base_model"),
        ({"method": {"method": "lo\nra" * 500}}, "method"),
        ({"x" * 500 + "\n": 1}, "x" * 100),
    ],
)
def test_odd_values_give_one_short_line_naming_the_field(overrides, path):
    found = problems(minilm_spec(**overrides))
    (where, message), = ((p, m) for p, m in found.items() if p.startswith(path))
    assert "\n" not in where + message and len(message) <= 500 and len(where) <= 200, found


def test_seeds_are_bounded_by_what_torch_and_numpy_take():
    limit = 2**32
    assert parse_job_spec(minilm_spec(training={"seed": limit - 1})).training.seed == limit - 1
    assert "less than 4294967296" in problems(minilm_spec(training={"seed": limit}))["training.seed"]
    assert "method.seed" in problems(minilm_spec(method={"method": "ipt", "seed": 2**70}))
    subspace = {"kind": "ipt-subspace", "name": "sub", "base_model": "minilm", "seed": limit}
    assert "seed" in problems(subspace)


def _float_fields():
    import typing

    import peft_methods

    for name in peft_methods.list_methods():
        config = peft_methods.get_method(name).Config
        for field, info in config.model_fields.items():
            if float in (info.annotation, *typing.get_args(info.annotation)):
                yield name, field


@pytest.mark.parametrize("method,field", list(_float_fields()))
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_float_of_any_method_takes_inf_or_nan(method, field, value):
    found = problems(minilm_spec(method={"method": method, field: value}))
    assert "finite number" in found[f"method.{field}"], found


@pytest.mark.parametrize("field", ["lr", "head_lr", "warmup_ratio", "weight_decay", "eval_fraction", "base_dropout"])
def test_no_training_float_takes_nan(field):
    assert "finite number" in problems(minilm_spec(training={field: float("nan")}))[f"training.{field}"]


# -- spec files: no aliases, bounded size and nesting, plain values ----
@pytest.mark.parametrize(
    "text,fragment",
    [
        ("a: &x [1, 2]\nname: *x\n", "anchors and aliases"),
        ("base: &b {name: x}\nother:\n  <<: *b\n", "anchors and aliases"),
        ("name: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
        ("name: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 levels deep"),
        ("name: 2001-02-03\n", "a date is not allowed"),
        ("name: !!binary aGVsbG8=\n", "a bytes is not allowed"),
        ("seed: " + "9" * 5000 + "\n", "a value it cannot convert"),
        ("name: x\n---\nname: y\n", "is not valid YAML"),
        ("name: !!python/name:os.system x\n", "is not valid YAML"),
    ],
)
def test_a_spec_file_refuses_aliases_deep_nesting_and_odd_values_in_one_line(tmp_path, text, fragment):
    with pytest.raises(JobSpecError) as err:
        load_job_spec(_write(tmp_path / "job.yaml", text))
    (where, message), = err.value.problems
    assert fragment in message and "\n" not in message, err.value.problems


def test_a_json_spec_file_is_bounded_likewise(tmp_path):
    for text, fragment in [("[" * 100_000 + "]" * 100_000, "nested more than 32"), ("{" * 3, "not valid JSON")]:
        with pytest.raises(JobSpecError, match=fragment):
            load_job_spec(_write(tmp_path / "job.json", text))


def test_a_spec_file_over_one_mib_is_refused_unread(tmp_path):
    path = _write(tmp_path / "job.yaml", YAML_SPEC + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(JobSpecError, match="larger than 1024 KiB"):
        load_job_spec(path)
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(JobSpecError, match="not UTF-8"):
        load_job_spec(tmp_path / "latin1.yaml")
