"""Data sources beyond the built-ins (jobs/training/sources.py): formats, URLs, folders and globs, Hugging Face
dataset ids from a seeded hub cache, filters, splits, fingerprints, spec errors, and the recipe training from a
stream. Real files written with pyarrow into tmp_path; no Ray (its glue is tested in tests/integration)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.hub_cache import seed_hub_cache
from jobs.spec import JobSpecError, parse_job_spec
from jobs.training import sources
from jobs.training.data import fingerprint, load_for_job
from tests.jobs.conftest import minilm_spec

ROOT = Path(__file__).resolve().parents[2]
SECRET = "patient 4711 has a rare disease"
ROWS = [{"text": f"question number {i}", "label": ["loc", "num", "hum"][i % 3], "lang": ["en", "de"][i % 2]}
        for i in range(60)]


def write(folder: Path, fmt: str, rows: list[dict] = ROWS, name: str = "d") -> Path:
    """``rows`` as one file of ``fmt`` (parquet, arrow, jsonl, json or csv) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "arrow":
        with pa.ipc.new_stream(str(path), table.schema) as w:  # what `datasets` writes
            w.write_table(table)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
    return path


def job(dataset: dict, **overrides):
    return parse_job_spec(minilm_spec(dataset=dataset, **overrides))


def loaded(dataset: dict, **overrides):
    spec = job(dataset, **overrides)
    return spec, load_for_job(spec.dataset, spec.task, spec.training)


def problems(dataset: dict, **overrides) -> dict[str, str]:
    with pytest.raises(JobSpecError) as err:
        job(dataset, **overrides)
    return dict(err.value.problems)


# -- formats, URLs, folders, globs --------------------------------------------------------------------------
def test_every_format_gives_the_same_rows_and_the_same_split(tmp_path):
    splits = {}
    for fmt in ("parquet", "arrow", "jsonl", "json", "csv"):
        _, data = loaded({"path": str(write(tmp_path, fmt))})
        splits[fmt] = (data.train, data.eval, data.labels)
    first = splits["parquet"]
    assert all(s == first for s in splits.values()), {k: len(v[0]) for k, v in splits.items()}
    train, held_out, labels = first
    assert labels == ["hum", "loc", "num"] and len(held_out) == 12 and len(train) == 48  # eval_fraction 0.2
    assert not {x for x, _ in train} & {x for x, _ in held_out}


def test_a_file_url_a_folder_and_a_glob_read_the_same_rows(tmp_path):
    whole = write(tmp_path / "one", "parquet")
    write(tmp_path / "shards", "parquet", ROWS[:25], "part-0")
    write(tmp_path / "shards", "parquet", ROWS[25:], "part-1")
    (tmp_path / "shards" / "README.md").write_text("not data")
    _, reference = loaded({"path": str(whole)})
    for path in (f"file://{whole}", str(tmp_path / "shards"), str(tmp_path / "shards" / "part-*.parquet")):
        _, data = loaded({"path": path})
        assert sorted(data.train) == sorted(reference.train) and sorted(data.eval) == sorted(reference.eval), path


def test_the_format_can_be_named_when_the_suffix_does_not_say(tmp_path):
    path = write(tmp_path, "jsonl")
    renamed = path.rename(tmp_path / "rows.txt")
    assert "cannot tell the format" in problems({"path": str(renamed)})["dataset.path"]
    _, data = loaded({"path": str(renamed), "format": "jsonl"})
    assert len(data.train) + len(data.eval) == len(ROWS)


# -- filter, split, train_size ------------------------------------------------------------------------------
def test_a_filter_keeps_only_matching_records(tmp_path):
    path = str(write(tmp_path, "csv"))
    _, english = loaded({"path": path, "filter": {"lang": "en"}})
    assert len(english.train) + len(english.eval) == 30
    _, some = loaded({"path": path, "filter": {"lang": ["en", "de"], "label": "num"}})
    assert len(some.train) + len(some.eval) == 20 and some.labels == ["num"]
    assert "no column(s) ['colour']" in problems({"path": path, "filter": {"colour": "red"}})["dataset.path"]


