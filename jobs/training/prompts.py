"""How a conversation becomes prompt tokens — one rule for training (SFT) and serving (chat).

With a chat template, the tokenizer's own: the messages rendered with the generation prompt (the
text that opens the assistant's turn). Without one, the fallback: every message on its own line as
``role: content``, then ``assistant:`` and a newline. Both are tokenised as text without adding
special tokens again, so a job trains on exactly the ids a served chat request sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]  # {"role": ..., "content": ...}


def prompt_text(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The conversation as the text the model continues, up to the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:\n"


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of :func:`prompt_text`."""
    return list(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
