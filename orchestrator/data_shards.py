"""A job's training rows streamed through Ray Data, so no worker holds the whole dataset.

Ray Train's convention: the trainer is given ``datasets={"train": ray.data.Dataset}`` and each worker
reads its own shard (``ray.train.get_dataset_shard("train")``, a streaming split of equal parts).

:func:`plan` (the runner's side) builds that dataset from a path/hf source: one read task per file,
with :mod:`jobs.training.sources`' own readers (the same parsing, filter and column mapping as the
in-memory path), each row carrying its key's hash. Before training it makes a few passes over the rows
(counted, never held): the row count, the classifier's labels, the held-out rows (the ``k`` smallest key
hashes: a pass keeps only rows below a threshold, raised until enough distinct keys are in), and, with
``train_size``, the cut among the training rows' hashes. So a streamed job and an in-memory one split
a source identically. The held-out rows and a small sample go to every worker in its config; the
training rows stream.

:class:`ShardStream` (a worker's side) is the :class:`jobs.training.sources.TrainStream` the recipe
reads: each epoch iterates the worker's shard anew, through a local shuffle buffer seeded by the job's
seed, the epoch and the rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from jobs.training import sources

_TOP = 2**64 - 1  # the largest row hash
_ROWS_PER_BATCH = 1024
SAMPLE_BATCHES = 8  # the recipe primes a method with up to 8 batches of training rows


def _read(batch: dict[str, np.ndarray], *, source: sources.Source, columns: tuple[str, str],
          where: dict | None, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read task: one file's (x, y) rows and their key hashes, ``_ROWS_PER_BATCH`` at a time."""
    for file in batch["file"]:
        xs: list[str] = []
        ys: list[str] = []
        for x, y in sources.pairs(source, str(file), columns, where):
            xs.append(x)
            ys.append(y)
            if len(xs) == _ROWS_PER_BATCH:
                yield _rows(xs, ys, seed)
                xs, ys = [], []
        if xs:
            yield _rows(xs, ys, seed)


def _rows(xs: list[str], ys: list[str], seed: int) -> dict[str, np.ndarray]:
    return {"x": np.array(xs, dtype=object), "y": np.array(ys, dtype=object),
            "h": np.array([sources.row_hash(x, seed) for x in xs], dtype=np.uint64)}


def _between(batch: dict[str, np.ndarray], *, lo: int | None, hi: int) -> dict[str, np.ndarray]:
    """The rows whose hash is in (lo, hi] (lo None: from the start)."""
    h = batch["h"]
    keep = h <= np.uint64(hi)
    if lo is not None:
        keep &= h > np.uint64(lo)
    return {k: v[keep] for k, v in batch.items()}


def read_rows(source: sources.Source, columns: tuple[str, str], where: dict | None, seed: int) -> ray.data.Dataset:
    """Every row of ``source`` that passes ``where``, as columns x, y (text) and h (its key's hash)."""
    files = ray.data.from_items([{"file": f} for f in source.files], override_num_blocks=len(source.files))
    return files.map_batches(_read, fn_kwargs={"source": source, "columns": columns, "where": where, "seed": seed},
                             batch_size=1, batch_format="numpy")


def between(rows: ray.data.Dataset, lo: int | None, hi: int) -> ray.data.Dataset:
    return rows.map_batches(_between, fn_kwargs={"lo": lo, "hi": hi}, batch_format="numpy")


def _hashes(rows: ray.data.Dataset) -> np.ndarray:
    parts = [b["h"] for b in rows.select_columns(["h"]).iter_batches(batch_size=65536, batch_format="numpy")]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _threshold(fraction: float) -> int:
    return _TOP if fraction >= 1 else int(fraction * _TOP)


