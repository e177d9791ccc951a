"""Runs the training recipe in a fresh process where Ray cannot be imported:
``python -m tests.jobs.recipe_runs SPEC_JSON OUT_JSON [RESUME_FOLDER]``.

The process is the recipe's whole world: a one-rank gloo group (what Ray Train would set up), an
in-memory reporter, and ``import ray`` made to fail, so the recipe provably needs no Ray. SPEC_JSON may
hold a list of specs, run one after another in this process (OUT_JSON then holds a list of results).

Every run goes through :class:`CheckedRecipe`, which asserts the device discipline as it trains: each
tensor the model's forward receives was handed over by the recipe's ``Placement`` (so it is on the
rank's device), and the frozen base was loaded in the job's precision (under ZeRO-3, partitioned as it
loaded). A violation fails the run."""

from __future__ import annotations

import json
import socket
import sys

sys.modules["ray"] = None  # type: ignore[assignment] - any `import ray` now raises ImportError

import torch  # noqa: E402

from jobs.training.devices import Placement  # noqa: E402
from jobs.training.recipe import Recipe  # noqa: E402


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
    from jobs.training.reporter import InMemoryReporter

    spec_path, out_path = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    specs = json.loads(open(spec_path).read())
    results = []
    for raw in specs if isinstance(specs, list) else [specs]:
        reporter = InMemoryReporter(resume_from=resume)
        recipe = CheckedRecipe(parse_job_spec(raw), reporter, metadata={"base_fingerprint": "sha256:test",
                                                                         "job_id": "j1"})
        name = recipe.run()
        results.append({"adapter": name, "events": reporter.events, "recorded": reporter.recorded,
                        "checkpoints": reporter.checkpoints, "adapters": reporter.adapters,
                        "forwards_checked": recipe.forwards_checked})
    with open(out_path, "w") as f:
        json.dump(results if isinstance(specs, list) else results[0], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
