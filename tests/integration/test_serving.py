"""Serving many adapters from one base: real Ray Serve on the local cluster, real HTTP requests.

What the server answers is checked against an independent reference: each adapter loaded the
ordinary way (``peft_methods.load_adapter`` onto a fresh base, from the folder it was saved to before
registration) and run plainly, one full forward per token: no adapter bank, batching or KV cache."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import transformers
from ray import serve

import peft_methods
from jobs.base_models import resolve_base_model
from jobs.training.prompts import prompt_ids
from orchestrator import Client
from tests.conftest import SHARED_MODELS, randomize_adapter

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = {"lora": {"method": "lora", "r": 4}, "prompt": {"method": "prompt_tuning", "num_virtual_tokens": 4},
            "bitfit": {"method": "bitfit"}, "bottleneck": {"method": "bottleneck"}}


def _tiny_llama(folder, seed: int):
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS)).save_pretrained(
        folder
    )
    return folder


def _register(client, base_folder, name, config, *, task="causal-lm", task_name="qa", seed=0, labels=None):
    """Save a randomized adapter and register it; returns the folder it was saved to (the reference's copy)."""
    fingerprint = client.store.register_base_model(str(base_folder)).fingerprint
    loader = (
        transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    )
    kwargs = {} if task == "causal-lm" else {"num_labels": len(labels)}
    torch.manual_seed(seed)  # the method's own initialization (LoRA's A, prompt tuning's tokens) follows the seed
    model = peft_methods.apply(loader.from_pretrained(base_folder, **kwargs).eval(), config)
    randomize_adapter(model, scale=0.5)
    folder = peft_methods.save_adapter(
        model,
        base_folder.parent / f"out-{name}-{seed}",
        metadata={"base_fingerprint": fingerprint, **({"labels": labels} if labels else {})},
    )
    client.adapters.register(folder, name=name, base_fingerprint=fingerprint, task=task, task_name=task_name)
    return folder


# The server's logits may differ from a plain forward's by float rounding (its mixed batches reorder sums;
# tests/peft_methods/test_mixed_batch.py holds them to 2e-5). A greedy pick is comparable only where the
# reference's best token leads the next by more than that: the reference asserts a lead above MARGIN.
MARGIN = 1e-4


@functools.lru_cache(maxsize=None)
def _plain_model(base: str, folder: str | None, num_labels: int | None = None):
    """The base, or a fresh base with the adapter in ``folder`` loaded the ordinary way, in eval mode."""
    if num_labels is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    return (model if folder is None else peft_methods.load_adapter(model, folder)).eval()


@functools.lru_cache(maxsize=None)
def _tokenizer(base: str):
    return transformers.AutoTokenizer.from_pretrained(base)


def _reference(base, folder, prompt: str | list[dict], max_tokens: int = 5) -> tuple[str, int]:
    """(text, completion tokens) the plain model generates greedily for a completion prompt (a string) or a
    chat (messages, prompted as training prompts them), stopping at end-of-sequence like the server."""
    model, tokenizer = _plain_model(str(base), folder and str(folder)), _tokenizer(str(base))
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = prompt_ids(tokenizer, prompt)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            top = logits.topk(2).values
            assert top[0] - top[1] > MARGIN, f"a near tie at token {len(new)}: pick another prompt ({folder})"
            new.append(int(logits.argmax()))
            if new[-1] in eos:
                break
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    base, other = _tiny_llama(root / "base", 0), _tiny_llama(root / "other", 1)
    client = Client(home=root / "home")
    folders = {str(base): None}  # model name -> the folder its reference loads (None: the plain base)
    for i, (name, config) in enumerate(ADAPTERS.items()):
        folders[name] = _register(client, base, name, config, seed=i, task_name=f"task-{name}")
    _register(client, other, "other-base", {"method": "lora"})
    client.adapters.promote("lora")
    serving = client.serve(str(base), capacity=3, api_key=KEY, port=8123, max_batch_size=16, batch_wait_s=0.3,
                           cpus_per_replica=0.5, name="llm")
    yield client, serving, base, folders
    serving.stop()


def _complete(url, model, prompt="hello there", **kw):
    r = requests.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0, **kw},
        headers=AUTH,
        timeout=120,
    )
    return r


def _answer(response) -> tuple[str, int]:
    """(text, completion tokens) of a completion response, which must have succeeded."""
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["text"], body["usage"]["completion_tokens"]


def test_models_lists_the_base_and_its_adapters_only(server):
    client, serving, base, _ = server
    r = requests.get(f"{serving.url}/v1/models", headers=AUTH, timeout=60)
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[0] == str(base) and sorted(ids[1:]) == sorted(ADAPTERS)


