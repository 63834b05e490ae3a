"""Where a run's metrics go (rank 0 only): ``metrics.jsonl``, TensorBoard, Weights & Biases, and a
progress bar with the live reward and accuracy.

``metrics.jsonl`` holds one JSON object per logged step (``{"step": k, "time": ..., name: value}``).
On ``--resume`` from step ``k`` the lines of steps ``> k`` (written after that checkpoint by the run
that died) are dropped first, atomically, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MetricsWriter", "Progress", "combine_rank_metrics", "read_metrics"]

# what the progress bar shows, in order, with short labels
_BAR_FIELDS = (
    ("layer1/reward_mean", "r1"),
    ("layer1/accuracy", "acc1"),
    ("layer2/accuracy", "acc2"),
    ("layer2/delta_i_to_c", "i→c"),
    ("train/loss", "loss"),
)


_SUMMED = ("/groups", "/groups_dropped", "/pairs", "/completion_tokens", "/timeouts", "/errors", "/nonfinite")
_WEIGHT_OF = {
    "layer1/": "layer1/groups",
    "reward1/": "layer1/groups",
    "layer2/": "layer2/pairs",
    "reward2/": "layer2/pairs",
}


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's rollout metrics of every rank -> the metrics of the whole step.

    Counts (groups, pairs, tokens, failures) are summed; times take the slowest rank; the means of a
    layer are weighted by that rank's share of the layer (layer-1 questions, layer-2 pairs: every
    group of a layer has the same size), so the result equals the one-process value on the same data.
    """
    keys = sorted({k for m in per_rank for k in m})
    out: dict[str, float] = {}
    for k in keys:
        vals = [(m[k], m) for m in per_rank if k in m]
        if k.endswith(_SUMMED):
            out[k] = sum(v for v, _ in vals)
        elif k.startswith("time/") or k.endswith("/time_s"):
            out[k] = max(v for v, _ in vals)
        else:
            wkey = next((w for p, w in _WEIGHT_OF.items() if k.startswith(p)), None)
            weights = [m.get(wkey, 0.0) if wkey else 1.0 for _, m in vals]
            total = sum(weights)
            out[k] = sum(v * w for (v, _), w in zip(vals, weights)) / total if total else 0.0
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/NaN; keep it visible instead of failing the write
    return v


class MetricsWriter:
    """Append step metrics to the enabled sinks.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tensorboard/`` go there).
        jsonl, tensorboard, wandb: which sinks; a sink whose package is missing is skipped with a
            warning (the run goes on).
        resume_step: when resuming, the checkpoint's step (later records are dropped).
        config: logged to wandb as the run config.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        jsonl: bool = True,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "mgrpo_fast",
        resume_step: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl" if jsonl else None
        if self.jsonl_path is not None:
            if resume_step is not None:
                _truncate_after(self.jsonl_path, resume_step)
            elif self.jsonl_path.exists():
                self.jsonl_path.unlink()  # a fresh run in an old directory starts a fresh file
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                logger.warning("logging.tensorboard: the tensorboard package is not installed; skipped")
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_mod

                self._wandb = wandb_mod.init(
                    project=wandb_project, dir=str(self.run_dir), config=config, resume="allow"
                )
            except ImportError:
                logger.warning("logging.wandb: the wandb package is not installed; skipped")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), **{k: _json_safe(v) for k, v in metrics.items()}}
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A tqdm bar over the training steps with the live reward / accuracy (off: a no-op)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                logger.info("logging.progress: tqdm is not installed; no progress bar")

    def update(self, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        shown = {label: f"{metrics[k]:.3g}" for k, label in _BAR_FIELDS if k in metrics}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
