"""What a PEFT method is: the contract every built-in and third-party method implements.

A method is a subclass of :class:`PeftMethod` registered under the entry-point group
``peftfleet.peft_methods`` (see :mod:`peft_methods.registry`). It declares:

* ``Config`` — a pydantic model with ``method: Literal["<name>"]``, ``extra="forbid"`` and a
  description on every field. It must be constructible from defaults alone (``Config()``), so
  tooling can always build a working example of it.
* ``apply(model, config)`` — change the model in place: inject modules, freeze everything else.
* ``is_adapter_parameter(name)`` — which parameters the method trains; by default they are also
  what is saved (``adapter_state_dict`` / ``load_adapter_state_dict``, file names via
  ``to_file_keys`` / ``from_file_keys``), which a method may override (e.g. to save sparsely).
* ``mergeable`` with ``merge`` / ``unmerge`` where the method allows folding into the base.
* ``inference_overhead`` — what serving an unmerged adapter costs, in words users can act on.
* ``default_lr`` — the learning rate of its own parameters when a job names none.
* optionally ``prime(model, batches)`` (look at data before training),
  ``regularization_loss(model)`` (a term added to the task loss), ``training_loss`` (a whole
  objective of its own, e.g. two stochastic forwards), ``begin_step`` (act at a step boundary, e.g.
  a second training phase), ``parameter_group`` / ``group_settings`` (learning rates of its own per
  parameter group) and ``loading_config`` (a lighter form to load a trained adapter in).

Learning rates: the job's ``training.lr`` drives the ``adapter`` group, ``training.head_lr`` the
``head`` group (``modules_to_save``), and a method may name further groups with their own settings
(diff pruning's ``gates``). Every group follows the job's warm-up and decay.

The applied config is recorded on the model (:func:`applied_config`), so saving needs no
other state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from peft_methods.targeting import task_head_names

FILE_KEY_PREFIX = "base_model.model."  # HF PEFT's prefix for tensors of the wrapped model
HEAD_LR = 2e-3  # the fresh task head's default learning rate, whatever the method (a job's training.head_lr)
_APPLIED_ATTR = "peftfleet_config"
_HEADS_ATTR = "peftfleet_modules_to_save"


@runtime_checkable
class MergeableLayer(Protocol):
    """An injected layer that can fold its adapter into its frozen base layer and take it out again."""

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def no_gather(params: list[nn.Parameter]) -> AbstractContextManager:
    """Parameters that are whole already: nothing to gather."""
    return nullcontext()


class MethodConfig(BaseModel):
    """Fields every method shares. Subclasses add ``method: Literal[...]`` and their own fields; no float field
    of any method takes inf or nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    modules_to_save: list[str] | None = Field(
        default=None,
        description=(
            "Modules trained in full and saved with the adapter (e.g. a task head). "
            "None = the model's task head when it has one (`classifier` for BERT-like "
            "encoders, `score` for LLaMA-like decoders); [] = none."
        ),
    )


