"""The serving engine under open load: rows join a running batch at the next step and leave when they
end or their client goes, each row computing exactly what it would alone; a failure stays with its
request (an adapter that cannot load, a deleted adapter, a store or storage that fails), adapters in
use are never evicted, and degenerate sampling settings are served per row. Real models, a real
SQLite store and real adapter files; no Ray needed."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil

import pytest
import torch
import transformers

import peft_methods
from jobs.base_models import resolve_base_model
from jobs.store import JobStore
from orchestrator.serving.decoding import Decoder, GenerationRequest, Row, generate
from orchestrator.serving.engine import AdapterResolver, ApiError, Engine, Finished
from peft_methods import registry
from peft_methods.adapter_bank import AdapterBank
from peft_methods.adapter_files import read_adapter
from tests.conftest import SHARED_MODELS, randomize_adapter


def _decoder(vocab: int = 97) -> transformers.LlamaForCausalLM:
    """A tiny random decoder whose next token depends on its context (at the default initialisation a
    model this small mostly repeats its last token, which would hide a row that lost its context)."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, initializer_range=0.2,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=None,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def _adapter(case_model, config: dict, folder, seed: int, metadata: dict | None = None):
    model = peft_methods.apply(case_model, config)
    torch.manual_seed(seed)
    randomize_adapter(model, scale=0.5)
    return peft_methods.save_adapter(model, folder, metadata=metadata or {})


def _greedy_alone(folder, prompt: list[int], n: int) -> list[int]:
    """The reference: the adapter loaded the ordinary way, full forwards of the whole sequence."""
    model = _decoder() if folder is None else peft_methods.load_adapter(_decoder(), folder).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_rows_joining_and_leaving_mid_decoding_each_generate_what_they_generate_alone(tmp_path):
    folders = {name: _adapter(_decoder(), {"method": name}, tmp_path / name, i)
               for i, name in enumerate(("lora", "prompt_tuning", "prefix_tuning", "bitfit"))}
    bank = AdapterBank(_decoder(), capacity=8)
    for name, folder in folders.items():
        config, state, _ = read_adapter(folder)
        bank.load(name, config, state)
    plan = {"a": ([5, 6, 7, 8, 9, 10], None, 9), "b": ([11, 12], "lora", 3), "c": ([13, 14, 15], "prefix_tuning", 6),
            "d": ([16] * 7, "prompt_tuning", 5), "e": ([17, 18], "bitfit", 4)}
    rows = {k: Row(GenerationRequest(p, a, max_tokens=n), None) for k, (p, a, n) in plan.items()}
    sampled = GenerationRequest([19, 20, 21], "lora", max_tokens=6, temperature=0.9, top_p=0.9, seed=5)
    rows["s"] = Row(sampled, None)
    decoder, sizes = Decoder(bank), []
    decoder.join([rows["a"], rows["b"]])
    for _ in range(3):  # b ends after its third token: it leaves before anyone joins
        decoder.step()
        sizes.append(len(decoder))
    decoder.join([rows["c"], rows["d"], rows["s"]])  # c brings a prefix, d a prompt: new widths in the cache
    sizes.append(len(decoder))
    decoder.step()
    decoder.join([rows["e"]])
    while len(decoder):
        decoder.step()
        sizes.append(len(decoder))
    assert sizes[:4] == [2, 1, 1, 4] and sizes[-1] == 0, sizes
    for key, (prompt, adapter, n) in plan.items():
        assert rows[key].result.tokens == _greedy_alone(folders.get(adapter), prompt, n), key
    assert rows["s"].result.tokens == generate(bank, [sampled])[0].tokens  # its draws are its own
    assert len({tuple(r.result.tokens) for r in rows.values()}) == len(rows)


# -- the engine: a random tiny decoder over SmolLM2's vocabulary, no adapters -------------------------

class _BaseOnly:
    names: dict = {}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny random decoder with SmolLM2's tokenizer, saved as a base model folder."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS))
    _random_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(base_folder):
    return transformers.AutoTokenizer.from_pretrained(base_folder)


def _random_llama() -> transformers.LlamaForCausalLM:
    return _decoder(vocab=49152)


async def _collect(queue) -> tuple[list[str], object]:
    pieces = []
    while not isinstance(item := await queue.get(), (Finished, ApiError)):
        pieces.append(item)
    return pieces, item


