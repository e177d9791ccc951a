"""Exporting registered adapters: merged into a plain transformers model, or as HF PEFT / vLLM-loadable
adapter folders, checked against plain transformers and HF PEFT as oracles (tiny config-built bases,
adapters with random non-zero weights, so a merge or a load that does nothing shows)."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import peft_methods
from jobs.base_models import load_base_model
from jobs.export import ExportError, export_adapter
from jobs.store import JobStore
from peft_methods.adapter_files import AdapterIntegrityError
from tests.conftest import randomize_adapter, save_tiny_bert
from tests.jobs.conftest import minilm_spec

LABELS = ["ABBR", "DESC", "NUM"]
AUTO = {"sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A 2-layer BERT (classification) and a 2-layer LLaMA (causal LM), each a folder with a tokenizer."""
    from jobs.base_models import resolve_base_model

    bert = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    llama = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_base_model("minilm"))
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    return {"sequence-classification": bert, "causal-lm": llama}


@pytest.fixture
def store(tmp_path):
    s = JobStore(f"sqlite:///{tmp_path / 's.db'}", home=tmp_path / "home", storage_url=tmp_path / "artifacts")
    yield s
    s.close()


def register(store, tmp_path, bases, task, method, *, labels=LABELS, name="exp"):
    """Train nothing: apply ``method`` to the base, randomise its tensors, save and register the adapter."""
    folder = bases[task]
    fingerprint = store.register_base_model(str(folder)).fingerprint
    dataset = {"name": "trec" if task == "sequence-classification" else "chatterbot_qa"}
    job = store.submit(minilm_spec(name=name, task=task, method=method, dataset=dataset))
    classify = task == "sequence-classification"
    model, _ = load_base_model(str(folder), task, num_labels=len(LABELS) if classify else None)
    peft_methods.apply(model, method)
    randomize_adapter(model, scale=0.5)
    metadata = {"base_fingerprint": fingerprint, "job_id": job.id, "metrics": {"eval_accuracy": 0.75}}
    if classify and labels:
        metadata["labels"] = labels
    saved = peft_methods.save_adapter(model, tmp_path / f"saved-{name}", metadata=metadata)
    return store.adapters.register(saved, name=name, base_fingerprint=fingerprint, task=task, task_name="trec",
                                   job_id=job.id, metrics={"eval_accuracy": 0.75})


def batch(task):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def ours(store, bases, record, num_labels=len(LABELS)):
    """Logits of the base with the registered adapter applied, unmerged: peftfleet's own loading."""
    folder = bases[record.task]
    model, _ = load_base_model(str(folder), record.task,
                               num_labels=num_labels if record.task == "sequence-classification" else None)
    store.adapters.load(record.name, model, base_path=folder)
    with torch.no_grad():
        return model.eval()(**batch(record.task)).logits


MERGE_CASES = [
    ("sequence-classification", {"method": "lora", "r": 4, "alpha": 8}, LABELS),
    ("causal-lm", {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["*_proj"]}, None),
    ("sequence-classification", {"method": "far", "fraction": 0.25}, None),  # no labels recorded: head size
    ("causal-lm", {"method": "bitfit"}, None),  # adds biases a plain LLaMA gets by config switch
    ("causal-lm", {"method": "bitfit", "target_modules": ["q_proj", "up_proj"]}, None),  # siblings' biases: zero
]


@pytest.mark.parametrize("task,method,labels", MERGE_CASES,
                         ids=lambda x: x.get("method") + str(len(x)) if isinstance(x, dict) else None)
