"""Built-in datasets load offline from their packages with deterministic, disjoint splits."""

from __future__ import annotations

import pytest

from jobs.training import data, sources


def test_trec_has_six_coarse_labels_and_every_unique_question():
    trec = data.load_trec(eval_size=1000)
    assert trec.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(trec.train) + len(trec.eval) == 5381
    assert len(trec.eval) == 1000
    assert {y for _, y in trec.train} == set(range(6))


@pytest.mark.parametrize("loader", [data.load_trec, data.load_movie_sentiment, data.load_chatterbot_qa])
def test_splits_are_deterministic_disjoint_and_seeded(loader):
    a, b, other = loader(seed=0), loader(seed=0), loader(seed=1)
    assert a.train == b.train and a.eval == b.eval
    assert not {x for x, _ in a.train} & {x for x, _ in a.eval}, "an example is in both train and eval"
    assert a.eval != other.eval


def test_train_size_takes_a_prefix_of_the_same_split():
    full, small = data.load_trec(), data.load_trec(train_size=2000)
    assert small.eval == full.eval and small.train == full.train[:2000]


def test_movie_sentiment_is_binary_with_confident_scores_only():
    movies = data.load_movie_sentiment()
    assert movies.labels == ["negative", "positive"]
    assert 9500 < len(movies.train) + len(movies.eval) < 10605  # 10,605 snippets, |score| <= 0.5 dropped
    positives = sum(y for _, y in movies.train) / len(movies.train)
    assert 0.4 < positives < 0.6


def test_chatterbot_pairs_are_text_to_text():
    qa = data.load_chatterbot_qa()
    assert len(qa.train) > 1000
    assert all(isinstance(q, str) and isinstance(a, str) and q and a for q, a in qa.train)


def test_an_eval_set_as_large_as_the_data_is_refused():
    with pytest.raises(ValueError, match="leaves no training data"):
        data.split([("a", 0), ("b", 1)], eval_size=2)


# -- local files: errors name the file, the line and the problem, never the record's contents (issue 18) ----
SECRET = "patient 4711 has a rare disease"


def _pairs(path):
    """Every (text, label) pair of a local .jsonl or .csv file, as a job reads them."""
    source = sources.Source(str(path), "csv" if path.suffix == ".csv" else "jsonl", (str(path),))
    return list(sources.all_pairs(source, ("text", "label")))


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        ("d.jsonl", f'{{"text": "a", "label": "x"}}\n\n{{"text": "{SECRET}", "label": \n', "line 3 is not valid JSON"),
        ("d.jsonl", f'{{"text": "a", "label": "x"}}\n["{SECRET}"]\n', "line 2 is a JSON list, not an object"),
        ("d.jsonl", f'{{"text": "{SECRET}", "labels": "x"}}\n', "line 1 has no column(s) ['label']"),
        ("d.jsonl", f'{{"text": "{SECRET}", "label": ""}}\n', "line 1 has an empty value in column(s) ['label']"),
        ("d.jsonl", "[" * 100_000 + f'"{SECRET}"' + "]" * 100_000 + "\n", "line 1 is not valid JSON"),
        ("d.csv", f"text,label\na,x\n{SECRET},\n", "line 3 has an empty value in column(s) ['label']"),
        ("d.csv", f"{SECRET},x\nb,y\n", "line 1, the header, has no column(s) ['text', 'label']"),
        ("d.csv", f"text,label\na,x\n{SECRET}\n", "line 3 has an empty value in column(s) ['label']"),
        ("d.csv", f'text,label\n"{SECRET}{"." * 200_000}",x\n', "line 2 is not valid CSV (field larger than"),
    ],
)
def test_a_malformed_record_is_named_by_file_and_line_without_its_contents(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        _pairs(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert SECRET not in message and "4711" not in message


def test_bytes_that_are_not_utf8_are_named_without_echoing_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "caf\xe9 4711", "label": "y"}\n')
    with pytest.raises(ValueError, match="has bytes that are not UTF-8 text") as err:
        _pairs(path)
    assert "4711" not in str(err.value)


def test_a_job_spec_names_a_missing_column_without_echoing_the_first_record(tmp_path):
    from jobs.spec import JobSpecError, parse_job_spec
    from tests.jobs.conftest import minilm_spec

    path = tmp_path / "no-header.csv"
    path.write_text(f"{SECRET},DESC\n")  # no header: the first record would be read as one
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(minilm_spec(dataset={"path": str(path)}))
    (where, message), = err.value.problems
    assert where == "dataset.path" and "no column(s) ['text', 'label']" in message and SECRET not in message
