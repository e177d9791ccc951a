"""Where a serving replica runs: --device/--dtype through the CLI and ServeOptions, CUDA asked for on
a machine without it refused clearly and early, and the base loaded in the dtype it was asked for."""

from __future__ import annotations

import pytest
import torch
import transformers

from jobs.base_models import resolve_base_model
from jobs.store import JobStore
from orchestrator.cli import main
from orchestrator.serving import device as device_module
from orchestrator.serving.deployment import ServeOptions, Serving, build_app
from orchestrator.serving.device import (
    DeviceUnavailable,
    check_device,
    check_placement,
    load_base,
    resolve_device,
    resolve_dtype,
)
from tests.conftest import SHARED_MODELS


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as a CPU-only one, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home")


@pytest.fixture
def no_cluster(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command connected to Ray before refusing")

    monkeypatch.setattr("orchestrator.client.connect", refuse)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)  # fp32 weights, as every base is stored
    transformers.AutoTokenizer.from_pretrained(resolve_base_model("smollm2", home=SHARED_MODELS)).save_pretrained(
        folder)
    return folder


def serve(store, capsys, *argv):
    code = main(["serve", *argv, "--store-url", store.url, "--home", str(store.home)])
    out = capsys.readouterr()
    return code, out.err


def test_cuda_on_a_machine_without_it_is_a_clear_error(no_cuda):
    with pytest.raises(DeviceUnavailable, match=r"device 'cuda' was asked for, but no CUDA device is visible here"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")


def test_auto_uses_cuda_only_where_the_replica_has_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", has_gpu=True) == torch.device("cuda", 0)
    assert resolve_device("auto", has_gpu=False) == torch.device("cpu")  # Ray shows GPUs it did not reserve
    with pytest.raises(DeviceUnavailable, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_auto_dtype_is_bf16_on_cuda_where_supported_else_fp32(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp16", cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    assert resolve_dtype("auto", cuda) == torch.float32
    with pytest.raises(DeviceUnavailable, match="Tesla T4 does not support it"):
        resolve_dtype("bf16", cuda)
    with pytest.raises(ValueError, match="expected auto, fp32, bf16, fp16"):
        resolve_dtype("float8", cpu)


def test_bad_values_and_unreserved_gpus_are_refused_before_anything_is_deployed(monkeypatch):
    for bad in ("gpu", "cpu:0", "cuda:x", "auto:1"):
        with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
            check_device(bad)
    with pytest.raises(ValueError, match="needs a GPU per replica"):
        check_placement("cuda", 0)
    with pytest.raises(ValueError, match="sees cuda:0..cuda:0 only"):
        check_placement("cuda:1", 1)
    check_placement("cuda:1", 2)
    check_placement("cuda", 0.5)
    check_placement("cpu", 1)
    with pytest.raises(ValueError, match="needs a GPU per replica"):
        build_app(ServeOptions(base="b", device="cuda"), gpus_per_replica=0)
    with pytest.raises(ValueError, match="device 'gpu'"):
        ServeOptions(base="b", device="gpu")


def test_the_cli_refuses_cuda_on_this_machine_before_starting_ray(store, capsys, tiny_base, no_cuda, no_cluster):
    code, err = serve(store, capsys, "--base", str(tiny_base), "--device", "cuda")
    assert code == 2 and "device 'cuda' was asked for, but no CUDA device is visible here" in err
    code, err = serve(store, capsys, "--base", str(tiny_base), "--device", "cuda", "--gpus-per-replica", "0")
    assert code == 2 and "needs a GPU per replica" in err
    code, err = serve(store, capsys, "--base", str(tiny_base), "--device", "gpu")
    assert code == 2 and "expected auto, cpu, cuda or cuda:N" in err


def test_the_cli_passes_device_and_dtype_to_the_replicas(store, capsys, tiny_base, no_cuda, monkeypatch):
    """Against a cluster elsewhere (RAY_ADDRESS) this machine's lack of CUDA says nothing: the
    options go to the replicas, with one GPU reserved for each."""

    class Elsewhere:
        started_here = False

    deployed = {}

    def start(options, **scaling):
        deployed.update(options=options, **scaling)
        return Serving("peftfleet", "http://127.0.0.1:8000")

    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    monkeypatch.setattr("orchestrator.client.connect", lambda *a, **k: Elsewhere())
    monkeypatch.setattr("orchestrator.serving.deployment.start", start)
    code, err = serve(store, capsys, "--base", str(tiny_base), "--device", "cuda", "--dtype", "bf16")
    assert code == 0, err
    assert (deployed["options"].device, deployed["options"].dtype, deployed["gpus_per_replica"]) == ("cuda", "bf16", 1)
    code, err = serve(store, capsys, "--base", str(tiny_base), "--dtype", "fp32")  # the earlier --device is not kept
    assert code == 0 and deployed["gpus_per_replica"] == 0
    assert (deployed["options"].device, deployed["options"].dtype) == ("auto", "fp32")
    code, err = serve(store, capsys, "--base", str(tiny_base), "--device", "cuda:0")
    assert code == 0 and deployed["options"].device == "cuda:0" and deployed["gpus_per_replica"] == 1


def test_the_base_loads_in_the_dtype_asked_for(tiny_base, monkeypatch):
    for dtype in (torch.bfloat16, torch.float32):
        model, tokenizer = load_base(str(tiny_base), "causal-lm", device=torch.device("cpu"), dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype} and not model.training
        assert tokenizer.pad_token is not None
    model, _ = load_base(str(tiny_base), "sequence-classification", device=torch.device("cpu"),
                         dtype=torch.bfloat16, num_labels=2)
    assert model.score.weight.dtype == torch.bfloat16 and model.config.pad_token_id is not None

    seen = {}  # on CUDA, straight onto the device as the weights are read

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_base(str(tiny_base), "causal-lm", device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert seen["device_map"] == {"": torch.device("cuda", 0)} and seen["dtype"] == torch.bfloat16
    assert device_module.DTYPE_NAMES[torch.bfloat16] == "bf16"
