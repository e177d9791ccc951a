"""Head only: the linear probe. The base stays frozen and only the task head (``modules_to_save``)
trains, so this is the baseline every PEFT method must beat: whatever a method scores above it is
what its own parameters learned, not what a fresh head learns on frozen features.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from peft_methods.api import MethodConfig, PeftMethod
from peft_methods.targeting import task_head_names


class HeadOnlyConfig(MethodConfig):
    method: Literal["head_only"] = Field(default="head_only", description="Selects head-only training.")


class HeadOnly(PeftMethod):
    name = "head_only"
    Config = HeadOnlyConfig
    mergeable = True  # nothing to fold: the base runs unchanged, the head is the adapter
    inference_overhead = "none: the base runs unchanged under the trained head"
    paper = "linear probing (the baseline of e.g. Houlsby et al. 2019, arXiv:1902.00751)"

    def _inject(self, model: nn.Module, config: HeadOnlyConfig) -> None:
        heads = task_head_names(model) if config.modules_to_save is None else config.modules_to_save
        if not heads:
            raise ValueError(f"head_only: {type(model).__name__} has no task head to train (modules_to_save is empty)")

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        return False

    def packing_problem(self, config: HeadOnlyConfig) -> str | None:
        return None

    def row_deltas(self, base: nn.Module, config: HeadOnlyConfig, state: dict) -> list:
        return []  # the heads are served generically