class PeftMethod:
    """Base class of a PEFT method. Subclass it, set the class attributes, implement ``_inject``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = False
    inference_overhead: ClassVar[str] = "unknown"
    paper: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-3  # a job's training.lr when its spec sets none (the head has its own)

    # -- what subclasses implement ---------------------------------------------------------
    def _inject(self, model: nn.Module, config: MethodConfig) -> None:
        """Add the method's modules/parameters to ``model``. Freezing is done by ``apply``."""
        raise NotImplementedError

    def is_adapter_parameter(self, name: str, config: MethodConfig) -> bool:
        """True for the parameters this method owns (besides ``modules_to_save``)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights; the model then runs at base cost.

        Mergeable methods get this for free when their injected layers are :class:`MergeableLayer`s.
        """
        self._each_mergeable_layer(model, "merge")

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`."""
        self._each_mergeable_layer(model, "unmerge")

    def _each_mergeable_layer(self, model: nn.Module, action: str) -> None:
        if not self.mergeable:
            raise NotImplementedError(f"method {self.name!r} cannot be merged into the base")
        for module in model.modules():
            if isinstance(module, MergeableLayer):
                getattr(module, action)()

    def prime(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Look at a few training batches before the optimizer is built (e.g. FAR picks the units to
        train). Called after ``apply`` with batches that include ``labels``; default: nothing."""

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss after each forward (e.g. diff pruning's L0 penalty)."""
        return None

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      forward: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One training micro-batch's (task loss, loss to backpropagate). ``forward()`` runs the model (or the
        engine wrapping it) on ``batch`` once and returns its output (with ``.loss``); a method may call it more
        than once (AdaMix's two stochastic routes). Default: one forward, plus :meth:`regularization_loss`."""
        out = forward()
        extra = self.regularization_loss(model)
        return out.loss, out.loss if extra is None else out.loss + extra

    def begin_step(self, model: nn.Module, step: int, total_steps: int,
                   gathered: Callable[[list[nn.Parameter]], AbstractContextManager] = no_gather) -> None:
        """Called before optimizer step ``step`` (0-based) of ``total_steps``, also on the first step after a
        resume; what it changes must be restored by a checkpoint (buffers are). ``gathered(params)`` is a
        context in which partitioned parameters (ZeRO-3) are whole, read-only; the caller supplies it.
        Default: nothing."""

    def parameter_group(self, name: str, config: MethodConfig) -> str:
        """The optimizer group of the method's own trainable parameter ``name``: ``adapter`` (the job's
        ``lr``) unless the method names another one in :meth:`group_settings`."""
        return "adapter"

    def group_settings(self, config: MethodConfig) -> dict[str, dict[str, float]]:
        """Optimizer settings (``lr``, ``weight_decay``) of the groups the method adds beyond ``adapter``
        and ``head``. Default: none."""
        return {}

    def optimizer_groups(self, model: nn.Module, names: Iterable[str], *, lr: float, head_lr: float,
                         weight_decay: float) -> list[dict[str, Any]]:
        """The trainable parameters ``names`` split into optimizer groups, each a dict with ``name``,
        ``names`` (parameter names, in the given order), ``lr`` and ``weight_decay``; empty groups are left
        out. The task heads form the ``head`` group (``head_lr``)."""
        config = _require_applied(model)
        settings = {"adapter": {"lr": lr, "weight_decay": weight_decay},
                    "head": {"lr": head_lr, "weight_decay": weight_decay}, **self.group_settings(config)}
        heads = getattr(model, _HEADS_ATTR, ())
        grouped: dict[str, list[str]] = {}
        for n in names:
            group = "head" if any(n.startswith(h + ".") for h in heads) else self.parameter_group(n, config)
            if group not in settings:
                raise ValueError(f"{self.name}: parameter group {group!r} of {n} has no settings")
            grouped.setdefault(group, []).append(n)
        return [{"name": g, "names": ns, **settings[g]} for g, ns in grouped.items()]

    def loading_config(self, config: MethodConfig, state: dict[str, torch.Tensor]) -> MethodConfig:
        """The config ``load_adapter`` applies before copying in the saved tensors ``state``.

        A method that trains through something inference does not need (IPT's frozen decoder)
        returns a lighter config here; by default the saved config itself."""
        return config

    def row_deltas(self, base: nn.Module, config: MethodConfig, state: dict[str, torch.Tensor]) -> list[Any]:
        """A saved adapter as changes of the plain ``base`` that a mixed batch applies to the rows using
        it, so many adapters serve (and train) in one forward of one shared base. Each item is a
        ``RowDelta`` (one module's change, applying itself) or an ``InputDelta`` (virtual tokens), see
        :mod:`peft_methods.row_deltas`; a method may define its own kinds. ``state`` holds the saved
        tensors by parameter name with the task heads taken out (those are served generically).
        Without this a method's adapters are refused by the server with a clear error."""
        raise NotImplementedError(f"{self.name} does not describe its adapter as per-row deltas")

    def packing_problem(self, config: MethodConfig) -> str | None:
        """Why a job with ``config`` cannot train packed with other jobs on one resident base (None: it
        can). Packing trains an adapter through its :meth:`row_deltas`, built from its
        :meth:`training_state`, so a method packs when those deltas compute exactly its training forward
        (no dropout of its own, no regulariser, no training-only machinery)."""
        return f"{self.name} does not declare that its training forward equals its per-row deltas"

    def adapter_config(self, model: nn.Module, config: MethodConfig) -> dict[str, Any]:
        """The content of ``adapter_config.json``. Methods HF PEFT knows override this."""
        return {"peft_type": f"PEFTFLEET_{self.name.upper()}", **config.model_dump(mode="json")}

    # -- shared behaviour ------------------------------------------------------------------
    def apply(self, model: nn.Module, config: MethodConfig) -> nn.Module:
        """Inject the method into ``model`` in place and freeze everything it does not own.

        Configs are checked against the model before it changes where possible; a model on which
        ``apply`` raised part-way should be discarded.
        """
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: expected {self.Config.__name__}, got {type(config).__name__}")
        if applied_config(model) is not None:
            raise ValueError(
                f"model already has method {applied_config(model).method!r} applied; "
                "apply one method per base model copy"
            )
        heads = task_head_names(model) if config.modules_to_save is None else config.modules_to_save
        modules = dict(model.named_modules())
        unknown = [h for h in heads if h not in modules]
        if unknown:
            raise ValueError(f"modules_to_save {unknown} are not modules of {type(model).__name__}")
        was_training = model.training
        self._inject(model, config)
        model.train(was_training)  # new modules start in training mode; keep the model's mode
        setattr(model, _APPLIED_ATTR, config)
        setattr(model, _HEADS_ATTR, tuple(heads))
        owned = {n for n, _ in model.named_parameters() if self.owns(model, n)}
        if not owned:
            raise ValueError(f"{self.name}: the config selects no parameters in {type(model).__name__}")
        for n, p in model.named_parameters():
            p.requires_grad_(n in owned)
        return model

    def owns(self, model: nn.Module, name: str) -> bool:
        """Whether parameter ``name`` belongs to the adapter (method parameters or saved modules)."""
        config = _require_applied(model)
        heads = getattr(model, _HEADS_ATTR, ())
        if any(name.startswith(h + ".") for h in heads):
            return True
        return self.is_adapter_parameter(name, config)

    def trainable_parameter_names(self, model: nn.Module) -> set[str]:
        """The parameters training updates: the method's own plus ``modules_to_save``."""
        return {n for n, _ in model.named_parameters() if self.owns(model, n)}

    def num_adapter_parameters(self, model: nn.Module) -> int:
        """How many values training updates (what a "trainable %" counts)."""
        names = self.trainable_parameter_names(model)
        return sum(p.numel() for n, p in model.named_parameters() if n in names)

    # -- what is saved: by default the trainable parameters themselves ---------------------
    # A method whose artifact differs from its training parameters (sparse diffs, folded
    # re-parametrisations, HF PEFT's own tensor names) overrides these four.
    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds, keyed by parameter name, detached."""
        return {k: t.detach() for k, t in self.training_state(model).items()}

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's tensors as :meth:`adapter_state_dict` keys them, but live: what a base group
        builds per-row deltas from while training, so gradients reach the trainable parameters. A method
        that renames its tensors, or saves one computed from its parameters, overrides this."""
        names = self.trainable_parameter_names(model)
        return {n: p for n, p in model.named_parameters() if n in names}

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into an applied model; keys must match ``adapter_state_dict`` exactly."""
        params = dict(model.named_parameters())
        check_state_keys(self.name, set(self.adapter_state_dict(model)), state)
        for n, t in state.items():  # check everything before changing anything
            if params[n].shape != t.shape:
                raise ValueError(f"{self.name}: {n} has shape {tuple(t.shape)}, model expects {tuple(params[n].shape)}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def to_file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensor names as written to adapter_model.safetensors (HF PEFT's `base_model.model.` prefix)."""
        return {FILE_KEY_PREFIX + k: v for k, v in state.items()}

    def from_file_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`to_file_keys`; raises ValueError on names it did not write."""
        strange = [k for k in tensors if not k.startswith(FILE_KEY_PREFIX)]
        if strange:
            raise ValueError(f"{self.name}: tensor names must start with {FILE_KEY_PREFIX!r}, found {strange[:3]}")
        return {k[len(FILE_KEY_PREFIX):]: v for k, v in tensors.items()}


def check_state_keys(method_name: str, expected: set[str], state: dict[str, torch.Tensor]) -> None:
    """Refuse adapter tensors whose names differ from what the method saves for this model."""
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{method_name}: adapter tensors do not match the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def applied_config(model: nn.Module) -> MethodConfig | None:
    """The config of the method applied to ``model``, or None."""
    return getattr(model, _APPLIED_ATTR, None)


def _require_applied(model: nn.Module) -> MethodConfig:
    config = applied_config(model)
    if config is None:
        raise ValueError("no PEFT method is applied to this model; call peft_methods.apply first")
    return config
