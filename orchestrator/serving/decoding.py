"""Decoding for the server: the batched generation loop over an adapter bank, sampling, and the
text a client receives (end of sequence, stop strings, why a row finished).

The bank (:mod:`peft_methods.adapter_bank`) runs forwards; this module decides what to do with the
logits. Every row carries its own text state, so the work per generated token is bounded whatever
the output's length: a :class:`TextStream` decodes each new token with a few tokens before it as
context (never the whole output again), and :class:`StopStrings` looks for stop strings only in
the new text plus the few characters held back because they could start one. Held-back text is
released once it cannot, so streamed pieces concatenate to exactly the non-streamed text.

The rules a response reports are written once here: :func:`finish_reason` and
:func:`check_context_length`.

The logits stay on the model's device. Each step chooses every row's next token there (greedy or
sampled, :func:`sample`), flags end-of-sequence tokens there, and then copies the chosen ids and
those flags to the host in one transfer: the step's only wait for the device. No vocabulary-sized
tensor ever leaves the device. The host turns the ids into text, looks for stop strings and counts
``max_tokens``; rows that ended leave the batch (:class:`Decoder`) without another wait.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peft_methods.adapter_bank import AdapterBank, DecodingBatch

# Tokens a TextStream holds back while they show no new printable text (skipped special tokens,
# bytes of a character still incomplete); a UTF-8 character takes at most four byte tokens.
MAX_HELD_TOKENS = 8
# Below this a temperature is greedy: dividing logits by it would overflow to infinity (NaN probabilities).
MIN_TEMPERATURE = 1e-4


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: Hashable | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()


@dataclass
class Generation:
    """One row's output so far: its tokens, the text pieces released, and why it ended (None: running)."""

    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def finish_reason(*, stopped: bool, eos: bool, tokens: int, max_tokens: int) -> str | None:
    """Why a row ends, or None while it runs: "stop" at a stop string or end-of-sequence, "length" at max_tokens."""
    if stopped or eos:
        return "stop"
    return "length" if tokens >= max_tokens else None


class ContextLengthExceeded(ValueError):
    """The prompt, the adapter's virtual tokens and max_tokens do not fit the model's positions."""


def check_context_length(prompt_tokens: int, virtual_tokens: int, max_tokens: int, max_positions: int | None) -> None:
    """Raise :class:`ContextLengthExceeded` unless prompt + virtual tokens + max_tokens ≤ max_positions."""
    total = prompt_tokens + virtual_tokens + max_tokens
    if max_positions is not None and total > max_positions:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_positions} tokens; the request needs {total} "
            f"({prompt_tokens} in the prompt, {virtual_tokens} virtual tokens of the adapter, max_tokens {max_tokens})")


