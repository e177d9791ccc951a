"""Built-in datasets load offline from their packages with deterministic, disjoint splits."""

from __future__ import annotations

import pytest

from jobs.training import data


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
