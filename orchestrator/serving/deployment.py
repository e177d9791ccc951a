"""The Ray Serve deployment: each replica loads the base once and serves its adapters over an
OpenAI-shaped HTTP API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/classify`).

Replicas are independent: each has its own adapter bank (LRU), loads adapters on first use from
artifact storage and reads the registry on every request, so adapters registered later are
servable without a restart. Each loads the base in its ``dtype`` onto its ``device``
(:mod:`orchestrator.serving.device`); the bank keeps the adapters there too.
"""


import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

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
from orchestrator.serving.engine import AdapterResolver, ApiError, Engine, Finished

app = FastAPI(title="peftfleet", docs_url=None, redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return JSONResponse(error_body("the request body is not valid JSON", code="invalid_json"), status_code=400)
    message, param = validation_message(errors)
    return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=422)


@dataclass
class ServeOptions:
    """What a serving application runs: which base, which adapters, where, how it batches and scales.

    ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, fp32, bf16, fp16): see
    :mod:`orchestrator.serving.device`."""

    base: str
    task: str = "causal-lm"
    adapters: list[str] | None = None  # None = every adapter registered for the base
    capacity: int = 32
    max_batch_size: int = 32
    batch_wait_s: float = 0.01
    api_key: str | None = None
    store_url: str | None = None
    storage_url: str | None = None
    home: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_device(self.device)
        check_dtype(self.dtype)


@serve.deployment
@serve.ingress(app)
class AdapterServer:
    def __init__(self, options: dict[str, Any]):
        import ray
        import torch

        from jobs.store import JobStore
        from peft_methods.adapter_bank import AdapterBank

        opts = ServeOptions(**options)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.options = opts
        # First, so a replica asked for a GPU it does not have fails at once, naming what it sees.
        # Ray leaves every GPU visible to a replica that reserved none: "auto" goes by the reservation.
        self.device = resolve_device(opts.device, has_gpu=bool(ray.get_gpu_ids()))
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
        self.engine = Engine(self.bank, self.tokenizer, self.resolver, max_batch_size=opts.max_batch_size,
                             batch_wait_s=opts.batch_wait_s, max_positions=self.max_positions)

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    def _causal(self) -> None:
        if self.options.task != "causal-lm":
            raise ApiError(400, f"this server serves {self.options.task} adapters; use /v1/classify", code="wrong_task")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": self.resolver.models()}

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """What this replica holds now: loaded adapters (LRU order, oldest first) and recent batches."""
        self._authorize(request)
        names = self.resolver.names
        return {"loaded": [names.get(k, str(k)) for k in self.bank.loaded], "capacity": self.bank.capacity,
                "device": str(self.device), "dtype": DTYPE_NAMES[self.dtype], "batches": self.engine.batches[-20:]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        self._causal()
        ids = self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        return await self._complete(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._authorize(request)
        self._causal()
        return await self._complete(body, chat_prompt_ids(self.tokenizer, body.messages), chat=True)

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if self.options.task != "sequence-classification":
            raise ApiError(400, "this server serves causal-lm adapters; use /v1/completions", code="wrong_task")
        adapter = self.resolver.resolve(body.model)
        if adapter is None:
            raise ApiError(400, "the base model has no trained classification head; name an adapter", param="model",
                           code="no_head")
        texts = [body.input] if isinstance(body.input, str) else body.input
        rows = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=self.max_positions or 512)["input_ids"]
            logits = await self.engine.classify(adapter, ids)
            scores = logits.softmax(-1).tolist()
            labels = self.engine.labels.get(adapter) or [f"LABEL_{i}" for i in range(len(scores))]
            rows.append(list(zip(labels, scores)))
        return classify_response(body.model, rows)

    async def _complete(self, body, ids: list[int], *, chat: bool):
        """The engine sends text pieces (stop strings already cut) and then a Finished; both answers
        only pass them on. The first item is awaited before answering, so a request the engine
        refuses (too long, adapter not servable) gets its HTTP error status when streaming too."""
        adapter = self.resolver.resolve(body.model)
        seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**31
        queue = await self.engine.generate(adapter, ids, max_tokens=body.max_tokens, temperature=body.temperature,
                                           top_p=body.top_p, seed=seed, stop=body.stop)
        first = await queue.get()
        if isinstance(first, ApiError):
            raise first
        if body.stream:
            return StreamingResponse(self._stream(first, queue, body, chat), media_type="text/event-stream")
        pieces, item = [], first
        while not isinstance(item, Finished):
            pieces.append(item)
            item = await queue.get()
            if isinstance(item, ApiError):
                raise item
        return completion_response(body.model, "".join(pieces), len(ids), item.completion_tokens, item.reason, chat)

    async def _stream(self, item, queue, body, chat: bool):
        stream_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if chat:
            yield stream_chunk(stream_id, body.model, "", None, chat)
        while not isinstance(item, Finished):
            if isinstance(item, ApiError):
                yield f"data: {json.dumps(error_body(item.message, item.type, item.param, item.code))}\n\n"
                return
            yield stream_chunk(stream_id, body.model, item, None, chat)
            item = await queue.get()
        yield stream_chunk(stream_id, body.model, None, item.reason, chat)
        yield "data: [DONE]\n\n"


def build_app(options: ServeOptions, *, num_replicas: int | str = 1, autoscaling: dict[str, Any] | None = None,
              cpus_per_replica: float = 1, gpus_per_replica: float = 0, env: dict[str, str] | None = None):
    """The Serve application for ``options`` (``num_replicas`` or ``autoscaling`` settings). A CUDA
    ``options.device`` needs ``gpus_per_replica`` > 0: refused here, before anything is deployed."""
    check_placement(options.device, gpus_per_replica)
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
    return AdapterServer.options(
        **scaling, max_ongoing_requests=max(64, options.max_batch_size * 4),
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica,
                           "runtime_env": {"env_vars": env or {}}},
    ).bind(vars(options))


