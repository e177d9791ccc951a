"""Decoding for the server: mixed batches generate what each request generates alone, text is
decoded incrementally (each token a bounded number of times, however long the output), stop
strings spanning tokens are cut, and streamed pieces add up to the non-streamed text."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode

import peft_methods
from jobs.base_models import resolve_base_model
from orchestrator.serving.decoding import (
    ContextLengthExceeded,
    GenerationRequest,
    StopStrings,
    TextStream,
    check_context_length,
    finish_reason,
    generate,
    sample,
)
from orchestrator.serving.engine import ApiError, Engine, Finished
from peft_methods.adapter_bank import AdapterBank
from peft_methods.adapter_files import read_adapter
from tests.conftest import SHARED_MODELS, TINY_LLAMA, randomize_adapter

TEXT = "Héllo wörld! Ünïcode: 日本語のテキスト 🎉🚀 don't stop . , ? it's  double  space\n\nnew para ½ — end. über"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm"))


def _random_llama(eos: int | None = None) -> transformers.LlamaForCausalLM:
    """A tiny random LLaMA over SmolLM2's vocabulary: it never stops early unless told an EOS."""
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, eos_token_id=eos, bos_token_id=None,
                                   pad_token_id=None, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = eos
    return model


class CountingDecodes:
    """A tokenizer wrapper that counts every decode call and the ids it is given; ``fast`` also
    exposes a counting backend, as a fast tokenizer does."""

    def __init__(self, tokenizer, fast: bool):
        self.tokenizer, self.is_fast, self.calls, self.ids = tokenizer, fast, 0, 0
        self.clean_up_tokenization_spaces = False
        if fast:
            self.backend_tokenizer = self

    def decode(self, ids, **kwargs):
        self.calls, self.ids = self.calls + 1, self.ids + len(ids)
        target = self.tokenizer.backend_tokenizer if self.is_fast else self.tokenizer
        return target.decode(list(ids), **kwargs)


# -- text: incremental decoding and stop strings ---------------------------------------------------

@pytest.mark.parametrize("name", ["smollm2", "minilm"])
@pytest.mark.parametrize("fast", [True, False], ids=["backend", "window-of-decodes"])
def test_text_pieces_add_up_to_a_full_decode(name, fast, request):
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    rng = random.Random(0)
    cases = [tokenizer(TEXT, add_special_tokens=False)["input_ids"]]  # multi-byte characters split across tokens
    cases += [[rng.randrange(tokenizer.vocab_size) for _ in range(50)] for _ in range(60)]  # broken bytes too
    specials = tokenizer.all_special_ids * 20
    cases += [[*tokenizer("a b c", add_special_tokens=False)["input_ids"], *specials[:n],
               *tokenizer(" d é", add_special_tokens=False)["input_ids"]] for n in (2, 20)]  # skipped special tokens
    for ids in cases:
        stream = TextStream(CountingDecodes(tokenizer, fast))
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_are_found_across_pieces_and_what_might_start_one_waits():
    stops = StopStrings(["lo world", "XYZ"])
    released = [stops.release(p) for p in ["Hel", "lo wo", "rld"]]
    assert released == [("He", False), ("l", False), ("", True)]  # "l", then "lo wo" could start the stop: held back
    stops = StopStrings(["\n\n"])
    assert stops.release("one\n") == ("one", False)
    assert stops.release("two\n") == ("\ntwo", False)  # the held newline was not a stop after all
    assert stops.release("\nthree") == ("", True)
    stops = StopStrings(["abcd", "bc"])
    assert stops.release("xab") == ("x", False) and stops.release("c") == ("a", True)  # the first stop to complete
    stops = StopStrings(["never"])
    assert stops.release("nev") == ("", False) and stops.flush() == "nev"


def test_finish_reasons_and_context_length_are_one_rule_each():
    assert finish_reason(stopped=True, eos=False, tokens=3, max_tokens=8) == "stop"
    assert finish_reason(stopped=False, eos=True, tokens=8, max_tokens=8) == "stop"  # EOS on the last token
    assert finish_reason(stopped=False, eos=False, tokens=8, max_tokens=8) == "length"
    assert finish_reason(stopped=False, eos=False, tokens=0, max_tokens=0) == "length"
    assert finish_reason(stopped=False, eos=False, tokens=3, max_tokens=8) is None
    check_context_length(50, 4, 10, 64)
    check_context_length(50, 4, 10, None)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 64 tokens; the request needs 65"):
        check_context_length(50, 5, 10, 64)


# -- sampling -----------------------------------------------------------------------------------------

