"""The training recipe every worker of a job runs, in named phases (as torchtune's recipes read):

setup_data       the job's training and held-out examples (in memory, or this rank's rows streamed from
                 Ray Data shards with the held-out split in memory), and how they become batches
setup_model      load the frozen base in the job's precision on this rank's device (under ZeRO-3
                 partitioned as it loads), apply the PEFT method (FAR and friends look at a few batches)
setup_optimizer  a DeepSpeed engine whose optimizer holds only the trainable parameters (ZeRO 0–3;
                 gloo on CPU, NCCL on GPU; DeepSpeed's CPU Adam when the optimizer is offloaded),
                 restored from a checkpoint when there is one
train            each optimizer step consumes one global batch, split into micro-batches across ranks
                 and accumulation steps, so N workers follow the same trajectory as one worker;
                 evaluates and checkpoints (adapter + optimizer state only) on schedule, each
                 checkpoint recorded with the sha256 of its files, verified before a restore; the next
                 step's batches are tokenised in a background thread while this one computes
evaluate         metrics on the held-out split, summed across ranks
save             rank 0 writes the adapter from the optimizer's fp32 master weights (under ZeRO-3
                 gathering just the adapter's) and registers it

Every batch, metric and collective goes through one :class:`jobs.training.devices.Placement`, so
each lives on the rank's device; the host waits on the device only when a metric is logged.

The recipe knows nothing of Ray or the store: it talks to the outside world through a
:class:`jobs.training.reporter.Reporter`, so it runs in a unit test with an in-memory one.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from itertools import islice
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

import peft_methods
from jobs.base_models import enable_activation_checkpointing, init_task_head, load_base_model, set_base_dropout
from jobs.spec import JobSpec
from jobs.training import checkpoints
from jobs.training.batches import Batches
from jobs.training.checkpoints import STEP_FILE, CheckpointRejected
from jobs.training.data import fingerprint as data_fingerprint
from jobs.training.data import load_for_job
from jobs.training.devices import Placement, all_sum, make_optimizer, master_weights
from jobs.training.reporter import Reporter
from jobs.training.sources import TrainStream, row_hash

CHECKPOINT_TAG = "peftfleet"


def deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:  # type: ignore[valid-type]
    t, ds = spec.training, spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no fused-op compile on CPU
        "steps_per_print": 10**9,
    }


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model: Any, batches: Batches, examples: list, *, batch_size: int, rank: int = 0,
             world: int = 1, placement: Placement | None = None) -> dict[str, float]:
    """Held-out metrics of ``model`` (a module or a DeepSpeed engine): loss and accuracy for classifiers,
    loss and perplexity over response tokens for causal LMs. Each rank takes every world-th example and
    the sums are all-reduced, so every rank returns the same numbers. Sums stay on the model's device
    until the one all-reduce at the end."""
    placement = placement or Placement(_device_of(model))
    classify = batches.task == "sequence-classification"
    was_training = model.training
    model.eval()
    mine = examples[rank::world]
    sums = placement.zeros(4)  # loss × n, correct, examples, response tokens
    for i in range(0, max(len(mine), 1), batch_size):
        chunk = mine[i : i + batch_size] or examples[:1]  # every rank runs the same number of forwards (ZeRO-3 gathers)
        weight = 1.0 if mine[i : i + batch_size] else 0.0
        batch = placement.batch(batches(chunk))
        out = model(**batch)
        if classify:
            n = len(chunk) * weight
            sums[1] += (out.logits.argmax(-1) == batch["labels"]).sum() * weight
            sums[2] += n
        else:
            n = (batch["labels"][:, 1:] != -100).sum() * weight
            sums[3] += n
        sums[0] += out.loss.detach().double() * n
    loss_sum, correct, count, tokens = all_sum(sums)
    model.train(was_training)
    if classify:
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
    return {"eval_loss": loss_sum / tokens, "eval_perplexity": math.exp(min(20.0, loss_sum / tokens))}


def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)  # DeepSpeed engines and transformers models say it
    return device if isinstance(device, torch.device) else next(model.parameters()).device


class Recipe:
    """One job's training on one rank. ``method_config`` is the spec's, with registry references already
    resolved to local folders; ``metadata`` goes into the saved adapter (base fingerprint, job id, lineage)."""

    def __init__(self, spec: JobSpec, reporter: Reporter, *, rank: int = 0, world: int = 1,  # type: ignore[valid-type]
                 method_config: Any = None, metadata: dict[str, Any] | None = None, home: str | None = None,
                 init_checkpoint: str | None = None, device: torch.device | None = None,
                 train_stream: TrainStream | None = None):
        self.spec, self.reporter, self.rank, self.world = spec, reporter, rank, world
        self.method_config = method_config if method_config is not None else spec.method
        self.metadata, self.home, self.init_checkpoint = dict(metadata or {}), home, init_checkpoint
        self.device = device  # this rank's device when the caller knows it (Ray Train), else cuda:LOCAL_RANK or cpu
        self.stream = train_stream  # this rank's training rows streamed (Ray Data shards) instead of held
        self.step = 0
        self._order: tuple[int, list] | None = None  # (epoch, its shuffled examples)
        self._cursor: list | None = None  # streaming: [epoch, next step index, this rank's iterator]
        self._streamed = 0  # streaming: rows this rank trained on
        self._seen: set[int] = set()  # streaming: hashes of this rank's first-epoch rows (bounded)

    def run(self) -> str | None:
        """Every phase in order; returns the registered adapter's name on rank 0 (None elsewhere)."""
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        metrics = self.train()
        return self.save(metrics)

    # -- setup ---------------------------------------------------------------------------------
    def setup_data(self) -> None:
        """The job's examples: held in memory (every rank the whole split), or, given a train stream, this
        rank's rows as they stream by and the held-out split in memory. Rank 0 notes the dataset's
        fingerprint, which goes into the adapter's metadata and (:meth:`setup_optimizer`) the store."""
        t = self.spec.training
        if self.stream is not None:
            self.data = SimpleNamespace(train=self.stream.sample, eval=self.stream.eval, labels=self.stream.labels)
            rows = self.stream.rows
        else:
            self.data = load_for_job(self.spec.dataset, self.spec.task, t)
            rows = len(self.data.train)
        self.labels = getattr(self.data, "labels", None)
        self.dataset_info: dict[str, Any] | None = None
        if self.rank == 0:
            self.dataset_info = self.stream.fingerprint if self.stream is not None else \
                data_fingerprint(self.spec.dataset, t, self.data)
            self.metadata["dataset"] = self.dataset_info
        self.global_batch = t.batch_size * t.grad_accum_steps * self.world
        self.steps_per_epoch = rows // self.global_batch  # the last partial batch is dropped: ranks step together
        if self.steps_per_epoch == 0:
            raise ValueError(f"{rows} training examples cannot fill one global batch of {self.global_batch}")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch

    def setup_model(self) -> None:
        import deepspeed
        import transformers

        transformers.logging.set_verbosity_error()  # a fresh task head is expected, not news
        # before anything starts DeepSpeed's comms (ZeRO-3 loading does): avoid a 30–50 s compile; gloo suffices
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        t = self.spec.training
        torch.manual_seed(t.seed)  # the same fresh head on every rank
        num_labels = len(self.labels) if self.labels else None
        self.placement = Placement.for_job(self.spec.deepspeed.precision, self.device)
        self.zero3 = self.spec.deepspeed.zero_stage == 3
        with self._partitioned_loading():
            self.model, tokenizer = load_base_model(self.spec.base_model, self.spec.task, num_labels=num_labels,
                                                    home=self.home, dtype=self.placement.dtype,
                                                    device=None if self.zero3 else self.placement.device)
        self.method = peft_methods.get_method(self.method_config.method)
        self.batches = Batches(self.spec.task, tokenizer, t.max_length)
        train = self.data.train
        with self._base_gathered():
            set_base_dropout(self.model, t.base_dropout)
            init_task_head(self.model, t.seed)  # seeded by the job alone: a base group draws the same head
            torch.manual_seed(t.seed)  # the method's own initialisation, likewise
            self.method.apply(self.model, self.method_config)
            if t.gradient_checkpointing:
                enable_activation_checkpointing(self.model)
            self.method.prime(self.model, (self.placement.batch(self.batches(train[i : i + t.batch_size]))
                                           for i in range(0, min(len(train), 8 * t.batch_size), t.batch_size)))

    @contextmanager
    def _partitioned_loading(self) -> Iterator[None]:
        """Under ZeRO-3, transformers loads inside ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig``
        is registered: each rank keeps only its partition of every weight, never a whole copy. Unregistered
        afterwards, so a later load in this process (a test, a benchmark) gets whole weights again."""
        if not self.zero3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        config = deepspeed_config(self.spec, self.world)
        # zero.Init parses this before DeepSpeed's comms know the world size: let it derive the global batch
        registered = HfDeepSpeedConfig({k: v for k, v in config.items() if k != "train_batch_size"})
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del registered

    def _base_gathered(self):
        """Under ZeRO-3 the base's partitions, gathered while the method is applied and primed (it may read
        base weights and run forwards before any engine exists): one transient copy in the job's precision."""
        return self._whole(list(self.model.parameters()))

    def _whole(self, params: list[torch.nn.Parameter]):
        """A context in which ``params`` are whole (read-only): gathered under ZeRO-3, as they are otherwise."""
        if not self.zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def setup_optimizer(self) -> None:
        import deepspeed

        t = self.spec.training
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.summary = {"trainable_parameters": sum(_numel(p) for p in trainable.values()),
                        "total_parameters": sum(_numel(p) for p in self.model.parameters())}
        optimizer = make_optimizer(self.method, self.model, trainable, t,
                                   offload=self.spec.deepspeed.offload_optimizer)
        warmup = int(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(t.lr_schedule, warmup, self.total_steps)
        )
        on_gpu = self.placement.device.type == "cuda"
        self.engine, _, _, _ = deepspeed.initialize(
            args=SimpleNamespace(device_rank=self.placement.device.index) if on_gpu else None,  # the engine's device
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=self.scheduler,
            config=deepspeed_config(self.spec, self.world),
            dist_init_required=False,
        )
        resumed = self.restore()
        self.reporter.started(step=self.step, total_steps=self.total_steps, resumed=resumed,
                              summary={"total_steps": self.total_steps, "world_size": self.world, **self.summary})
        self.reporter.dataset_used(self.dataset_info)
        if self.rank == 0:
            print(
                f"{self.summary['trainable_parameters']:,} trainable parameters, {self.total_steps} steps of "
                f"{self.global_batch} examples, ZeRO-{self.spec.deepspeed.zero_stage}, {self.world} worker(s)",
                flush=True,
            )

    # -- train -----------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Steps until ``total_steps``; returns the last evaluation's metrics."""
        self.begin_training()
        self.engine.train()
        with ThreadPoolExecutor(1, thread_name_prefix="peftfleet-batches") as prefetch:
            upcoming = prefetch.submit(self.micro_batches, self.step)
            while self.step < self.total_steps:
                micro = upcoming.result()
                if self.step + 1 < self.total_steps:
                    upcoming = prefetch.submit(self.micro_batches, self.step + 1)
                loss = self.train_step(micro)
                self.step += 1
                self.after_step(loss)
        if self.stream is not None:
            self.reporter.metrics(self.step, self.stream_counts())
        # this worker's peak resident memory, for sizing (Linux reports KiB)
        self.reporter.metrics(self.step, {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return self.last_metrics

    def begin_training(self) -> None:
        """The schedule of logs, evaluations and checkpoints, from the current step."""
        t = self.spec.training
        self.eval_every = t.eval_every_steps or self.steps_per_epoch
        self.ckpt_every = t.checkpoint_every_steps or self.steps_per_epoch
        self.log_every = max(1, min(10, self.total_steps // 20))
        self._clock = (time.perf_counter(), self.step)
        self.last_metrics: dict[str, float] = {}

    def after_step(self, loss: torch.Tensor) -> None:
        """What follows optimizer step ``self.step`` (``loss``: its mean loss, on the device): the log,
        the evaluation and the checkpoint when they are due."""
        step = self.step
        if step % self.log_every == 0 or step == self.total_steps:
            (mean_loss,) = all_sum(loss.reshape(1) / self.world)  # the only wait on the device
            self.reporter.metrics(step, {"train_loss": mean_loss, "lr": self.scheduler.get_last_lr()[0]})
            started, first = self._clock
            self._say(f"step {step}/{self.total_steps} loss {mean_loss:.4f} "
                      f"({(step - first) / (time.perf_counter() - started):.2f} steps/s)", rank0=True)
        evaluated = step % self.eval_every == 0 or step == self.total_steps
        if evaluated:
            self.last_metrics = self.evaluate()
            self.reporter.metrics(step, self.last_metrics)
            self._say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items()), rank0=True)
        if (step % self.ckpt_every == 0) and step < self.total_steps:
            self.checkpoint(self.last_metrics if evaluated else {})
            self.reporter.metrics(step, {"checkpoint_step": step})  # persisted: a sweep may hand it on
            self.reporter.hold(step)  # a PBT trial's scheduler decides on it before it trains on
        elif evaluated:
            self.reporter.progress(step, self.last_metrics)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's tokenised micro-batches of global step ``step``, host side (what the prefetch
        thread prepares while the previous step computes)."""
        t = self.spec.training
        if self.stream is not None:
            examples = self.streamed_examples(step)
            return [self.placement.prepare(self.batches(examples[a * t.batch_size : (a + 1) * t.batch_size]))
                    for a in range(t.grad_accum_steps)]
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = list(self.data.train)
            random.Random(t.seed + epoch).shuffle(order)  # identical on every rank; once per epoch
            self._order = (epoch, order)
        examples = self._order[1][index * self.global_batch : (index + 1) * self.global_batch]
        starts = ((a * self.world + self.rank) * t.batch_size for a in range(t.grad_accum_steps))
        return [self.placement.prepare(self.batches(examples[s : s + t.batch_size])) for s in starts]

    def streamed_examples(self, step: int) -> list:
        """This rank's next ``batch_size × grad_accum_steps`` streamed rows for global step ``step``: the
        epoch's stream is opened at its first step (or, resuming, skips the rows of the steps already done)
        and read on in step order."""
        t = self.spec.training
        per_rank = t.batch_size * t.grad_accum_steps
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._cursor is None or self._cursor[:2] != [epoch, index]:
            rows = self.stream.epoch(epoch)
            if index:
                for _ in islice(rows, index * per_rank):
                    pass
            self._cursor = [epoch, index, rows]
        examples = list(islice(self._cursor[2], per_rank))
        if len(examples) < per_rank:
            raise RuntimeError(f"rank {self.rank}'s shard of the training data ran out at step {step + 1} "
                               f"(epoch {epoch + 1}): {len(examples)} of {per_rank} rows")
        self._cursor[1] += 1
        self._streamed += len(examples)
        if epoch == 0 and len(self._seen) < 100_000:
            self._seen.update(row_hash(x, t.seed) for x, _ in examples)
        return examples

    def stream_counts(self) -> dict[str, float]:
        """Rows each rank trained on (``stream_rows_rank<r>``) and first-epoch row keys more than one rank
        saw (``stream_rows_shared``: 0 when every rank read a shard of its own). Collective."""
        mine = (self._streamed, self._seen)
        every = [mine]
        if self.world > 1 and dist.is_initialized():
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        keys = [key for _, seen in every for key in seen]
        return {**{f"stream_rows_rank{r}": float(n) for r, (n, _) in enumerate(every)},
                "stream_rows_shared": float(len(keys) - len(set(keys)))}

    def train_step(self, micro: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their mean loss, on the device
        (reading it waits for the step, so only logging does)."""
        total = None
        self.method.begin_step(self.engine.module, self.step, self.total_steps, self._whole)
        for batch in micro:
            batch = self.placement.batch(batch)
            loss, objective = self.method.training_loss(self.engine.module, batch, lambda: self.engine(**batch))
            self.engine.backward(objective)
            self.engine.step()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        return total / len(micro)

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out split, summed across ranks (see :func:`evaluate`)."""
        return evaluate(self.engine, self.batches, self.data.eval, batch_size=self.spec.training.batch_size,
                        rank=self.rank, world=self.world, placement=self.placement)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Write a checkpoint of the current step, have the reporter persist it, then record the sha256 of
        its files (every rank's) in the store: a restore loads only what matches that record."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_checkpoint(folder)
            files = checkpoints.manifest(folder)
            if self.world > 1 and dist.is_initialized():  # every rank's files land in one persisted folder
                every: list[Any] = [None] * self.world
                dist.all_gather_object(every, files)
                files = checkpoints.merge(every)
            self.reporter.progress(self.step, metrics, checkpoint=folder)
            self.reporter.checkpoint_saved(self.step, files)

    def save_checkpoint(self, folder: str) -> None:
        """The adapter and optimizer state only (never the frozen base), plus the job and step it holds."""
        self.engine.save_checkpoint(
            folder, tag=CHECKPOINT_TAG, client_state={"step": self.step}, exclude_frozen_parameters=True
        )
        self.write_step_file(folder)

    def write_step_file(self, folder: str) -> None:
        with open(os.path.join(folder, STEP_FILE), "w") as f:
            json.dump({"job_id": str(self.metadata.get("job_id", "")), "step": self.step}, f)

    def restore(self) -> bool:
        """Before the first step: resume from the job's own last checkpoint (True), or else start from
        ``init_checkpoint``, another job's state continued with this job's hyper-parameters (a PBT exploit:
        the adapter and optimizer state come from there, the learning-rate schedule is this job's at that
        step). Either is verified against its record in the store first (:meth:`verified`)."""
        with self.reporter.checkpoint_to_resume() as folder:
            if folder is not None:
                with self.verified(folder, own=True) as private:
                    self.step = self.load_checkpoint(private)
                self._say(f"resumed from checkpoint at step {self.step}")
                return True
        if self.init_checkpoint:
            with self.verified(self.init_checkpoint) as private:
                self.step = self.load_checkpoint(private, with_schedule=False)
            self.scheduler.last_epoch = self.step
            sched = self.scheduler  # this job's learning rate at that step, from the first step on
            for group, base, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(self.step)
            self._say(f"started from {self.init_checkpoint} at step {self.step}")
        return False

    @contextmanager
    def verified(self, folder: str, *, own: bool = False) -> Iterator[str]:
        """A private copy of checkpoint ``folder``, once it matched the store's record of the
        job and step its step file names (this job's own, if ``own``): confined to the reporter's checkpoint
        root, exactly the recorded files, each with its recorded sha256. Else :class:`CheckpointRejected`,
        before anything in it was loaded."""
        said = checkpoints.read_step_file(folder)
        mine = self.metadata.get("job_id")
        if own and mine is not None and said["job_id"] != str(mine):
            raise CheckpointRejected(f"checkpoint {folder} holds job {said['job_id']!r}, not this job {mine!r}")
        files = self.reporter.checkpoint_record(said["job_id"], said["step"])
        if files is None:
            raise CheckpointRejected(f"checkpoint {folder}: the store has no record of job {said['job_id']!r} "
                                     f"at step {said['step']}")
        with checkpoints.verified_copy(folder, files, root=self.reporter.checkpoint_root) as private:
            yield private

    def load_checkpoint(self, folder: str, *, with_schedule: bool = True) -> int:
        """Restore a checkpoint :meth:`save_checkpoint` wrote (verified: see :meth:`verified`); returns its
        step. DeepSpeed reads its files with ``torch.load(weights_only=True)``."""
        engine, saving = self.engine, self.engine.checkpoint_engine
        engine.checkpoint_engine = checkpoints.weights_only_engine()
        try:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=False,
                                                     load_lr_scheduler_states=with_schedule)
        finally:
            engine.checkpoint_engine = saving
        return int(client_state["step"])

    # -- save ------------------------------------------------------------------------------------
    def save(self, metrics: dict[str, float]) -> str | None:
        """Write and register the adapter on rank 0; every rank returns once it is registered."""
        model = self.engine.module
        owned = [(n, p) for n, p in model.named_parameters() if self.method.owns(model, n)]
        name = None
        with master_weights(owned):  # the adapter's fp32 masters, gathered under ZeRO-3; never the base
            if self.rank == 0:
                name = self.write_adapter(model, metrics)
        if dist.is_initialized():
            dist.barrier()
        self.reporter.finished(self.step, metrics, name)
        return name

    def write_adapter(self, model: torch.nn.Module, metrics: dict[str, float]) -> str:
        """Write the adapter applied to ``model`` (its tensors as they stand) and register it; its name."""
        scores = {k: float(v) for k, v in metrics.items() if k.startswith("eval_")}
        with tempfile.TemporaryDirectory() as tmp:
            folder = peft_methods.save_adapter(model, os.path.join(tmp, "adapter"), metadata={
                **self.metadata, "metrics": scores, **({"labels": list(self.labels)} if self.labels else {}),
            })
            name = self.reporter.register_adapter(str(folder), scores)
        print(f"adapter {name} registered", flush=True)
        return name

    def _say(self, message: str, *, rank0: bool = False) -> None:
        if not rank0 or self.rank == 0:
            print(message if rank0 else f"[rank {self.rank}] {message}", flush=True)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partition reports its whole size there
