"""The HTTP API's shapes, following OpenAI's so existing clients work unchanged: request bodies,
responses, server-sent-event chunks and the error object ``{"error": {"message", "type",
"param", "code"}}``; and how a chat request becomes prompt tokens (training's rule)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs.training.prompts import prompt_ids

# torch's generators take seeds in this range (a wider one fails inside the engine, not here).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# A temperature under this is greedy: logits divided by it would overflow float32 (1e-40 is subnormal).
GREEDY_BELOW = 1e-6


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, logprobs...). Python's json module reads NaN and
    # Infinity, which no field here can take.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, description="An adapter name, a task name with a promoted adapter, or the base.")


class _Sampling(_Request):
    max_tokens: int = Field(default=16, ge=0, description="At most the server's max_tokens_limit.")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(default=1, description="Only 1: the server checks it, to answer 400 as OpenAI does.")

    @field_validator("temperature")
    @classmethod
    def _greedy(cls, v: float) -> float:
        return 0.0 if v < GREEDY_BELOW else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The prompt tokens of a chat request: exactly what an SFT job trained on for the same
    conversation (:func:`jobs.training.prompts.prompt_ids`), so adapters see served chats as in training."""
    return prompt_ids(tokenizer, [m.model_dump() for m in messages])


class ClassifyRequest(_Request):
    input: str | list[str] = Field(description="One text or a list of texts.")

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("input must hold at least one text")
        return v


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line per bad field, and the first field's name as OpenAI's ``param``."""
    lines, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        lines.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(lines) or "invalid request body", param


def completion_response(model: str, text: str, prompt_tokens: int, tokens: int, finish_reason: str,
                        chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens},
    }


def stream_chunk(stream_id: str, model: str, text: str | None, finish: str | None, chat: bool) -> str:
    if chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def classify_response(model: str, rows: list[list[tuple[str, float]]]) -> dict[str, Any]:
    return {
        "object": "list", "model": model,
        "data": [{"index": i, "label": max(scores, key=lambda s: s[1])[0], "scores": dict(scores)}
                 for i, scores in enumerate(rows)],
    }
