"""The Ray Serve deployment: each replica loads the base once and serves its adapters over an
OpenAI-shaped HTTP API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/classify`).

Replicas are independent: each has its own adapter bank (LRU), loads adapters on first use from
artifact storage and reads the registry on every request, so adapters registered later are
servable without a restart. Each loads the base in its ``dtype`` onto its ``device``
(:mod:`orchestrator.serving.device`); the bank keeps the adapters there too.

:class:`AdapterService` is the replica's work and :func:`create_app` its HTTP app; the Serve
deployment :class:`AdapterServer` only wraps them, so tests drive the same app in-process.
Before a route runs, :class:`RequestGuard` checks the API key and reads the body up to
``max_body_bytes``: a refused request's body is never read. Every error, the framework's
included, leaves in OpenAI's shape, and a 5xx shows an error id, never the exception's text.
Neither the API key nor a store URL with a password is in the deployment's options or runtime env:
each replica reads them from its own environment (:mod:`jobs.secrets`).
"""

import asyncio
import hmac
import ipaddress
import json
import os
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import secrets
from orchestrator.cluster import check_no_secrets
from orchestrator.serving.api import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    chat_prompt_ids,
    classify_response,
    completion_response,
    error_body,
    stream_chunk,
    validation_message,
)
from orchestrator.serving.device import (
    DTYPE_NAMES,
    check_device,
    check_dtype,
    check_placement,
    load_base,
    resolve_device,
    resolve_dtype,
)
from orchestrator.serving.engine import AdapterResolver, ApiError, Engine, Finished, log_error

DEFAULT_MAX_PROMPT_TOKENS = 4096  # for a model whose config names no max_position_embeddings


@dataclass
class ServeOptions:
    """What a serving application runs: which base, which adapters, where, how it batches and scales,
    and the limits every request is held to (docs/serving.md#limits).

    ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, fp32, bf16, fp16): see
    :mod:`orchestrator.serving.device`."""

    base: str
    task: str = "causal-lm"
    adapters: list[str] | None = None  # None = every adapter registered for the base
    capacity: int = 32
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    scheduler: str = "continuous"  # or "static": a new batch only once the running one is empty
    max_prefill_tokens: int = 4096  # prompt tokens that may join the running batch in one step
    api_key: str | None = None
    api_key_from_env: bool = False  # the replica reads its key with jobs.secrets.api_key() (it is not in here)
    store_url: str | None = None  # None: the replica's own PEFTFLEET_STORE_URL (or secrets file)
    storage_url: str | None = None
    home: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's max_position_embeddings, else 4096
    max_tokens_limit: int = 1024
    request_timeout_s: float = 120.0
    max_classify_inputs: int = 256
    grace_s: float = 30.0  # on stop, how long replicas finish requests in flight
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype)
        if self.scheduler not in ("continuous", "static"):
            raise ValueError(f"scheduler must be 'continuous' or 'static', not {self.scheduler!r}")
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens_limit", "request_timeout_s",
                     "max_classify_inputs", "max_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be 0 or more, not {self.grace_s!r}")


class LimitExceeded(ApiError):
    """A request over one of the server's limits. Its message names the limit and holds nothing
    internal, so it is shown as it is, a 504 included."""


def client_error(e: ApiError) -> tuple[dict[str, Any], int]:
    """The body and status a client sees for ``e``. A 5xx's message may carry an exception's text
    (paths, internals): it is logged here with an id, and the client gets the id instead."""
    message = e.message
    if e.status >= 500 and not isinstance(e, LimitExceeded):
        message = f"internal server error (error id {log_error(f'{e.status} {e.code}: {e.message}')})"
    return error_body(message, e.type, e.param, e.code), e.status


_SERVER_ERROR = "internal server error"