def test_sampling_inverts_each_rows_nucleus_distribution_on_the_device():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log()[None].repeat(6, 1)
    t, p = torch.ones(6), torch.ones(6)
    u = torch.tensor([0.0, 0.1, 0.55, 0.85, 0.95, 1.0])  # 1: as u × total may round up to the total
    for nucleus in (False, True):
        assert sample(logits, t, p, u, nucleus=nucleus).tolist() == [0, 0, 1, 2, 2, 2]  # never the 0-probability one
    # top_p 0.7 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375
    cut = sample(logits, t, torch.full((6,), 0.7), u)
    assert cut.tolist() == [0, 0, 0, 1, 1, 1]
    greedy = sample(logits, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), torch.tensor([1, 1, 1, 1e-6, 1e-6, 1e-6]), u)
    assert greedy.tolist() == [0, 0, 1, 0, 0, 0]  # temperature 0, or a nucleus of one token: the argmax

    # Many rows, one uniform each: the frequencies follow the tempered, cut distribution.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g).repeat(40000, 1)
    u = torch.rand(40000, generator=g)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.5, 0.6)):
        tokens = sample(logits, torch.full((40000,), temperature), torch.full((40000,), top_p), u, nucleus=top_p < 1)
        expected = torch.softmax(logits[0] / temperature, -1)
        ranked, order = expected.sort(descending=True)
        expected = torch.zeros(50).scatter(0, order, torch.where(ranked.cumsum(0) - ranked < top_p, ranked, 0))
        expected /= expected.sum()
        seen = torch.bincount(tokens, minlength=50) / 40000
        assert (seen - expected).abs().max() < 0.01, (temperature, top_p)
        assert (seen[expected == 0] == 0).all()


def test_a_seed_reproduces_its_sample_alone_or_in_any_batch():
    bank = AdapterBank(_random_llama(), capacity=1)
    request = GenerationRequest([5, 6, 7], max_tokens=10, temperature=1.0, top_p=0.95, seed=11)
    alone = generate(bank, [request])[0].tokens
    others = [GenerationRequest([9, 10], max_tokens=4, temperature=0.7, seed=3), GenerationRequest([8], max_tokens=12)]
    assert generate(bank, [others[0], request, others[1]])[1].tokens == alone == generate(bank, [request])[0].tokens
    assert generate(bank, [GenerationRequest([5, 6, 7], max_tokens=10, temperature=1.0, top_p=0.95, seed=12)]
                    )[0].tokens != alone


# -- generation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False], ids=["backend", "window-of-decodes"])
def test_each_generated_token_is_decoded_a_bounded_number_of_times(smollm2_tokenizer, fast):
    """Before, every token re-decoded the whole output to look for stop strings: N²/2 ids."""
    n = 300
    bank = AdapterBank(_random_llama(), capacity=1)
    for stop in ([], ["<never in this text>"]):
        tokenizer = CountingDecodes(smollm2_tokenizer, fast)
        result = generate(bank, [GenerationRequest([5, 6, 7], max_tokens=n, stop=stop)], tokenizer)[0]
        assert len(result.tokens) == n and result.finish_reason == "length"
        assert result.text == smollm2_tokenizer.decode(result.tokens, skip_special_tokens=True)
        assert tokenizer.calls <= 2 * n + 2 and tokenizer.ids <= 6 * n, (tokenizer.calls, tokenizer.ids)


def test_a_stop_string_spanning_tokens_cuts_the_text_and_ends_the_row(smollm2_tokenizer):
    bank = AdapterBank(_random_llama(), capacity=1)
    full = generate(bank, [GenerationRequest([5, 6, 7], max_tokens=40)], smollm2_tokenizer)[0]
    # a stop string covering parts of several tokens, well inside the text
    starts = [len(smollm2_tokenizer.decode(full.tokens[:k])) for k in range(len(full.tokens) + 1)]
    stop = full.text[starts[10] - 2: starts[13] + 2]
    assert full.text.find(stop) > 0
    pieces = []
    cut = generate(bank, [GenerationRequest([5, 6, 7], max_tokens=40, stop=[stop, "zzzzzz"])], smollm2_tokenizer,
                   on_update=lambda row, piece, result: pieces.append(piece))[0]
    assert cut.text == full.text[: full.text.find(stop)] and "".join(pieces) == cut.text
    assert cut.finish_reason == "stop" and 13 <= len(cut.tokens) <= 15  # ended as soon as the stop string was complete
    assert cut.tokens == full.tokens[: len(cut.tokens)]


