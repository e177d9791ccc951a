"""One prompt format: a conversation becomes the same token ids when an SFT job trains on it and
when the server answers it on /v1/chat/completions, with a chat template and without one."""

from __future__ import annotations

import pytest
import transformers

from jobs.base_models import resolve_base_model
from jobs.training.batches import Batches
from jobs.training.prompts import prompt_text
from orchestrator.serving.api import ChatMessage, chat_prompt_ids
from tests.conftest import SHARED_MODELS

QUESTIONS = ["What is the capital of France?", "Ünïcödé, emoji 🎉 and  two spaces:\nthen a new line"]


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def tokenizer(request):
    name = request.param
    folder = resolve_base_model(name, home=SHARED_MODELS) if name == "smollm2" else resolve_base_model(name)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.eos_token_id is None:
        tok.eos_token = tok.sep_token  # MiniLM has no EOS; SFT rows end with one
    return tok


def _trained_prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt part of an SFT row: its real positions whose label is -100."""
    batch = Batches("causal-lm", tokenizer, max_length=512)([(question, "An answer."), ("a", "b")])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    return ids[(labels == -100) & (mask == 1)].tolist()


@pytest.mark.parametrize("question", QUESTIONS)
def test_training_and_serving_tokenise_a_conversation_the_same(tokenizer, question):
    served = chat_prompt_ids(tokenizer, [ChatMessage(role="user", content=question)])
    assert served == _trained_prompt_ids(tokenizer, question)
    text = tokenizer.decode(served)
    if tokenizer.chat_template:
        assert text.endswith("<|im_start|>assistant\n")  # the template's generation prompt opens the answer
    else:
        assert prompt_text(tokenizer, [{"role": "user", "content": question}]) == f"user: {question}\nassistant:\n"


def test_the_server_keeps_every_turn_of_a_conversation(tokenizer):
    turns = [("system", "be brief"), ("user", "first question"), ("assistant", "an answer"),
             ("user", "second question")]
    ids = chat_prompt_ids(tokenizer, [ChatMessage(role=r, content=c) for r, c in turns])
    text = tokenizer.decode(ids, skip_special_tokens=True)
    where = [text.find(content) for _, content in turns]
    assert -1 not in where and where == sorted(where)
