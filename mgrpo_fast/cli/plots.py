"""``summary.png`` of a run: rewards per layer, correction rates of layer 2 and the two-pass eval,
per step, from ``metrics.jsonl`` (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_summary"]

_PANELS = (
    (
        "reward per layer",
        (("layer1/reward_mean", "layer 1 (answer)"), ("layer2/reward_mean", "layer 2 (correction)")),
    ),
    (
        "layer-2 correction rates",
        (("layer2/delta_i_to_c", "Δi→c (wrong → right)"), ("layer2/delta_c_to_i", "Δc→i (right → wrong)")),
    ),
    ("held-out two-pass eval", (("eval/acc_t1", "Acc@t1"), ("eval/acc_t2", "Acc@t2"))),
)


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_summary(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "MGRPO") -> str:
    """Draw the three panels for the ``metrics.jsonl`` records and save a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.6), constrained_layout=True)
    for ax, (name, series) in zip(axes, _PANELS):
        for key, label in series:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
