"""Sweep specs: drawing configurations, and refusing a bad search space before anything exists."""

from __future__ import annotations

import math

import pytest

from jobs.spec import JobSpecError
from jobs.sweep_spec import draw, parse_sweep_spec, trial_spec
from tests.jobs.conftest import minilm_spec


def sweep(**overrides) -> dict:
    data = {
        "name": "s", "spec": minilm_spec(),
        "search_space": {
            "training.lr": {"loguniform": [1e-4, 1e-2]},
            "training.batch_size": {"choice": [8, 16]},
            "method": {"choice": [{"method": "lora", "r": {"randint": [2, 5]}}, {"method": "bitfit"}]},
        },
        "num_samples": 20,
    }
    data.update(overrides)
    return data


def test_draws_are_reproducible_within_bounds_and_resolve_nested_choices():
    spec = parse_sweep_spec(sweep())
    first, again, other = draw(spec), draw(spec), draw(parse_sweep_spec(sweep(seed=1)))
    assert first == again and first != other and len(first) == 20
    for params in first:
        assert 1e-4 <= params["training.lr"] <= 1e-2 and params["training.batch_size"] in (8, 16)
        method = params["method"]
        assert method == {"method": "bitfit"} or (method["method"] == "lora" and method["r"] in (2, 3, 4))
    assert {p["method"]["method"] for p in first} == {"lora", "bitfit"}
    logs = [math.log10(p["training.lr"]) for p in first]
    assert min(logs) < -3 < max(logs)  # spread over the decades, not bunched at the top
    job = trial_spec(spec, first[0], 7, sweep_id="f" * 32)
    assert job.name == "s-t007" and job.idempotency_key == f"sweep-{'f' * 32}-7" and "sweep-ffffffffffff" in job.tags
    assert job.training.lr == first[0]["training.lr"]


@pytest.mark.parametrize(
    "space,where,message",
    [
        ({"training.lr": {"loguniform": [0, 1e-2]}}, "search_space.training.lr", "low > 0"),
        ({"training.lr": {"uniform": [0.1, 0.01]}}, "search_space.training.lr", "low < high"),
        ({"training.batch_size": {"randint": [1.5, 4]}}, "search_space.training.batch_size", "integers"),
        ({"training.batch_size": {"choice": []}}, "search_space.training.batch_size", "non-empty"),
        (
            {"training.lr": {"uniform": [0.5, 1.000001]}},
            "search_space (training.lr = high): training.lr",
            "less than or equal to 1",
        ),  # only the bound is bad
        ({"method.r": {"choice": [4, 8]}}, "", "r"),  # fine for LoRA (the spec's method): accepted below
        ({"method": {"choice": [{"method": "bitfit", "r": 4}]}}, "search_space (", "Extra inputs are not permitted"),
        ({"training.nonsense": {"choice": [1, 2]}}, "training.nonsense", "Extra inputs are not permitted"),
        ({"name.part": {"choice": [1]}}, "search_space.name.part", "not a mapping"),
    ],
)
def test_a_bad_search_space_is_refused_naming_where(space, where, message):
    if space == {"method.r": {"choice": [4, 8]}}:
        parse_sweep_spec(sweep(search_space=space))
        with pytest.raises(JobSpecError, match="Extra inputs are not permitted"):  # ...but not for BitFit
            parse_sweep_spec(sweep(spec={**minilm_spec(), "method": {"method": "bitfit"}}, search_space=space))
        return
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep(search_space=space))
    path, text = err.value.problems[0]
    assert path.startswith(where) or where in path, err.value.problems
    assert message in text or message in path, err.value.problems


def test_sweep_level_fields_are_checked():
    for bad, field in [
        ({"mode": "maximise"}, "mode"),
        ({"num_samples": 0}, "num_samples"),
        ({"name": "a/b"}, "name"),
        ({"scheduler_options": {"patience": 3}}, "scheduler_options"),
        ({"search_space": {}}, "search_space"),
    ]:
        with pytest.raises(JobSpecError) as err:
            parse_sweep_spec(sweep(**bad))
        assert err.value.problems[0][0] == field
    with pytest.raises(JobSpecError, match="pbt perturbs continuous parameters"):
        parse_sweep_spec(sweep(scheduler="pbt", search_space={"training.batch_size": {"choice": [8, 16]}}))
    pbt = parse_sweep_spec(sweep(scheduler="pbt", spec={**minilm_spec(), "training": {"eval_every_steps": 10}}))
    assert trial_spec(pbt, draw(pbt)[0], 0).training.checkpoint_every_steps == 10  # PBT continues from evaluations


