"""Where a job's data comes from when it is not a built-in: a local path or any fsspec URL (``file://``,
``s3://``, ``gs://`` …) of Parquet, JSON Lines / JSON, CSV or Arrow files (one file, a folder, or a
glob), or a Hugging Face dataset repository (``hf: org/name``) read from the standard hub cache.

Everything here is plain Python (fsspec, pyarrow, huggingface_hub, datasets): no Ray. The same readers
serve the in-memory path (:func:`load_pairs`, the recipe on every rank) and the streaming one (the
orchestrator's Ray Data glue calls :func:`read_file` per file), so both see the same rows, filtered and
mapped the same way, and both split them by the same rule (:func:`split_pairs`, :func:`cutoff`):

* a row's *key* is its text (classification) or prompt (causal LM); its hash is ``blake2b`` of the key,
  keyed by the job's seed (:func:`row_hash`), a 64-bit number;
* the held-out rows are those whose key hash is among the ``k`` smallest distinct ones (``k``:
  ``training.eval_size``, else ``eval_fraction`` of the rows), so rows sharing a key stay on one side and a
  streaming pass can find them without holding the data;
* ``train_size`` keeps the training rows with the smallest hashes above that cut (rows sharing a key
  together, so a few more may remain when keys repeat).

Errors name the file and the line (or row) and the problem, never what the record holds. Files are
read with safe parsers only (json, csv, pyarrow); nothing is unpickled and no repository code runs.
"""

from __future__ import annotations

import csv
import glob as globbing
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from peft_methods.adapter_files import sha256_file

FORMATS = ("parquet", "jsonl", "json", "csv", "arrow")
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".csv": "csv", ".arrow": "arrow", ".feather": "arrow"}
# what a Hugging Face dataset's packaged builder is called, in our formats
_HF_BUILDERS = {"parquet": "parquet", "json": "json", "csv": "csv", "arrow": "arrow"}
STREAM_BYTES = 256 << 20  # auto-streaming threshold (PEFTFLEET_STREAM_BYTES overrides)

_BATCH = 1024


def stream_threshold() -> int:
    """Bytes of source data above which ``streaming: auto`` streams (``PEFTFLEET_STREAM_BYTES``, 256 MiB)."""
    return int(os.environ.get("PEFTFLEET_STREAM_BYTES", STREAM_BYTES))