def _run(coroutine, timeout: float = 120):
    """Run a test's requests; a request the engine lost fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": []}


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_a_request_arriving_mid_generation_joins_at_the_next_step(tokenizer, scheduler):
    engine = Engine(AdapterBank(_random_llama(), capacity=1), tokenizer, _BaseOnly(), max_positions=4096,
                    scheduler=scheduler)
    order = []

    async def main():
        long = await engine.generate(None, [5, 6, 7], max_tokens=150, **GREEDY)
        first = await long.get()  # the long row is decoding
        short = await engine.generate(None, [8, 9], max_tokens=5, **GREEDY)

        async def watch(name, queue):
            _, done = await _collect(queue)
            order.append((name, engine.steps))
            return done

        return first, await asyncio.gather(watch("long", long), watch("short", short))

    first, (long_done, short_done) = _run(main())
    assert long_done == Finished("length", 150) and short_done == Finished("length", 5)
    steps = dict(order)
    if scheduler == "continuous":  # it joined the running batch and was done ~5 steps later
        assert [name for name, _ in order] == ["short", "long"] and steps["short"] < 20, order
        assert any(b["size"] == 2 and b["joined"] == 1 for b in engine.batches), engine.batches
    else:  # the static baseline: it waited for the whole running batch
        assert [name for name, _ in order] == ["long", "short"] and steps["short"] >= 150, order


def test_a_cancelled_row_leaves_at_the_next_step_and_the_server_goes_on(tokenizer):
    engine = Engine(AdapterBank(_random_llama(), capacity=1), tokenizer, _BaseOnly(), max_positions=4096)

    async def main():
        queue = await engine.generate(None, [5, 6, 7], max_tokens=3000, **GREEDY)
        await queue.get()
        engine.cancel(queue)  # the client went away
        await asyncio.sleep(0.3)
        left_at, rows = engine.steps, len(engine.decoder)
        await asyncio.sleep(0.3)
        idle = engine.steps == left_at  # nothing decodes any more
        after = await _collect(await engine.generate(None, [8, 9], max_tokens=4, **GREEDY))
        return left_at, rows, idle, after

    left_at, rows, idle, (pieces, done) = _run(main())
    assert rows == 0 and idle and left_at < 1000, (rows, left_at)  # it left long before its 3,000 tokens
    assert done == Finished("length", 4) and pieces


def test_degenerate_sampling_settings_are_served_per_row(tokenizer):
    engine = Engine(AdapterBank(_random_llama(), capacity=1), tokenizer, _BaseOnly(), max_positions=4096)
    greedy = generate(engine.bank, [GenerationRequest([5, 6, 7], max_tokens=8)], tokenizer)[0].text
    hot = {"temperature": 1.0, "top_p": 1.0, "stop": []}

    async def main():
        queues = [await engine.generate(None, [5, 6, 7], max_tokens=8, temperature=1e-40, top_p=1.0, seed=1, stop=[]),
                  await engine.generate(None, [5, 6, 7], max_tokens=8, seed=2**64 - 1, **hot),
                  await engine.generate(None, [5, 6, 7], max_tokens=8, seed=-5, **hot),
                  await engine.generate(None, [5, 6, 7], max_tokens=8, temperature=2.0, top_p=1e-9, seed=3, stop=[]),
                  await engine.generate(None, [5, 6, 7], max_tokens=8, **GREEDY)]
        return await asyncio.gather(*map(_collect, queues))

    results = _run(main())
    assert all(done == Finished("length", 8) for _, done in results), results
    texts = ["".join(p) for p, _ in results]
    assert texts[0] == texts[3] == texts[4] == greedy  # a vanishing temperature or nucleus is greedy
    assert texts[1] != greedy and texts[2] != greedy  # extreme seeds still sample


def test_the_engine_reports_a_loop_that_ended(tokenizer):
    engine = Engine(AdapterBank(_random_llama(), capacity=1), tokenizer, _BaseOnly())

    async def main():
        engine.start()
        engine.check()  # running: healthy
        engine._loop_task.cancel()
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="serving loop ended"):
            engine.check()

    _run(main())


# -- failures stay with their request: a real store and registered adapters ------------------------

@pytest.fixture
def served(tmp_path, base_folder, tokenizer):
    """A tiny decoder registered as a base in a real SQLite store, adapters for it: four LoRA, one IA³."""
    base = base_folder
    (tmp_path / "db").mkdir()
    store = JobStore(f"sqlite:///{tmp_path / 'db' / 'store.db'}", home=tmp_path / "home")
    fingerprint = store.register_base_model(str(base)).fingerprint
    folders, loaded = {}, transformers.AutoModelForCausalLM.from_pretrained(base)
    for i, name in enumerate(("good", "other", "third", "gone", "alien")):
        model = copy.deepcopy(loaded)
        config = {"method": "ia3"} if name == "alien" else {"method": "lora", "r": 4}  # ia3: the example plugin
        folders[name] = _adapter(model, config, tmp_path / "out" / name, i, {"base_fingerprint": fingerprint})
        store.adapters.register(folders[name], name=name, base_fingerprint=fingerprint, task="causal-lm",
                                task_name=name)
    resolver = AdapterResolver(store, str(base), fingerprint, None)

    def engine(capacity: int = 8) -> Engine:
        model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        return Engine(AdapterBank(model, capacity=capacity), tokenizer, resolver, max_positions=2048)

    return store, resolver, engine, folders, tmp_path


def _alone(engine: Engine, adapter_folder, prompt: list[int], n: int) -> list[int]:
    bank = AdapterBank(transformers.AutoModelForCausalLM.from_pretrained(engine.bank.model.name_or_path).eval())
    key = None
    if adapter_folder is not None:
        config, state, _ = read_adapter(adapter_folder)
        bank.load("x", config, state)
        key = "x"
    return generate(bank, [GenerationRequest(prompt, key, max_tokens=n)])[0].tokens


def test_an_adapter_that_cannot_load_fails_only_its_own_request(served, monkeypatch):
    store, resolver, make_engine, folders, tmp_path = served
    engine = make_engine()
    ids = {name: resolver.resolve(name) for name in ("good", "gone", "alien", "third")}
    store.adapters.delete("gone", force=True)  # deleted between the lookup and the batch
    monkeypatch.delitem(registry._registry(), "ia3")  # this replica lacks the plugin "alien" was trained with
    weights = store.adapters.local_folder(ids["third"])  # its storage fails: the files are gone
    shutil.rmtree(weights)

    async def main():
        queues = [await engine.generate(ids[name], [5, 6, 7], max_tokens=4, **GREEDY)
                  for name in ("good", "gone", "alien", "third")]
        queues.append(await engine.generate(None, [5, 6, 7], max_tokens=4, **GREEDY))
        results = await asyncio.gather(*map(_collect, queues))
        engine.check()  # the loop lives on
        return results

    results = _run(main())
    good, gone, alien, third, base = (done for _, done in results)
    assert good == Finished("length", 4) and base == Finished("length", 4)
    for error in (gone, alien, third):
        assert isinstance(error, ApiError) and error.status in (400, 404, 500), error
        assert str(tmp_path) not in error.message and "Traceback" not in error.message, error.message
    assert alien.status == 400 and "unknown PEFT method 'ia3'" in alien.message  # says what is missing
    assert results[0][0] and "".join(results[0][0]) != "".join(results[4][0])  # the adapter changed the output


def test_a_store_that_fails_fails_the_requests_that_need_it_and_the_next_request_succeeds(served):
    store, resolver, make_engine, folders, tmp_path = served
    engine = make_engine()
    good = resolver.resolve("good")

    async def main():
        os.rename(tmp_path / "db", tmp_path / "db-away")  # the store is down: its database cannot be opened
        store.db.engine.dispose()
        down = await _collect(await engine.generate(good, [5, 6, 7], max_tokens=3, **GREEDY))
        os.rename(tmp_path / "db-away", tmp_path / "db")
        up = await _collect(await engine.generate(good, [5, 6, 7], max_tokens=3, **GREEDY))
        engine.check()
        return down, up

    (_, down), (pieces, up) = _run(main())
    assert isinstance(down, ApiError) and down.status == 500 and down.type == "server_error"
    assert up == Finished("length", 3) and pieces


def test_adapters_in_use_are_never_evicted_a_request_waits_for_a_slot_instead(served):
    store, resolver, make_engine, folders, tmp_path = served
    engine = make_engine(capacity=2)
    keys = {name: resolver.resolve(name) for name in ("good", "other", "third")}
    plan = {"good": ([5, 6, 7], 40), "other": ([8, 9], 25), "third": ([10, 11, 12], 6)}

    async def main():
        first = await engine.generate(keys["good"], plan["good"][0], max_tokens=plan["good"][1], **GREEDY)
        piece = await first.get()  # "good" is decoding: both slots will be in use once "other" joins
        rest = [await engine.generate(keys[n], plan[n][0], max_tokens=plan[n][1], **GREEDY) for n in ("other", "third")]
        results = await asyncio.gather(*map(_collect, [first, *rest]))
        return [([piece, *results[0][0]], results[0][1]), *results[1:]]

    results = _run(main())
    assert all(isinstance(done, Finished) for _, done in results), results
    names = resolver.names
    together = [set(b["adapters"]) for b in engine.batches if b["kind"] == "generate"]
    assert {"good", "other"} in together and not any({"good", "other", "third"} <= t for t in together), together
    assert names[keys["third"]] == "third"
    for name, (prompt, n) in plan.items():  # nobody's deltas vanished mid-generation
        tokens = _alone(engine, folders[name], prompt, n)
        text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        (pieces, _) = results[list(plan).index(name)]
        assert "".join(pieces) == text, name