def test_sweeps_and_their_trials_are_recorded_in_the_store(store):
    spec = parse_sweep_spec(sweep(num_samples=2))
    record = store.sweeps.create(spec)
    assert record.state == "PENDING" and record.sweep_spec == spec
    assert store.sweeps.get(record.id[:8]).id == record.id and store.sweeps.get("s").id == record.id
    params = draw(spec)
    jobs = [store.submit(trial_spec(spec, p, i, sweep_id=record.id)) for i, p in enumerate(params)]
    for i, (job, p) in enumerate(zip(jobs, params)):
        store.sweeps.add_trial(record.id, job.id, f"trial_{i}", p)
        store.sweeps.add_trial(record.id, job.id, f"trial_{i}", p)  # again after a restore: no duplicate
    trials = store.sweeps.trials(record.id)
    assert [t.job.id for t in trials] == [j.id for j in jobs] and [t.params for t in trials] == params
    done = store.sweeps.update(record.id, state="SUCCEEDED", best_job_id=jobs[0].id, best_value=0.5, best_adapter="a")
    assert done.finished_at is not None and store.sweeps.list()[0].best_value == 0.5
    with pytest.raises(ValueError, match="unknown sweep state"):
        store.sweeps.update(record.id, state="DONE")


def test_the_example_sweep_validates_with_its_spec_inline():
    from pathlib import Path

    from jobs.sweep_spec import load_sweep_spec

    spec = load_sweep_spec(Path(__file__).resolve().parents[2] / "examples" / "trec-sweep.yaml")
    assert spec.scheduler == "asha" and spec.num_samples == 6 and spec.promote
    assert {d["method"]["method"] for d in draw(spec)} == {"lora", "bitfit"}


def grid_sweep(**overrides) -> dict:
    space = {
        "training.batch_size": {"grid": [8, 16]},
        "method": {"grid": [{"method": "lora", "r": 4}, {"method": "lora", "r": 8}, {"method": "bitfit"}]},
        "training.lr": {"loguniform": [1e-4, 1e-2]},
    }
    return sweep(**{"search_space": space, "num_samples": None, **overrides})


def test_a_grid_runs_every_combination_with_the_other_values_drawn_per_trial():
    import itertools

    spec = parse_sweep_spec(grid_sweep())
    assert spec.num_samples == 1
    first, again, other = draw(spec), draw(spec), draw(parse_sweep_spec(grid_sweep(seed=1)))
    assert first == again and first != other and len(first) == 6
    methods = spec.search_space["method"]["grid"]
    combos = [(p["training.batch_size"], p["method"]) for p in first]
    assert combos == list(itertools.product([8, 16], methods))  # every combination once, last key fastest
    assert all(list(p) == ["training.batch_size", "method", "training.lr"] for p in first)
    lrs = [p["training.lr"] for p in first]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 6  # drawn per trial, not per grid point
    job = trial_spec(spec, first[5], 5)
    assert job.training.batch_size == 16 and job.method.method == "bitfit" and job.training.lr == lrs[5]

    twice = draw(parse_sweep_spec(grid_sweep(num_samples=2)))
    assert len(twice) == 12 and [(p["training.batch_size"], p["method"]) for p in twice] == combos * 2
    assert len({p["training.lr"] for p in twice}) == 12


def test_num_samples_defaults_to_one_grid_or_eight_draws():
    assert parse_sweep_spec(grid_sweep()).num_samples == 1
    assert parse_sweep_spec(sweep(num_samples=None)).num_samples == 8
    without_key = sweep()
    del without_key["num_samples"]
    assert parse_sweep_spec(without_key).num_samples == 8 and len(draw(parse_sweep_spec(without_key))) == 8
    with_grid = grid_sweep()
    del with_grid["num_samples"]
    assert parse_sweep_spec(with_grid).num_samples == 1 and len(draw(parse_sweep_spec(with_grid))) == 6
    assert parse_sweep_spec(grid_sweep(num_samples=3)).num_samples == 3