def test_each_row_of_a_mixed_batch_generates_what_its_own_adapter_does_alone(server):
    """Rows of three adapters and the base, prompts of different lengths, one prompt under three
    models: served alone and in one batch, every row's text and token count are its own plain model's."""
    _, serving, base, folders = server
    rows = [(str(base), "hello there"), ("lora", "once upon a time"), ("prompt", "hello there"),
            ("bitfit", "what is the answer to it"), ("lora", "hello there")]  # three adapters fit the bank of 3
    expected = [_reference(base, folders[model], prompt) for model, prompt in rows]
    plain = [_reference(base, None, prompt) for _, prompt in rows[1:]]
    assert all(want != base_text for want, base_text in zip(expected[1:], plain)), "an adapter changed nothing"

    alone = [_answer(_complete(serving.url, model, prompt)) for model, prompt in rows]
    with ThreadPoolExecutor(len(rows)) as pool:
        together = [_answer(r) for r in pool.map(lambda row: _complete(serving.url, *row), rows)]
    assert alone == expected
    assert together == expected
    batches = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["batches"]
    assert any({"lora", "prompt", "bitfit"} <= set(b["adapters"]) for b in batches), batches  # one mixed batch


def test_stats_say_where_the_replica_serves(server):
    _, serving, _, _ = server
    stats = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()
    assert (stats["device"], stats["dtype"]) == ("cpu", "fp32")  # auto, on a replica that reserved no GPU


def test_lru_evicts_and_reloads_with_the_same_results(server):
    _, serving, base, folders = server
    assert _answer(_complete(serving.url, "lora")) == _reference(base, folders["lora"], "hello there")
    for name in ("bottleneck", "prompt", "bitfit"):  # three others through a bank of three: lora is evicted
        assert _answer(_complete(serving.url, name)) == _reference(base, folders[name], "hello there"), name
    loaded = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["loaded"]
    assert "lora" not in loaded and len(loaded) == 3
    assert _answer(_complete(serving.url, "lora")) == _reference(base, folders["lora"], "hello there")  # reloaded
    assert requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["loaded"][-1] == "lora"


def test_task_names_reach_the_promoted_adapter_and_new_adapters_need_no_restart(server):
    client, serving, base, folders = server
    r = _complete(serving.url, "task-lora")  # lora is the task's promoted adapter
    assert r.json()["model"] == "task-lora" and _answer(r) == _reference(base, folders["lora"], "hello there")
    assert _complete(serving.url, "late").status_code == 404
    old = _register(client, base, "late", {"method": "lora", "r": 2}, seed=9)
    r = _complete(serving.url, "late")
    assert r.json()["model"] == "late" and _answer(r) == _reference(base, old, "hello there")
    client.adapters.delete("late")  # replaced under the same name: the server must not keep the old weights
    new = _register(client, base, "late", {"method": "lora", "r": 2}, seed=10)
    assert _reference(base, new, "hello there") != _reference(base, old, "hello there")  # tells them apart
    assert _answer(_complete(serving.url, "late")) == _reference(base, new, "hello there")


