"""Which modules a method touches: name patterns, per-family defaults, task heads.

A pattern is matched against a module's full dotted name or any dotted suffix of it, with shell
wildcards: ``query`` matches ``bert.encoder.layer.0.attention.self.query``; ``layer.1*.query``
matches layers 1 and 10–19; ``*`` alone matches every layer of the wanted kind. A wildcard pattern
skips modules of other kinds; a plain name that hits one is an error.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

# Families are keyed by `config.model_type`; BERT-like encoders and LLaMA-like decoders name their
# projections differently, so "the attention query and value" needs a table, not one default.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"}
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3"}

ATTENTION_QV = {
    **{t: ["query", "value"] for t in _BERT_LIKE},
    **{t: ["q_proj", "v_proj"] for t in _LLAMA_LIKE},
    "distilbert": ["q_lin", "v_lin"],
}
ALL_LINEAR_IN_BLOCKS = {
    **{
        t: ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"] for t in _BERT_LIKE
    },
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] for t in _LLAMA_LIKE},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}
_HEAD_NAMES = ("classifier", "score")
ENCODER_FAMILIES = frozenset(_BERT_LIKE) | {"distilbert"}  # pool at the first position; the rest pool at the last


def model_family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"{type(model).__name__} has no `config.model_type`; give target_modules explicitly")
    return model_type


def default_targets(model: nn.Module, table: dict[str, list[str]], what: str) -> list[str]:
    """The per-family default patterns from ``table``; a clear error for unknown families."""
    family = model_family(model)
    if family not in table:
        raise ValueError(
            f"no default {what} for model family {family!r} (known: {sorted(table)}); "
            "set target_modules to name patterns of its nn.Linear layers"
        )
    return list(table[family])


def name_matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def find_modules(
    model: nn.Module, patterns: list[str], kind: type[nn.Module] = nn.Linear
) -> list[tuple[str, nn.Module]]:
    """Modules whose names match any pattern. Every pattern must match; every match must be ``kind``."""
    heads = task_head_names(model)
    found, used = [], set()
    for name, module in model.named_modules():
        hits = [p for p in patterns if name and name_matches(name, p)]
        if not hits or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if not isinstance(module, kind):
            if all(_is_glob(p) for p in hits) or any(isinstance(m, kind) for m in module.children()):
                continue  # `*_proj` or a container whose name happens to match, e.g. `attention.output`
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not {kind.__name__}")
        used.update(hits)
        found.append((name, module))
    unused = [p for p in patterns if p not in used]
    if unused:
        sample = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kind)})
        raise ValueError(
            f"target_modules {unused} match no {kind.__name__} in the model; its {kind.__name__} names end in {sample}"
        )
    return found


def task_head_names(model: nn.Module) -> list[str]:
    """The freshly initialised task head of a sequence-classification model, else nothing."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [n for n in _HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def hf_task_type(model: nn.Module) -> str | None:
    """HF PEFT's `task_type` for this model class, written into adapter_config.json."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