def test_rows_end_independently_at_eos_stop_strings_and_max_tokens(smollm2_tokenizer):
    probe = generate(AdapterBank(_random_llama(), capacity=1), [GenerationRequest([5, 6, 7], max_tokens=6)])[0]
    eos = probe.tokens[3]
    bank = AdapterBank(_random_llama(eos=eos), capacity=1)
    requests = [GenerationRequest([5, 6, 7], max_tokens=9), GenerationRequest([8, 9], max_tokens=2),
                GenerationRequest([8, 9], max_tokens=0), GenerationRequest([10, 11, 12, 13], max_tokens=7)]
    finished = {}

    def on_update(row, piece, result):
        if result.finish_reason:
            assert row not in finished
            finished[row] = result.finish_reason

    out = generate(bank, requests, smollm2_tokenizer, on_update=on_update)
    assert out[0].tokens == probe.tokens[: probe.tokens.index(eos) + 1]  # stopped at its EOS, which it keeps
    assert [o.finish_reason for o in out] == ["stop", "length", "length", out[3].finish_reason]
    assert [len(o.tokens) for o in out][1:3] == [2, 0]
    assert finished == {i: o.finish_reason for i, o in enumerate(out)}  # every row reported its end once


def test_mixed_generation_equals_generating_each_request_alone(tmp_path):
    case, folders = TINY_LLAMA, {}
    for name in ("lora", "prompt_tuning", "bitfit", "prefix_tuning"):
        model = peft_methods.apply(case.fresh(), {"method": name})
        randomize_adapter(model, scale=0.5)
        folders[name] = peft_methods.save_adapter(model, tmp_path / name)
    bank = AdapterBank(case.fresh(), capacity=8)
    for name, folder in folders.items():
        config, state, _ = read_adapter(folder)
        bank.load(name, config, state)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18, 19, 20, 21]]
    requests = [GenerationRequest(p, k, max_tokens=6) for p, k in zip(prompts, [None, *folders])]
    # a sampled row too (its draws are its own: seed 3 happens to draw EOS at its second token)
    requests.append(GenerationRequest(prompts[0], "lora", max_tokens=6, temperature=0.8, top_p=0.9, seed=4))
    together = [g.tokens for g in generate(bank, requests)]
    alone = [generate(bank, [r])[0].tokens for r in requests]
    assert together == alone
    assert all(len(t) == 6 for t in together)
    assert len({tuple(t) for t in together[:5]}) > 1  # the adapters change what is generated


class HostWaits(TorchFunctionMode):
    """Records every torch call that makes the host wait for the device on a GPU (a copy to the host,
    a read of a value, an op whose output size depends on values), in order, with the model's
    forwards ("forward") between them, and whether it happened inside a forward. A blocking copy
    to a device counts, ``.to(device)`` or ``torch.tensor(data, device=...)`` (on the CPU every
    tensor is already there, so both directions look alike; on a GPU both wait); a non-blocking
    ``.to`` from the host is a plain copy to the device."""

    WAITS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
             "unique", "masked_select", "argwhere", "repeat_interleave"}

    def __init__(self, model):
        super().__init__()
        self.log, self.depth = [], 0
        model.register_forward_pre_hook(lambda m, a: self._enter())
        model.register_forward_hook(lambda m, a, o: setattr(self, "depth", self.depth - 1))

    def _enter(self):
        if self.depth == 0:
            self.log.append(("forward",))
        self.depth += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        blocking_copy = (name == "to" and not kwargs.get("non_blocking") and not (len(args) > 3 and args[3]) and any(
            str(a).startswith("cpu") for a in [*args[1:], kwargs.get("device")])) or (
            name in ("tensor", "as_tensor") and kwargs.get("device") is not None)
        if name in self.WAITS or blocking_copy:
            size = args[0].numel() if args and isinstance(args[0], torch.Tensor) else None
            self.log.append(("inside" if self.depth else "outside", name, size))
        return func(*args, **kwargs)

    def steps(self) -> list[list[tuple]]:
        """The log cut at each forward: [waits before the first forward, waits after forward 1, ...]."""
        out = [[]]
        for entry in self.log:
            if entry == ("forward",):
                out.append([])
            else:
                out[-1].append(entry)
        return out


