"""``mgrpo-eval``: two-pass evaluation (Acc@t1, Acc@t2, Δ, Δi→c, Δc→i) of saved models on a dataset.

    mgrpo-eval --model runs/mgrpo-seed0/final [--data test.jsonl] [--num-problems 200] [--json out.json]

(no ``--model``: the bundled demo model; no ``--data``: the bundled task's test split). The metrics are
defined in :mod:`mgrpo_fast.rl.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch

from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION
from mgrpo_fast.rl.evaluate import TwoPassResult, evaluate_two_pass, format_table

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgrpo-eval", description="Two-pass evaluation: Acc@t1, Acc@t2, Δ, Δi→c, Δc→i"
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="a save_pretrained directory or a .gguf file (repeat to compare); default: the bundled model",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="JSONL/Parquet eval files (GSM8K, MATH or prompt/answer style); default: the bundled test split",
    )
    p.add_argument("--num-problems", type=int, default=200, help="the first n problems (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per pass (default: the bundled task's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--guiding-phrase", default=DEFAULT_GUIDING_PHRASES[0], help="the phrase before pass 2")
    p.add_argument("--template", choices=("chat", "plain"), default="chat")
    p.add_argument(
        "--instruction",
        default="auto",
        help="appended to the question: 'auto' (the bundled task's prompt without --data, else the "
        "default step-by-step \\boxed{} instruction), 'none', or the text",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mgrpo-eval``: evaluate each ``--model`` and print the table (and JSON with ``--json``)."""
    from mgrpo_fast.data.train_data import (
        bundled_task_spec,
        default_max_new_tokens,
        default_model_path,
        load_eval_problems,
    )
    from mgrpo_fast.models.checkpoints import load_tokenizer
    from mgrpo_fast.models.policy import load_policy
    from mgrpo_fast.rl.rollout.hf import HFGenerateBackend

    args = _parser().parse_args(argv)
    if args.num_problems < 1:
        _parser().error(f"--num-problems: expected an integer >= 1, got {args.num_problems}")
    problems = load_eval_problems(args.data or (), limit=args.num_problems)
    max_new = args.max_new_tokens or default_max_new_tokens(args.data)
    instruction = {"auto": DEFAULT_INSTRUCTION, "none": None}.get(args.instruction, args.instruction)
    if args.instruction == "auto" and not args.data:
        instruction = bundled_task_spec().get("instruction", DEFAULT_INSTRUCTION)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, TwoPassResult] = {}
    for path in args.model or [default_model_path()]:
        model = load_policy(path, dtype="float32", device=device)
        tokenizer = load_tokenizer(path)  # a save_pretrained directory or a .gguf file
        backend = HFGenerateBackend(model, tokenizer)
        results[path] = evaluate_two_pass(
            problems,
            tokenizer,
            backend,
            max_new_tokens=max_new,
            temperature=args.temperature,
            batch_size=args.batch_size,
            guiding_phrase=args.guiding_phrase,
            seed=args.seed,
            template=args.template,
            instruction=instruction,
        )
        del model, backend
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({k: asdict(v) for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
