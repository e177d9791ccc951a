"""The serving engine of one replica: which adapters a request may name, and the scheduling loop.

Iteration-level scheduling (continuous batching, as vLLM, SGLang and LoRAX do): one batch of rows
decodes, one token per row per step, across adapters and methods. Between two steps, rows that
finished (end-of-sequence, a stop string, ``max_tokens``) or whose client went away leave, and
waiting requests join after a prefill of their own, as long as the batch has room (``max_batch_size``
rows, the bank's adapter slots, ``max_prefill_tokens`` of prompts per step). Classification requests
waiting then run together in one forward. Each step runs in a worker thread, so the event loop keeps
answering HTTP meanwhile. Each request's own queue receives its text as pieces are decoded (stop
strings already cut, see :mod:`orchestrator.serving.decoding`), then one :class:`Finished`; the
deployment only forwards them, whether it streams or not. ``scheduler="static"`` admits a new batch
only once the running one is empty (the engine's earlier policy, kept as the load benchmark's baseline).

Failures stay with their request: an adapter that cannot load (missing plugin, deleted, storage or
store down) fails the requests that name it; a failing prefill fails only the rows joining; a failing
step fails the rows of that batch. The loop itself never ends (``check()`` says if it somehow did).
Adapters the running rows use are pinned in the bank: loading another never evicts them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from jobs.store import JobStore
from jobs.store.adapter_registry import AdapterNotFound
from orchestrator.serving.decoding import (
    ContextLengthExceeded,
    Decoder,
    Generation,
    GenerationRequest,
    Row,
    check_context_length,
)
from peft_methods.adapter_bank import AdapterBank, BankFull, NotServable
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
            record = self.store.adapters.get(name)  # the bytes read are the bytes the store's hash vouches for
            config, state, manifest = read_adapter(self.store.adapters.local_folder(name),
                                                   manifest_sha256=record.sha256)
        except AdapterIntegrityError as e:  # the details (paths) go to the log, not to the client
            ref = _log_error(e)
            raise ApiError(500, f"adapter '{self.names.get(name, name)}' failed its integrity check (error id {ref})",
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
    cancelled: bool = False
    row: Row | None = None  # generate: its decoding state once admitted


Scheduler = Literal["continuous", "static"]


class Engine:
    def __init__(self, bank: AdapterBank, tokenizer: Any, resolver: AdapterResolver, *, max_batch_size: int = 32,
                 batch_wait_s: float = 0.01, max_positions: int | None = None, scheduler: Scheduler = "continuous",
                 max_prefill_tokens: int = 4096):
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', not {scheduler!r}")
        self.bank, self.tokenizer, self.resolver, self.max_positions = bank, tokenizer, resolver, max_positions
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.scheduler, self.max_prefill_tokens = scheduler, max_prefill_tokens
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.waiting: deque[_Pending] = deque()  # taken from the queue, not yet admitted
        self.decoder = Decoder(bank)
        self._running: list[_Pending] = []  # the decoder's rows' requests
        self._joining: list[_Pending] = []  # taken from waiting, joining at this step
        self._by_queue: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # the bank is used by one step at a time
        self._loop_task: asyncio.Task | None = None
        self.batches: list[dict[str, Any]] = []  # recent batch compositions, for tests and metrics
        self.labels: dict[str, list[str]] = {}  # class names of loaded classification adapters
        self.steps = 0

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._scheduling_loop())

    def check(self) -> None:
        """Raise if the scheduling loop has ended (it never should): the replica is then unhealthy."""
        task = self._loop_task
        if task is not None and task.done():
            error = None if task.cancelled() else task.exception()
            raise RuntimeError(f"the serving loop ended: {type(error).__name__ if error else 'cancelled'}")

    # -- the two kinds of work ---------------------------------------------------------------------
    async def generate(self, adapter: str | None, ids: list[int], **params: Any) -> asyncio.Queue:
        """Queue a completion (``params``: GenerationRequest's fields); returns the queue its text
        pieces arrive in, then a :class:`Finished` (or an ApiError instead)."""
        self.start()
        item = _Pending("generate", adapter, ids, params, queue=asyncio.Queue())
        self._by_queue[id(item.queue)] = item
        await self.queue.put(item)
        return item.queue

    def cancel(self, queue: asyncio.Queue) -> None:
        """The client of the generation behind ``queue`` went away: its row leaves at the next step (or
        never joins) and nothing more is sent."""
        item = self._by_queue.pop(id(queue), None)
        if item is not None:
            item.cancelled = True
            if item.row is not None:
                item.row.cancelled = True

    async def classify(self, adapter: str, ids: list[int]) -> torch.Tensor:
        self.start()
        item = _Pending("classify", adapter, ids, future=asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.future

    # -- scheduling -------------------------------------------------------------------------------------
    async def _scheduling_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not self._running and not self.waiting:
                    self.waiting.append(await self.queue.get())  # idle: wait for work, then gather a little
                    deadline = loop.time() + self.batch_wait_s
                    while self.queue.qsize() + len(self.waiting) < self.max_batch_size:
                        timeout = deadline - loop.time()
                        if timeout <= 0:
                            break
                        try:
                            self.waiting.append(await asyncio.wait_for(self.queue.get(), timeout))
                        except asyncio.TimeoutError:
                            break
                while not self.queue.empty():
                    self.waiting.append(self.queue.get_nowait())
                await asyncio.to_thread(self._iteration, loop)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - the loop must not die: fail what it held, go on
                traceback.print_exc()
                self._fail_all(e, loop)
                await asyncio.sleep(0.01)

    def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        """Between two steps: rows leave, classifications run, requests join; then one decoding step."""
        with self._lock:
            self._running = [p for p in self._running if not p.cancelled and not p.row.done]
            self.decoder.drop_cancelled()
            self._classify(loop)
            self._joining = joining = self._admit(loop)
            if joining:
                try:
                    self.decoder.join([p.row for p in joining])
                except Exception as e:  # noqa: BLE001 - their prefill failed: they fail, the batch goes on
                    for p in joining:
                        self._fail(p, _server_error(e), loop)
                else:
                    self._running += [p for p in joining if not p.row.done and not p.row.cancelled]
                    self._record("generate", self._running, joined=len(joining))
                self._joining = []
            if len(self.decoder):
                try:
                    self.decoder.step()
                    self.steps += 1
                except Exception as e:  # noqa: BLE001 - the step failed: its rows fail, the next requests go on
                    self.decoder.clear()
                    running, self._running = self._running, []
                    for p in running:
                        self._fail(p, _server_error(e), loop)
            self._running = [p for p in self._running if not p.row.done and not p.row.cancelled]
            for p in list(self._by_queue.values()):
                if p.row is not None and (p.row.done or p.row.cancelled):
                    self._by_queue.pop(id(p.queue), None)

    def _admit(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """The waiting generations that join now (first come, first served): room in the batch, slots for
        their adapters (those in use are pinned), and the step's prefill budget (one prompt always fits)."""
        if self.scheduler == "static" and self._running:
            return []
        joining: list[_Pending] = self._joining  # where a failure of the loop itself still finds them
        budget = self.max_prefill_tokens
        skipped: list[_Pending] = []
        while self.waiting and len(self._running) + len(joining) < self.max_batch_size:
            p = self.waiting.popleft()
            if p.cancelled:
                continue
            if p.kind != "generate":
                skipped.append(p)
                continue
            if joining and len(p.ids) > budget:
                self.waiting.appendleft(p)
                break
            in_use = self.decoder.adapters | {q.adapter for q in joining}
            try:
                if not self._ensure_loaded(p.adapter, pinned=in_use):
                    self.waiting.appendleft(p)  # every slot is in use: it waits for a row to leave
                    break
                self._check_length(p)
                p.row = Row(GenerationRequest(p.ids, p.adapter, **p.params), self.tokenizer, self._reporter(p, loop))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._fail(p, e if isinstance(e, ApiError) else _server_error(e), loop)
                continue
            joining.append(p)
            budget -= len(p.ids)
        self.waiting.extendleft(reversed(skipped))
        return joining

    def _classify(self, loop: asyncio.AbstractEventLoop) -> None:
        """The waiting classifications (up to ``max_batch_size``) in one forward."""
        group = [p for p in self.waiting if p.kind == "classify"][: self.max_batch_size]
        if not group:
            return
        taken = set(map(id, group))
        self.waiting = deque(p for p in self.waiting if id(p) not in taken)
        ready, in_use = [], set(self.decoder.adapters)
        for p in group:
            try:
                if not self._ensure_loaded(p.adapter, pinned=in_use):
                    self.waiting.appendleft(p)  # no slot free now: next step
                    continue
                in_use.add(p.adapter)
                ready.append(p)
            except Exception as e:  # noqa: BLE001
                self._fail(p, e if isinstance(e, ApiError) else _server_error(e), loop)
        if not ready:
            return
        self._record("classify", ready)
        try:
            logits = self.bank.forward_rows([p.ids for p in ready], [p.adapter for p in ready]).logits
            logits = logits.float().cpu()  # (rows, widest head): one copy to the host for the batch
            for p, row in zip(ready, logits):
                loop.call_soon_threadsafe(_set_result, p.future, row[: self.bank.num_labels(p.adapter)])
        except Exception as e:  # noqa: BLE001 - this batch's requests fail, the server goes on
            for p in ready:
                self._fail(p, _server_error(e), loop)

    def _record(self, kind: str, batch: list[_Pending], joined: int | None = None) -> None:
        names = self.resolver.names
        entry = {"kind": kind, "size": len(batch), "adapters": sorted({names.get(p.adapter, str(p.adapter))
                                                                       for p in batch})}
        if joined is not None:
            entry["joined"] = joined
        self.batches.append(entry)
        del self.batches[:-100]

    def _reporter(self, p: _Pending, loop: asyncio.AbstractEventLoop):
        queue = p.queue

        def on_update(piece: str, result: Generation) -> None:
            if p.cancelled:
                return
            if piece:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            if result.finish_reason is not None:
                loop.call_soon_threadsafe(queue.put_nowait, Finished(result.finish_reason, len(result.tokens)))

        return on_update

    def _check_length(self, p: _Pending) -> None:
        """With the adapter's virtual tokens counted, the row must fit the model's positions."""
        try:
            check_context_length(len(p.ids), self.bank.prompt_length(p.adapter), p.params.get("max_tokens", 0),
                                 self.max_positions)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def _ensure_loaded(self, adapter: str | None, pinned: set) -> bool:
        """Load the adapter unless it is in the bank; False when every slot is pinned by rows in flight."""
        if adapter is None:
            return True
        if adapter in self.bank:
            self.bank.touch(adapter)
            return True
        if len(self.bank.loaded) >= self.bank.capacity and all(k in pinned for k in self.bank.loaded):
            return False
        try:
            config, state, labels = self.resolver.read(adapter)  # a method this replica lacks: KeyError
            self.bank.load(adapter, config, state, pinned=pinned)
        except BankFull:
            return False
        except (NotServable, BaseModelMismatch, ValueError, KeyError) as e:
            name = self.resolver.names.get(adapter, adapter)
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ApiError(400, f"adapter '{name}' cannot be served: {reason}", "invalid_request_error",
                           "model", "adapter_not_servable") from None
        if labels:
            self.labels[adapter] = list(labels)
        return True

    def _fail(self, p: _Pending, error: ApiError, loop: asyncio.AbstractEventLoop) -> None:
        if p.queue is not None:
            self._by_queue.pop(id(p.queue), None)
        if p.row is not None:
            p.row.cancelled = True
        if p.kind == "classify":
            loop.call_soon_threadsafe(_set_exception, p.future, error)
        elif not p.cancelled:
            loop.call_soon_threadsafe(p.queue.put_nowait, error)

    def _fail_all(self, e: BaseException, loop: asyncio.AbstractEventLoop) -> None:
        """After an unexpected failure of the loop itself: everything in flight fails, state starts afresh."""
        with self._lock:
            self.decoder.clear()
            pending = self._running + self._joining + list(self.waiting)
            self._running, self._joining, self.waiting = [], [], deque()
        for p in pending:
            self._fail(p, _server_error(e), loop)


def log_error(message: str, *, with_traceback: bool = False) -> str:
    """Print what the client must not see (paths, internals; with the exception being handled when asked)
    to the replica's log under a fresh id; returns the id, for the client's message."""
    error_id = uuid.uuid4().hex[:12]
    print(f"peftfleet serving error {error_id}: {message}", file=sys.stderr, flush=True)
    if with_traceback:
        traceback.print_exc()
    return error_id


def _log_error(e: BaseException) -> str:
    return log_error(f"{type(e).__name__}: {e}")


def _server_error(e: BaseException) -> ApiError:
    """A 500 for the client that names an error id, not the exception (logged with it)."""
    ref = _log_error(e)
    return ApiError(500, f"The server had an error while processing your request (error id {ref})", "server_error",
                    code="server_error")


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