async def _send_json(send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """Pure ASGI middleware, before any route: the API key (``Authorization: Bearer KEY``, compared
    in constant time) on every path, then the body, read up to ``max_body_bytes`` (by its
    Content-Length first, then as it arrives, so a chunked body is cut off too) and replayed to the
    route. A refused request's body is never read. An exception no handler took becomes a 500
    without its text (logged with an id)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.token = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # lower-case names; the last of a repeated header
        if self.token is not None and not self._authorized(headers.get(b"authorization", b"")):
            await _send_json(send, 401, error_body("Incorrect API key provided", code="invalid_api_key"),
                             [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await _send_json(send, 400, error_body("Content-Length is not a number", code="invalid_request"))
            return
        if length is not None and int(length) > self.max_body_bytes:
            await self._too_large(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception:  # noqa: BLE001 - the client gets an id, the log gets the traceback
            error_id = log_error(f"{scope.get('method')} {scope.get('path')}", with_traceback=True)
            if not started:
                await _send_json(send, 500, error_body(f"{_SERVER_ERROR} (error id {error_id})", "server_error",
                                                       code="internal_error"))

    def _authorized(self, value: bytes) -> bool:
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)

    async def _too_large(self, send) -> None:
        message = f"the request body is over this server's limit of {self.max_body_bytes} bytes (max_body_bytes)"
        await _send_json(send, 413, error_body(message, code="request_too_large"))


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def create_app(service: "AdapterService") -> FastAPI:
    """The HTTP app of one replica: routes that call ``service``, the guard, and OpenAI-shaped errors."""
    app = FastAPI(title="peftfleet", docs_url=None, redoc_url=None, openapi_url=None)
    opts = service.options
    app.add_middleware(RequestGuard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        body, status = client_error(e)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path[:200]}"
        if e.status_code == 404:
            message = f"Invalid URL ({where})"
        elif e.status_code == 405:
            message = f"Method not allowed ({where})"
        elif e.status_code < 500 and isinstance(e.detail, str):
            message = e.detail
        else:
            message = f"{_SERVER_ERROR} (error id {log_error(f'{e.status_code} {where}: {e.detail}')})"
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, type_, code=_HTTP_CODES.get(e.status_code, "http_error")),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:  # RequestGuard answers first
        error_id = log_error(f"{request.method} {request.url.path}", with_traceback=True)
        return JSONResponse(error_body(f"{_SERVER_ERROR} (error id {error_id})", "server_error",
                                       code="internal_error"), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.resolver.models()}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """What this replica holds now: loaded adapters (LRU order, oldest first) and recent batches."""
        return service.stats()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.complete(await _parse(request, CompletionRequest), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await service.complete(await _parse(request, ChatRequest), chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        return await service.classify(await _parse(request, ClassifyRequest))

    return app


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as ``model``, whatever its Content-Type says (``curl -d`` sends a form type)."""
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors())
        raise ApiError(422, message, param=param, code="invalid_value") from None