# -- locating a source ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A resolved source: its files (fsspec paths, or for ``hf`` paths inside the repository at
    ``revision``), their format, and what the user named. Picklable: Ray Data read tasks receive it."""

    name: str  # what the user gave: a path, a URL or an hf id
    format: str
    files: tuple[str, ...]
    protocol: str = "file"  # fsspec protocol; "hf" for a Hugging Face dataset repository
    revision: str | None = None  # the resolved commit of an hf dataset
    split: str | None = None
    sizes: tuple[int, ...] = field(default=())
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def shown(self, file: str) -> str:
        """How a file is named in messages and fingerprints."""
        if self.protocol == "hf":
            return f"hf:{self.name}/{file}"
        return file if self.protocol == "file" else f"{self.protocol}://{file}"

    def local_file(self, file: str) -> str | None:
        """A local path holding ``file`` (an hf file from this node's hub cache, downloaded if it may), or
        None for a remote file."""
        if self.protocol == "hf":
            from huggingface_hub import hf_hub_download

            from jobs.hub_cache import hub_cache_dir, hub_offline

            return hf_hub_download(self.name, file, repo_type="dataset", revision=self.revision,
                                   cache_dir=hub_cache_dir(), local_files_only=hub_offline())
        return file if self.protocol == "file" else None

    def open(self, file: str, mode: str = "rb"):
        local = self.local_file(file)
        if local is not None:
            return open(local, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""}))
        fs = _filesystem(self.protocol, self.storage_options)
        return fs.open(file, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""}))


def _filesystem(protocol: str, options: dict[str, Any]):
    import fsspec

    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError as e:  # s3fs, gcsfs, adlfs...: the user installs the one their URLs need
        raise ValueError(f"{protocol}:// URLs need fsspec's {protocol} filesystem package installed "
                         f"({str(e).splitlines()[0][:200]})") from None
    except ValueError as e:
        raise ValueError(f"unknown URL scheme {protocol!r} ({str(e).splitlines()[0][:200]})") from None


def resolve(dataset: Any) -> Source:
    """The files behind a DatasetSpec's ``path`` or ``hf``; ValueError (one line, naming no contents) if
    there are none or they cannot be read."""
    if dataset.hf is not None:
        return _resolve_hf(dataset)
    return _resolve_path(dataset.path, dataset.format, dataset.split)


def _format_of(files: Iterable[str], given: str | None, where: str) -> str:
    if given is not None:
        return given
    found = {SUFFIXES.get(Path(f).suffix.lower()) for f in files}
    if None in found or len(found) != 1:
        suffixes = sorted({Path(f).suffix or "(none)" for f in files})[:5]
        raise ValueError(f"{where}: cannot tell the format from the file suffix(es) {suffixes}; files end in "
                         f"{sorted(SUFFIXES)} or `format` says one of {list(FORMATS)}")
    return found.pop()


def _resolve_path(path: str, fmt: str | None, split: str | None) -> Source:
    from fsspec.core import split_protocol

    protocol, rest = split_protocol(path)
    protocol = protocol or "file"
    if protocol in ("file", "local"):
        protocol, rest = "file", str(Path(rest).expanduser())
    fs = _filesystem(protocol, {})
    shown = path if len(path) <= 200 else path[:199] + "…"
    try:
        if globbing.has_magic(rest):
            files = sorted(f for f in fs.glob(rest) if fs.isfile(f))
        elif fs.isdir(rest):
            files = _split_files(rest, split) if split else sorted(
                f for f in fs.find(rest) if not any(p.startswith(".") for p in Path(f).relative_to(rest).parts))
            if fmt is None:  # a folder may hold a README or the like beside its data
                files = [f for f in files if Path(f).suffix.lower() in SUFFIXES]
        elif fs.isfile(rest):
            files = [rest]
        else:
            raise ValueError(f"dataset {shown} does not exist")
        if split and not fs.isdir(rest):
            raise ValueError("`split` picks the files of a folder (or an hf dataset); this path is not a folder")
        if not files:
            raise ValueError(f"dataset {shown} holds no data files")
        sizes = tuple(int(fs.size(f) or 0) for f in files)
    except OSError as e:
        raise ValueError(f"cannot read dataset {shown} ({e.strerror or type(e).__name__})") from None
    return Source(path, _format_of(files, fmt, f"dataset {shown}"), tuple(files), protocol, None, split, sizes)


def _split_files(folder: str, split: str) -> list[str]:
    """A local folder's files of one split, by the Hugging Face conventions (``train-*.parquet``,
    ``data/test.csv``, a README's ``configs``), resolved by ``datasets`` without reading them."""
    splits = _builder_splits(folder, None, None)
    if split not in splits:
        raise ValueError(f"the dataset has no split {split!r}; it has {sorted(splits)}")
    return sorted(splits[split][1])


def _builder_splits(folder: str, config: str | None, data_dir: str | None) -> dict[str, tuple[str, list[str]]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory() as scratch:  # its cache's lock files: not the user's cache
            builder = datasets.load_dataset_builder(folder, name=config, data_dir=data_dir, cache_dir=scratch)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; its first line says what, not contents
        raise ValueError(f"cannot tell the dataset's files apart ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    fmt = _HF_BUILDERS.get(builder.name)
    if fmt is None:
        raise ValueError(f"the dataset is in a format peftfleet does not read ({builder.name!r}); one of "
                         f"{list(FORMATS)}")
    return {str(s): (fmt, [str(f) for f in files]) for s, files in (builder.config.data_files or {}).items()}


def _resolve_hf(dataset: Any) -> Source:
    from huggingface_hub import snapshot_download

    from jobs.hub_cache import hub_cache_dir, hub_offline

    repo = dataset.hf
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=dataset.revision, cache_dir=hub_cache_dir(),
                                   local_files_only=hub_offline())
    except Exception as e:  # noqa: BLE001 - not found, offline without a cached copy, gated, network
        why = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if hub_offline() else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        at = f" at revision {dataset.revision!r}" if dataset.revision else ""
        raise ValueError(f"cannot get Hugging Face dataset {repo!r}{at} ({why})") from None
    commit = Path(folder).name
    splits = _builder_splits(folder, dataset.config, dataset.data_dir)
    split = dataset.split or ("train" if "train" in splits or len(splits) != 1 else next(iter(splits)))
    if split not in splits:
        raise ValueError(f"Hugging Face dataset {repo!r} has no split {split!r}; it has {sorted(splits)}")
    fmt, files = splits[split]
    fmt = dataset.format or fmt
    relative = tuple(sorted(os.path.relpath(f, folder) for f in files))
    if any(r.startswith("..") for r in relative):
        raise ValueError(f"Hugging Face dataset {repo!r} names data files outside its repository")
    sizes = tuple(os.path.getsize(os.path.join(folder, f)) for f in relative)
    return Source(repo, fmt, relative, "hf", commit, split, sizes)


# -- reading records ----------------------------------------------------------------------------------------
def records(source: Source, file: str, columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) of every record of one file: ``where`` says "line N" or "row N" for messages,
    ``record`` maps column names to values (only ``columns`` for columnar formats, when given)."""
    shown = source.shown(file)
    fmt = source.format
    if fmt in ("parquet", "arrow"):
        yield from _columnar(source, file, shown, columns)
        return
    line, reader = 0, None
    try:
        with source.open(file, "rt") as f:
            if fmt == "csv":
                reader = csv.DictReader(f)
                if columns:
                    missing = [c for c in columns if c not in (reader.fieldnames or columns)]
                    if missing:
                        raise ValueError(f"{shown}: line 1, the header, has no column(s) {missing}")
                for record in reader:
                    line = reader.line_num
                    yield f"line {line}", record
            elif fmt == "json" and _starts_array(f):
                try:
                    every = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{shown}: is not valid JSON ({e.msg} at line {e.lineno})") from None
                except (RecursionError, ValueError):
                    raise ValueError(f"{shown}: is not valid JSON (nested too deeply or a number too long)") from None
                for i, record in enumerate(every, start=1):
                    if not isinstance(record, dict):
                        raise ValueError(f"{shown}: record {i} is a JSON {type(record).__name__}, not an object")
                    yield f"record {i}", record
            else:
                for line, text in enumerate(f, start=1):
                    if text.strip():
                        yield f"line {line}", _json_record(text, shown, line)
    except UnicodeDecodeError:
        after = f", after line {line}" if line else ""
        raise ValueError(f"{shown}: has bytes that are not UTF-8 text{after}") from None
    except csv.Error as e:  # csv's messages describe the problem, not the text
        raise ValueError(f"{shown}: line {reader.line_num + 1} is not valid CSV ({e})") from None


def _starts_array(f) -> bool:
    """Whether a .json file is one array of records (else JSON Lines); the stream is rewound."""
    while True:
        c = f.read(1)
        if not c or not c.isspace():
            f.seek(0)
            return c == "["


def _json_record(text: str, shown: str, line: int) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:  # its message says what is wrong and where, not what the line holds
        raise ValueError(f"{shown}: line {line} is not valid JSON ({e.msg} at column {e.colno})") from None
    except (RecursionError, ValueError):
        raise ValueError(f"{shown}: line {line} is not valid JSON (nested too deeply or a number too long)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{shown}: line {line} is a JSON {type(record).__name__}, not an object of columns")
    return record


def _columnar(source: Source, file: str, shown: str, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with source.open(file, "rb") as f:
            if source.format == "parquet":
                reader = pq.ParquetFile(f)
                names = reader.schema_arrow.names
                _check_schema(names, columns, shown)
                batches = reader.iter_batches(batch_size=_BATCH, columns=columns or None)
            else:
                reader = _arrow_reader(pa, f)
                names = reader.schema.names
                _check_schema(names, columns, shown)
                batches = (b.select(columns) if columns else b for b in reader)
            row = 0
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    yield f"row {row}", record
    except (pa.ArrowException, OSError) as e:  # pyarrow's messages name the structure, not the values
        raise ValueError(f"{shown}: is not a readable {source.format} file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _arrow_reader(pa, f):
    """An Arrow IPC file, or a stream (what ``datasets`` writes as ``.arrow``)."""
    try:
        return _FileBatches(pa.ipc.open_file(f))
    except pa.ArrowInvalid:
        f.seek(0)
        return pa.ipc.open_stream(f)


class _FileBatches:
    """An IPC file reader's batches, iterable as a stream reader's are."""

    def __init__(self, reader):
        self.reader, self.schema = reader, reader.schema

    def __iter__(self):
        return (self.reader.get_batch(i) for i in range(self.reader.num_record_batches))


def _check_schema(names: list[str], columns: list[str] | None, shown: str) -> None:
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise ValueError(f"{shown}: has no column(s) {missing}")


def _norm(value: Any) -> Any:
    """How a filter compares values: text as text (stripped), booleans as true/false, numbers as text, so a
    CSV's "3" matches a YAML 3."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def allowed_values(where: dict[str, Any] | None) -> dict[str, set]:
    """A declarative filter ``{column: value or [values]}`` as {column: the normalised values it allows}."""
    return {column: {_norm(v) for v in (wanted if isinstance(wanted, list) else [wanted])}
            for column, wanted in (where or {}).items()}


def keeps(record: dict, allowed: dict[str, set]) -> bool:
    """Whether a record passes a filter (:func:`allowed_values`): every column holds an allowed value."""
    return all(_norm(record.get(column)) in values for column, values in allowed.items())


def pairs(source: Source, file: str, columns: tuple[str, str],
          where: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """(first, second) column values of one file's records that pass ``where``, as stripped text; a record
    missing either, or with an empty one, is an error naming the file and line."""
    needed = list(dict.fromkeys([*columns, *(where or {})]))
    shown = source.shown(file)
    allowed = allowed_values(where)
    for at, record in records(source, file, needed):
        missing = [c for c in needed if c not in record]
        if missing:
            raise ValueError(f"{shown}: {at} has no column(s) {missing}")
        if not keeps(record, allowed):
            continue
        empty = [c for c in columns if record[c] in (None, "")]
        if empty:
            raise ValueError(f"{shown}: {at} has an empty value in column(s) {empty}")
        yield str(record[columns[0]]).strip(), str(record[columns[1]]).strip()


def all_pairs(source: Source, columns: tuple[str, str], where: dict[str, Any] | None = None):
    for file in source.files:
        yield from pairs(source, file, columns, where)


def check(source: Source, columns: tuple[str, str], where: dict[str, Any] | None = None) -> None:
    """Cheap validation before a job is stored: the first file's schema or first record has the columns."""
    needed = list(dict.fromkeys([*columns, *(where or {})]))
    first = source.files[0]
    for at, record in records(source, first, needed):
        missing = [c for c in needed if c not in record]
        if missing:
            raise ValueError(f"{source.shown(first)}: {at} has no column(s) {missing}")
        return
    raise ValueError(f"dataset file {source.shown(first)} has no records")


# -- the split ----------------------------------------------------------------------------------------------
def row_hash(key: str, seed: int) -> int:
    """A row's place in the split: a 64-bit hash of its key, keyed by the job's seed."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8,
                                          key=int(seed).to_bytes(8, "big")).digest(), "big")


def eval_count(rows: int, eval_size: int | None, eval_fraction: float) -> int:
    return eval_size or max(1, round(rows * eval_fraction))


def cutoff(hashes: Iterable[int], k: int, *, what: str = "eval_size") -> int:
    """The ``k``-th smallest distinct hash: every row at or below it is held out. ValueError if that
    would leave nothing to train on."""
    distinct = sorted(set(hashes))
    if k >= len(distinct):
        raise ValueError(f"{what} {k} leaves no training data out of {len(distinct)} distinct examples")
    return distinct[k - 1]


def train_cutoff(hashes: Iterable[int], train_size: int) -> int | None:
    """The largest hash the ``train_size`` training rows with the smallest hashes reach (None: all fit)."""
    ordered = sorted(hashes)
    return None if train_size >= len(ordered) else ordered[train_size - 1]


@dataclass(frozen=True)
class Split:
    """Where a source's rows go: rows hashing at or below ``eval_cut`` are held out, the rest train (up to
    ``train_cut`` when given). ``rows``: (total, train, eval)."""

    eval_cut: int
    train_cut: int | None
    rows: tuple[int, int, int]


def split_pairs(items: list[tuple[str, str]], *, seed: int, eval_size: int | None, eval_fraction: float,
                train_size: int | None) -> tuple[list, list, Split]:
    """(train, eval, split) of ``items`` by the hash rule (see the module docstring), each in source order."""
    hashes = [row_hash(x, seed) for x, _ in items]
    cut = cutoff(hashes, eval_count(len(items), eval_size, eval_fraction))
    train_cut = train_cutoff([h for h in hashes if h > cut], train_size) if train_size else None
    train = [p for p, h in zip(items, hashes) if h > cut and (train_cut is None or h <= train_cut)]
    held_out = [p for p, h in zip(items, hashes) if h <= cut]
    return train, held_out, Split(cut, train_cut, (len(items), len(train), len(held_out)))


# -- fingerprint --------------------------------------------------------------------------------------------
def content_hash(source: Source) -> tuple[str, str]:
    """(hash, what it covers). Local files: sha256 of their bytes (of each file's name and sha256, in
    order, for several). hf: the repository's commit already pins the bytes ("revision"). Remote URLs:
    hashing would download everything, so a sha256 of each object's name, size and ETag (or its modified
    time when the store gives no ETag) ("etag")."""
    if source.protocol == "hf":
        return source.revision or "", "revision"
    if source.protocol == "file":
        digests = [sha256_file(Path(f)) for f in source.files]
        if len(digests) == 1:
            return digests[0], "bytes"
        return _combined(source, digests), "bytes"
    fs = _filesystem(source.protocol, source.storage_options)
    tags = []
    for f in source.files:
        info = fs.info(f)
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") \
            or info.get("mtime") or info.get("updated") or ""
        tags.append(f"{info.get('size')}:{str(tag).strip(chr(34))}")
    return _combined(source, tags), "etag"


def _combined(source: Source, parts: list[str]) -> str:
    root = os.path.commonpath(source.files) if len(source.files) > 1 else ""
    named = "".join(f"{os.path.relpath(f, root) if root else f}\0{p}\n" for f, p in zip(source.files, parts))
    return hashlib.sha256(named.encode()).hexdigest()


def fingerprint(source: Source, dataset: Any, split: Split, seed: int, *, streaming: bool) -> dict[str, Any]:
    """What a job trained on, for the store and the adapter's peftfleet.json."""
    digest, covers = content_hash(source)
    total, train, held_out = split.rows
    return {
        "source": source.name if source.protocol != "hf" else f"hf:{source.name}",
        "format": source.format,
        **({"revision": source.revision} if source.revision else {}),
        "hash": digest, "hash_of": covers,
        "files": len(source.files), "bytes": source.total_bytes,
        "rows": {"total": total, "train": train, "eval": held_out},
        "split_seed": seed, "split": source.split, "filter": dataset.filter,
        "train_size": dataset.train_size, "streaming": streaming,
    }


def wants_streaming(dataset: Any) -> bool:
    """Whether a job's data streams through Ray Data (``streaming: on``, or ``auto`` above
    :func:`stream_threshold` bytes); built-in datasets never do."""
    if dataset.name is not None or dataset.streaming == "off":
        return False
    if dataset.streaming == "on":
        return True
    return resolve(dataset).total_bytes > stream_threshold()


class TrainStream(Protocol):
    """Training rows a job's recipe streams instead of holding them (the orchestrator builds one from Ray
    Data shards): only this rank's rows pass through it, the held-out split stays in memory."""

    rows: int  # training rows of the whole job (every rank's): steps per epoch come from it
    labels: list[str] | None  # a classifier's labels (class id = index), None for causal LMs
    eval: list  # the held-out examples, as the in-memory path has them
    sample: list  # a few training examples, the same on every rank (a method's priming looks at them)
    fingerprint: dict[str, Any]

    def epoch(self, epoch: int) -> Iterator[tuple]:
        """This rank's training examples of ``epoch`` ((text, class id) or (prompt, response)), in order."""
