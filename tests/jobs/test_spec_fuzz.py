"""Spec fuzz: YAML documents (random trees, and valid job and sweep specs mutated with wrong types, huge
strings, line breaks, inf/nan, deep nesting and aliases) read by the job-spec and sweep-spec file loaders.
Each is either a valid spec or a JobSpecError of one-line problems, each naming its field or saying what is
wrong with the whole document; a rejected job submitted to a real store stores nothing."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.spec import JobSpecError, load_job_spec
from jobs.store import JobStore
from jobs.sweep_spec import load_sweep_spec
from tests.jobs.conftest import minilm_spec

WHOLE_DOCUMENT = ("is a mapping of fields", "anchors and aliases", "nested more than", "is not valid YAML",
                  "larger than", "not UTF-8")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["my-job\n", "x" * 5000, "../etc", "~nobody/x", "a\x00b", "train", "lora", "minilm", ".inf", "2001-02-03"]
)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([2**32, 2**32 - 1, -1, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True) | text
)


def nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


trees = st.recursive(
    scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=10,
)
values = trees | st.builds(nested, trees, st.integers(28, 40))

JOB_PATHS = ["name", "kind", "task", "base_model", "tags", "task_name", "idempotency_key", "priority",
             "dataset", "dataset.name", "dataset.path", "dataset.train_size",
             "method", "method.method", "method.r", "method.alpha", "method.dropout", "method.seed",
             "training", "training.seed", "training.lr", "training.head_lr", "training.epochs", "training.batch_size",
             "deepspeed.zero_stage", "resources.num_workers", "resources.gpus_per_worker", "surprise"]
SWEEP_PATHS = ["name", "seed", "metric", "mode", "num_samples", "scheduler", "max_concurrent",
               "scheduler_options", "scheduler_options.grace_period", "search_space", "search_space.training.lr",
               "search_space.training.lr.loguniform", "search_space.method.choice", "spec", "spec.name",
               "spec.training", "spec.method.alpha"]


def valid_sweep() -> dict:
    return {"name": "s", "spec": minilm_spec(), "num_samples": 2,
            "search_space": {"training.lr": {"loguniform": [1e-4, 1e-2]},
                             "method": {"choice": [{"method": "lora", "r": 4}, {"method": "bitfit"}]}}}


def mutated(base: dict, paths: list[str]):
    edit = st.tuples(st.sampled_from(paths), values)
    return st.builds(_apply, st.just(base), st.lists(edit, min_size=1, max_size=3))


def _apply(base: dict, edits: list[tuple[str, object]]) -> dict:
    data = copy.deepcopy(base)
    for path, value in edits:
        *heads, last = path.split(".")
        node = data
        for head in heads:
            node = node.setdefault(head, {}) if isinstance(node, dict) else node
        if isinstance(node, dict):
            node[last] = value
    return data


def shared(data):
    """The same subtree twice: PyYAML writes it once with an anchor and then an alias."""
    if not isinstance(data, dict):
        return data
    return {**data, "again": data.get("training") or data.get("search_space") or [1]}


def documents(base: dict, paths: list[str]):
    data = trees | mutated(base, paths)
    return st.one_of(
        st.tuples(data, st.just("")),
        st.tuples(data.map(shared), st.just("")),
        st.tuples(mutated(base, paths), st.sampled_from(["x: &a [1]\ny: *a\n", "<<: {}\n", "%%%\n", "\t- ["])),
    )


def check_rejection(err: JobSpecError) -> None:
    assert err.problems, err
    for where, message in err.problems:
        assert isinstance(where, str) and isinstance(message, str) and message
        assert "\n" not in where + message and "\r" not in where + message, err.problems
        assert where or any(reason in message for reason in WHOLE_DOCUMENT), err.problems


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = JobStore(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'store.db'}", home=tmp_path_factory.mktemp("h"))
    yield store
    store.close()


def _write(folder, data, extra: str) -> object:
    path = folder / "doc.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True) + extra, encoding="utf-8")
    return path


@SETTINGS
@given(document=documents(minilm_spec(), JOB_PATHS))
def test_job_spec_files_are_valid_or_refused_in_one_line_per_field(tmp_path_factory, store, document):
    data, extra = document
    path = _write(tmp_path_factory.mktemp("job"), data, extra)
    try:
        load_job_spec(path)
    except JobSpecError as e:
        check_rejection(e)
    before = store.count_jobs()
    try:
        store.submit(data)
    except JobSpecError as e:
        check_rejection(e)
        assert store.count_jobs() == before  # nothing stored
    else:
        assert store.count_jobs() == before + 1


@SETTINGS
@given(document=documents(valid_sweep(), SWEEP_PATHS))
def test_sweep_files_are_valid_or_refused_in_one_line_per_field(tmp_path_factory, document):
    data, extra = document
    try:
        load_sweep_spec(_write(tmp_path_factory.mktemp("sweep"), data, extra))
    except JobSpecError as e:
        check_rejection(e)


def test_the_unmutated_documents_are_valid(tmp_path):
    assert load_job_spec(_write(tmp_path, minilm_spec(), "")).name == "trec-lora"
    assert load_sweep_spec(_write(tmp_path, valid_sweep(), "")).num_samples == 2