class AdapterService:
    """One replica's work: the base, its adapter bank and engine, and what each route does."""

    def __init__(self, options: dict[str, Any]):
        import ray
        import torch

        from jobs.store import JobStore
        from peft_methods.adapter_bank import AdapterBank

        opts = ServeOptions(**options)
        if opts.api_key_from_env:
            opts.api_key = secrets.api_key()
            if not opts.api_key:
                raise RuntimeError("this application requires an API key, but this replica has none: give it "
                                   "PEFTFLEET_API_KEY (from a Kubernetes Secret or the secrets file) or "
                                   "PEFTFLEET_API_KEY_FILE")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.options = opts
        # First, so a replica asked for a GPU it does not have fails at once, naming what it sees.
        # Ray leaves every GPU visible to a replica that reserved none: "auto" goes by the reservation.
        self.device = resolve_device(opts.device, has_gpu=ray.is_initialized() and bool(ray.get_gpu_ids()))
        self.dtype = resolve_dtype(opts.dtype, self.device)
        store = JobStore(opts.store_url, storage_url=opts.storage_url, home=opts.home)
        base = store.register_base_model(opts.base)
        # The base's own head is a placeholder: classification adapters bring theirs.
        num_labels = 2 if opts.task == "sequence-classification" else None
        model, self.tokenizer = load_base(opts.base, opts.task, device=self.device, dtype=self.dtype,
                                          num_labels=num_labels, home=opts.home)
        self.bank = AdapterBank(model, capacity=opts.capacity)
        self.tokenizer.padding_side = self.bank.padding_side
        allowed = set(opts.adapters) if opts.adapters is not None else None
        self.resolver = AdapterResolver(store, opts.base, base.fingerprint, allowed)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.max_prompt_tokens = opts.max_prompt_tokens or self.max_positions or DEFAULT_MAX_PROMPT_TOKENS
        self.engine = Engine(self.bank, self.tokenizer, self.resolver, max_batch_size=opts.max_batch_size,
                             batch_wait_s=opts.batch_wait_s, max_positions=self.max_positions,
                             scheduler=opts.scheduler, max_prefill_tokens=opts.max_prefill_tokens)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        self.engine.check()

    def stats(self) -> dict[str, Any]:
        names = self.resolver.names
        return {"loaded": [names.get(k, str(k)) for k in self.bank.loaded], "capacity": self.bank.capacity,
                "device": str(self.device), "dtype": DTYPE_NAMES[self.dtype], "batches": self.engine.batches[-20:]}

    def _timeout(self) -> LimitExceeded:
        return LimitExceeded(504, f"the request did not finish within this server's limit of "
                                  f"{self.options.request_timeout_s:g} s (request_timeout_s)", "server_error",
                             code="request_timeout")

    async def complete(self, body: CompletionRequest | ChatRequest, *, chat: bool):
        """A completion, streamed or not, within ``request_timeout_s`` of its arrival."""
        opts = self.options
        if opts.task != "causal-lm":
            raise ApiError(400, f"this server serves {opts.task} adapters; use /v1/classify", code="wrong_task")
        if body.n not in (None, 1):
            raise ApiError(400, f"n = {body.n}: this server answers one choice per request (n = 1)", param="n",
                           code="invalid_value")
        if body.max_tokens > opts.max_tokens_limit:
            raise LimitExceeded(400, f"max_tokens = {body.max_tokens} is over this server's limit of "
                                     f"{opts.max_tokens_limit} (max_tokens_limit)", param="max_tokens",
                                code="max_tokens_exceeded")
        deadline = asyncio.get_running_loop().time() + opts.request_timeout_s
        within = asyncio.timeout_at(deadline)
        try:
            async with within:
                return await self._complete(body, chat, deadline)
        except TimeoutError:
            if not within.expired():
                raise
            raise self._timeout() from None

    async def _complete(self, body: CompletionRequest | ChatRequest, chat: bool, deadline: float):
        """The engine sends text pieces (stop strings already cut) and then a Finished; both answers
        only pass them on. The first item is awaited before answering, so a request the engine
        refuses (too long, adapter not servable) gets its HTTP error status when streaming too.
        A request that ends before its Finished (cancelled: the client left, or the deadline
        passed) takes its row out of the engine's batch."""
        adapter = self.resolver.resolve(body.model)
        if chat:
            ids = await asyncio.to_thread(chat_prompt_ids, self.tokenizer, body.messages)
        else:
            ids = await asyncio.to_thread(lambda: self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])
        if len(ids) > self.max_prompt_tokens:
            raise LimitExceeded(400, f"the prompt is {len(ids)} tokens, over this server's limit of "
                                     f"{self.max_prompt_tokens} (max_prompt_tokens)",
                                param="messages" if chat else "prompt", code="context_length_exceeded")
        seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**31
        queue = await self.engine.generate(adapter, ids, max_tokens=body.max_tokens, temperature=body.temperature,
                                           top_p=body.top_p, seed=seed, stop=body.stop)
        done = False  # the engine sent its last item, or the stream took the queue over
        try:
            first = await queue.get()
            if isinstance(first, ApiError):
                done = True
                raise first
            if body.stream:
                events = self._stream(first, queue, body, chat, deadline)
                await anext(events)  # started: from now on, closing it frees the row
                done = True
                return EventStream(events)
            pieces, item = [], first
            while not isinstance(item, Finished):
                pieces.append(item)
                item = await queue.get()
                if isinstance(item, ApiError):
                    done = True
                    raise item
            done = True
            return completion_response(body.model, "".join(pieces), len(ids), item.completion_tokens, item.reason,
                                       chat)
        finally:
            if not done:
                self.engine.cancel(queue)

    async def _stream(self, item, queue: asyncio.Queue, body, chat: bool, deadline: float):
        """Server-sent events until the Finished; an error (the deadline too) is one error event, then
        the end. Closed early (the client left), the row leaves the engine's batch. Its first item
        is an empty string, for the caller to start it with."""
        done = False
        try:
            yield ""
            stream_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if chat:
                yield stream_chunk(stream_id, body.model, "", None, chat)
            while not isinstance(item, Finished):
                if isinstance(item, ApiError):
                    done = True
                    yield f"data: {json.dumps(client_error(item)[0])}\n\n"
                    return
                yield stream_chunk(stream_id, body.model, item, None, chat)
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await queue.get()
                except TimeoutError:
                    yield f"data: {json.dumps(client_error(self._timeout())[0])}\n\n"
                    return
            done = True
            yield stream_chunk(stream_id, body.model, None, item.reason, chat)
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.engine.cancel(queue)

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        """Every input is submitted at once, so they share engine batches."""
        opts = self.options
        if opts.task != "sequence-classification":
            raise ApiError(400, "this server serves causal-lm adapters; use /v1/completions", code="wrong_task")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > opts.max_classify_inputs:
            raise LimitExceeded(400, f"{len(texts)} inputs are over this server's limit of {opts.max_classify_inputs} "
                                     f"per request (max_classify_inputs)", param="input", code="too_many_inputs")
        adapter = self.resolver.resolve(body.model)
        if adapter is None:
            raise ApiError(400, "the base model has no trained classification head; name an adapter", param="model",
                           code="no_head")
        within = asyncio.timeout(opts.request_timeout_s)
        try:
            async with within:
                encoded = await asyncio.to_thread(
                    lambda: self.tokenizer(texts, truncation=True, max_length=self.max_positions or 512)["input_ids"])
                logits = await asyncio.gather(*(self.engine.classify(adapter, ids) for ids in encoded))
        except TimeoutError:
            if not within.expired():
                raise
            raise self._timeout() from None
        rows = []
        for row in logits:
            scores = row.softmax(-1).tolist()
            labels = self.engine.labels.get(adapter) or [f"LABEL_{i}" for i in range(len(scores))]
            rows.append(list(zip(labels, scores)))
        return classify_response(body.model, rows)


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so its ``finally``
    runs at once when the client leaves (Starlette may stop iterating it without closing it)."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


