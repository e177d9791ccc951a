"""The serving HTTP layer in-process: the app Serve runs (``create_app``) around a real
``AdapterService`` (a tiny LLaMA or BERT, a real engine, a real SQLite store), driven over ASGI
with no Ray: the API key before the body, the limits, OpenAI-shaped errors that leak nothing,
rows freed when a client leaves or a request times out, /v1/classify's batching, safe binding and
the CLI's stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import peft_methods
from jobs.base_models import resolve_base_model
from jobs.store import JobStore
from jobs.store.adapter_registry import AdapterNotFound
from orchestrator import Client
from orchestrator.cli import main
from orchestrator.serving.api import CompletionRequest
from orchestrator.serving.deployment import (
    AdapterService,
    RequestGuard,
    ServeOptions,
    check_binding,
    create_app,
    start,
)
from orchestrator.serving.engine import ApiError, Finished
from tests.conftest import SHARED_MODELS, randomize_adapter

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-peftfleet-0123456789abcdef"
AUTH = [(b"authorization", f"Bearer {KEY}".encode())]
JSON = [(b"content-type", b"application/json")]
LONG = 1024  # tokens of a long generation: ~2 s on 2 CPUs, long enough to leave in the middle of


# -- driving the ASGI app ----------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    read: int  # body messages the app took from receive()

    def json(self):
        return json.loads(self.body)


class Exchange:
    """One HTTP request to an ASGI app, the body given as ``chunks`` (a chunked upload when there are
    several, or when ``content_length`` is False). It counts the body messages the app reads; after
    the body, receive() waits until :meth:`leave` (the client disconnects)."""

    def __init__(self, app, method: str, path: str, *, body: bytes | dict | None = None, chunks=None,
                 headers=(), content_length: bool | int = True, spec_version: str = "2.3"):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        chunks = [body or b""] if chunks is None else list(chunks)
        self.pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                        for i, c in enumerate(chunks)]
        headers = list(headers)
        if content_length is True and len(chunks) == 1:
            headers.append((b"content-length", str(len(chunks[0])).encode()))
        elif content_length is not True and content_length is not False:
            headers.append((b"content-length", str(content_length).encode()))
        else:
            headers.append((b"transfer-encoding", b"chunked"))
        self.read, self.left, self.sent = 0, asyncio.Event(), asyncio.Queue()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": b"", "headers": headers, "server": ("127.0.0.1", 8000),
                 "client": ("127.0.0.1", 50000)}
        self.task = asyncio.ensure_future(app(scope, self.receive, self.sent.put))

    async def receive(self):
        if self.pending:
            self.read += 1
            return self.pending.pop(0)
        await self.left.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left.set()

    async def reply(self, timeout: float = 60) -> Reply:
        await asyncio.wait_for(self.task, timeout)
        messages = []
        while not self.sent.empty():
            messages.append(self.sent.get_nowait())
        start = next(m for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        return Reply(start["status"], dict(start["headers"]), body, self.read)

    async def next_event(self, timeout: float = 60) -> bytes:
        """The next non-empty body piece of a streamed response."""
        while True:
            message = await asyncio.wait_for(self.sent.get(), timeout)
            if message["type"] == "http.response.body" and message.get("body"):
                return message["body"]


async def call(app, method: str, path: str, **kw) -> Reply:
    return await Exchange(app, method, path, **kw).reply()


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module, as a replica has one: the engine's batching task lives on it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def run(loop, coro, timeout: float = 120):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


# -- servers -------------------------------------------------------------------------------------------
def _register(store, base, name, config, *, task="causal-lm", labels=None, seed=0):
    fingerprint = store.register_base_model(str(base)).fingerprint
    loader = transformers.AutoModelForCausalLM if task == "causal-lm" else \
        transformers.AutoModelForSequenceClassification
    torch.manual_seed(seed)
    model = peft_methods.apply(loader.from_pretrained(base, **({"num_labels": len(labels)} if labels else {})),
                               config)
    randomize_adapter(model, scale=0.5)
    metadata = {"base_fingerprint": fingerprint, **({"labels": labels} if labels else {})}
    folder = peft_methods.save_adapter(model, base.parent / f"out-{name}", metadata=metadata)
    store.adapters.register(folder, name=name, base_fingerprint=fingerprint, task=task, task_name=f"task-{name}")


def _service(store, base, **options):
    opts = ServeOptions(base=str(base), store_url=store.url, storage_url=store.artifacts.url, home=str(store.home),
                        **options)
    return AdapterService(vars(opts))


@dataclass
class Server:
    app: object
    service: AdapterService
    base: str


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny LLaMA (2048 positions, so a long generation fits) with SmolLM2's tokenizer, a LoRA
    adapter and a tampered one, behind an API key, with the default limits but a 30 s timeout (a
    request the engine loses fails the test in 30 s, as a 504)."""
    root = tmp_path_factory.mktemp("llm")
    base = root / "base"
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS)).save_pretrained(base)
    store = JobStore(f"sqlite:///{root / 's.db'}", home=root / "home")
    _register(store, base, "lora", {"method": "lora", "r": 4})
    _register(store, base, "tampered", {"method": "lora", "r": 2}, seed=1)
    weights = store.adapters.local_folder("tampered") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    service = _service(store, base, api_key=KEY, request_timeout_s=30)
    return Server(create_app(service), service, str(base))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT with MiniLM's tokenizer and a sentiment adapter; no API key (open on loopback)."""
    root = tmp_path_factory.mktemp("cls")
    base = root / "bert"
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm")).save_pretrained(base)
    store = JobStore(f"sqlite:///{root / 's.db'}", home=root / "home")
    _register(store, base, "sentiment", {"method": "lora", "r": 4}, task="sequence-classification",
              labels=["negative", "positive"])
    service = _service(store, base, task="sequence-classification", max_classify_inputs=8, batch_wait_s=0.01)
    return Server(create_app(service), service, str(base))


