"""The PNGs of ``make demo`` and ``make compare`` (matplotlib, headless), from ``metrics.jsonl`` records.

* :func:`plot_summary` (``runs/demo/summary.png``): the held-out two-pass eval over steps (Acc@t1 and
  Acc@t2; Δi→c and Δc→i), and the training reward of each layer (a moving mean over steps).
* :func:`plot_compare` (``runs/compare/compare.png``): the held-out Acc@t1, Acc@t2 and Δi→c / Δc→i of
  each algorithm over steps, the mean over seeds as a line and the range over seeds as a band.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_compare", "plot_summary", "seed_band", "series"]

_EVAL_ACC = (("eval/acc_t1", "Acc@t1 (first answer)"), ("eval/acc_t2", "Acc@t2 (after the correction)"))
_EVAL_DELTAS = (("eval/delta_i_to_c", "Δi→c (wrong → right)"), ("eval/delta_c_to_i", "Δc→i (right → wrong)"))
_TRAIN_REWARDS = (
    ("layer1/reward_mean", "layer 1 (first answers)"),
    ("layer2/reward_mean", "layer 2 (corrections)"),
)


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in ``records`` (the records that have it, in order)."""
    pts = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _moving_mean(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percent_axis(ax, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("% of held-out problems")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_summary(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "MGRPO", smooth: int = 5
) -> str:
    """Three panels for one run's ``metrics.jsonl`` records, saved as a PNG at ``path``: held-out
    Acc@t1 / Acc@t2, held-out Δi→c / Δc→i (eval records), and the training reward per layer as a
    moving mean over ``smooth`` steps (raw values faint). Returns the path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    for ax, keys, name in (
        (axes[0], _EVAL_ACC, "held-out accuracy (greedy, two passes)"),
        (axes[1], _EVAL_DELTAS, "held-out correction rates"),
    ):
        for key, label in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, [100 * v for v in values], marker="o", ms=4, label=label)
        _percent_axis(ax, name)
    ax = axes[2]
    for key, label in _TRAIN_REWARDS:
        steps, values = series(records, key)
        if steps:
            (line,) = ax.plot(steps, _moving_mean(values, smooth), label=f"{label}, mean of {smooth} steps")
            ax.plot(steps, values, color=line.get_color(), alpha=0.25, lw=0.8)
    ax.set_title("training reward (sampled, T = rollout.temperature)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def seed_band(
    runs: Sequence[Sequence[dict[str, Any]]], key: str
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps every run evaluated at, and the mean, min and max (percent) over the runs at each."""
    per_run = [dict(zip(*series(r, key))) for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    vals = [[100 * d[s] for d in per_run] for s in steps]
    return steps, [statistics.mean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_compare(
    runs: Mapping[str, Sequence[Sequence[dict[str, Any]]]], path: str | os.PathLike, title: str = ""
) -> str:
    """Held-out Acc@t1, Acc@t2 and Δi→c / Δc→i over steps for each algorithm (``runs[name]`` = the
    ``metrics.jsonl`` records of each seed): the mean over seeds as a line, min..max over seeds as a
    band. Saved as a PNG at ``path``; returns the path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, seeds) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        for ax, key in ((axes[0], "eval/acc_t1"), (axes[1], "eval/acc_t2")):
            steps, mean, lo, hi = seed_band(seeds, key)
            if steps:
                ax.plot(
                    steps, mean, color=color, marker="o", ms=4, label=f"{name} (mean of {len(seeds)} seeds)"
                )
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
        for (key, label), style in zip(_EVAL_DELTAS, ("-", "--")):
            steps, mean, lo, hi = seed_band(seeds, key)
            if steps:
                axes[2].plot(steps, mean, style, color=color, marker="o", ms=3, label=f"{name} {label}")
                axes[2].fill_between(steps, lo, hi, color=color, alpha=0.12)
    for ax, name in zip(axes, ("held-out Acc@t1", "held-out Acc@t2", "held-out correction rates")):
        _percent_axis(ax, name)
    fig.suptitle(title or "GRPO vs MGRPO at an equal rollout budget (band: min..max over seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