def eos_ids(model: nn.Module) -> list[int]:
    """The model's end-of-sequence ids (generation config first); [] when it has none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor, *,
           nucleus: bool = True) -> torch.Tensor:
    """Every row's next token, on the logits' device: greedy where its temperature is 0, else drawn
    from the tempered distribution cut to its top-p nucleus.

    ``logits`` (rows, vocabulary); ``temperature``, ``top_p`` and ``uniforms`` (rows,), a row's
    uniform in [0, 1) picking its token by the inverse of the cumulative distribution (the draw is
    the row's alone, whatever else is in the batch). ``nucleus=False`` skips the sort when no row
    has top_p < 1. Nothing is copied to the host."""
    greedy = logits.argmax(-1)
    hot = temperature > 0
    probs = torch.softmax(logits / torch.where(hot, temperature, 1.0)[:, None], dim=-1)
    if nucleus:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        probs = torch.where(probs.cumsum(-1) - probs < top_p[:, None], probs, 0.0)  # the smallest set reaching top_p
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True)
    index = torch.minimum(index, (cdf < cdf[:, -1:]).sum(-1, keepdim=True))  # rounding never picks past the last kept
    token = (order.gather(-1, index) if nucleus else index).squeeze(-1)
    return torch.where(hot, token, greedy)


class TextStream:
    """One row's text, a piece per token, equal in sum to ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Each step decodes only the tokens since the last piece, behind the tokens of that piece as
    context (spaces, word pieces and multi-byte characters depend on the neighbours): a window of a
    few tokens, so a long output costs linear work, not a full decode per token. A piece ending in
    an incomplete character waits for the next token. Fast tokenizers are decoded by their Rust
    backend directly unless the Python tokenizer cleans up spaces after it.
    """

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        if getattr(tokenizer, "is_fast", False) and backend is not None and not cleans_up:
            self._decode: Callable[[list[int]], str] = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.window: list[int] = []  # the last piece's tokens (context), then the tokens held since
        self.held = 0
        self.context = ""  # the context tokens' text, decoded on their own

    def push(self, token: int) -> str:
        """Add a token; returns the new text it completes (possibly empty)."""
        self.window.append(token)
        self.held += 1
        text = self._decode(self.window)
        if len(text) > len(self.context) and not text.endswith("\ufffd"):
            return self._advance(text)
        if self.held >= MAX_HELD_TOKENS:  # keep the window bounded
            if len(text) <= len(self.context):  # held tokens that show nothing (skipped special tokens)
                del self.window[-self.held:]
                self.held = 0
                return ""
            return self._advance(text)  # bytes that never formed a character: shown as a full decode shows them
        return ""

    def finish(self) -> str:
        """Whatever is still held back at the end (an incomplete character), as a full decode shows it."""
        return self._advance(self._decode(self.window)) if self.held else ""

    def _advance(self, text: str) -> str:
        piece = text[len(self.context):]
        del self.window[: len(self.window) - self.held]
        self.held = 0
        self.context = self._decode(self.window)
        return piece


class StopStrings:
    """Cuts a row's text at the first stop string, looking at each piece once.

    Text that could be the start of a stop string is held back (at most the longest stop's length
    minus one characters) until the next piece shows whether it is; only that tail and the new
    piece are searched."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""

    def release(self, new: str) -> tuple[str, bool]:
        """The text that may go to the client now, and whether a stop string ended the row there."""
        if not self.stops:
            return new, False
        text = self.held + new
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held = ""
            return text[: min(cuts)], True
        keep = self._partial_stop(text)
        self.held = text[len(text) - keep:]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        for k in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class Row:
    """One request's decoding state on the host: its text, its result, and who hears of it."""

    def __init__(self, request: GenerationRequest, tokenizer: Any,
                 on_update: Callable[[str, Generation], None] | None = None):
        if request.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.request = request
        self.on_update = on_update
        self.text = TextStream(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(request.stop)
        self.result = Generation()
        self.stopped = False
        self.cancelled = False  # its client went away: it leaves at the next step, quietly
        self.result.finish_reason = self._reason(stopped=False, eos=False)  # max_tokens 0 ends at once

    @property
    def done(self) -> bool:
        return self.result.finish_reason is not None

    @property
    def hot(self) -> bool:
        """Sampled (else greedy): a temperature too small to divide by is greedy."""
        return self.request.temperature >= MIN_TEMPERATURE

    def add(self, token: int, eos: bool) -> str:
        """Record a chosen token (``eos``: it ends the sequence); returns the text released by it."""
        tokens = self.result.tokens
        tokens.append(token)
        last = eos or len(tokens) >= self.request.max_tokens
        piece, stopped = "", False
        if self.text is not None:
            piece, stopped = self.stops.release(self.text.push(token) + (self.text.finish() if last else ""))
            if last and not stopped:
                piece += self.stops.flush()
        if piece:
            self.result.pieces.append(piece)
        self.stopped = stopped
        self.result.finish_reason = self._reason(stopped=stopped, eos=eos)
        if self.on_update and (piece or self.done):
            self.on_update(piece, self.result)
        return piece

    def _reason(self, *, stopped: bool, eos: bool) -> str | None:
        tokens, max_tokens = len(self.result.tokens), self.request.max_tokens
        return finish_reason(stopped=stopped, eos=eos, tokens=tokens, max_tokens=max_tokens)

    def uniforms(self) -> torch.Tensor:
        """The row's uniform draw for each of its tokens, from its own seed: whatever batch it is in, a
        row samples what it samples alone."""
        if not self.hot:
            return torch.zeros(self.request.max_tokens)
        generator = torch.Generator().manual_seed(self.request.seed % 2**64)
        return torch.rand(self.request.max_tokens, generator=generator)


class Decoder:
    """Rows decoding together, joining and leaving between steps (continuous batching) over one
    :class:`~peft_methods.adapter_bank.DecodingBatch`.

    ``join(rows)`` prefills new rows (their own forward) and chooses their first tokens; ``step()``
    feeds every row its last token and chooses the next. A row that finishes (end-of-sequence, a stop
    string, ``max_tokens``) or is cancelled leaves at once: its cache columns go, and it costs nothing
    more. Each forward is followed by one wait for the device: the chosen ids and end-of-sequence flags
    (2 × rows numbers); the rows' sampling settings and draws live on the device beside them.
    """

    def __init__(self, bank: AdapterBank):
        self.bank = bank
        self.eos = eos_ids(bank.model)
        self.batch = DecodingBatch(bank)
        self.rows: list[Row] = []
        self.ids: torch.Tensor | None = None  # each row's last chosen token, on the device
        self.temperature = self.top_p = self.uniforms = self.count = None  # (rows,), (rows,), (rows, k), (rows,)
        self._eos: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def adapters(self) -> set[Hashable]:
        return {row.request.adapter for row in self.rows} - {None}

    def join(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` and choose their first tokens (rows already finished, e.g. ``max_tokens`` 0,
        are reported and never join). If the prompts' forward fails, the running rows are untouched."""
        for row in rows:
            if row.done and row.on_update:
                row.on_update("", row.result)
        rows = [row for row in rows if not row.done and not row.cancelled]
        if not rows:
            return
        logits = self.batch.join([r.request.prompt_ids for r in rows], [r.request.adapter for r in rows])
        device = logits.device

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        temperature = put([r.request.temperature if r.hot else 0.0 for r in rows], torch.float32)
        top_p = put([r.request.top_p for r in rows], torch.float32)
        draws = [r.uniforms() for r in rows]
        uniforms = torch.zeros(len(rows), max(d.numel() for d in draws))
        for i, d in enumerate(draws):
            uniforms[i, : d.numel()] = d
        uniforms = uniforms.to(device, non_blocking=True)
        count = torch.zeros(len(rows), dtype=torch.long, device=device)
        if self._eos is None:
            self._eos = put(self.eos, torch.long)
        ids = self._choose(logits, rows, temperature, top_p, uniforms, count)
        if self.rows:
            width = max(self.uniforms.shape[1], uniforms.shape[1])
            self.uniforms = torch.cat([_pad_right(self.uniforms, width), _pad_right(uniforms, width)])
            self.temperature = torch.cat([self.temperature, temperature])
            self.top_p = torch.cat([self.top_p, top_p])
            self.count = torch.cat([self.count, count + 1])
            self.ids = torch.cat([self.ids, ids])
        else:
            self.temperature, self.top_p, self.uniforms = temperature, top_p, uniforms
            self.count, self.ids = count + 1, ids
        self.rows = self.rows + list(rows)
        self._settle(self.rows)

    def step(self) -> None:
        """One token for every running row."""
        if not self.rows:
            return
        logits = self.batch.step(self.ids)
        self.ids = self._choose(logits, self.rows, self.temperature, self.top_p, self.uniforms, self.count)
        self.count = self.count + 1
        self._settle(self.rows)

    def drop_cancelled(self) -> None:
        self._keep([i for i, row in enumerate(self.rows) if not row.cancelled])

    def clear(self) -> list[Row]:
        """Drop every row (after a failure); returns them."""
        rows, self.rows = self.rows, []
        self.batch.close()
        self.batch = DecodingBatch(self.bank)
        self.ids = self.temperature = self.top_p = self.uniforms = self.count = None
        return rows

    def _choose(self, logits: torch.Tensor, rows: Sequence[Row], temperature: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Each row's next token (on the device), recorded on the host after the step's one wait."""
        if any(r.hot for r in rows):
            draw = uniforms.gather(1, count.clamp_max(uniforms.shape[1] - 1)[:, None]).squeeze(1)
            nucleus = any(r.hot and r.request.top_p < 1 for r in rows)
            ids = sample(logits, temperature, top_p, draw, nucleus=nucleus)
        else:
            ids = logits.argmax(-1)
        eos = torch.isin(ids, self._eos)
        tokens, flags = torch.stack([ids, eos.to(ids.dtype)]).tolist()  # the step's one wait
        for row, token, flag in zip(rows, tokens, flags):
            row.add(token, eos=bool(flag))
        return ids

    def _settle(self, rows: list[Row]) -> None:
        self._keep([i for i, row in enumerate(rows) if not row.done and not row.cancelled])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.batch.keep(keep)
        if not keep:
            self.ids = self.temperature = self.top_p = self.uniforms = self.count = None
            return
        index = torch.tensor(keep, dtype=torch.long).to(self.ids.device, non_blocking=True)
        self.ids, self.temperature, self.top_p, self.uniforms, self.count = (
            t.index_select(0, index) for t in (self.ids, self.temperature, self.top_p, self.uniforms, self.count))


def _pad_right(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else torch.cat([t, t.new_zeros(t.shape[0], width - t.shape[1])], dim=1)


def generate(bank: AdapterBank, requests: Sequence[GenerationRequest], tokenizer: Any = None,
             on_update: Callable[[int, str, Generation], None] | None = None) -> list[Generation]:
    """Sample continuations for rows that use different adapters, in one batch with a KV cache: all
    join at once and each leaves when it ends (a :class:`Decoder` no one else joins).

    Rows end at a stop string (needs ``tokenizer``), end-of-sequence or ``max_tokens``.
    ``on_update(row, piece, result)`` is called whenever a row releases text or finishes
    (``result.finish_reason`` is then set). Without a tokenizer only token ids are produced."""
    def hook(i: int):
        return (lambda piece, result: on_update(i, piece, result)) if on_update else None

    rows = [Row(r, tokenizer, hook(i)) for i, r in enumerate(requests)]
    decoder = Decoder(bank)
    try:
        decoder.join(rows)
        while len(decoder):
            decoder.step()
    finally:
        decoder.clear()
    return [row.result for row in rows]