def assert_openai_error(reply: Reply, status: int, code: str | None = None, param: str | None = None) -> dict:
    """``reply`` is ``status`` with exactly OpenAI's error object, and tells nothing of the server's insides."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    text = reply.body.decode()
    for leak in ("Traceback", 'File "', ".py", "site-packages", str(ROOT), "/tmp/", "Error:"):
        assert leak not in text, (leak, text)
    if code is not None:
        assert error["code"] == code, body
    if param is not None:
        assert error["param"] == param, body
    return error


def _complete_body(model, **kw):
    return {"model": model, "prompt": "hello there", "max_tokens": 4, "temperature": 0, **kw}


# -- the adversarial suite -----------------------------------------------------------------------------
def test_an_adversarial_client_gets_openai_shaped_errors_and_the_server_keeps_serving(llm, loop):
    app, base = llm.app, llm.base
    ok = _complete_body(base)
    big = b"x" * (64 * 1024)
    unauthenticated = [  # (method, path, headers): every one refused before its body is read
        ("POST", "/v1/completions", []),
        ("POST", "/v1/completions", [(b"authorization", b"Bearer wrong")]),
        ("POST", "/v1/completions", [(b"authorization", f"Bearer {KEY}x".encode())]),
        ("POST", "/v1/completions", [(b"authorization", f"Bearer {KEY[:-1]}".encode())]),
        ("POST", "/v1/completions", [(b"authorization", f"Basic {KEY}".encode())]),
        ("POST", "/v1/completions", [(b"authorization", b"Bearer")]),
        ("POST", "/v1/completions", [(b"authorization", KEY.encode())]),
        ("GET", "/openapi.json", []),
        ("GET", "/docs", []),
        ("GET", "/v1/models", [(b"authorization", b"Bearer " + KEY.upper().encode())]),
        ("POST", "/v1/no-such-route", []),
        ("DELETE", "/v1/models", []),
    ]

    async def scenario():
        replies = []
        for method, path, headers in unauthenticated:
            # a chunked body the server must never read (and one that says its length, for the rest)
            for chunks, length in (([json.dumps(ok).encode(), big], False), ([big], True)):
                reply = await call(app, method, path, chunks=chunks, headers=[*headers, *JSON], content_length=length)
                replies.append(((method, path, headers), reply))
        return replies

    for what, reply in run(loop, scenario()):
        assert_openai_error(reply, 401, "invalid_api_key")
        assert reply.headers[b"www-authenticate"] == b"Bearer"
        assert reply.read == 0, f"the body of a refused request was read: {what}"

    huge = 2 * 1024 * 1024
    cases = [  # (method, path, request keyword arguments, status, code, param)
        ("POST", "/v1/completions", {"body": b"{not json"}, 400, "invalid_json", None),
        ("POST", "/v1/completions", {"body": b""}, 400, "invalid_json", None),
        ("POST", "/v1/completions", {"body": b"\xff\xfe\x00{"}, 400, "invalid_json", None),
        ("POST", "/v1/completions", {"body": b"[" * 100_000 + b"]" * 100_000}, 400, "invalid_json", None),
        ("POST", "/v1/completions", {"body": b"[1, 2]"}, 422, "invalid_value", None),
        ("POST", "/v1/completions", {"body": b'"a string"'}, 422, "invalid_value", None),
        ("POST", "/v1/completions", {"body": {"model": base}}, 422, "invalid_value", "prompt"),
        ("POST", "/v1/completions", {"body": {**ok, "prompt": 17}}, 422, "invalid_value", "prompt"),
        ("POST", "/v1/completions", {"body": {**ok, "prompt": ["a", "b"]}}, 422, "invalid_value", "prompt"),
        ("POST", "/v1/completions", {"body": {**ok, "model": ""}}, 422, "invalid_value", "model"),
        ("POST", "/v1/completions", {"body": {**ok, "max_tokens": "many"}}, 422, "invalid_value", "max_tokens"),
        ("POST", "/v1/completions", {"body": {**ok, "max_tokens": -1}}, 422, "invalid_value", "max_tokens"),
        ("POST", "/v1/completions", {"body": {**ok, "max_tokens": 1025}}, 400, "max_tokens_exceeded", "max_tokens"),
        ("POST", "/v1/completions", {"body": {**ok, "max_tokens": 10**30}}, 400, "max_tokens_exceeded", "max_tokens"),
        ("POST", "/v1/completions", {"body": {**ok, "temperature": -0.1}}, 422, "invalid_value", "temperature"),
        ("POST", "/v1/completions", {"body": {**ok, "temperature": 2.5}}, 422, "invalid_value", "temperature"),
        ("POST", "/v1/completions", {"body": json.dumps(ok)[:-1].encode() + b', "temperature": NaN}'}, 422,
         "invalid_value", "temperature"),
        ("POST", "/v1/completions", {"body": json.dumps(ok)[:-1].encode() + b', "top_p": Infinity}'}, 422,
         "invalid_value", "top_p"),
        ("POST", "/v1/completions", {"body": {**ok, "top_p": 0}}, 422, "invalid_value", "top_p"),
        ("POST", "/v1/completions", {"body": {**ok, "seed": 2**64}}, 422, "invalid_value", "seed"),
        ("POST", "/v1/completions", {"body": {**ok, "seed": -(2**63) - 1}}, 422, "invalid_value", "seed"),
        ("POST", "/v1/completions", {"body": {**ok, "seed": "lucky"}}, 422, "invalid_value", "seed"),
        ("POST", "/v1/completions", {"body": {**ok, "n": 2}}, 400, "invalid_value", "n"),
        ("POST", "/v1/completions", {"body": {**ok, "n": 0}}, 400, "invalid_value", "n"),
        ("POST", "/v1/completions", {"body": {**ok, "stop": ["a", "b", "c", "d", "e"]}}, 422, "invalid_value", "stop"),
        ("POST", "/v1/completions", {"body": {**ok, "stop": [""]}}, 422, "invalid_value", "stop"),
        ("POST", "/v1/completions", {"body": {**ok, "stream": [1]}}, 422, "invalid_value", "stream"),
        ("POST", "/v1/chat/completions", {"body": {"model": base, "messages": []}}, 422, "invalid_value", "messages"),
        ("POST", "/v1/chat/completions", {"body": {"model": base, "messages": [{"role": "tool", "content": "x"}]}},
         422, "invalid_value", None),
        ("POST", "/v1/completions", {"body": {**ok, "model": "no-such-adapter"}}, 404, "model_not_found", "model"),
        ("POST", "/v1/completions", {"body": {**ok, "model": "x" * 10_000}}, 404, "model_not_found", "model"),
        ("POST", "/v1/completions", {"body": {**ok, "prompt": "word " * 2100}}, 400, "context_length_exceeded",
         "prompt"),
        ("POST", "/v1/chat/completions",
         {"body": {"model": base, "messages": [{"role": "user", "content": "word " * 2100}]}}, 400,
         "context_length_exceeded", "messages"),
        ("POST", "/v1/completions", {"body": {**ok, "prompt": "word " * 1500, "max_tokens": 1000}}, 400,
         "context_length_exceeded", "prompt"),  # fits max_prompt_tokens; with max_tokens, not the context
        ("POST", "/v1/completions", {"body": {**ok, "model": "tampered"}}, 500, "adapter_integrity_error", None),
        ("POST", "/v1/completions", {"body": b"{}", "content_length": huge}, 413, "request_too_large", None),
        ("POST", "/v1/completions", {"body": b"x" * (huge // 2), "content_length": "12x"}, 400, "invalid_request",
         None),
        ("POST", "/v1/classify", {"body": {"model": base, "input": "x"}}, 400, "wrong_task", None),
        ("GET", "/v1/completions", {}, 405, "method_not_allowed", None),
        ("PUT", "/v1/models", {"body": ok}, 405, "method_not_allowed", None),
        ("GET", "/v1/engines", {}, 404, "not_found", None),
        ("GET", "/openapi.json", {}, 404, "not_found", None),
        ("GET", "/docs", {}, 404, "not_found", None),
    ]
    chunked_too_big = [b"x" * 65536] * 32  # 2 MiB in 32 chunks and no Content-Length

    async def scenario2():
        replies = [await call(app, method, path, headers=[*AUTH, *JSON], **kw) for method, path, kw, *_ in cases]
        chunked = await call(app, "POST", "/v1/completions", chunks=chunked_too_big, headers=[*AUTH, *JSON],
                             content_length=False)
        return replies, chunked

    replies, chunked = run(loop, scenario2())
    for (method, path, kw, status, code, param), reply in zip(cases, replies, strict=True):
        error = assert_openai_error(reply, status, code, param)
        if "content_length" in kw:
            assert reply.read == 0, "a body refused by its Content-Length was read"
        if code in ("max_tokens_exceeded", "request_too_large"):
            assert ("max_tokens_limit" if code == "max_tokens_exceeded" else "max_body_bytes") in error["message"]
    assert "max_prompt_tokens" in replies[[c[4] for c in cases].index("context_length_exceeded")].json()["error"][
        "message"]
    assert "error id" in replies[[c[4] for c in cases].index("adapter_integrity_error")].json()["error"]["message"]
    assert_openai_error(chunked, 413, "request_too_large")
    assert chunked.read == 17, "the server read past max_body_bytes"  # 16 chunks are 1 MiB; the 17th is over

    # What must be served: the limits' edges, a tiny temperature (greedy), a `curl -d` body, and then a
    # plain request.
    async def scenario3():
        greedy = await call(app, "POST", "/v1/completions", body=_complete_body("lora", max_tokens=6),
                            headers=[*AUTH, *JSON])
        tiny = await call(app, "POST", "/v1/completions", body=_complete_body("lora", max_tokens=6, temperature=1e-40,
                                                                             seed=2**64 - 1), headers=[*AUTH, *JSON])
        low = await call(app, "POST", "/v1/completions", body=_complete_body("lora", max_tokens=1024, seed=-(2**63),
                                                                            temperature=0.7, prompt="hi"),
                         headers=[*AUTH, *JSON])
        form = await call(app, "POST", "/v1/completions", body=_complete_body(base, n=1),
                          headers=[*AUTH, (b"content-type", b"application/x-www-form-urlencoded")])
        models = await call(app, "GET", "/v1/models", headers=[(b"authorization", f"bearer {KEY}".encode())])
        last = await call(app, "POST", "/v1/completions", body=ok, headers=[*AUTH, *JSON])
        return greedy, tiny, low, form, models, last

    greedy, tiny, low, form, models, last = run(loop, scenario3())
    for reply in (greedy, tiny, low, form, models, last):
        assert reply.status == 200, reply.body
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert tiny.json()["usage"] == greedy.json()["usage"]
    assert low.json()["usage"]["completion_tokens"] <= 1024
    assert {m["id"] for m in models.json()["data"]} == {base, "lora", "tampered"}
    assert last.json()["usage"]["completion_tokens"] == 4


def test_an_unexpected_exception_is_a_500_with_an_id_and_nothing_else(llm, loop, capfd):
    app = create_app(llm.service)

    @app.get("/v1/boom")
    async def boom():
        raise OSError(f"cannot open {ROOT}/secret/adapter.py")

    @app.get("/v1/engine-failed")
    async def engine_failed():  # what an engine may send for a failed batch: the exception's own text
        raise ApiError(500, f"OSError: {ROOT}/peft_methods/adapter_bank.py: no space left", "server_error",
                       code="server_error")

    async def failing(scope, receive, send):  # an app that fails below every handler
        raise RuntimeError(f"{ROOT}/orchestrator/serving/engine.py broke")

    guard = RequestGuard(failing, api_key=None, max_body_bytes=10)

    async def scenario():
        return (await call(app, "GET", "/v1/boom", headers=AUTH), await call(guard, "GET", "/"),
                await call(app, "GET", "/v1/engine-failed", headers=AUTH))

    replies = run(loop, scenario())
    log = capfd.readouterr().err
    causes = ("secret/adapter.py", "engine.py broke", "no space left")
    for reply, cause, code in zip(replies, causes, ("internal_error", "internal_error", "server_error"), strict=True):
        error = assert_openai_error(reply, 500, code)
        assert error["type"] == "server_error" and "error id" in error["message"]
        error_id = error["message"].split("error id ")[1].rstrip(")")
        assert error_id in log and cause in log  # the server's log has what the client does not
    assert log.count("Traceback") == 2


# -- the engine's rows: freed when the client leaves or the deadline passes -----------------------------
def _watch_queues(service, monkeypatch) -> list[asyncio.Queue]:
    """Each generation's queue, as the engine hands it out (the engine itself runs unchanged)."""
    queues, generate = [], service.engine.generate

    async def recording(*args, **kwargs):
        queues.append(await generate(*args, **kwargs))
        return queues[-1]

    monkeypatch.setattr(service.engine, "generate", recording)
    return queues