def held_out(rows: ray.data.Dataset, total: int, k: int) -> tuple[int, list[tuple[str, str]]]:
    """(eval cut, held-out rows): the rows whose key hash is among the ``k`` smallest distinct ones, found
    by passes that keep only rows under a threshold, raised until more than ``k`` distinct keys are in."""
    fraction = 4 * k / total + 1 / 1024
    while True:
        hi = _threshold(fraction)
        candidates = between(rows, None, hi).take_all()
        hashes = [int(r["h"]) for r in candidates]
        if len(set(hashes)) > k or hi == _TOP:
            cut = sources.cutoff(hashes, k)  # a training key exists: more than k distinct, or all were seen
            return cut, [(str(r["x"]), str(r["y"])) for r in candidates if int(r["h"]) <= cut]
        fraction *= 4


def train_cut(rows: ray.data.Dataset, cut: int, total: int, train_size: int) -> tuple[int | None, int]:
    """(train cut, training rows) keeping the ``train_size`` training rows with the smallest hashes: passes
    read the hashes (only) of rows above the eval cut, under a threshold raised until enough are in."""
    fraction = cut / _TOP + 2 * train_size / total + 1 / 1024
    while True:
        hi = _threshold(fraction)
        hashes = _hashes(between(rows, cut, hi))
        if len(hashes) >= train_size or hi == _TOP:
            last = sources.train_cutoff(hashes.tolist(), train_size)
            return last, int((hashes <= np.uint64(last)).sum()) if last is not None else len(hashes)
        fraction *= 2


def plan(spec: Any) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The streamed training rows of job ``spec`` (a Dataset of x, y) and what every worker gets in its
    config: ``rows`` (training rows), ``labels``, ``eval`` and ``sample`` (examples), ``fingerprint``."""
    dataset, t = spec.dataset, spec.training
    source = sources.resolve(dataset)
    columns = dataset.columns_for(spec.task)
    rows = read_rows(source, columns, dataset.filter, t.seed)
    total = rows.count()
    if total == 0:
        raise ValueError(f"dataset {source.name}: no records{' pass its filter' if dataset.filter else ''}")
    cut, evaluation = held_out(rows, total, sources.eval_count(total, t.eval_size, t.eval_fraction))
    last, n_train = None, total - len(evaluation)
    if dataset.train_size and dataset.train_size < n_train:
        last, n_train = train_cut(rows, cut, total, dataset.train_size)
    train = between(rows, cut, _TOP if last is None else last).select_columns(["x", "y"])
    classify = spec.task == "sequence-classification"
    labels = sorted(str(y) for y in rows.unique("y")) if classify else None
    index = {label: i for i, label in enumerate(labels or [])}

    def example(x: Any, y: Any) -> tuple:
        return (str(x), index[str(y)]) if classify else (str(x), str(y))

    sample = [example(r["x"], r["y"]) for r in train.take(SAMPLE_BATCHES * t.batch_size)]
    split = sources.Split(cut, last, (total, n_train, len(evaluation)))
    info = {"rows": n_train, "labels": labels, "eval": [example(x, y) for x, y in evaluation], "sample": sample,
            "fingerprint": sources.fingerprint(source, dataset, split, t.seed, streaming=True)}
    return train, info


class ShardStream:
    """This worker's shard of the streamed training rows (:class:`jobs.training.sources.TrainStream`)."""

    def __init__(self, shard: Any, info: dict[str, Any], *, seed: int, rank: int, shuffle_buffer: int = 1024):
        self.shard, self.seed, self.rank, self.shuffle_buffer = shard, seed, rank, shuffle_buffer
        self.rows, self.labels, self.fingerprint = info["rows"], info["labels"], info["fingerprint"]
        self.eval, self.sample = [tuple(e) for e in info["eval"]], [tuple(e) for e in info["sample"]]
        self._index = {label: i for i, label in enumerate(self.labels)} if self.labels else None

    def epoch(self, epoch: int) -> Iterator[tuple]:
        batches = self.shard.iter_batches(batch_size=256, batch_format="numpy",
                                          local_shuffle_buffer_size=self.shuffle_buffer,
                                          local_shuffle_seed=self.seed + 1_000_003 * epoch + self.rank)
        for batch in batches:
            for x, y in zip(batch["x"], batch["y"]):
                yield (str(x), self._index[str(y)]) if self._index is not None else (str(x), str(y))


__all__ = ["ShardStream", "between", "held_out", "plan", "read_rows", "train_cut"]
