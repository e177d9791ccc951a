"""Serving many adapters from one base: real Ray Serve on the local cluster, real HTTP requests."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import transformers
from ray import serve

import peft_methods
from jobs.base_models import resolve_base_model
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
    fingerprint = client.store.register_base_model(str(base_folder)).fingerprint
    loader = (
        transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    )
    kwargs = {} if task == "causal-lm" else {"num_labels": len(labels)}
    model = peft_methods.apply(loader.from_pretrained(base_folder, **kwargs).eval(), config)
    torch.manual_seed(seed)
    randomize_adapter(model, scale=0.5)
    folder = peft_methods.save_adapter(
        model,
        base_folder.parent / f"out-{name}-{seed}",
        metadata={"base_fingerprint": fingerprint, **({"labels": labels} if labels else {})},
    )
    return client.adapters.register(folder, name=name, base_fingerprint=fingerprint, task=task, task_name=task_name)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    base, other = _tiny_llama(root / "base", 0), _tiny_llama(root / "other", 1)
    client = Client(home=root / "home")
    for i, (name, config) in enumerate(ADAPTERS.items()):
        _register(client, base, name, config, seed=i, task_name=f"task-{name}")
    _register(client, other, "other-base", {"method": "lora"})
    client.adapters.promote("lora")
    serving = client.serve(str(base), capacity=3, api_key=KEY, port=8123, max_batch_size=16, batch_wait_s=0.3,
                           cpus_per_replica=0.5, name="llm")
    yield client, serving, base
    serving.stop()


def _complete(url, model, prompt="hello there", **kw):
    r = requests.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0, **kw},
        headers=AUTH,
        timeout=120,
    )
    return r


def test_models_lists_the_base_and_its_adapters_only(server):
    client, serving, base = server
    r = requests.get(f"{serving.url}/v1/models", headers=AUTH, timeout=60)
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[0] == str(base) and sorted(ids[1:]) == sorted(ADAPTERS)


def test_a_mixed_batch_equals_each_request_served_alone(server):
    _, serving, base = server
    models = [str(base), "lora", "prompt", "bitfit"]  # three adapters fit the bank of 3
    alone = [_complete(serving.url, m).json()["choices"][0]["text"] for m in models]
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: _complete(serving.url, m), models))
    assert [r.status_code for r in together] == [200] * len(models)
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert len(set(alone)) > 1, "the adapters made no difference"
    batches = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["batches"]
    assert any(b["size"] >= 3 and len(b["adapters"]) >= 3 for b in batches), (
        batches
    )  # rows of different adapters, one batch


def test_stats_say_where_the_replica_serves(server):
    _, serving, _ = server
    stats = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()
    assert (stats["device"], stats["dtype"]) == ("cpu", "fp32")  # auto, on a replica that reserved no GPU


def test_lru_evicts_and_reloads_with_the_same_results(server):
    _, serving, _ = server
    first = _complete(serving.url, "lora").json()["choices"][0]["text"]
    for name in ("bottleneck", "prompt", "bitfit"):  # three others through a bank of three: lora is evicted
        assert _complete(serving.url, name).status_code == 200
    loaded = requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["loaded"]
    assert "lora" not in loaded and len(loaded) == 3
    assert _complete(serving.url, "lora").json()["choices"][0]["text"] == first
    assert requests.get(f"{serving.url}/v1/stats", headers=AUTH, timeout=60).json()["loaded"][-1] == "lora"


def test_task_names_reach_the_promoted_adapter_and_new_adapters_need_no_restart(server):
    client, serving, base = server
    assert (
        _complete(serving.url, "task-lora").json()["choices"][0]["text"]
        == _complete(serving.url, "lora").json()["choices"][0]["text"]
    )
    assert _complete(serving.url, "late").status_code == 404
    _register(client, base, "late", {"method": "lora", "r": 2}, seed=9)
    r = _complete(serving.url, "late")
    assert r.status_code == 200 and r.json()["model"] == "late"
    client.adapters.delete("late")  # replaced under the same name: the server must not keep the old weights
    _register(client, base, "late", {"method": "lora", "r": 2}, seed=10)
    assert _complete(serving.url, "late").json()["choices"][0]["text"] != r.json()["choices"][0]["text"]


def test_errors_come_back_in_openai_shape_and_the_server_stays_up(server):
    client, serving, base = server
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
    _, serving, _ = server
    full = _complete(serving.url, "prompt").json()["choices"][0]["text"]
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


def test_chat_completions_and_stop_strings(server):
    _, serving, _ = server
    r = requests.post(
        f"{serving.url}/v1/chat/completions",
        json={"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 4
    text = _complete(serving.url, "bitfit", max_tokens=8).json()["choices"][0]["text"]
    stop = text.strip()[-2:] if len(text.strip()) >= 2 else None
    if stop:
        cut = _complete(serving.url, "bitfit", max_tokens=8, stop=[stop]).json()["choices"][0]
        assert stop not in cut["text"] and cut["finish_reason"] == "stop" and text.startswith(cut["text"])


def test_the_official_openai_client_works_unchanged(server):
    import openai

    _, serving, base = server
    api = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in api.models.list()} >= {str(base), "lora", "prompt"}
    done = api.completions.create(model="lora", prompt="hello there", max_tokens=5, temperature=0)
    assert done.choices[0].text == _complete(serving.url, "lora").json()["choices"][0]["text"]
    streamed = "".join(
        c.choices[0].text
        for c in api.completions.create(model="lora", prompt="hello there", max_tokens=5, temperature=0, stream=True)
    )
    assert streamed == done.choices[0].text
    chat = api.chat.completions.create(
        model="prompt", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
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
    _register(
        client,
        base,
        "sentiment",
        {"method": "lora", "r": 4},
        task="sequence-classification",
        labels=["negative", "positive"],
    )
    _register(
        client, base, "topic", {"method": "bitfit"}, task="sequence-classification", labels=["a", "b", "c"], seed=1
    )
    serving = client.serve(str(base), adapters=["sentiment", "topic"], num_replicas=2, port=8123, cpus_per_replica=0.5,
                           name="cls", route_prefix="/cls", batch_wait_s=0.3)
    try:
        status = serve.status().applications["cls"].deployments["AdapterServer"]
        assert status.replica_states.get("RUNNING") == 2
        texts = ["a fine film", "what a waste of time", "who wrote it?"]

        def post(model, text):
            return requests.post(f"{serving.url}/v1/classify", json={"model": model, "input": text}, timeout=120)

        alone = {(m, t): post(m, t).json()["data"][0] for m in ("sentiment", "topic") for t in texts}
        with ThreadPoolExecutor(6) as pool:
            together = dict(zip(alone, pool.map(lambda k: post(*k).json()["data"][0], alone)))
        for key, got in together.items():
            assert got["label"] == alone[key]["label"]
            assert got["scores"].keys() == alone[key]["scores"].keys()
            for label, score in got["scores"].items():
                assert abs(score - alone[key]["scores"][label]) < 1e-5
        assert set(alone[("sentiment", texts[0])]["scores"]) == {"negative", "positive"}
        assert set(alone[("topic", texts[0])]["scores"]) == {"a", "b", "c"}
        batch = post("sentiment", texts)  # a list of inputs
        assert [d["index"] for d in batch.json()["data"]] == [0, 1, 2]
        r = requests.post(f"{serving.url}/v1/classify", json={"model": str(base), "input": "x"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_head"
    finally:
        serving.stop()