async def _settled(queue: asyncio.Queue, quiet_s: float) -> list:
    """What ``queue`` holds once nothing more has arrived for ``quiet_s``."""
    while True:
        size = queue.qsize()
        await asyncio.sleep(quiet_s)
        if queue.qsize() == size:
            return [queue.get_nowait() for _ in range(size)]


def _long_request(**kw):
    return {"model": "lora", "prompt": "once upon a time", "max_tokens": LONG, "temperature": 0, **kw}


def test_a_client_that_leaves_or_times_out_frees_its_row(llm, loop, monkeypatch):
    """A long generation runs to its end (LONG tokens, finish_reason length) when awaited. Left in
    its first tokens (a stream's client disconnects, a stream or a plain request is cancelled as Ray
    Serve cancels it, or request_timeout_s passes), the engine puts nothing more on its queue: no
    Finished ever comes, though the whole generation takes a fraction of the time waited."""
    app, service = llm.app, llm.service
    queues = _watch_queues(service, monkeypatch)

    async def full():
        began = time.monotonic()
        reply = await call(app, "POST", "/v1/completions", body=_long_request(), headers=[*AUTH, *JSON])
        return reply, time.monotonic() - began

    reply, took = run(loop, full())
    assert reply.status == 200 and reply.json()["choices"][0]["finish_reason"] == "length", reply.body
    assert reply.json()["usage"]["completion_tokens"] == LONG
    quiet = 0.5  # a row still generating sends a piece every few milliseconds

    async def leave_stream(spec_version):
        exchange = Exchange(app, "POST", "/v1/completions", body=_long_request(stream=True),
                            headers=[*AUTH, *JSON], spec_version=spec_version)
        first = await exchange.next_event()
        if spec_version == "2.3":
            exchange.leave()  # Starlette notices the disconnect and stops the stream
        else:
            exchange.task.cancel()  # ASGI 2.4 (uvicorn): Serve cancels the request when its client leaves
        await asyncio.gather(exchange.task, return_exceptions=True)
        return first, await _settled(queues[-1], quiet)

    async def cancel_plain():
        known = len(queues)
        exchange = Exchange(app, "POST", "/v1/completions", body=_long_request(), headers=[*AUTH, *JSON])
        while len(queues) == known:  # until it is in the engine's hands
            assert not exchange.task.done(), (await exchange.reply()).body
            await asyncio.sleep(0.005)
        await asyncio.sleep(took / 5)  # a fifth of the way through its generation
        assert not exchange.task.done()
        exchange.task.cancel()
        await asyncio.gather(exchange.task, return_exceptions=True)
        return await _settled(queues[known], quiet)

    for spec_version in ("2.3", "2.4"):
        first, left = run(loop, leave_stream(spec_version))
        assert first.startswith(b"data: ")
        assert not any(isinstance(item, Finished) for item in left), f"the row ran on ({spec_version})"
        assert len(left) < LONG - 100
    left = run(loop, cancel_plain())
    assert not any(isinstance(item, Finished) for item in left) and len(left) < LONG - 100

    monkeypatch.setattr(service.options, "request_timeout_s", took / 3)

    async def time_out():
        plain = await call(app, "POST", "/v1/completions", body=_long_request(), headers=[*AUTH, *JSON])
        plain_left = await _settled(queues[-1], quiet)
        stream = await call(app, "POST", "/v1/completions", body=_long_request(stream=True),
                            headers=[*AUTH, *JSON])
        return plain, plain_left, stream, await _settled(queues[-1], quiet)

    plain, plain_left, stream, stream_left = run(loop, time_out())
    error = assert_openai_error(plain, 504, "request_timeout")
    assert "request_timeout_s" in error["message"]
    events = [e for e in stream.body.decode().split("\n\n") if e]
    assert stream.status == 200 and events[-1] != "data: [DONE]"
    assert json.loads(events[-1][len("data: "):])["error"]["code"] == "request_timeout"
    assert all(json.loads(e[len("data: "):])["choices"] for e in events[:-1])
    for left in (plain_left, stream_left):
        assert not any(isinstance(item, Finished) for item in left) and len(left) < LONG - 100