def test_a_merged_export_is_a_plain_transformers_model_with_the_adapters_outputs(
    store, tmp_path, bases, task, method, labels
):
    record = register(store, tmp_path, bases, task, method, labels=labels)
    expected = ours(store, bases, record)
    plain, _ = load_base_model(str(bases[task]), task, num_labels=3 if task == "sequence-classification" else None)
    result = export_adapter(store, record.name, tmp_path / "out", merge=True)
    assert result.kind == "merged" and "model.safetensors" in result.files and CARD in result.files
    assert not list((tmp_path / "out").glob("*.bin")) and not (tmp_path / "out" / "adapter_config.json").exists()

    exported = AUTO[task].from_pretrained(tmp_path / "out").eval()  # transformers alone
    assert not [m for m in exported.modules() if type(m).__module__.startswith("peft_methods")]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert not [n for n in names if "base_layer" in n or "lora_" in n or "far_" in n]
    with torch.no_grad():
        theirs = exported(**batch(task)).logits
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the adapter did change the base: a merge that folds nothing would fail above
        assert not torch.allclose(plain.eval()(**batch(task)).logits[..., :3], expected[..., :3], atol=1e-3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token_id is not None
    if labels:
        assert exported.config.id2label == dict(enumerate(labels))


CARD = "README.md"


def test_the_model_card_names_base_data_method_metrics_and_job(store, tmp_path, bases):
    record = register(store, tmp_path, bases, "sequence-classification", {"method": "lora", "r": 2})
    export_adapter(store, record.name, tmp_path / "out", merge=True)
    card = (tmp_path / "out" / CARD).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for needed in (record.base_fingerprint, str(bases["sequence-classification"]), record.job_id, '"name": "trec"',
                   '"r": 2', "eval_accuracy=0.75", "ABBR, DESC, NUM", "merged"):
        assert needed in card, needed
    # once the job has recorded its data's fingerprint, the card names that instead of the spec
    store.set_runtime(record.job_id, dataset={"source": "trec", "hash": "sha256:0ddba11"})
    export_adapter(store, record.name, tmp_path / "again")
    card = (tmp_path / "again" / CARD).read_text()
    assert "sha256:0ddba11" in card and "the job's dataset fingerprint" in card and "library_name: peft\n" in card


def test_the_card_prefers_the_datasets_fingerprint_when_the_adapter_records_one(store, tmp_path, bases):
    folder = bases["sequence-classification"]
    fingerprint = store.register_base_model(str(folder)).fingerprint
    model, _ = load_base_model(str(folder), "sequence-classification", num_labels=3)
    peft_methods.apply(model, {"method": "bitfit"})
    dataset = {"name": "trec", "fingerprint": "sha256:feedface"}
    saved = peft_methods.save_adapter(model, tmp_path / "a", metadata={"base_fingerprint": fingerprint,
                                                                      "dataset": dataset})
    store.adapters.register(saved, name="by-hand", base_fingerprint=fingerprint, task="sequence-classification",
                            task_name="t")
    export_adapter(store, "by-hand", tmp_path / "out")
    card = (tmp_path / "out" / CARD).read_text()
    assert "sha256:feedface" in card and "none (registered by hand)" in card and "library_name: peftfleet" in card


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_a_lora_export_loads_in_hf_peft_unchanged_with_our_outputs(store, tmp_path, bases, task):
    method = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    record = register(store, tmp_path, bases, task, method)
    result = export_adapter(store, record.name, tmp_path / "out")
    assert set(result.files) == {"adapter_config.json", "adapter_model.safetensors", "peftfleet.json", CARD}
    num_labels = 3 if task == "sequence-classification" else None
    fresh, _ = load_base_model(str(bases[task]), task, num_labels=num_labels)
    hf = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch(task)).logits, ours(store, bases, record), atol=1e-6, rtol=0)
    config = peft.LoraConfig.from_pretrained(tmp_path / "out")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.base_model_name_or_path == str(bases[task])
    # peftfleet still verifies and loads the export (its manifest carries the new config's hash)
    again, _ = load_base_model(str(bases[task]), task, num_labels=num_labels)
    peft_methods.load_adapter(again, tmp_path / "out")
    assert "library_name: peft\n" in (tmp_path / "out" / CARD).read_text()


def test_a_lora_exports_config_and_tensor_names_are_hf_pefts_own(store, tmp_path, bases):
    """HF PEFT saving an equivalent LoraConfig is the reference: every field we write is one it writes, with
    its value; the tensors carry its names; and vLLM's checks (PEFTHelper) find nothing to refuse."""
    task = "causal-lm"
    record = register(store, tmp_path, bases, task, {"method": "lora", "r": 4, "alpha": 8})
    export_adapter(store, record.name, tmp_path / "out", base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    ours_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    fresh, _ = load_base_model(str(bases[task]), task)
    reference = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ours_config["target_modules"],
                                task_type="CAUSAL_LM")
    peft.get_peft_model(fresh, reference).save_pretrained(tmp_path / "hf")
    theirs = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(ours_config) <= set(theirs), set(ours_config) - set(theirs)
    assert {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path",
            "bias", "fan_in_fan_out", "modules_to_save", "use_rslora", "use_dora", "lora_bias", "init_lora_weights",
            "rank_pattern", "alpha_pattern", "layer_replication"} <= set(ours_config)
    assert ours_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # PEFT writes its path
    same = {k: v for k, v in ours_config.items() if k not in ("target_modules", "base_model_name_or_path")}
    assert same == {k: theirs[k] for k in same}
    assert sorted(ours_config["target_modules"]) == sorted(theirs["target_modules"])
    names = {}
    for folder in ("out", "hf"):
        with safe_open(tmp_path / folder / "adapter_model.safetensors", "pt") as f:
            names[folder] = set(f.keys())
    assert names["out"] == names["hf"] and len(names["out"]) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    # what vLLM refuses (vllm/lora/peft_helper.py PEFTHelper._validate_features, validate_legal)
    assert ours_config["bias"] == "none" and not ours_config["use_dora"] and not ours_config["lora_bias"]
    assert ours_config["init_lora_weights"] is True and not ours_config["layer_replication"]
    assert ours_config["modules_to_save"] is None


def test_a_method_without_a_hf_format_exports_in_peftfleets_own(store, tmp_path, bases):
    task = "sequence-classification"
    record = register(store, tmp_path, bases, task, {"method": "bottleneck"})
    result = export_adapter(store, record.name, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTFLEET_BOTTLENECK" and "base_model_name_or_path" not in config
    assert result.kind == "adapter" and CARD in result.files
    model, _ = load_base_model(str(bases[task]), task, num_labels=3)
    peft_methods.load_adapter(model, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch(task)).logits, ours(store, bases, record))


def test_merging_a_method_that_cannot_merge_is_refused_naming_those_that_can(store, tmp_path, bases):
    record = register(store, tmp_path, bases, "sequence-classification", {"method": "bottleneck"})
    with pytest.raises(ExportError) as e:
        export_adapter(store, record.name, tmp_path / "out", merge=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--merge: adapter 'exp' uses bottleneck")
    assert re.search(r"mergeable methods: bitfit, diff_pruning, far, head_only, (ia3, )?lora \(", message)
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_kept_unless_overwrite_and_altered_files_are_refused(store, tmp_path, bases):
    record = register(store, tmp_path, bases, "sequence-classification", {"method": "lora"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--out: .* exists and is not empty"):
        export_adapter(store, record.name, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export_adapter(store, record.name, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    weights = store.adapters.local_folder(record.name) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors sha256"):
        export_adapter(store, record.name, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))
