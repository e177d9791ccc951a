"""Runs the training recipe in a fresh process where Ray cannot be imported:
``python -m tests.jobs.recipe_runs SPEC_JSON OUT_JSON [RESUME_FOLDER]``.

With ``RECIPE_RUNS_STORE`` set to a JSON object ``{"url", "job_id", "root"}`` (optionally ``"resume"``: a
folder to offer as the job's own checkpoint, ``"init"``: a checkpoint to start from), or a list of them
(one per spec), the run is that job in that real store: a :class:`StoreReporter` persists its
checkpoints under ``root`` and records them there, as the cluster's reporters do, and every restore is
verified against those records; a run a restore refused reports the error instead of an adapter.
Without it, checkpoint records live in the in-memory reporter (one process).

The process is the recipe's whole world: a one-rank gloo group (what Ray Train would set up), an
in-memory reporter, and ``import ray`` made to fail, so the recipe provably needs no Ray. SPEC_JSON may
hold a list of specs, run one after another in this process (OUT_JSON then holds a list of results).

Every run goes through :class:`CheckedRecipe`, which asserts the device discipline as it trains: each
tensor the model's forward receives was handed over by the recipe's ``Placement`` (so it is on the
rank's device), and the frozen base was loaded in the job's precision (under ZeRO-3, partitioned as it
loaded). A violation fails the run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import sys
from pathlib import Path

sys.modules["ray"] = None  # type: ignore[assignment] - any `import ray` now raises ImportError

import torch  # noqa: E402

from jobs.training.checkpoints import CheckpointRejected  # noqa: E402
from jobs.training.devices import Placement  # noqa: E402
from jobs.training.recipe import Recipe  # noqa: E402
from jobs.training.reporter import InMemoryReporter  # noqa: E402


class StoreReporter(InMemoryReporter):
    """An in-memory reporter whose checkpoints are persisted to ``<root>/<job>/a<attempt>/step-<N>`` and
    recorded in a real job store (what the cluster's reporters do); it resumes from the job's latest record
    unless told a folder."""

    def __init__(self, store_url: str, job_id: str, root: str, resume_from: str | None = None):
        from jobs.store import JobStore

        super().__init__(resume_from, job_id=job_id)
        self.store = JobStore(store_url, storage_url=os.path.join(root, "artifacts"), home=os.path.join(root, "home"))
        self.checkpoint_root = root
        self.persisted: dict[int, str] = {}

    def checkpoint_to_resume(self):
        if self.resume_from is None:
            latest = self.store.checkpoints.latest(self.job_id)
            self.resume_from = latest.folder if latest else None
        return super().checkpoint_to_resume()

    def progress(self, step, metrics, checkpoint=None):
        super().progress(step, metrics, checkpoint)
        if checkpoint is not None:
            attempt = self.store.get(self.job_id).attempt
            folder = Path(self.checkpoint_root, self.job_id, f"a{attempt}", f"step-{step}")
            shutil.copytree(checkpoint, folder)
            self.persisted[step] = str(folder)
            self.checkpoints[-1] = (step, str(folder))

    def checkpoint_saved(self, step, files):
        super().checkpoint_saved(step, files)
        self.store.checkpoints.record(self.job_id, self.store.get(self.job_id).attempt, step, self.persisted[step],
                                      files)

    def checkpoint_record(self, job_id, step):
        found = self.store.checkpoints.find(job_id, step=step)
        return None if found is None else found.files


def make_reporter(where: dict | None, resume: str | None, job_id: str = "j1") -> InMemoryReporter:
    """A run's reporter: a :class:`StoreReporter` when ``where`` names a store, else in-memory (as ``job_id``)."""
    if where is None:
        return InMemoryReporter(resume_from=resume, job_id=job_id)
    return StoreReporter(where["url"], where["job_id"], where["root"], resume_from=where.get("resume") or resume)


class RecordingPlacement(Placement):
    """A Placement that remembers every tensor it handed over (kept alive, so ids stay unique)."""

    def __init__(self, device, dtype):
        super().__init__(device, dtype)
        self.handed: dict[int, torch.Tensor] = {}

    def batch(self, batch):
        moved = super().batch(batch)
        self.handed.update({id(t): t for t in moved.values()})
        return moved


class CheckedRecipe(Recipe):
    def setup_model(self) -> None:
        super().setup_model()
        self.placement = RecordingPlacement(self.placement.device, self.placement.dtype)
        model = self.model
        base = [(n, p) for n, p in model.named_parameters() if not self.method.owns(model, n)]
        wrong = sorted({str(p.dtype) for _, p in base if p.is_floating_point() and p.dtype != self.placement.dtype})
        assert not wrong, f"the frozen base holds {wrong} weights in a {self.placement.dtype} job"
        if self.zero3:
            whole = [n for n, p in base if not hasattr(p, "ds_id")]
            assert not whole, f"ZeRO-3 loaded {whole[:3]} whole instead of partitioned"
        self.forwards_checked = 0

    def setup_optimizer(self) -> None:
        super().setup_optimizer()
        self.engine.module.register_forward_pre_hook(self._check_inputs, with_kwargs=True, prepend=True)

    def _check_inputs(self, module, args, kwargs) -> None:
        for key, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                assert id(value) in self.placement.handed, f"input {key!r} reached the model without the Placement"
                assert value.device == self.placement.device, f"input {key!r} is on {value.device}"
        self.forwards_checked += 1


def main() -> None:
    import torch.distributed as dist

    from jobs.spec import parse_job_spec

    spec_path, out_path = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    specs = json.loads(open(spec_path).read())
    runs = specs if isinstance(specs, list) else [specs]
    stores = json.loads(os.environ.get("RECIPE_RUNS_STORE") or "null")
    stores = stores if isinstance(stores, list) else [stores] * len(runs)
    results = []
    for raw, where in zip(runs, stores):
        reporter = make_reporter(where, resume)
        recipe = CheckedRecipe(parse_job_spec(raw), reporter, init_checkpoint=(where or {}).get("init"),
                               metadata={"base_fingerprint": "sha256:test", "job_id": reporter.job_id})
        try:
            name = recipe.run()
        except (CheckpointRejected, pickle.UnpicklingError) as e:  # what a restore refused, for the test to read
            results.append({"error": f"{type(e).__name__}: {e}", "events": reporter.events})
            continue
        results.append({"adapter": name, "events": reporter.events, "recorded": reporter.recorded,
                        "checkpoints": reporter.checkpoints, "adapters": reporter.adapters,
                        "forwards_checked": recipe.forwards_checked})
    with open(out_path, "w") as f:
        json.dump(results if isinstance(specs, list) else results[0], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
