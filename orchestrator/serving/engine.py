"""The serving engine of one replica: which adapters a request may name, and the batching loop.

Requests wait in one queue. A loop takes the first, gathers more for ``batch_wait_s`` (up to
``max_batch_size``), loads the adapters the batch needs into the bank (hash- and base-checked,
LRU), and runs the batch as one mixed forward in a worker thread, so the event loop keeps
answering HTTP meanwhile. Each request's own queue receives its text as pieces are decoded (stop
strings already cut, see :mod:`orchestrator.serving.decoding`), then one :class:`Finished`; the
deployment only forwards them, whether it streams or not.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.store import JobStore
from jobs.store.adapter_registry import AdapterNotFound
from orchestrator.serving.decoding import (
    ContextLengthExceeded,
    Generation,
    GenerationRequest,
    check_context_length,
    generate,
)
from peft_methods.adapter_bank import AdapterBank, NotServable
from peft_methods.adapter_files import AdapterIntegrityError, BaseModelMismatch, read_adapter


class ApiError(Exception):
    """An error for the client, in OpenAI's shape: HTTP status, type, message, optional param."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class AdapterResolver:
    """Maps a request's ``model`` to an adapter of this base: a registered adapter's name, or a task
    name whose promoted adapter is used; the base's own name means no adapter."""

    def __init__(self, store: JobStore, base_name: str, base_fingerprint: str, allowed: set[str] | None):
        self.store, self.base_name, self.fingerprint, self.allowed = store, base_name, base_fingerprint, allowed
        self.names: dict[str, str] = {}  # adapter id -> name, for messages and stats

    def resolve(self, model: str) -> str | None:
        """The adapter's id (what the bank keys on, so an adapter deleted and registered again under the
        same name is loaded afresh), or None for the base."""
        if model in (self.base_name, self.fingerprint):
            return None
        try:
            record = self.store.adapters.get(model)
        except AdapterNotFound:
            record = self.store.adapters.promoted(self.fingerprint, model) if _is_name(model) else None
            if record is None:
                raise ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model",
                               "model_not_found") from None
        if record.base_fingerprint != self.fingerprint:
            raise ApiError(400, f"adapter '{record.name}' was trained on base {record.base_fingerprint[:19]}…; "
                           f"this server serves {self.base_name} ({self.fingerprint[:19]}…)", "invalid_request_error",
                           "model", "wrong_base_model")
        if self.allowed is not None and record.name not in self.allowed:
            raise ApiError(404, f"The model '{record.name}' is not served here", "invalid_request_error", "model",
                           "model_not_found")
        self.names[record.id] = record.name
        return record.id

    def models(self) -> list[dict[str, Any]]:
        adapters = self.store.adapters.list(base=self.fingerprint)
        base = {"id": self.base_name, "object": "model", "owned_by": "peftfleet", "created": 0,
                "peftfleet": {"kind": "base", "fingerprint": self.fingerprint}}
        return [base] + [
            {"id": a.name, "object": "model", "owned_by": "peftfleet", "created": int(a.created_at),
             "parent": self.base_name,
             "peftfleet": {"kind": "adapter", "method": a.method, "task": a.task, "task_name": a.task_name,
                           "promoted": a.promoted}}
            for a in adapters if self.allowed is None or a.name in self.allowed
        ]

    def read(self, name: str) -> tuple[Any, dict[str, torch.Tensor], list[str] | None]:
        """An adapter's config, tensors and class labels (when recorded) from its verified artifact,
        refusing another base."""
        try:
            config, state, manifest = read_adapter(self.store.adapters.local_folder(name))
        except AdapterIntegrityError as e:
            raise ApiError(500, f"adapter '{self.names.get(name, name)}' failed its integrity check: {e}",
                           "server_error", "model", "adapter_integrity_error") from None
        if manifest.get("metadata", {}).get("base_fingerprint") != self.fingerprint:
            raise ApiError(400, f"adapter '{self.names.get(name, name)}' records another base", "invalid_request_error",
                           "model", "wrong_base_model")
        return config, state, manifest.get("metadata", {}).get("labels")


def _is_name(value: str) -> bool:
    return bool(value) and len(value) <= 64


@dataclass(frozen=True)
class Finished:
    """The last item of a generation's queue: why it ended and how many tokens it produced."""

    reason: str
    completion_tokens: int


@dataclass
class _Pending:
    kind: str  # "generate" or "classify"
    adapter: str | None
    ids: list[int]
    params: dict[str, Any] = field(default_factory=dict)
    queue: asyncio.Queue | None = None  # generate: text pieces, then a Finished; errors as ApiError
    future: asyncio.Future | None = None  # classify: the row's logits


