"""``make compare``: GRPO and MGRPO on the embedded default at an equal rollout budget, over several
seeds, evaluated with the two-pass protocol; prints one row per algorithm (mean ± std over seeds) and
the starting checkpoint's row.

Both algorithms use ``configs/demo.yaml`` with ``layer1.group_size: auto``: MGRPO samples G1 answers
and G2 continuations of each selected answer; GRPO gets ``G1' = G1 + ceil(|S|·G2·T2/T1)`` answers per
question instead (``mgrpo_fast.config.run``), the same completion-token budget per question, and the
same questions, steps and optimizer. Writes ``{out}/summary.json`` (the table and every run's final
eval) and ``{out}/compare.png`` (held-out Acc@t1, Acc@t2, Δi→c / Δc→i over steps per algorithm, mean
and min..max over the seeds; the start is evaluated once, the same checkpoint for every run).

    python -m mgrpo_fast.compare [--seeds 0 1 2] [--out runs/compare] [--key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mgrpo_fast.cli.demo import DEFAULT_CONFIG, eval_rows
from mgrpo_fast.cli.plots import plot_compare
from mgrpo_fast.config.loading import load_config
from mgrpo_fast.rl.run_log import read_metrics

__all__ = ["main"]

_COLUMNS = (
    ("acc_t1", "Acc@t1"),
    ("acc_t2", "Acc@t2"),
    ("delta", "Δ(t1,t2)"),
    ("delta_i_to_c", "Δi→c"),
    ("delta_c_to_i", "Δc→i"),
)


def _cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per name, each cell the mean ± std (percent) over that row's runs."""
    head = "| | runs | " + " | ".join(c for _, c in _COLUMNS) + " |"
    lines = [head, "|---" * (len(_COLUMNS) + 2) + "|"]
    for name, runs in rows.items():
        cells = [_cell([r[k] for r in runs]) for k, _ in _COLUMNS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mgrpo-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/compare")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    out = Path(args.out)
    results: dict[str, list[dict[str, float]]] = {"start": [], "GRPO": [], "MGRPO": []}
    budget: dict[str, str] = {}
    curves: dict[str, list[list[dict]]] = {"GRPO": [], "MGRPO": []}
    start_record: dict = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for algo in ("grpo", "mgrpo"):
            cfg = load_config(
                args.config,
                [
                    "--logging.overwrite=true",  # every comparison starts its runs afresh
                    *overrides,
                    f"--algo={algo}",
                    f"--seed={seed}",
                    f"--logging.run_dir={out}/{algo}-seed{seed}",
                    "--logging.progress=false",
                    f"--eval.at_start={str(not results['start']).lower()}",
                ],
            )
            t = time.perf_counter()
            trainer = MGRPOTrainer(cfg)
            trainer.train()
            c = trainer.config
            budget[algo] = f"G1={c.layer1.group_size}" + (
                f", G2={c.layer2.group_size}, selection={c.layer2.selection}" if algo == "mgrpo" else ""
            )
            records = read_metrics(Path(c.logging.run_dir) / "metrics.jsonl")
            evals = eval_rows(records)
            if not results["start"]:
                results["start"].append(evals[0][1].__dict__)
                start_record = next(r for r in records if "eval/acc_t1" in r)
            elif start_record:  # the same start checkpoint (greedy eval): every curve starts there
                records = [start_record, *records]
            curves[algo.upper()].append(records)
            results[algo.upper()].append(evals[-1][1].__dict__)
            print(f"{algo} seed {seed}: {evals[-1][1]} ({time.perf_counter() - t:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    text = table(results)
    print()
    print(text)
    print(
        f"\nequal rollout budget per question: GRPO {budget['grpo']}; MGRPO {budget['mgrpo']}; "
        f"seeds {args.seeds}; wall time {wall / 60:.1f} min"
    )
    out.mkdir(parents=True, exist_ok=True)
    png = plot_compare(curves, out / "compare.png")
    print(f"wrote {png} and {out / 'summary.json'}")
    (out / "summary.json").write_text(
        json.dumps(
            {"rows": results, "budget": budget, "seeds": args.seeds, "wall_s": wall, "table": text}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