def build(args: dict[str, Any]):
    """Serve's application builder, for config files and KubeRay's RayService (``import_path:
    orchestrator.serving.deployment:build``): ``args`` are ServeOptions fields (device and dtype
    among them) plus num_replicas, autoscaling, cpus_per_replica, gpus_per_replica; the store and
    storage come from the environment (PEFTFLEET_STORE_URL, PEFTFLEET_STORAGE_URL, PEFTFLEET_API_KEY)."""
    args = dict(args)
    scaling = {k: args.pop(k) for k in ("num_replicas", "autoscaling", "cpus_per_replica", "gpus_per_replica")
               if k in args}
    options = ServeOptions(**{"store_url": os.environ.get("PEFTFLEET_STORE_URL"),
                              "storage_url": os.environ.get("PEFTFLEET_STORAGE_URL"),
                              "api_key": os.environ.get("PEFTFLEET_API_KEY") or None, **args})
    env = {k: v for k, v in os.environ.items()
           if k.startswith("PEFTFLEET_") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return build_app(options, env=env, **scaling)


@dataclass(frozen=True)
class Serving:
    """A running serving application; ``url`` is the OpenAI base URL without ``/v1``."""

    name: str
    url: str

    def stop(self) -> None:
        serve.delete(self.name)


def start(options: ServeOptions, *, name: str = "peftfleet", host: str = "127.0.0.1", port: int = 8000,
          route_prefix: str = "/",
          **scaling: Any) -> Serving:
    """Deploy (or update) the application on the connected Ray cluster; returns once replicas are ready.

    Serve's HTTP proxy is per cluster: if it already runs (another application, an earlier call),
    its host and port stay and the returned URL says which they are."""
    import ray
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options, **scaling), name=name, route_prefix=route_prefix)
    http = ray.get(_get_global_client()._controller.get_http_config.remote())
    if (http.host, http.port) != (host, port):
        print(f"Serve already listens on {http.host}:{http.port} in this cluster; {name!r} is served there", flush=True)
    return Serving(name, f"http://{http.host}:{http.port}{route_prefix.rstrip('/')}")
