"""The training recipe that runs inside every Ray Train worker of a job.

setup   load the frozen base, apply the PEFT method, build a DeepSpeed engine whose optimizer
        holds only the trainable parameters (ZeRO 0–3; gloo on CPU, NCCL on GPU)
train   each optimizer step consumes one global batch, split into micro-batches across ranks and
        accumulation steps, so N workers follow the same trajectory as one worker
eval    every epoch (or `eval_every_steps`) on the held-out split, summed across ranks
ckpt    adapter + optimizer state only (`exclude_frozen_parameters`), reported to Ray Train so a
        restarted worker group resumes from the last one
save    rank 0 writes the adapter — under ZeRO-3 after gathering just the adapter's partitions —
        and registers it in the store

Rank 0 is the job's voice: it moves the job to RUNNING, records metrics and registers the adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

import peft_methods
from jobs.base_models import load_base_model
from jobs.data import load_for_job
from jobs.states import JobState
from jobs.store import JobStore
from jobs.subspaces import resolve_method_config

CHECKPOINT_TAG = "peftfleet"
STEP_FILE = "peftfleet_step.json"  # in every checkpoint folder: the step it holds


def deepspeed_config(spec, world_size: int) -> dict[str, Any]:
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


class Batches:
    """Tokenised micro-batches for one task type."""

    def __init__(self, task: str, tokenizer, max_length: int):
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if self.task == "sequence-classification":
            enc = self.tokenizer([t for t, _ in examples], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc["labels"] = torch.tensor([y for _, y in examples])
            return dict(enc)
        return self._sft(examples)

    def _sft(self, pairs) -> dict[str, torch.Tensor]:
        """Prompt + response; the loss covers the response (and EOS) only."""
        tok, rows = self.tokenizer, []
        for prompt, response in pairs:
            if tok.chat_template:
                head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            else:
                head = prompt + "\n"
            p = tok(head, add_special_tokens=False)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = (p + r)[: self.max_length]
            labels = ([-100] * len(p) + r)[: self.max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
        }


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, batches: Batches, examples, rank: int, world: int, batch_size: int) -> dict[str, float]:
    """Metrics on the held-out split; each rank takes every world-th example, sums are all-reduced."""
    engine.eval()
    mine = examples[rank::world]
    loss_sum = correct = count = tokens = 0.0
    for i in range(0, max(len(mine), 1), batch_size):
        chunk = mine[i : i + batch_size] or examples[:1]  # every rank runs the same number of forwards (ZeRO-3 gathers)
        weight = 1.0 if mine[i : i + batch_size] else 0.0
        batch = batches(chunk)
        out = engine(**batch)
        if batches.task == "sequence-classification":
            n = len(chunk) * weight
            loss_sum += out.loss.item() * n
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item() * weight
            count += n
        else:
            n = (batch["labels"][:, 1:] != -100).sum().item() * weight
            loss_sum += out.loss.item() * n
            tokens += n
    loss_sum, correct, count, tokens = _all_sum([loss_sum, correct, count, tokens])
    engine.train()
    if batches.task == "sequence-classification":
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
    return {"eval_loss": loss_sum / tokens, "eval_perplexity": math.exp(min(20.0, loss_sum / tokens))}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. ``config``: job_id, spec, store_url, storage_url, home, base_fingerprint."""
    import deepspeed
    import ray.train
    import transformers

    transformers.logging.set_verbosity_error()  # a fresh task head is expected, not news
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job_id = config["job_id"]
    store = JobStore(config["store_url"], storage_url=config["storage_url"], home=config["home"]) if rank == 0 else None
    from jobs.spec import parse_job_spec

    spec = parse_job_spec(config["spec"])
    t = spec.training
    torch.manual_seed(t.seed)  # the same fresh head on every rank

    data = load_for_job(spec.dataset, spec.task, t)
    labels = getattr(data, "labels", None)
    model, tokenizer = load_base_model(spec.base_model, spec.task, num_labels=len(labels) if labels else None, home=config["home"])
    method = peft_methods.get_method(spec.method.method)
    # Registry references in the method config (an IPT subspace) become verified local folders.
    method_config, lineage = resolve_method_config(
        spec.method, store or JobStore(config["store_url"], storage_url=config["storage_url"], home=config["home"]), config["base_fingerprint"]
    )
    method.apply(model, method_config)
    batches = Batches(spec.task, tokenizer, t.max_length)
    method.prime(model, (batches(data.train[i : i + t.batch_size]) for i in range(0, min(len(data.train), 8 * t.batch_size), t.batch_size)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    counts = {"trainable_parameters": sum(p.numel() for p in trainable), "total_parameters": sum(p.numel() for p in model.parameters())}

    micro, accum = t.batch_size, t.grad_accum_steps
    global_batch = micro * accum * world
    steps_per_epoch = len(data.train) // global_batch  # the last partial batch is dropped: every rank must step together
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train)} training examples cannot fill one global batch of {global_batch}")
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, int(t.warmup_ratio * total_steps), total_steps))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid a 30–50 s compile; gloo suffices
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec, world), dist_init_required=False
    )

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=False)
        step = int(client_state["step"])
        print(f"[rank {rank}] resumed from checkpoint at step {step}", flush=True)
    elif config.get("init_checkpoint"):
        # Another job's state, continued with this job's hyper-parameters (a PBT exploit): the adapter
        # and optimizer state come from there, the learning-rate schedule is this job's at that step.
        _, client_state = engine.load_checkpoint(config["init_checkpoint"], tag=CHECKPOINT_TAG, load_module_strict=False,
                                                 load_lr_scheduler_states=False)
        step = int(client_state["step"])
        scheduler.last_epoch = step
        print(f"[rank {rank}] started from {config['init_checkpoint']} at step {step}", flush=True)

    nodes = _worker_nodes(world)
    if rank == 0:
        current = store.get(job_id).state
        resumed = f"; resumed from the checkpoint at step {step}" if checkpoint is not None else (
            f"; continuing another job's checkpoint at step {step}" if step else "")
        if current is JobState.RUNNING and checkpoint is not None:  # Ray Train restarted the worker group
            store.transition(job_id, JobState.RETRYING, reason=f"worker group restarted after a failure{resumed}")
            current = JobState.RETRYING
        if current is not JobState.RUNNING:
            store.transition(job_id, JobState.RUNNING, reason=f"{world} worker(s) training{resumed}", expected=[JobState.QUEUED, JobState.RETRYING])
        store.set_runtime(job_id, worker_nodes=nodes, placement_group=_placement_group())
        if step:  # resumed (own checkpoint) or continuing another job's (PBT)
            store.record_metrics(job_id, step, {"resumed_from_step": step})
        store.record_metrics(job_id, step, {"total_steps": total_steps, "world_size": world, **counts})
        print(f"job {job_id[:8]}: {counts['trainable_parameters']:,} trainable parameters, "
              f"{total_steps} steps of {global_batch} examples, ZeRO-{spec.deepspeed.zero_stage}, {world} worker(s)", flush=True)

    eval_every = t.eval_every_steps or steps_per_epoch
    ckpt_every = t.checkpoint_every_steps or steps_per_epoch
    log_every = max(1, min(10, total_steps // 20))
    engine.train()
    started = time.perf_counter()
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        order = list(data.train)
        random.Random(t.seed + epoch).shuffle(order)  # identical on every rank
        batch_examples = order[index * global_batch : (index + 1) * global_batch]
        loss_sum = 0.0
        for a in range(accum):
            start = (a * world + rank) * micro
            loss = engine(**batches(batch_examples[start : start + micro])).loss
            extra = method.regularization_loss(engine.module)
            engine.backward(loss if extra is None else loss + extra)
            engine.step()
            loss_sum += loss.item()
        step += 1
        if step % log_every == 0 or step == total_steps:
            (mean_loss,) = _all_sum([loss_sum / accum / world])
            if rank == 0:
                store.record_metrics(job_id, step, {"train_loss": mean_loss, "lr": scheduler.get_last_lr()[0]})
                rate = step / (time.perf_counter() - started)
                print(f"step {step}/{total_steps} loss {mean_loss:.4f} ({rate:.2f} steps/s)", flush=True)
        metrics: dict[str, float] = {"step": step}
        if step % eval_every == 0 or step == total_steps:
            metrics.update(evaluate(engine, batches, data.eval, rank, world, micro))
            if rank == 0:
                store.record_metrics(job_id, step, {k: v for k, v in metrics.items() if k != "step"})
                print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"), flush=True)
        if (step % ckpt_every == 0 or step == total_steps) and step < total_steps:
            with tempfile.TemporaryDirectory() as folder:
                engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step}, exclude_frozen_parameters=True)
                with open(os.path.join(folder, STEP_FILE), "w") as f:  # readable without unpickling anything
                    json.dump({"step": step}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            if rank == 0:  # persisted once report returns: a sweep may hand it to another trial
                store.record_metrics(job_id, step, {"checkpoint_step": step})
        elif len(metrics) > 1:
            ray.train.report(metrics)

    if rank == 0:  # this worker's peak resident memory, for sizing (Linux reports KiB)
        store.record_metrics(job_id, step, {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    adapter = _save_and_register(engine, method, spec, config, store, rank, metrics, lineage, labels)
    ray.train.report({**metrics, "adapter": adapter or ""})


def _placement_group() -> str | None:
    """The id of the placement group holding this job's workers (so whoever stops the job abruptly,
    e.g. a sweep's scheduler, can give its resources back)."""
    import ray

    pg = ray.util.get_current_placement_group()
    return None if pg is None else pg.id.hex()


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (where the workers were placed)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized() or world == 1:
        return [mine]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, mine)
    return [str(n) for n in nodes]


def _save_and_register(engine, method, spec, config, store, rank: int, metrics: dict[str, float], lineage: dict,
                       labels: list | None) -> str | None:
    model = engine.module
    owned = [p for n, p in model.named_parameters() if method.owns(model, n)]
    gather = nullcontext()
    if spec.deepspeed.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(owned, modifier_rank=None)  # only the adapter, never the base
    name = None
    with gather:
        if rank == 0:
            job_id = config["job_id"]
            name = f"{spec.name}-{job_id[:8]}"
            scores = {k: float(v) for k, v in metrics.items() if k.startswith("eval_")}
            with tempfile.TemporaryDirectory() as tmp:
                folder = peft_methods.save_adapter(model, os.path.join(tmp, "adapter"), metadata={
                    "base_fingerprint": config["base_fingerprint"], "job_id": job_id, "metrics": scores, **lineage,
                    **({"labels": list(labels)} if labels else {}),
                })
                store.adapters.register(
                    folder, name=name, base_fingerprint=config["base_fingerprint"], task=spec.task,
                    task_name=spec.effective_task_name, job_id=job_id, metrics=scores, tags=spec.tags,
                )
            print(f"adapter {name} registered", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return name