def test_each_decoding_step_waits_for_the_device_once_and_never_copies_a_vocabulary(smollm2_tokenizer, tmp_path):
    """Sampling (greedy and nucleus) and end-of-sequence are worked out on the device; per step the host
    waits once, for the chosen ids and the rows' EOS flags (2 × rows numbers). Rows leaving (stop strings
    found on the host, max_tokens) and their adapters' routing add no wait. Inside the model, the mixed
    batch's adapters add no wait to what the base model's own forward does."""
    folders = {}
    for i, name in enumerate(("lora", "prompt_tuning", "bitfit", "far", "diff_pruning", "bottleneck")):
        model = peft_methods.apply(_random_llama(), {"method": name})
        torch.manual_seed(i)
        randomize_adapter(model, scale=0.5)
        folders[name] = peft_methods.save_adapter(model, tmp_path / name)
    keys = [None, *folders]
    plain, mixed = AdapterBank(_random_llama(eos=7), capacity=8), AdapterBank(_random_llama(eos=7), capacity=8)
    for name, folder in folders.items():
        config, state, _ = read_adapter(folder)
        mixed.load(name, config, state)
    prompts = [[5 + i] * (2 + i % 3) for i in range(len(keys))]  # rows of different lengths: padding
    counter = HostWaits(mixed.model)
    with counter:  # greedy rows only: no sampling at all
        greedy = generate(mixed, [GenerationRequest(p, k, max_tokens=12) for p, k in zip(prompts, keys)],
                          smollm2_tokenizer)
    assert [[e for e in entries if e[0] == "outside"] for entries in counter.steps()[1:]] == [
        [("outside", "tolist", 2 * len(keys))]] * 12
    first = greedy[0].text
    stop = first[len(first) // 2: len(first) // 2 + 3]

    def requests(adapters, prompts):
        return [GenerationRequest(p, k, max_tokens=12 - (i == 3) * 5 - (i == 5) * 12,
                                  temperature=0.9 if i % 2 else 0.0, top_p=0.8 if i % 4 == 1 else 1.0, seed=i,
                                  stop=[stop] if i == 0 else [])
                for i, (p, k) in enumerate(zip(prompts, adapters))]

    # The plain base on rows as long as the mixed rows with their virtual tokens: the same shapes.
    as_long = [[1] * mixed.prompt_length(k) + p for p, k in zip(prompts, keys)]
    waits = {}
    for name, bank, adapters, rows in (("plain", plain, [None] * len(keys), as_long), ("mixed", mixed, keys, prompts)):
        counter = HostWaits(bank.model)
        with counter:
            out = generate(bank, requests(adapters, rows), smollm2_tokenizer)
        waits[name] = counter.steps()
    assert out[0].finish_reason == "stop" and len(out[0].tokens) < 12  # a stop string ended a row early
    assert [o.finish_reason for o in out[3:6:2]] == ["length", "length"] and len(out[5].tokens) == 0
    before, *steps = waits["mixed"]
    assert len(steps) == 12  # one forward per step: the prompts', then 11 more
    assert before == []  # the rows' slots reach the router from the host's copy: no wait
    rows = []
    for step, entries in enumerate(steps):
        outside = [e for e in entries if e[0] == "outside"]
        assert [e[:2] for e in outside] == [("outside", "tolist")], f"step {step}: {outside}"
        rows.append(outside[0][2] // 2)
    # The row with max_tokens 0 never joins; finished rows leave at once (the stop string's, then max_tokens 7's).
    assert rows[0] == len(keys) - 1 and rows == sorted(rows, reverse=True) and rows[-1] < rows[0] - 1, rows
    inside = [[e for e in entries if e[0] == "inside"] for entries in waits["mixed"]]
    assert inside == [[e for e in entries if e[0] == "inside"] for entries in waits["plain"]]


# -- the engine: text pieces and one Finished per request ------------------------------------------

class _NoAdapters:
    names: dict = {}


def test_the_engine_sends_pieces_then_finished_and_streaming_adds_up(smollm2_tokenizer):
    bank = AdapterBank(_random_llama(), capacity=1)
    engine = Engine(bank, smollm2_tokenizer, _NoAdapters(), batch_wait_s=0.05, max_positions=64)
    full = generate(bank, [GenerationRequest([5, 6, 7], max_tokens=12)], smollm2_tokenizer)[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 4]

    async def run(**params):
        queue = await engine.generate(None, [5, 6, 7], **{"temperature": 0.0, "top_p": 1.0, "seed": 0, **params})
        items = []
        while not isinstance(item := await queue.get(), (Finished, ApiError)):
            items.append(item)
        return items, item

    async def main():
        return await asyncio.gather(run(max_tokens=12, stop=[]), run(max_tokens=12, stop=[stop]),
                                    run(max_tokens=62, stop=[]))

    (pieces, done), (cut, stopped), (_, refused) = asyncio.run(main())
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == full.text and done == Finished("length", 12)
    assert "".join(cut) == full.text[: full.text.find(stop)] and stopped.reason == "stop"
    assert isinstance(refused, ApiError) and refused.code == "context_length_exceeded"