def test_a_folder_split_reads_that_split_s_files(tmp_path):
    write(tmp_path / "data", "parquet", ROWS[:40], "train-00000-of-00001")
    write(tmp_path / "data", "parquet", ROWS[40:], "test-00000-of-00001")
    _, train = loaded({"path": str(tmp_path), "split": "train"})
    _, test = loaded({"path": str(tmp_path), "split": "test"})
    assert len(train.train) + len(train.eval) == 40 and len(test.train) + len(test.eval) == 20
    assert "has no split 'validation'" in problems({"path": str(tmp_path), "split": "validation"})["dataset.path"]


def test_train_size_keeps_the_smallest_hashes_and_leaves_eval_alone(tmp_path):
    path = str(write(tmp_path, "parquet"))
    _, full = loaded({"path": path})
    _, small = loaded({"path": path, "train_size": 10})
    assert small.eval == full.eval and len(small.train) == 10 and set(small.train) <= set(full.train)
    seed = job({"path": path}).training.seed
    by_hash = sorted(full.train, key=lambda p: sources.row_hash(p[0], seed))
    assert set(small.train) == set(by_hash[:10])


def test_the_eval_cut_found_from_a_prefix_of_hashes_equals_the_full_one():
    """What the streaming path relies on: the k smallest distinct hashes are in any prefix holding k of them."""
    keys = [f"row {i % 40}" for i in range(100)]  # repeated keys: 40 distinct
    hashes = sorted(sources.row_hash(k, 7) for k in keys)
    full = sources.cutoff(hashes, 8)
    assert sources.cutoff(hashes[: hashes.index(full) + 3], 8) == full
    with pytest.raises(ValueError, match="leaves no training data out of 40 distinct"):
        sources.cutoff(hashes, 40)


# -- Hugging Face dataset ids, from a seeded hub cache ------------------------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """``org/tiny`` in a hub cache under tmp_path: train and test splits of parquet files."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "repo"
    write(repo / "data", "parquet", ROWS[:45], "train-00000-of-00001")
    write(repo / "data", "parquet", ROWS[45:], "test-00000-of-00001")
    return seed_hub_cache(repo, "org/tiny", repo_type="dataset")


def test_an_hf_dataset_is_read_from_the_hub_cache_at_its_commit(hub):
    spec, data = loaded({"hf": "org/tiny"})
    assert len(data.train) + len(data.eval) == 45 and spec.effective_task_name == "tiny"
    print_ = fingerprint(spec.dataset, spec.training, data)
    assert (print_["source"], print_["revision"], print_["hash_of"], print_["split"]) == \
        ("hf:org/tiny", hub, "revision", "train")
    _, test = loaded({"hf": "org/tiny", "split": "test", "revision": "main"})
    assert len(test.train) + len(test.eval) == 15


def test_an_hf_dataset_missing_from_the_cache_is_a_one_line_error(hub):
    found = problems({"hf": "org/absent"})
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in found["dataset.hf"]
    assert "has no split 'dev'" in problems({"hf": "org/tiny", "split": "dev"})["dataset.hf"]
    assert "is not a Hugging Face repository id" in problems({"hf": "not a repo id"})["dataset.hf"]
    assert problems({"path": "x.csv", "revision": "main"})["dataset.revision"] == "is for `hf` datasets only"


# -- fingerprints -------------------------------------------------------------------------------------------
def test_the_fingerprint_hashes_the_bytes_and_counts_the_rows(tmp_path):
    path = write(tmp_path, "jsonl")
    spec, data = loaded({"path": str(path), "filter": {"lang": "en"}}, training={"seed": 3})
    first = fingerprint(spec.dataset, spec.training, data)
    assert first["rows"] == {"total": 30, "train": len(data.train), "eval": len(data.eval)}
    assert (first["source"], first["format"], first["hash_of"], first["split_seed"], first["filter"]) == \
        (str(path), "jsonl", "bytes", 3, {"lang": "en"})
    assert fingerprint(spec.dataset, spec.training, load_for_job(spec.dataset, spec.task, spec.training)) == first
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"question number 7")] = ord("Q")  # one changed byte
    path.write_bytes(bytes(raw))
    assert fingerprint(spec.dataset, spec.training, load_for_job(spec.dataset, spec.task, spec.training))["hash"] \
        != first["hash"]