@serve.deployment
@serve.ingress()
class AdapterServer(AdapterService):
    """The Serve deployment: an :class:`AdapterService` per replica, its app built once it exists."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self)


def build_app(options: ServeOptions, *, num_replicas: int | str = 1, autoscaling: dict[str, Any] | None = None,
              cpus_per_replica: float = 1, gpus_per_replica: float = 0, env: dict[str, str] | None = None):
    """The Serve application for ``options`` (``num_replicas`` or ``autoscaling`` settings). A CUDA
    ``options.device`` needs ``gpus_per_replica`` > 0: refused here, before anything is deployed."""
    check_placement(options.device, gpus_per_replica)
    check_no_secrets(env or {})
    # What Serve keeps and ships to replicas holds no secret: each replica finds them itself.
    options = replace(options, api_key=None, api_key_from_env=bool(options.api_key) or options.api_key_from_env,
                      store_url=None if secrets.has_password(options.store_url) else options.store_url)
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
    return AdapterServer.options(
        **scaling, max_ongoing_requests=max(64, options.max_batch_size * 4),
        graceful_shutdown_timeout_s=options.grace_s,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica,
                           "runtime_env": {"env_vars": env or {}}},
    ).bind(vars(options))


def build(args: dict[str, Any]):
    """Serve's application builder, for config files and KubeRay's RayService (``import_path:
    orchestrator.serving.deployment:build``): ``args`` are ServeOptions fields (device, dtype and
    the limits among them) plus num_replicas, autoscaling, cpus_per_replica, gpus_per_replica; the
    store and storage come from the environment (PEFTFLEET_STORE_URL, PEFTFLEET_STORAGE_URL,
    PEFTFLEET_API_KEY or PEFTFLEET_API_KEY_FILE). The replicas' runtime env gets the other PEFTFLEET_*
    settings; the secrets they read from their own pods' environment."""
    args = dict(args)
    scaling = {k: args.pop(k) for k in ("num_replicas", "autoscaling", "cpus_per_replica", "gpus_per_replica")
               if k in args}
    options = ServeOptions(**{"store_url": secrets.store_url(), "storage_url": os.environ.get("PEFTFLEET_STORAGE_URL"),
                              "api_key": secrets.api_key(), **args})
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("PEFTFLEET_") and k not in secrets.SECRET_NAMES and not secrets.has_password(v))
           or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return build_app(options, env=env, **scaling)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None, insecure: bool = False) -> None:
    """Beyond loopback, a server answers anyone who can reach it: refused without an API key, unless
    ``insecure`` says that is meant."""
    if not (is_loopback(host) or api_key or insecure):
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who reaches it could use it. "
                         f"Set one (--api-key or PEFTFLEET_API_KEY), listen on 127.0.0.1, or pass --insecure "
                         f"(insecure=True) to serve it open")


@dataclass(frozen=True)
class Serving:
    """A running serving application; ``url`` is the OpenAI base URL without ``/v1``."""

    name: str
    url: str

    def stop(self) -> None:
        """Delete the application. Serve routes it no new requests, and each replica finishes those in
        flight for up to the options' ``grace_s`` before it ends; returns when it has."""
        serve.delete(self.name)


def start(options: ServeOptions, *, name: str = "peftfleet", host: str = "127.0.0.1", port: int = 8000,
          route_prefix: str = "/", insecure: bool = False,
          **scaling: Any) -> Serving:
    """Deploy (or update) the application on the connected Ray cluster; returns once replicas are ready.

    Serve's HTTP proxy is per cluster: if it already runs (another application, an earlier call),
    its host and port stay and the returned URL says which they are.

    Raises:
        ValueError: ``host`` (or the host Serve already listens on) is not loopback, ``options`` has no
            ``api_key`` and ``insecure`` is not set; nothing is deployed.
    """
    import ray
    from ray.serve.context import _get_global_client

    check_binding(host, options.api_key, insecure)
    serve.start(http_options={"host": host, "port": port})
    http = ray.get(_get_global_client()._controller.get_http_config.remote())
    check_binding(http.host, options.api_key, insecure)
    serve.run(build_app(options, **scaling), name=name, route_prefix=route_prefix)
    if (http.host, http.port) != (host, port):
        print(f"Serve already listens on {http.host}:{http.port} in this cluster; {name!r} is served there", flush=True)
    return Serving(name, f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}")