# -- /v1/classify -----------------------------------------------------------------------------------------
def test_classify_sends_all_inputs_to_the_engine_at_once_and_caps_them(classifier, loop):
    app, engine = classifier.app, classifier.service.engine
    texts = ["a fine film", "what a waste of time", "who wrote it?", "fine", "bad", "so so"]

    async def scenario():
        alone = [await call(app, "POST", "/v1/classify", body={"model": "sentiment", "input": t}, headers=JSON)
                 for t in texts]
        before = len(engine.batches)
        together = await call(app, "POST", "/v1/classify", body={"model": "sentiment", "input": texts}, headers=JSON)
        return alone, engine.batches[before:], together, await asyncio.gather(
            call(app, "POST", "/v1/classify", body={"model": "sentiment", "input": ["x"] * 9}, headers=JSON),
            call(app, "POST", "/v1/classify", body={"model": "sentiment", "input": []}, headers=JSON),
            call(app, "POST", "/v1/classify", body={"model": classifier.base, "input": "x"}, headers=JSON),
            call(app, "POST", "/v1/completions", body=_complete_body("sentiment"), headers=JSON))

    alone, batches, together, (too_many, empty, no_head, wrong_task) = run(loop, scenario())
    assert [b["size"] for b in batches] == [len(texts)], batches  # one batch for the request's six inputs
    assert together.status == 200
    rows = together.json()["data"]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    for one, row in zip(alone, rows, strict=True):
        assert one.status == 200
        want = one.json()["data"][0]
        assert row["label"] == want["label"] and set(row["scores"]) == {"negative", "positive"}
        assert all(abs(row["scores"][k] - want["scores"][k]) < 1e-5 for k in want["scores"])
    error = assert_openai_error(too_many, 400, "too_many_inputs", "input")
    assert "max_classify_inputs" in error["message"]
    assert_openai_error(empty, 422, "invalid_value", "input")
    assert_openai_error(no_head, 400, "no_head", "model")
    assert_openai_error(wrong_task, 400, "wrong_task")


