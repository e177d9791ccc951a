"""Many jobs' adapters trained together on one resident frozen base (mLoRA's and ASPEN's idea, for
every method whose adapter is per-row deltas, and for jobs with their own lifecycles).

A :class:`BaseGroup` loads a frozen base once, on one device in one precision, and keeps it. Jobs
join it as :class:`Member` s: each is the job's own recipe (its data and order, its schedule, its
evaluations and checkpoints, its adapter registration), but instead of a copy of the base it holds a
*shell*, a copy of the base's module tree that shares every frozen tensor, with the job's method
applied; only the shell's trainable tensors are its own (fp32 masters, whatever the base's precision).

Each group step (:meth:`BaseGroup.step`) takes one micro-batch of every member, pads them into one
batch, and runs the base's forward and backward once for all rows. The shared base's modules are
wrapped in :class:`~peft_methods.mixed_module.MixedModule` s, the same ones serving uses; every step
each member's ``row_deltas`` are rebuilt from its live trainable tensors, so they are differentiable
and each adapter acts on its own rows only. Each member's loss is normalised over its own rows (or
response tokens); the step's backward is of their sum, so a member's gradient is exactly that of its
own loss: the same as training alone, up to floating-point reduction order. Each member then takes
its own optimizer step at its own accumulation boundary (AdamW, clipping at 1.0, its warm-up and
decay: what its solo DeepSpeed engine at ZeRO <= 2 does).

Members join and leave only between steps (:meth:`add`, :meth:`remove`); a member whose loss is not
finite leaves alone, with the error. The group knows nothing of Ray or the store: the actor that
holds it (``orchestrator.groups``) queues joins and leaves and talks to the store through each
member's reporter.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from itertools import chain
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peft_methods
from jobs.base_models import enable_activation_checkpointing, init_task_head, load_base_model, set_base_dropout
from jobs.spec import JobSpec
from jobs.training.batches import Batches
from jobs.training.devices import Placement, make_optimizer
from jobs.training.recipe import Recipe, evaluate, lr_lambda
from jobs.training.reporter import Reporter
from jobs.training.sources import wants_streaming
from peft_methods.mixed_module import MixedModule, RowRouter
from peft_methods.row_deltas import InputDelta, RowDelta
from peft_methods.targeting import replace_module, task_head_names

PACKED_STATE = "packed_state.json"  # in every checkpoint a member writes, beside its adapter and optimizer tensors
# Families whose causal-LM logits are exactly ``lm_head(last hidden state)`` (no soft-capping or scaling).
PLAIN_LM_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"})


def default_capacity() -> int:
    """Members a group trains at once (``PEFTFLEET_GROUP_MAX_MEMBERS``, default 8); more wait."""
    return int(os.environ.get("PEFTFLEET_GROUP_MAX_MEMBERS", "8"))


def is_packed_checkpoint(folder: str) -> bool:
    """Whether ``folder`` is a checkpoint a group member wrote (which a member can start from)."""
    return os.path.isfile(os.path.join(folder, PACKED_STATE))


def packing_problem(spec: JobSpec, *, init_checkpoint: str | None = None) -> str | None:  # type: ignore[valid-type]
    """Why ``spec`` trains solo rather than in a base group (None: it packs)."""
    if spec.packing == "off":
        return "packing is off in its spec"
    if init_checkpoint and not is_packed_checkpoint(init_checkpoint):
        return "it continues another job's DeepSpeed checkpoint (a PBT exploit)"
    if spec.resources.num_workers > 1:
        return f"it asks for {spec.resources.num_workers} data-parallel workers; a base group has one rank today"
    ds = spec.deepspeed
    if ds.zero_stage == 3 or ds.offload_optimizer or ds.offload_params:
        return "ZeRO-3 and offloading partition or move the base per job; a base group holds it whole, on its device"
    if ds.precision == "fp16":
        return "fp16 needs DeepSpeed's loss scaling, which a base group does not do"
    if spec.dataset.streaming != "off" and wants_streaming(spec.dataset):
        return "its data streams through Ray Data shards; a base group's members hold their data in memory"
    if spec.task == "sequence-classification" and spec.method.modules_to_save == []:
        return "it keeps the base's task head frozen (modules_to_save: []); every member of a group trains its own"
    return peft_methods.get_method(spec.method.method).packing_problem(spec.method)


@dataclass(frozen=True)
class GroupKey:
    """What jobs sharing one resident base must agree on."""

    base_model: str
    task: str
    precision: str
    base_dropout: float | None
    gradient_checkpointing: bool
    cpus: float
    gpus: float

    @classmethod
    def of(cls, spec: JobSpec, base_fingerprint: str) -> GroupKey:  # type: ignore[valid-type]
        res = spec.resources
        t = spec.training
        return cls(base_fingerprint, spec.task, spec.deepspeed.precision, t.base_dropout, t.gradient_checkpointing,
                   float(res.cpus_per_worker), float(res.gpus_per_worker))


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares every parameter and buffer with it (the modules
    are new objects, the tensors the same): somewhere to apply a method without copying the base."""
    memo = {id(t): t for t in chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class _CastHead(nn.Module):
    """A member's task head (fp32 masters) run in the dtype of what it is given, as it would be in a
    model of that precision; gradients reach the masters through the cast."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: p.to(x.dtype) for n, p in self.head.named_parameters()}
        return torch.func.functional_call(self.head, params, (x,))


class BaseGroup:
    """One resident frozen base and the jobs training on it (see the module docstring)."""

    def __init__(self, base_model: str, task: str, *, precision: str = "fp32", device: torch.device | None = None,
                 home: str | None = None, base_dropout: float | None = None, gradient_checkpointing: bool = False,
                 capacity: int | None = None):
        self.task, self.capacity = task, capacity or default_capacity()
        self.placement = Placement.for_job(precision, device)
        self.plain, self.tokenizer = load_base_model(
            base_model, task, num_labels=2 if task == "sequence-classification" else None, home=home,
            dtype=self.placement.dtype, device=self.placement.device,
        )
        set_base_dropout(self.plain, base_dropout)
        self.plain.requires_grad_(False)
        self.model = structural_copy(self.plain).train()  # the tree that runs: MixedModules go in here
        self.router = RowRouter(base_slot=self.capacity)
        self.checkpointing = gradient_checkpointing
        if gradient_checkpointing:  # the backward recomputes each layer, MixedModules included: see step()
            enable_activation_checkpointing(self.model)
            self.router.cache_plans = False  # a recomputed layer must gather its deltas again, as it first did
        self.mixed: dict[str, MixedModule] = {}
        self.members: dict[int, Member] = {}

    @property
    def base_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in chain(self.plain.parameters(), self.plain.buffers()))

    # -- membership (between steps only) ---------------------------------------------------------
    def add(self, spec: JobSpec, reporter: Reporter, *, method_config: Any = None,  # type: ignore[valid-type]
            metadata: dict[str, Any] | None = None, home: str | None = None,
            init_checkpoint: str | None = None) -> Member:
        """Set a job up as a member (data, shell, optimizer, resumed from its own checkpoint if it has one,
        else started from ``init_checkpoint``, another member's checkpoint, if given)."""
        used = set(self.members)
        free = [s for s in range(self.capacity) if s not in used]
        if not free:
            raise RuntimeError(f"the group is full ({self.capacity} members)")
        member = Member(self, free[0], spec, reporter, method_config=method_config, metadata=metadata, home=home,
                        init_checkpoint=init_checkpoint)
        member.setup_data()
        member.setup_model()
        member.setup_optimizer()
        member.begin_training()
        self.members[member.slot] = member
        return member

    def remove(self, member: Member) -> None:
        self.members.pop(member.slot, None)

    def active(self) -> list[Member]:
        """The members that train at the next step (not held)."""
        return [m for m in self.members.values() if not m.reporter.held]

    # -- one packed step -------------------------------------------------------------------------
    def step(self) -> list[tuple[Member, BaseException | None]]:
        """One micro-batch of every member through one forward and backward of the base; members at an
        accumulation boundary take their optimizer step (and log, evaluate, checkpoint, finish). Returns
        the members that left during it: (member, None) finished with its adapter registered,
        (member, error) failed. A held member (its reporter's ``held``: a PBT trial waiting for its
        scheduler's decision) sits the step out."""
        members = self.active()
        if not members:
            return []
        parts = [m.next_micro() for m in members]
        try:
            batch, spans = self.pack(parts)
            logits = self.forward(members, spans, batch)
            losses = [m.loss(logits[a:b], part["labels"]) for m, (a, b), part in zip(members, spans, parts)]
            sum(loss / m.accumulation for loss, m in zip(losses, members)).backward()
            values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # the step's one wait
        except Exception as e:  # noqa: BLE001 - find whose rows broke it; the rest go on
            return self._isolate(members, parts, e)
        finally:
            self.router.set(None)  # kept through the backward: checkpointed layers recompute with their rows
        left: list[tuple[Member, BaseException | None]] = []
        for member, loss, value in zip(members, losses, values):
            try:
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {member.step + 1}: its rows left the group")
                if member.micro_done(loss.detach()):
                    member.finish()
                    left.append((member, None))
            except Exception as e:  # noqa: BLE001 - one member's failure is its own
                left.append((member, e))
        for member, _ in left:
            self.remove(member)
        return left

    def _isolate(self, members: list[Member], parts: list[dict[str, torch.Tensor]],
                 error: Exception) -> list[tuple[Member, BaseException | None]]:
        """A packed step raised: every member restarts its current optimizer step (its accumulated
        gradients may be partial), and each member's micro-batch is run through the base alone. The
        members whose own rows fail leave with their error; if none does, the failure is the group's."""
        left: list[tuple[Member, BaseException | None]] = []
        for member, part in zip(members, parts):
            member.restart_step()
            try:
                batch, spans = self.pack([part])
                with torch.no_grad():
                    member.loss(self.forward([member], spans, batch), part["labels"])
            except Exception as own:  # noqa: BLE001
                left.append((member, own))
        if not left:
            raise error
        for member, _ in left:
            self.remove(member)
        return left

    def pack(self, parts: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """Every member's micro-batch as one batch on the device: padded on the right to the widest
        (masked, so each row computes what it would alone; labels are padded by each member's loss);
        each member's row span."""
        width = max(p["input_ids"].shape[1] for p in parts)
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        keys = [k for k in parts[0] if k != "labels"]
        batch = {k: torch.cat([F.pad(p[k], (0, width - p[k].shape[1]), value=pad[k]) for p in parts]) for k in keys}
        spans, row = [], 0
        for p in parts:
            spans.append((row, row + p["input_ids"].shape[0]))
            row += p["input_ids"].shape[0]
        return self.placement.batch(batch), spans

    def forward(self, members: list[Member], spans: list[tuple[int, int]],
                batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A packed batch whose rows ``spans[i]`` belong to ``members[i]`` through the base: a classifier's
        logits; a decoder's logits, or its last hidden states when :meth:`output_head` says the members
        apply the head themselves. A member with a soft prompt gets its rows without the prompt's
        positions, as its own model returns them."""
        prompts = self._install(members)
        slots = torch.cat([torch.full((b - a,), m.slot, dtype=torch.long) for m, (a, b) in zip(members, spans)])
        self.router.set(slots.to(self.placement.device, non_blocking=True))
        width = batch["input_ids"].shape[1]
        model = self.model if self.output_head() is None else getattr(self.model, self.model.base_model_prefix)
        try:
            out = model(**(self._with_prompts(members, spans, batch, prompts) if prompts else batch))
        finally:
            if not (self.checkpointing and torch.is_grad_enabled()):
                self.router.set(None)  # else step() ends the routing after the backward
        values = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if values.dim() == 2 or not prompts:  # a classifier: one row of logits per sequence
            return values
        starts = [prompts[m.slot].shape[0] if m.slot in prompts else 0 for m in members]
        return torch.cat([values[a:b, n : n + width] for (a, b), n in zip(spans, starts)])

    def output_head(self) -> nn.Module | None:
        """A decoder's vocabulary projection when the members may apply it themselves, to the positions
        their loss reads only (in SFT most positions are the prompt's or padding: their logits over the
        whole vocabulary are never needed). Only for families whose logits are exactly the head applied
        to the backbone's last hidden states, and while no member's adapter changes the head itself."""
        if self.task != "causal-lm" or getattr(self.plain.config, "model_type", None) not in PLAIN_LM_HEADS:
            return None
        head = self.model.get_output_embeddings()
        return None if isinstance(head, MixedModule) else head

    def _install(self, members: list[Member]) -> dict[int, torch.Tensor]:
        """Rebuild every wrapped module's deltas and heads from the members' live tensors; returns the soft
        prompts (virtual-token embeddings) of members that have one, by slot."""
        for module in self.mixed.values():
            module.clear()
        prompts: dict[int, torch.Tensor] = {}
        for member in members:
            for delta in member.deltas():
                if isinstance(delta, InputDelta):
                    if delta.keys_values(self.plain.config) is not None:
                        raise NotImplementedError("key/value prefixes do not pack in training yet")
                    prompts[member.slot] = delta.embeddings()
                else:
                    self._mixed(delta.module).add(member.slot, delta)
            for name, head in member.heads.items():
                self._mixed(name).set_head(member.slot, head)
        return prompts

    def _with_prompts(self, members: list[Member], spans: list[tuple[int, int]], batch: dict[str, torch.Tensor],
                      prompts: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The packed batch as input embeddings with each member's prompt in front of its rows' tokens (and
        its positions unmasked), padded on the right: each row laid out as its own model lays it out."""
        embeds = self.model.get_input_embeddings()(batch["input_ids"])
        longest = max(p.shape[0] for p in prompts.values())
        rows: dict[str, list[torch.Tensor]] = {"inputs_embeds": [], "attention_mask": [], "token_type_ids": []}
        for member, (a, b) in zip(members, spans):
            prompt = prompts.get(member.slot)
            n = 0 if prompt is None else prompt.shape[0]
            own = embeds[a:b]
            if n:
                own = torch.cat([prompt.to(embeds.dtype).expand(b - a, n, -1), own], dim=1)
            rows["inputs_embeds"].append(F.pad(own, (0, 0, 0, longest - n)))
            rows["attention_mask"].append(F.pad(F.pad(batch["attention_mask"][a:b], (n, 0), value=1), (0, longest - n)))
            if "token_type_ids" in batch:
                rows["token_type_ids"].append(F.pad(batch["token_type_ids"][a:b], (n, longest - n)))
        return {k: torch.cat(v) for k, v in rows.items() if v}

    def _mixed(self, name: str) -> MixedModule:
        module = self.mixed.get(name)
        if module is None:
            module = self.mixed[name] = MixedModule(self.model.get_submodule(name), self.router, self.capacity)
            replace_module(self.model, name, module)
        return module


class Member(Recipe):
    """One job in a base group: its recipe, with a shell of the group's base in place of a model of its own."""

    def __init__(self, group: BaseGroup, slot: int, spec: JobSpec, reporter: Reporter, **kwargs: Any):  # type: ignore[valid-type]
        super().__init__(spec, reporter, device=group.placement.device, **kwargs)
        self.group, self.slot = group, slot
        self.accumulation = spec.training.grad_accum_steps
        self._pending: list[dict[str, torch.Tensor]] = []
        self._losses: list[torch.Tensor] = []

    # -- setup -------------------------------------------------------------------------------------
    def setup_model(self) -> None:
        t, group = self.spec.training, self.group
        self.placement, self.zero3 = group.placement, False
        self.method = peft_methods.get_method(self.method_config.method)
        self.batches = Batches(self.spec.task, group.tokenizer, t.max_length)
        shell = structural_copy(group.plain)
        if self.labels:
            _fresh_heads(shell, len(self.labels))
        init_task_head(shell, t.seed)  # the head and the method's tensors: as the job's solo recipe draws them
        torch.manual_seed(t.seed)
        self.method.apply(shell, self.method_config)
        train = self.data.train
        self.method.prime(shell, (self.placement.batch(self.batches(train[i : i + t.batch_size]))
                                  for i in range(0, min(len(train), 8 * t.batch_size), t.batch_size)))
        owned = self.method.trainable_parameter_names(shell)
        for name in owned:  # the job's own fp32 masters; the frozen tensors stay shared with the base
            module_name, _, attr = name.rpartition(".")
            module = shell.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(getattr(module, attr).detach().to(torch.float32).clone()))
        group.plain.requires_grad_(False)  # apply marked the shell's (shared) frozen tensors; they stay frozen
        self.model = shell.train()
        heads = self.method_config.modules_to_save
        heads = task_head_names(shell) if heads is None else heads
        self.heads = {name: _CastHead(shell.get_submodule(name)) for name in heads}
        self.params = {n: p for n, p in shell.named_parameters() if n in owned}

    def setup_optimizer(self) -> None:
        t = self.spec.training
        self.summary = {"trainable_parameters": sum(p.numel() for p in self.params.values()),
                        "total_parameters": sum(p.numel() for p in self.model.parameters())}
        self.optimizer = make_optimizer(self.method, self.model, self.params, t, offload=False)
        warmup = int(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, warmup, self.total_steps))
        resumed = self.restore()
        self.reporter.started(step=self.step, total_steps=self.total_steps, resumed=resumed,
                              summary={"total_steps": self.total_steps, "world_size": 1, **self.summary})
        self.reporter.dataset_used(self.dataset_info)

    @property
    def at_boundary(self) -> bool:
        """Between two optimizer steps (no micro-batch of the next one trained yet): it can leave and
        resume from a checkpoint without losing anything."""
        return not self._pending and not self._losses

    def pause(self) -> str:
        """Checkpoint it now (at a boundary) through its reporter (recorded, as every checkpoint), to resume
        later; the step it holds, in words."""
        self.checkpoint({})
        self.reporter.metrics(self.step, {"checkpoint_step": self.step})
        return f"step {self.step}"

    # -- what the group asks of it each step -------------------------------------------------------
    def restart_step(self) -> None:
        """Drop what the current optimizer step accumulated; its micro-batches come again (the same ones:
        a step's batches depend on the step alone)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._pending, self._losses = [], []

    def next_micro(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            self._pending = self.micro_batches(self.step)
        return self._pending.pop(0)

    def deltas(self) -> list[RowDelta | InputDelta]:
        """Its adapter as per-row deltas of the plain base, built from its live tensors (so differentiable)."""
        heads = tuple(name + "." for name in self.heads)
        state = {k: t for k, t in self.method.training_state(self.model).items() if not k.startswith(heads)}
        return self.method.row_deltas(self.group.plain, self.method_config, state)

    def loss(self, values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This job's loss over its own rows (``values``: what :meth:`BaseGroup.forward` gave for them), as
        its model's own loss would compute it."""
        labels = labels.to(values.device, non_blocking=True)
        if self.labels:
            return F.cross_entropy(values[:, : len(self.labels)].float(), labels)
        # its rows were padded to the batch's width: nothing to predict there
        shifted = F.pad(labels, (0, values.shape[1] - labels.shape[1] + 1), value=-100)[:, 1:]
        head = self.group.output_head()
        if head is None:  # values are logits
            return F.cross_entropy(values.float().reshape(-1, values.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        keep = shifted != -100  # values are hidden states: the head only where a token is predicted
        return F.cross_entropy(head(values[keep]).float(), shifted[keep])

    def micro_done(self, loss: torch.Tensor) -> bool:
        """After a backward over this member's micro-batch: step its optimizer at the accumulation
        boundary; True once it has trained all its steps."""
        self._losses.append(loss.float())
        if self._pending:
            return False
        params = list(self.params.values())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = torch.stack(self._losses).mean()
        self._losses = []
        self.step += 1
        self.after_step(mean)
        return self.step >= self.total_steps

    def finish(self) -> str:
        name = self.write_adapter(self.model, self.last_metrics)
        self.reporter.finished(self.step, self.last_metrics, name)
        return name

    def evaluate(self) -> dict[str, float]:
        return evaluate(_JobView(self), self.batches, self.data.eval, batch_size=self.spec.training.batch_size,
                        placement=self.placement)

    # -- checkpoints: the job's tensors, its optimizer's and its schedule's state (never the base), as
    # safetensors and JSON (nothing is unpickled); recorded and verified as the recipe's are -----------
    def save_checkpoint(self, folder: str) -> None:
        names = list(self.params)
        save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()},
                  os.path.join(folder, "adapter.safetensors"))
        state = self.optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().reshape(-1).clone() if v.dim() == 0 else v.detach().cpu().contiguous()
                   for i, entries in state["state"].items() for k, v in entries.items()}
        save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        groups = state["param_groups"]  # each with its parameters' indices in the optimizer's order
        with open(os.path.join(folder, PACKED_STATE), "w") as f:
            json.dump({"step": self.step, "names": names, "param_groups": groups, "scheduler": scheduler}, f)
        self.write_step_file(folder)

    def load_checkpoint(self, folder: str, *, with_schedule: bool = True) -> int:
        with open(os.path.join(folder, PACKED_STATE)) as f:
            saved = json.load(f)
        if saved["names"] != list(self.params):
            raise ValueError(f"checkpoint {folder} holds tensors {saved['names'][:3]}..., not this job's")
        tensors = load_file(os.path.join(folder, "adapter.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[name])
        moments = load_file(os.path.join(folder, "optimizer.safetensors"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in moments.items():
            index, _, field = key.partition(".")
            state.setdefault(int(index), {})[field] = value.reshape(()) if field == "step" else value
        self.optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        if with_schedule:
            self.scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None]})
        return int(saved["step"])


class _JobView(nn.Module):
    """The group's base seen by one member alone (every row its own): what :func:`evaluate` runs."""

    def __init__(self, member: Member):
        super().__init__()
        self.member = member
        self.base, self.shell = member.group.model, member.model  # so eval()/train() reach both

    def forward(self, labels: torch.Tensor, **batch: torch.Tensor) -> SimpleNamespace:
        member, rows = self.member, batch["input_ids"].shape[0]
        logits = member.group.forward([member], [(0, rows)], batch)
        if member.labels:
            logits = logits[:, : len(member.labels)]
        return SimpleNamespace(loss=member.loss(logits, labels), logits=logits)


def _fresh_heads(model: nn.Module, num_labels: int) -> None:
    """Give ``model`` task heads of its own, ``num_labels`` wide (weights set by ``init_task_head``)."""
    for name in task_head_names(model):
        head = copy.deepcopy(model.get_submodule(name))  # new tensors, not the base's
        last = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)][-1]
        old = head.get_submodule(last)
        new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None,
                        dtype=old.weight.dtype, device=old.weight.device)
        head = new if last == "" else head
        if last:
            replace_module(head, last, new)
        replace_module(model, name, head)
    model.config.num_labels = num_labels
    if hasattr(model, "num_labels"):  # what its own loss reads (a method's prime runs the shell's forward)
        model.num_labels = num_labels