def test_a_folder_fingerprint_covers_every_file(tmp_path):
    write(tmp_path / "shards", "csv", ROWS[:30], "a")
    second = write(tmp_path / "shards", "csv", ROWS[30:], "b")
    spec, data = loaded({"path": str(tmp_path / "shards")})
    before = fingerprint(spec.dataset, spec.training, data)["hash"]
    second.write_text(second.read_text().replace("question number 59", "question number 58"))
    assert fingerprint(spec.dataset, spec.training, load_for_job(spec.dataset, spec.task, spec.training))["hash"] \
        != before


def test_a_builtin_dataset_has_a_fingerprint_too():
    spec, data = loaded({"name": "trec"})
    info = fingerprint(spec.dataset, spec.training, data)
    assert info["source"] == "builtin:trec" and len(info["hash"]) == 64 and info["rows"]["eval"] == len(data.eval)


def test_status_shows_the_recorded_fingerprint(tmp_path, capsys):
    from jobs.store import JobStore
    from orchestrator.cli import main

    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home")
    job_id = store.submit(minilm_spec()).id
    spec, data = loaded({"name": "trec"})
    store.set_runtime(job_id, dataset=fingerprint(spec.dataset, spec.training, data))
    assert main(["status", job_id, "--store-url", store.url, "--home", str(store.home)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("dataset:"))
    assert line.strip().startswith("dataset: builtin:trec (builtin, sha256 ")
    assert line.endswith("of its bytes; rows 4305 train, 1076 eval of 5381, split seed 0)")


# -- spec errors: one line, the field named, nothing of the contents ----------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl", "csv"])
def test_a_missing_column_is_named_without_echoing_a_record(tmp_path, fmt):
    path = write(tmp_path, fmt, [{"text": SECRET, "labels": "x"}])
    message = problems({"path": str(path)})["dataset.path"]
    assert "no column(s) ['label']" in message and SECRET not in message and "\n" not in message


def test_unreadable_sources_are_one_line_errors_naming_the_field(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + SECRET.encode() * 3)
    cases = {
        str(broken): "is not a readable parquet file",
        str(tmp_path / "absent.parquet"): "does not exist",
        str(tmp_path / "*.csv"): "holds no data files",
        "s3://some-bucket/rows.parquet": "need fsspec's s3 filesystem package",
    }
    for path, fragment in cases.items():
        message = problems({"path": path})["dataset.path"]
        assert fragment in message and SECRET not in message and "\n" not in message, (path, message)
    assert "exactly one of" in problems({"path": str(broken), "hf": "org/tiny"})["dataset"]
    assert "not built-ins" in problems({"name": "trec", "filter": {"a": 1}})["dataset.filter"]


# -- the recipe trains from a stream ------------------------------------------------------------------------
class ListStream:
    """A :class:`jobs.training.sources.TrainStream` over a list (what a Ray Data shard gives a worker)."""

    def __init__(self, train: list, held_out: list, labels: list[str] | None, info: dict):
        self.items, self.eval, self.labels, self.fingerprint = train, held_out, labels, info
        self.rows, self.sample = len(train), train[:16]
        self.opened: list[int] = []

    def epoch(self, epoch: int):
        self.opened.append(epoch)
        return iter(self.items[epoch % 2 :] + self.items[: epoch % 2])  # each epoch its own order


def _stream_for(spec) -> ListStream:
    data = load_for_job(spec.dataset, spec.task, spec.training)
    return ListStream(data.train, data.eval, data.labels, fingerprint(spec.dataset, spec.training, data,
                                                                       streaming=True))


def test_a_resumed_stream_skips_the_rows_of_the_steps_already_done(tmp_path):
    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    spec = job({"path": str(write(tmp_path, "parquet"))}, training={"batch_size": 4, "grad_accum_steps": 2})
    straight = Recipe(spec, InMemoryReporter(), train_stream=_stream_for(spec))
    straight.setup_data()
    assert straight.steps_per_epoch == 48 // 8 and straight.dataset_info["streaming"] is True
    steps = [straight.streamed_examples(s) for s in range(9)]  # into the second epoch
    resumed = Recipe(spec, InMemoryReporter(), train_stream=_stream_for(spec))
    resumed.setup_data()
    assert resumed.streamed_examples(3) == steps[3] and resumed.streamed_examples(4) == steps[4]
    assert resumed.streamed_examples(7) == steps[7] and resumed.stream.opened == [0, 1]
    assert steps[6] == straight.stream.items[1:9]  # epoch 1 starts afresh, in its own order


def test_the_recipe_trains_from_a_stream_and_records_the_fingerprint(tmp_path):
    from tests.conftest import save_tiny_bert

    base = save_tiny_bert(tmp_path / "base")
    raw = minilm_spec(base_model=str(base), dataset={"path": str(write(tmp_path, "parquet"))},
                      training={"batch_size": 8, "epochs": 2, "max_length": 16})
    out = tmp_path / "out.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "tests.jobs.test_data_sources", json.dumps(raw), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    losses = [v for _, k, v in result["recorded"] if k == "train_loss"]
    assert result["total_steps"] == 2 * (48 // 8) and losses and all(0 < v < 100 for v in losses)
    assert result["rows_rank0"] == 2 * 48 and result["shared"] == 0  # every step's rows came from the stream
    adapter_meta = json.loads((Path(result["adapter"]) / "peftfleet.json").read_text())["metadata"]["dataset"]
    assert adapter_meta == result["dataset"] and adapter_meta["rows"]["train"] == 48 and adapter_meta["streaming"]


def test_a_base_group_member_records_its_fingerprint_and_a_streamed_job_trains_solo(tmp_path):
    from jobs.training.base_group import BaseGroup, packing_problem
    from jobs.training.reporter import InMemoryReporter
    from tests.conftest import save_tiny_bert

    base = str(save_tiny_bert(tmp_path / "base"))
    path = str(write(tmp_path, "parquet"))
    spec = parse_job_spec(minilm_spec(base_model=base, dataset={"path": path, "streaming": "off"},
                                      training={"batch_size": 8, "max_steps": 2, "max_length": 16}))
    assert packing_problem(spec) is None
    streamed = parse_job_spec(minilm_spec(base_model=base, dataset={"path": path, "streaming": "on"}))
    assert "streams through Ray Data" in packing_problem(streamed)
    group, reporter = BaseGroup(base, spec.task), InMemoryReporter()
    group.add(spec, reporter, metadata={"job_id": "j1"})
    while group.members:
        group.step()
    assert reporter.dataset == fingerprint(spec.dataset, spec.training, load_for_job(spec.dataset, spec.task,
                                                                                     spec.training))
    saved = json.loads((Path(reporter.adapters[0][0]) / "peftfleet.json").read_text())
    assert saved["metadata"]["dataset"] == reporter.dataset and reporter.dataset["streaming"] is False


def _main() -> None:
    """``python -m tests.jobs.test_data_sources SPEC_JSON OUT``: a one-rank recipe trained from a ListStream, in a
    process of its own (a gloo group, as Ray Train would set up)."""
    import socket

    import torch.distributed as dist

    from jobs.training.recipe import Recipe
    from jobs.training.reporter import InMemoryReporter

    spec = parse_job_spec(json.loads(sys.argv[1]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    reporter = InMemoryReporter()
    recipe = Recipe(spec, reporter, train_stream=_stream_for(spec), metadata={"job_id": "j1"})
    recipe.run()
    values = {k: v for _, k, v in reporter.recorded}
    Path(sys.argv[2]).write_text(json.dumps({
        "recorded": reporter.recorded, "total_steps": recipe.total_steps, "dataset": reporter.dataset,
        "adapter": reporter.adapters[0][0], "rows_rank0": values["stream_rows_rank0"],
        "shared": values["stream_rows_shared"]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _main()
