"""A sweep as one PNG: the metric over time for every trial, the final metric against each searched
parameter, and each parameter's importance (|Spearman rank correlation| with the final metric)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from jobs.store import JobStore
from jobs.store.sweep_registry import SweepRecord

STATE_COLOURS = {"SUCCEEDED": "tab:green", "STOPPED": "tab:orange", "FAILED": "tab:red"}


def numeric_params(trials: list[dict[str, Any]], metric_key: str) -> dict[str, list[tuple[float, float]]]:
    """Parameter -> [(value, final metric)] for trials with a metric; choices become their option index."""
    columns: dict[str, list[tuple[Any, float]]] = {}
    for t in trials:
        if t.get(metric_key) is None:
            continue
        for name, value in _flatten(t["params"]).items():
            columns.setdefault(name, []).append((value, t[metric_key]))
    out = {}
    for name, pairs in columns.items():
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pairs):
            out[name] = [(float(v), m) for v, m in pairs]
        else:
            options = sorted({repr(v) for v, _ in pairs})
            out[name] = [(float(options.index(repr(v))), m) for v, m in pairs]
    return out


def importance(pairs: list[tuple[float, float]]) -> float:
    """|Spearman ρ| between a parameter and the metric (0 when either does not vary)."""
    if len(pairs) < 3:
        return 0.0
    xs, ys = _ranks([p for p, _ in pairs]), _ranks([m for _, m in pairs])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx, sy = math.sqrt(sum((x - mx) ** 2 for x in xs)), math.sqrt(sum((y - my) ** 2 for y in ys))
    return 0.0 if sx == 0 or sy == 0 else abs(cov / (sx * sy))


def plot_sweep(store: JobStore, record: SweepRecord, trials: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = numeric_params(trials, record.metric)
    panels = 2 + len(params)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    axes = axes[0]
    for t in trials:  # metric over time, one line per trial
        series = store.metrics(t["job"], record.metric)
        if series:
            job = store.get(t["job"])
            start = job.started_at or job.created_at
            axes[0].plot([m.at - start for m in series], [m.value for m in series], marker="o", markersize=3,
                         color=STATE_COLOURS.get(t["state"], "tab:gray"), alpha=0.8)
    axes[0].set(
        title=f"{record.metric} over time ({record.scheduler})",
        xlabel="seconds since the trial started",
        ylabel=record.metric,
    )
    names = sorted(params, key=lambda n: -importance(params[n]))
    axes[1].barh(names or ["(none)"], [importance(params[n]) for n in names] or [0], color="tab:blue")
    axes[1].set(title="parameter importance", xlabel="|Spearman ρ| with final metric", xlim=(0, 1))
    for ax, name in zip(axes[2:], names):
        xs, ys = zip(*params[name])
        ax.scatter(xs, ys, color="tab:purple")
        if name.endswith("lr") and min(xs) > 0:
            ax.set_xscale("log")
        ax.set(title=name, xlabel=name, ylabel=record.metric)
    best = record.best_adapter or "-"
    fig.suptitle(f"sweep {record.name} ({record.id[:8]}): {len(trials)} trials, best {best}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