def test_limits_are_options_with_defaults_from_the_model(llm, classifier):
    assert llm.service.max_prompt_tokens == 2048  # the tiny LLaMA's max_position_embeddings
    opts = ServeOptions(base="b")
    assert (opts.max_body_bytes, opts.max_tokens_limit, opts.request_timeout_s, opts.max_classify_inputs,
            opts.grace_s) == (1 << 20, 1024, 120.0, 256, 30.0)
    for bad in ({"max_body_bytes": 0}, {"max_tokens_limit": -1}, {"request_timeout_s": 0}, {"grace_s": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeOptions(base="b", **bad)
    # A temperature too small to divide logits by (1e-40 is subnormal in float32) is greedy.
    assert [CompletionRequest(model="m", prompt="p", temperature=t).temperature for t in (1e-40, 1e-7, 1e-5)] == [
        0.0, 0.0, 1e-5]


# -- binding beyond loopback -------------------------------------------------------------------------------
def test_serving_beyond_loopback_needs_a_key_or_insecure(tmp_path, capsys, monkeypatch):
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        check_binding(host, None)
    check_binding("0.0.0.0", "a-key")
    check_binding("0.0.0.0", None, insecure=True)
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.com", ""):
        with pytest.raises(ValueError, match="without an API key"):
            check_binding(host, None)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was reached before the host was checked")

    monkeypatch.setattr("ray.serve.start", no_ray)
    monkeypatch.setattr("orchestrator.client.connect", no_ray)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without an API key"):
        start(ServeOptions(base="b"), host="0.0.0.0")

    store = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home")
    base = tmp_path / "base"
    transformers.BertModel(transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=48)).save_pretrained(base)

    def serve(*argv):
        monkeypatch.delenv("PEFTFLEET_API_KEY", raising=False)
        code = main(["serve", "--base", str(base), *argv, "--store-url", store.url, "--home", str(store.home)])
        return code, capsys.readouterr().err

    client = Client(store_url=store.url, home=store.home)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without an API key"):
        client.serve(str(base), host="0.0.0.0")
    with pytest.raises(AdapterNotFound):  # past the host's check, the next check refuses, before Ray
        client.serve(str(base), host="0.0.0.0", insecure=True, adapters=["missing"])

    code, err = serve("--host", "0.0.0.0")
    assert code == 2 and "refusing to serve on 0.0.0.0 without an API key" in err and "--insecure" in err
    # Past the check, each stops at the next one (an adapter not registered), before Ray.
    for argv in (["--insecure"], ["--api-key", "k"]):
        code, err = serve("--host", "0.0.0.0", "--adapters", "missing", *argv)
        assert code == 1 and "no adapter named 'missing'" in err, err


# -- peftfleet serve's stop on SIGTERM ----------------------------------------------------------------------
def test_a_stop_signal_is_taken_in_the_main_loop_not_the_handler():
    """`peftfleet serve` waits with wait_for_stop_signal: SIGTERM or SIGINT returns it (the process
    goes on to stop the application and exits 0), with no traceback or stack dump."""
    child = textwrap.dedent("""
        import time
        from orchestrator.cli import wait_for_stop_signal
        for _ in range(2):
            print("waiting", flush=True)
            got = wait_for_stop_signal()
            time.sleep(0.2)  # the stop's work, after the handler returned
            print("stopping on", got.name, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            assert proc.stdout.readline().strip() == "waiting"
            time.sleep(0.3)
            proc.send_signal(sig)
            assert proc.stdout.readline().strip() == f"stopping on {sig.name}"
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and "***" not in err, (proc.returncode, err)
