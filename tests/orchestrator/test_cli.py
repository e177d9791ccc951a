"""The `peftfleet` CLI on a real store: tables, JSON, and errors with exit codes (no Ray needed)."""

from __future__ import annotations

import json

import pytest

import peft_methods
from jobs.states import JobState
from jobs.store import JobStore
from orchestrator.cli import main
from orchestrator.client import Client
from tests.conftest import TINY_BERT
from tests.jobs.conftest import minilm_spec

SPEC = minilm_spec(name="cli-job", method={"method": "bitfit"})


@pytest.fixture
def store(tmp_path):
    return JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home")


def run(store, capsys, *argv):
    code = main([*argv, "--store-url", store.url, "--home", str(store.home)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jobs_as_table_and_json(store, capsys):
    job = store.submit(SPEC)
    store.transition(job.id, JobState.QUEUED)
    code, out, _ = run(store, capsys, "jobs")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["ID", "NAME", "STATE", "METHOD"]
    assert job.id[:12] in out and "QUEUED" in out
    code, out, _ = run(store, capsys, "jobs", "--json")
    [listed] = json.loads(out)
    assert (listed["id"], listed["state"], listed["method"]) == (job.id, "QUEUED", "bitfit")
    code, out, _ = run(store, capsys, "jobs", "--state", "RUNNING", "--json")
    assert json.loads(out) == []


def test_status_shows_events_and_a_missing_job_is_an_error(store, capsys):
    job = store.submit(SPEC)
    code, out, _ = run(store, capsys, "status", job.id[:8])
    assert code == 0 and "PENDING" in out and "submitted" in out
    code, out, err = run(store, capsys, "status", "feedfacecafe")
    assert code == 1 and out == "" and "no job 'feedfacecafe'" in err


def test_adapters_json_includes_the_base_fingerprint(store, capsys, tmp_path):
    base = tmp_path / "base"
    TINY_BERT.fresh().save_pretrained(base)
    fingerprint = store.register_base_model(str(base)).fingerprint
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora"})
    folder = peft_methods.save_adapter(model, tmp_path / "a", metadata={"base_fingerprint": fingerprint})
    store.adapters.register(
        folder,
        name="cli-adapter",
        base_fingerprint=fingerprint,
        task="sequence-classification",
        task_name="t",
        tags=["x"],
    )
    code, out, _ = run(store, capsys, "adapters", "--json", "--tag", "x")
    [adapter] = json.loads(out)
    assert adapter["name"] == "cli-adapter" and adapter["base_fingerprint"] == fingerprint
    code, out, _ = run(store, capsys, "adapters", "--base", str(base))
    assert "cli-adapter" in out and fingerprint[:19] in out


def test_a_bad_spec_file_names_the_field_and_exits_2_before_touching_ray(store, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nbase_model: minilm\ntask: sequence-classification\ndataset: {name: trec}\nmethod: {method: lora, "
        "r: 0}\n"
    )
    code, out, err = run(store, capsys, "submit", str(bad))
    assert code == 2 and "method.r: Input should be greater than 0" in err
    code, _, err = run(store, capsys, "submit", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err
    assert store.count_jobs() == 0


def test_subspaces_lists_each_subspace_with_its_sources(store, capsys, tmp_path):
    import torch

    from peft_methods.ipt import fit_subspace, save_subspace

    base = tmp_path / "base"
    TINY_BERT.fresh().save_pretrained(base)
    fingerprint = store.register_base_model(str(base)).fingerprint
    prompts = torch.randn(3, 2, 32)
    tensors, init, stats = fit_subspace(prompts, intrinsic_dim=2, inner_dim=4, steps=5, lr=1e-2, seed=0)
    folder = save_subspace(
        tmp_path / "s", tensors, init, num_virtual_tokens=2, hidden_size=32, metadata={"base_fingerprint": fingerprint}
    )
    store.subspaces.register(
        folder,
        name="cli-subspace",
        base_fingerprint=fingerprint,
        sources=[{"name": "pt-a"}, {"name": "pt-b"}],
        metrics=stats,
    )
    code, out, _ = run(store, capsys, "subspaces", "--base", str(base))
    assert code == 0 and "cli-subspace" in out and "pt-a, pt-b" in out
    code, out, _ = run(store, capsys, "subspaces", "--json")
    [listed] = json.loads(out)
    assert (listed["name"], listed["intrinsic_dim"], listed["num_virtual_tokens"]) == ("cli-subspace", 2, 2)


@pytest.fixture
def no_cluster(monkeypatch):
    """Fails the test if the command reaches for a Ray cluster (it must refuse before that)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command connected to Ray before refusing")

    monkeypatch.setattr("orchestrator.client.connect", refuse)


def test_serve_refuses_an_adapter_of_another_base_before_starting_anything(store, capsys, tmp_path, no_cluster):
    base, other = tmp_path / "base", tmp_path / "other"
    TINY_BERT.fresh().save_pretrained(base)
    TINY_BERT.build().save_pretrained(other)  # unseeded: other random weights, another fingerprint
    fingerprint = store.register_base_model(str(other)).fingerprint
    model = peft_methods.apply(TINY_BERT.fresh(), {"method": "lora"})
    folder = peft_methods.save_adapter(model, tmp_path / "a", metadata={"base_fingerprint": fingerprint})
    store.adapters.register(
        folder, name="elsewhere", base_fingerprint=fingerprint, task="sequence-classification", task_name="t"
    )
    code, _, err = run(store, capsys, "serve", "--base", str(base), "--adapters", "elsewhere")
    assert code == 2 and "trained on another base" in err
    code, _, err = run(store, capsys, "serve", "--base", str(base), "--adapters", "missing")
    assert code == 1 and "no adapter named 'missing'" in err


def test_tune_refuses_a_bad_sweep_file_naming_the_path_before_touching_ray(store, capsys, tmp_path, no_cluster):
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"name": "s", "spec": SPEC, "search_space": {"training.lr": {"uniform": [0.1, 0.01]}}})
    )
    code, _, err = run(store, capsys, "tune", str(sweep))
    assert code == 2 and "search_space.training.lr: uniform needs low < high" in err
    assert store.sweeps.list() == []


# Secrets: never on a command line, in a message or in a Ray runtime env (docs/security.md). Nothing
# here reaches Ray: the clusters below are descriptions, and `launch` must refuse before connecting.

PG = "postgresql+psycopg2://peftfleet:s3cret-pw@127.0.0.1:1/peftfleet"  # nothing listens on port 1


@pytest.fixture
def secret_env(monkeypatch):
    """No secret, secrets file or secrets mode from the caller's environment; all put back afterwards."""
    for name in ("PEFTFLEET_STORE_URL", "PEFTFLEET_API_KEY", "PEFTFLEET_SECRETS_FILE", "PEFTFLEET_SECRETS",
                 "PEFTFLEET_API_KEY_FILE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_a_password_on_the_command_line_is_refused_without_echoing_it(tmp_path, capsys, secret_env, no_cluster):
    code = main(["jobs", "--store-url", PG, "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--store-url holds a password" in err and "PEFTFLEET_STORE_URL" in err
    assert "s3cret-pw" not in err


def test_an_unreachable_store_is_one_line_with_its_password_masked(tmp_path, capsys, secret_env, no_cluster):
    secret_env.setenv("PEFTFLEET_STORE_URL", PG)
    code = main(["jobs", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Connection refused" in err
    assert "postgresql+psycopg2://peftfleet:***@127.0.0.1:1/peftfleet" in err and "s3cret-pw" not in err


def test_jobs_get_the_store_password_from_a_0600_file_not_the_runtime_env(store, tmp_path, secret_env):
    from jobs.secrets import read_secrets_file
    from orchestrator.cluster import Cluster

    client = Client(store_url=store.url, home=tmp_path / "home")
    client._cluster = Cluster("127.0.0.1:8265", started_here=True)  # a local cluster (not connected to)
    assert client.process_env()["PEFTFLEET_STORE_URL"] == store.url  # no password: it travels as it is
    client.store.url = PG  # what a client of a PostgreSQL store holds (no PostgreSQL here to open)
    env = client.process_env()
    assert "PEFTFLEET_STORE_URL" not in env and not any("s3cret-pw" in v for v in env.values())
    assert read_secrets_file(env["PEFTFLEET_SECRETS_FILE"]) == {"PEFTFLEET_STORE_URL": PG}
    assert client.process_env() == env  # one file per set of secrets, not one per launch


def test_a_remote_cluster_gets_a_password_only_from_its_own_pods(store, tmp_path, secret_env):
    from orchestrator.cluster import Cluster

    client = Client(store_url=store.url, home=tmp_path / "home")
    client._cluster = Cluster("10.0.0.5:8265", started_here=False, address="ray://head:10001")
    client.store.url = PG
    with pytest.raises(ValueError, match="remote Ray cluster ray://head:10001.*secrets='cluster'"):
        client.process_env()
    assert not (tmp_path / "home" / "secrets").exists()
    secret_env.setenv("PEFTFLEET_SECRETS", "cluster")
    client = Client(store_url=store.url, home=tmp_path / "home")
    client._cluster = Cluster("10.0.0.5:8265", started_here=False, address="ray://head:10001")
    client.store.url = PG
    env = client.process_env()
    assert env["PEFTFLEET_SECRETS"] == "cluster" and "PEFTFLEET_STORE_URL" not in env
    with pytest.raises(ValueError, match="secrets must be one of \\['auto', 'cluster'\\], not 'env'"):
        Client(store_url=store.url, home=tmp_path / "home", secrets="env")


def test_launch_refuses_a_runtime_env_holding_a_secret_before_reaching_ray(secret_env):
    from jobs.spec import parse_job_spec
    from orchestrator.cluster import Cluster, launch

    cluster = Cluster("127.0.0.1:9", started_here=True)  # nothing listens there
    resources = parse_job_spec(SPEC).resources
    for env in ({"PEFTFLEET_STORE_URL": PG}, {"PEFTFLEET_API_KEY": "k3y"}, {"PEFTFLEET_STORAGE_URL": "s3://id:key@b/x"}):
        with pytest.raises(ValueError, match=f"refusing to put {next(iter(env))} in a Ray runtime env"):
            launch(cluster, "orchestrator.runner x", submission_id="s", resources=resources, env=env)


def test_serve_keeps_the_api_key_and_store_password_out_of_its_options_and_runtime_env(secret_env):
    from orchestrator.serving.deployment import ServeOptions, build, build_app

    app = build_app(ServeOptions(base="b", api_key="k3y", store_url=PG), env={"PEFTFLEET_HOME": "/h"})
    [options] = app._bound_deployment.init_args
    assert (options["api_key"], options["api_key_from_env"], options["store_url"]) == (None, True, None)
    with pytest.raises(ValueError, match="PEFTFLEET_API_KEY"):
        build_app(ServeOptions(base="b"), env={"PEFTFLEET_API_KEY": "k3y"})
    # KubeRay's RayService: the pods hold both; the replicas' runtime env gets neither.
    secret_env.setenv("PEFTFLEET_STORE_URL", PG)
    secret_env.setenv("PEFTFLEET_API_KEY", "k3y")
    secret_env.setenv("PEFTFLEET_STORAGE_URL", "/mnt/peftfleet/artifacts")
    deployment = build({"base": "b"})._bound_deployment
    env = deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env["PEFTFLEET_STORAGE_URL"] == "/mnt/peftfleet/artifacts" and not set(env) & {"PEFTFLEET_STORE_URL",
                                                                                          "PEFTFLEET_API_KEY"}
    assert "s3cret-pw" not in repr(deployment.init_args) and "k3y" not in repr(deployment.init_args)
    assert deployment.init_args[0]["api_key_from_env"]


def test_an_older_store_is_refused_until_db_upgrade(store, capsys):
    from sqlalchemy import text

    job = store.submit(SPEC)
    with store.db.engine.begin() as conn:  # what peftfleet with schema 3 left
        conn.execute(text("DROP TABLE checkpoints"))
        conn.execute(text("ALTER TABLE job_events DROP COLUMN owner"))
        conn.execute(text("ALTER TABLE base_models DROP COLUMN source"))
        conn.execute(text("UPDATE peftfleet_schema SET version = 3"))
    store.close()
    code, _, err = run(store, capsys, "jobs")
    assert code == 1 and "schema version 3" in err and "peftfleet db upgrade" in err and len(err.splitlines()) == 1
    assert run(store, capsys, "db", "version")[:2] == (0, "schema version 3; this peftfleet uses 5\n")
    assert run(store, capsys, "db", "upgrade")[:2] == (0, "schema version 3 → 5\n")
    assert run(store, capsys, "db", "upgrade")[:2] == (0, "schema version 5: up to date\n")
    code, out, _ = run(store, capsys, "jobs", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [job.id]


# Export (docs/export.md) and quiet output (orchestrator/quiet.py), through the CLI on a real store.

def _register_lora_on_a_tiny_bert(store, tmp_path, method=None):
    from tests.conftest import randomize_adapter, save_tiny_bert

    base = save_tiny_bert(tmp_path / "base")  # a BertModel with a tokenizer: a classifier head is fresh on load
    fingerprint = store.register_base_model(str(base)).fingerprint
    model = TINY_BERT.build()
    model = peft_methods.apply(type(model).from_pretrained(base, num_labels=3), method or {"method": "lora"})
    randomize_adapter(model)
    folder = peft_methods.save_adapter(model, tmp_path / "a", metadata={"base_fingerprint": fingerprint,
                                                                       "labels": ["x", "y", "z"]})
    store.adapters.register(folder, name="to-export", base_fingerprint=fingerprint,
                            task="sequence-classification", task_name="t")
    return base


def test_export_writes_an_adapter_folder_and_refuses_merging_what_cannot_merge(store, capsys, tmp_path, no_cluster):
    base = _register_lora_on_a_tiny_bert(store, tmp_path)
    code, out, _ = run(store, capsys, "export", "to-export", "--out", str(tmp_path / "out"), "--json")
    assert code == 0 and json.loads(out)["kind"] == "adapter"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base.resolve())
    assert (tmp_path / "out" / "README.md").exists()
    code, _, err = run(store, capsys, "export", "to-export", "--out", str(tmp_path / "out"))
    assert code == 2 and "--out" in err and "--overwrite" in err and len(err.splitlines()) == 1
    code, _, err = run(store, capsys, "export", "missing", "--out", str(tmp_path / "o2"))
    assert code == 1 and "no adapter named 'missing'" in err


def test_merging_a_bottleneck_adapter_is_one_line_naming_the_mergeable_methods(store, capsys, tmp_path, no_cluster):
    store_dir = tmp_path / "s"
    store_dir.mkdir()
    _register_lora_on_a_tiny_bert(store, store_dir, {"method": "bottleneck"})
    capsys.readouterr()
    code, out, err = run(store, capsys, "export", "to-export", "--merge", "--out", str(tmp_path / "out"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "uses bottleneck, which cannot be merged" in err and "mergeable methods: bitfit, " in err
    assert not (tmp_path / "out").exists()


def test_a_quiet_command_sends_library_logs_to_a_file_named_once_and_verbose_does_not(store, capsys, tmp_path,
                                                                                       no_cluster, request):
    """`export --merge` loads a base whose classifier head is fresh: transformers reports it. Quiet (the default),
    that report lands in $home/logs/*.log and stderr names the file once; the loggers are put back afterwards."""
    import logging

    import transformers

    _register_lora_on_a_tiny_bert(store, tmp_path)
    logs = store.home / "logs"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # tests/conftest.py silences it; a user's process does not
    request.addfinalizer(lambda: transformers.logging.set_verbosity(verbosity))
    before = {name: list(logging.getLogger(name).handlers) for name in ("transformers", "")}
    capsys.readouterr()  # what setting up printed (transformers' progress bars, not quiet there)
    code, out, err = run(store, capsys, "export", "to-export", "--merge", "--out", str(tmp_path / "merged"))
    assert code == 0 and out.startswith("exported to-export (lora) as merged into its base")
    [log] = logs.glob("*.log")
    assert err == f"peftfleet: library logs go to {log} (--verbose shows them here)\n"
    assert "classifier.weight" in log.read_text() and "transformers" in log.read_text()
    assert {name: list(logging.getLogger(name).handlers) for name in before} == before
    log.unlink()
    code, out, _ = run(store, capsys, "--verbose", "export", "to-export", "--merge", "--out", str(tmp_path / "m2"))
    assert code == 0 and not list(logs.glob("*.log"))
    code, out, _ = run(store, capsys, "export", "to-export", "--merge", "--out", str(tmp_path / "m3"), "-v")
    assert code == 0 and not list(logs.glob("*.log"))