def test_errors_come_back_in_openai_shape_and_the_server_stays_up(server):
    client, serving, base, _ = server
    url = serving.url
    cases = [
        (_complete(url, "no-such-adapter"), 404, "model_not_found"),
        (_complete(url, "other-base"), 400, "wrong_base_model"),
        (_complete(url, "lora", prompt="word " * 80), 400, "context_length_exceeded"),
        (
            _complete(url, "prompt", prompt="word " * 58),
            400,
            "context_length_exceeded",
        ),  # fits only without the 4 virtual tokens
        (
            requests.post(
                f"{url}/v1/completions",
                data="{not json",
                headers={**AUTH, "Content-Type": "application/json"},
                timeout=60,
            ),
            400,
            "invalid_json",
        ),
        (
            requests.post(f"{url}/v1/completions", json={"model": "lora"}, headers=AUTH, timeout=60),
            422,
            "invalid_value",
        ),
        (_complete(url, "lora", temperature=-1), 422, "invalid_value"),
        (requests.get(f"{url}/v1/models", timeout=60), 401, "invalid_api_key"),
        (
            requests.post(f"{url}/v1/classify", json={"model": "lora", "input": "x"}, headers=AUTH, timeout=60),
            400,
            "wrong_task",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and "type" in error
    assert _complete(url, "lora").status_code == 200

    # A tampered artifact is refused when loaded; other adapters keep working.
    _register(client, base, "tampered", {"method": "lora", "r": 2}, seed=3)
    weights = client.adapters.local_folder("tampered") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    r = _complete(url, "tampered")
    assert r.status_code == 500 and r.json()["error"]["code"] == "adapter_integrity_error"
    assert _complete(url, "bitfit").status_code == 200


def test_streaming_sends_the_same_text_as_events(server):
    _, serving, base, folders = server
    full, _ = _answer(_complete(serving.url, "prompt"))
    assert full == _reference(base, folders["prompt"], "hello there")[0]
    r = requests.post(
        f"{serving.url}/v1/completions",
        json={"model": "prompt", "prompt": "hello there", "max_tokens": 5, "temperature": 0, "stream": True},
        headers=AUTH,
        stream=True,
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completions_are_the_plain_models_answer_to_the_training_prompt(server):
    _, serving, base, folders = server
    messages = [{"role": "user", "content": "hi"}]
    r = requests.post(
        f"{serving.url}/v1/chat/completions",
        json={"model": "lora", "messages": messages, "max_tokens": 4, "temperature": 0},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    answer = (body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"])
    assert answer == _reference(base, folders["lora"], messages, max_tokens=4) and answer[1] == 4


def test_a_stop_string_cuts_the_text_where_it_first_appears(server):
    _, serving, base, folders = server
    text, _ = _reference(base, folders["bitfit"], "hello there", max_tokens=8)
    assert len(text.strip()) >= 2, f"too little text to take a stop string from: {text!r}"
    assert _answer(_complete(serving.url, "bitfit", max_tokens=8))[0] == text
    stop = text.strip()[-2:]
    cut = _complete(serving.url, "bitfit", max_tokens=8, stop=[stop]).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (text[: text.index(stop)], "stop")


def test_the_official_openai_client_works_unchanged(server):
    import openai

    _, serving, base, folders = server
    api = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in api.models.list()} >= {str(base), "lora", "prompt"}
    done = api.completions.create(model="lora", prompt="hello there", max_tokens=5, temperature=0)
    assert (done.choices[0].text, done.usage.completion_tokens) == _reference(base, folders["lora"], "hello there")
    streamed = "".join(
        c.choices[0].text
        for c in api.completions.create(model="lora", prompt="hello there", max_tokens=5, temperature=0, stream=True)
    )
    assert streamed == done.choices[0].text
    messages = [{"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model="prompt", messages=messages, max_tokens=3, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    assert chat.choices[0].message.content == _reference(base, folders["prompt"], messages, max_tokens=3)[0]
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="nope", prompt="x", max_tokens=1)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{serving.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_classification_adapters_and_two_replicas(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    base = root / "bert"
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(base)
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm")).save_pretrained(base)
    client = Client(home=root / "home")
    labels = {"sentiment": ["negative", "positive"], "topic": ["a", "b", "c"]}
    folders = {
        "sentiment": _register(client, base, "sentiment", {"method": "lora", "r": 4}, task="sequence-classification",
                               labels=labels["sentiment"]),
        "topic": _register(client, base, "topic", {"method": "bitfit"}, task="sequence-classification",
                           labels=labels["topic"], seed=1),
    }
    serving = client.serve(str(base), adapters=["sentiment", "topic"], num_replicas=2, port=8123, cpus_per_replica=0.5,
                           name="cls", route_prefix="/cls", batch_wait_s=0.3)
    try:
        status = serve.status().applications["cls"].deployments["AdapterServer"]
        assert status.replica_states.get("RUNNING") == 2
        texts = ["a fine film", "what a waste of time", "who wrote it?"]

        def post(model, text):
            return requests.post(f"{serving.url}/v1/classify", json={"model": model, "input": text}, timeout=120)

        def scores(model, text):  # the plain model's class probabilities, by label
            plain = _plain_model(str(base), str(folders[model]), len(labels[model]))
            with torch.no_grad():
                probs = plain(input_ids=torch.tensor([_tokenizer(str(base))(text)["input_ids"]])).logits[0].softmax(-1)
            return dict(zip(labels[model], probs.tolist()))

        def check(got, want, key):  # the same labels and, within 1e-5, the same probabilities
            assert got["scores"].keys() == want.keys() and got["label"] == max(want, key=want.get), (key, got, want)
            assert all(abs(got["scores"][k] - want[k]) < 1e-5 for k in want), (key, got, want)

        expected = {(m, t): scores(m, t) for m in ("sentiment", "topic") for t in texts}
        for want in expected.values():  # the top label is clear (no near tie for rounding to flip)
            top = sorted(want.values())
            assert top[-1] - top[-2] > 1e-4, want
        alone = {key: post(*key).json()["data"][0] for key in expected}
        with ThreadPoolExecutor(6) as pool:
            together = dict(zip(expected, pool.map(lambda k: post(*k).json()["data"][0], expected)))
        for key, want in expected.items():
            check(alone[key], want, key)
            check(together[key], want, key)
        batch = post("sentiment", texts).json()["data"]  # a list of inputs
        assert [d["index"] for d in batch] == [0, 1, 2]
        for text, got in zip(texts, batch, strict=True):
            check(got, expected[("sentiment", text)], text)
        r = requests.post(f"{serving.url}/v1/classify", json={"model": str(base), "input": "x"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_head"
    finally:
        serving.stop()