class Engine:
    def __init__(self, bank: AdapterBank, tokenizer: Any, resolver: AdapterResolver, *, max_batch_size: int = 32,
                 batch_wait_s: float = 0.01, max_positions: int | None = None):
        self.bank, self.tokenizer, self.resolver, self.max_positions = bank, tokenizer, resolver, max_positions
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._lock = threading.Lock()  # the bank is used by one batch at a time
        self._loop_task: asyncio.Task | None = None
        self.batches: list[dict[str, Any]] = []  # recent batch sizes and adapters, for tests and metrics
        self.labels: dict[str, list[str]] = {}  # class names of loaded classification adapters

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._batching_loop())

    # -- the two kinds of work ---------------------------------------------------------------------
    async def generate(self, adapter: str | None, ids: list[int], **params: Any) -> asyncio.Queue:
        """Queue a completion (``params``: GenerationRequest's fields); returns the queue its text
        pieces arrive in, then a :class:`Finished` (or an ApiError instead)."""
        self.start()
        item = _Pending("generate", adapter, ids, params, queue=asyncio.Queue())
        await self.queue.put(item)
        return item.queue

    async def classify(self, adapter: str, ids: list[int]) -> torch.Tensor:
        self.start()
        item = _Pending("classify", adapter, ids, future=asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.future

    # -- batching -----------------------------------------------------------------------------------
    async def _batching_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            for kind in ("classify", "generate"):
                group = [p for p in batch if p.kind == kind]
                for chunk in self._fit_capacity(group):
                    await asyncio.to_thread(self._run, kind, chunk, loop)

    def _fit_capacity(self, group: list[_Pending]) -> list[list[_Pending]]:
        """Split so no sub-batch needs more distinct adapters than the bank has slots."""
        chunks, current, adapters = [], [], set()
        for p in group:
            extra = {p.adapter} - adapters - {None}
            if current and len(adapters | extra) > self.bank.capacity:
                chunks.append(current)
                current, adapters = [], set()
            current.append(p)
            adapters |= {p.adapter} - {None}
        return chunks + ([current] if current else [])

    def _run(self, kind: str, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            ready = []
            for p in batch:
                try:
                    self._ensure_loaded(p.adapter)
                    self._check_length(p)
                    ready.append(p)
                except ApiError as e:
                    self._fail(p, e, loop)
            if not ready:
                return
            names = self.resolver.names
            adapters = sorted({names.get(p.adapter, str(p.adapter)) for p in ready})
            self.batches.append({"kind": kind, "size": len(ready), "adapters": adapters})
            del self.batches[:-100]
            try:
                if kind == "classify":
                    logits = self.bank.forward_rows([p.ids for p in ready], [p.adapter for p in ready]).logits
                    logits = logits.float().cpu()  # (rows, widest head): one copy to the host for the batch
                    for p, row in zip(ready, logits):
                        loop.call_soon_threadsafe(_set_result, p.future, row[: self.bank.num_labels(p.adapter)])
                else:
                    self._generate(ready, loop)
            except Exception as e:  # noqa: BLE001 - one bad batch must not take the server down
                for p in ready:
                    self._fail(p, ApiError(500, f"{type(e).__name__}: {e}", "server_error"), loop)

    def _generate(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        def on_update(row: int, piece: str, result: Generation) -> None:
            queue = batch[row].queue
            if piece:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            if result.finish_reason is not None:
                loop.call_soon_threadsafe(queue.put_nowait, Finished(result.finish_reason, len(result.tokens)))

        generate(self.bank, [GenerationRequest(p.ids, p.adapter, **p.params) for p in batch], self.tokenizer, on_update)

    def _check_length(self, p: _Pending) -> None:
        """With the adapter's virtual tokens counted, the row must fit the model's positions."""
        try:
            check_context_length(len(p.ids), self.bank.prompt_length(p.adapter), p.params.get("max_tokens", 0),
                                 self.max_positions)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def _ensure_loaded(self, adapter: str | None) -> None:
        if adapter is None:
            return
        if adapter in self.bank:
            self.bank.touch(adapter)  # used by this batch: loading another must not evict it
            return
        config, state, labels = self.resolver.read(adapter)
        if labels:
            self.labels[adapter] = list(labels)
        try:
            self.bank.load(adapter, config, state)
        except (NotServable, BaseModelMismatch, ValueError) as e:
            name = self.resolver.names.get(adapter, adapter)
            raise ApiError(400, f"adapter '{name}' cannot be served: {e}", "invalid_request_error",
                           "model", "adapter_not_servable") from None

    @staticmethod
    def _fail(p: _Pending, error: ApiError, loop: asyncio.AbstractEventLoop) -> None:
        if p.kind == "classify":
            loop.call_soon_threadsafe(_set_exception, p.future, error)
        else:
            loop.call_soon_threadsafe(p.queue.put_nowait, error)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
