"""``make demo``: train MGRPO on the embedded default (the bundled arithmetic task and the tiny model
made by ``mgrpo_fast.tools.make_tiny_model``) on a laptop CPU, and show what it did.

1. evaluates the starting checkpoint with the two-pass protocol (Acc@t1, Acc@t2, Δi→c, Δc→i) on the
   held-out split,
2. trains MGRPO with ``configs/demo.yaml`` (progress bar with the live reward/accuracy),
3. evaluates the trained policy the same way and prints both rows as a table,
4. writes ``{run_dir}/summary.png`` (rewards per layer, correction rates per step, eval),
   ``{run_dir}/summary.json`` (before/after, wall time) and ``{run_dir}/metrics.jsonl``.

    python -m mgrpo_fast.demo [--config configs/demo.yaml] [--key.sub=value ...]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mgrpo_fast.cli.plots import plot_summary
from mgrpo_fast.config.fields import ConfigError
from mgrpo_fast.config.loading import load_config, parse_cli
from mgrpo_fast.rl.evaluate import TwoPassResult, format_table
from mgrpo_fast.rl.run_log import read_metrics

__all__ = ["DEFAULT_CONFIG", "eval_rows", "main"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def eval_rows(records: Sequence[dict]) -> list[tuple[int, TwoPassResult]]:
    """The ``eval/*`` records of a run as ``(step, TwoPassResult)``, in step order."""
    out = []
    for r in records:
        if "eval/acc_t1" in r:
            fields = {k.removeprefix("eval/"): r[k] for k in r if k.startswith("eval/")}
            fields["num_problems"] = int(fields["num_problems"])
            out.append((int(r["step"]), TwoPassResult(**fields)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path, overrides = parse_cli(argv)
    # The demo is rerun often: a fresh demo replaces the previous one in its run directory (a resumed
    # one continues it); --logging.overwrite=false restores the trainer's refusal.
    overrides = ["logging.overwrite=true", *overrides]
    try:
        cfg = load_config(path or DEFAULT_CONFIG, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mgrpo demo: error: {e}", file=sys.stderr)
        return 2
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    t0 = time.perf_counter()
    trainer = MGRPOTrainer(cfg)
    cfg = trainer.config
    print(
        f"mgrpo demo: {cfg.algo} on {len(trainer.train_problems)} bundled problems, "
        f"{cfg.train.total_steps} steps x {cfg.train.questions_per_step} questions, "
        f"G1={cfg.layer1.group_size} G2={cfg.layer2.group_size}; run dir {cfg.logging.run_dir}"
    )
    trainer.train()
    wall = time.perf_counter() - t0
    run_dir = Path(cfg.logging.run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = eval_rows(records)
    if len(evals) < 2:
        print(
            "mgrpo demo: the run logged fewer than two evaluations (eval.at_start / eval.at_end)",
            file=sys.stderr,
        )
        return 1
    (s0, before), (s1, after) = evals[0], evals[-1]
    middle = {f"step {s}": r for s, r in evals[1:-1]}
    rows = {f"start (step {s0})": before, **middle, f"after {cfg.algo.upper()} (step {s1})": after}
    print()
    print(format_table(rows))
    png = plot_summary(records, run_dir / "summary.png", title=f"{cfg.algo.upper()} demo on the bundled task")
    summary = {
        "before": before.__dict__,
        "after": after.__dict__,
        "wall_s": wall,
        "steps": trainer.step,
        "evals": [{"step": s, **r.__dict__} for s, r in evals],
        "config": cfg.to_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"\nwall time {wall:.0f} s; wrote {png}, {run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