@pytest.mark.parametrize(
    "space,where,message",
    [
        ({"method": {"method": "lora", "r": {"grid": [4, 8]}}}, "search_space.method.r", "only at the top level"),
        (
            {"method": {"choice": [{"method": "lora", "r": {"grid": [4, 8]}}, {"method": "bitfit"}]}},
            "search_space.method.choice[0].r",
            "only at the top level",
        ),
        (
            {"method": {"grid": [{"method": "lora", "r": {"grid": [4, 8]}}]}},
            "search_space.method.grid[0].r",
            "only at the top level",
        ),
        (
            {"method": {"grid": [{"method": "lora", "r": {"choice": [4, 8]}}]}},
            "search_space.method.grid[0].r",
            "constants",
        ),
        ({"training.batch_size": {"grid": []}}, "search_space.training.batch_size", "non-empty"),
        ({"training.batch_size": {"grid": 8}}, "search_space.training.batch_size", "non-empty"),
    ],
)
def test_a_bad_grid_is_refused_naming_where(space, where, message):
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep(search_space=space))
    assert err.value.problems[0][0] == where and message in err.value.problems[0][1], err.value.problems


def test_a_grid_value_that_makes_a_bad_job_is_refused_at_parse_time():
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep(search_space={"training.lr": {"grid": [0.01, -1]}}))
    path, _ = err.value.problems[0]
    assert path == "search_space (training.lr = grid[1]): training.lr", err.value.problems
    parse_sweep_spec(sweep(search_space={"training.lr": {"grid": [0.01, 0.001]}}))  # the same grid, valid


def test_a_grid_over_ten_thousand_trials_is_refused():
    space = {"training.seed": {"grid": list(range(101))}, "training.batch_size": {"grid": list(range(1, 101))}}
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep(search_space=space, num_samples=None))
    assert err.value.problems[0][0] == "num_samples" and "10100 trials" in err.value.problems[0][1]
    with pytest.raises(JobSpecError, match="at most 10,000"):
        parse_sweep_spec(grid_sweep(num_samples=1667))  # 6 x 1667 = 10002


# -- sweep files: no alias expansion ("billion laughs"), bounded nesting, finite numbers (issue 18) ----
def test_a_sweep_file_refuses_aliases_before_expanding_anything(tmp_path):
    from jobs.sweep_spec import load_sweep_spec

    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "sweep.yaml").write_text(
        "name: s\nspec: {name: x}\nsearch_space:\n  " + "\n  ".join(laughs) + "\n  tags: {choice: [*i]}\n"
    )
    with pytest.raises(JobSpecError) as err:
        load_sweep_spec(tmp_path / "sweep.yaml")
    (where, message), = err.value.problems
    assert "line 4: YAML anchors and aliases" in message


def test_the_job_spec_file_a_sweep_names_is_read_within_the_same_limits(tmp_path):
    import yaml

    from jobs.sweep_spec import load_sweep_spec

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**sweep(), "spec": "job.yaml"}))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(minilm_spec()) + "x: &x 1\ny: *x\n")
    with pytest.raises(JobSpecError) as err:
        load_sweep_spec(tmp_path / "sweep.yaml")
    assert err.value.problems[0][0] == "spec" and "anchors and aliases" in err.value.problems[0][1]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**sweep(), "spec": "n" * 5000 + ".yaml"}))
    with pytest.raises(JobSpecError, match="cannot read") as err:
        load_sweep_spec(tmp_path / "sweep.yaml")
    assert err.value.problems[0][0] == "spec"


def _deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"search_space": {"training.lr": {"uniform": [1e-4, math.inf]}}}, "search_space.training.lr"),
        ({"search_space": {"training.lr": {"loguniform": [1e-4, 10**400]}}}, "search_space.training.lr"),
        ({"scheduler_options": {"grace_period": math.inf}}, "scheduler_options.grace_period"),
        ({"seed": 2**32}, "seed"),
        ({"search_space": {"a" + ".a" * 100_000: 1}}, "search_space (sample 0): a.a.a"),
        ({"spec": {"name": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["trap"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}, "spec.name"),
        ({"search_space": {"tags": _deep(10_000)}}, "search_space.tags.a.a.a"),
    ],
)
def test_infinite_numbers_huge_seeds_and_deep_paths_are_refused_naming_the_field(overrides, field):
    with pytest.raises(JobSpecError) as err:
        parse_sweep_spec(sweep(**overrides))
    where, message = err.value.problems[0]
    assert where.startswith(field) and "\n" not in message, err.value.problems
