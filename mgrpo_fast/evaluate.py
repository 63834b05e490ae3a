"""Two-pass evaluation (DESIGN.md §2): Acc@t1, Acc@t2, Δ(t1,t2), Δi→c, Δc→i of a model on a dataset.

Pass 1 samples one first answer per problem (greedy by default) from the layer-1 prompt. Pass 2
builds the layer-2 correction input (the prompt, the first answer as the model's own turn, one guiding
phrase) and samples one continuation. The t2 answer is the one extracted from the *continuation*, the
same verifier the layer-2 reward uses in training (a continuation without a final answer is wrong).
Over the ``n`` problems::

    Acc@t1 = mean(c1)      Acc@t2 = mean(c2)      Δ = Acc@t2 − Acc@t1
    Δi→c   = mean(¬c1 ∧ c2)   (wrong, then right)    Δc→i = mean(c1 ∧ ¬c2)   (right, then wrong)

so ``Δ = Δi→c − Δc→i`` exactly. Command line::

    mgrpo-eval --model runs/mgrpo-seed0/final [--data test.jsonl] [--num-problems 200] [--json out.json]

(no ``--model``: the bundled demo model; no ``--data``: the bundled task's test split).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .data import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION, Problem
from .mgrpo import rollout_layer1, rollout_layer2
from .rewards import answers_match, extract_answer
from .rollout import RolloutBackend, SamplingParams

__all__ = [
    "TwoPassResult",
    "evaluate_two_pass",
    "format_table",
    "main",
    "summarize_two_pass",
    "two_pass_correctness",
]


@dataclass(frozen=True)
class TwoPassResult:
    """The paper's metrics over ``num_problems`` problems (fractions in [0, 1])."""

    num_problems: int
    acc_t1: float
    acc_t2: float
    delta: float
    delta_i_to_c: float
    delta_c_to_i: float

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def two_pass_correctness(
    problems: Sequence[Problem],
    tokenizer: Any,
    backend: RolloutBackend,
    *,
    max_new_tokens: int = 512,
    correction_max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    batch_size: int = 64,
    guiding_phrase: str = DEFAULT_GUIDING_PHRASES[0],
    separator: str = "\n\n",
    seed: int = 0,
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both passes on ``problems``: per-problem correctness ``(c1, c2)``, bool ``(n,)`` each.

    ``temperature=0`` decodes greedily (the default, so the numbers are deterministic);
    ``correction_max_new_tokens`` None = ``max_new_tokens``."""
    problems = list(problems)
    if not problems:  # e.g. a rank with no share of the eval set
        empty = torch.zeros(0, dtype=torch.bool)
        return empty, empty
    t2 = max_new_tokens if correction_max_new_tokens is None else correction_max_new_tokens
    common = {"temperature": temperature, "top_p": top_p, "stop": tuple(stop), "batch_size": batch_size}
    r1 = rollout_layer1(
        problems,
        tokenizer,
        backend,
        SamplingParams(max_new_tokens=max_new_tokens, **common),
        1,
        seed,
        system_prompt=system_prompt,
        template=template,
        instruction=instruction,
    )
    c1 = torch.tensor(
        [answers_match(extract_answer(c.text), p.answer) for c, p in zip(r1.completions, problems)]
    )
    pairs = [(q, 0) for q in range(len(problems))]
    r2 = rollout_layer2(
        r1,
        pairs,
        tokenizer,
        backend,
        SamplingParams(max_new_tokens=t2, **common),
        1,
        seed + 1,
        phrases=(guiding_phrase,),
        separator=separator,
        rng=random.Random(seed),
    )
    c2 = torch.tensor(
        [answers_match(extract_answer(c.text), p.answer) for c, p in zip(r2.completions, problems)]
    )
    return c1, c2


def evaluate_two_pass(
    problems: Sequence[Problem], tokenizer: Any, backend: RolloutBackend, **kwargs: Any
) -> TwoPassResult:
    """Run both passes on ``problems`` with ``backend`` and return the metrics (module docstring);
    keywords as :func:`two_pass_correctness`."""
    if not problems:
        raise ValueError("problems: expected at least one evaluation problem, got none")
    return summarize_two_pass(*two_pass_correctness(problems, tokenizer, backend, **kwargs))


def summarize_two_pass(c1: torch.Tensor, c2: torch.Tensor) -> TwoPassResult:
    """The metrics from the per-problem correctness ``c1 (n,)`` (first answer) and ``c2 (n,)`` (after
    the correction), bool."""
    f1, f2 = c1.float(), c2.float()
    return TwoPassResult(
        num_problems=int(c1.numel()),
        acc_t1=float(f1.mean()),
        acc_t2=float(f2.mean()),
        delta=float(f2.mean() - f1.mean()),
        delta_i_to_c=float(((~c1) & c2).float().mean()),
        delta_c_to_i=float((c1 & ~c2).float().mean()),
    )


def format_table(rows: dict[str, TwoPassResult]) -> str:
    """A Markdown table with one row per named result (percentages)."""
    head = "| model | n | Acc@t1 | Acc@t2 | Δ(t1,t2) | Δi→c | Δc→i |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for name, r in rows.items():
        pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
        lines.append(
            f"| {name} | {r.num_problems} | {pct(r.acc_t1)} | {pct(r.acc_t2)} | {pct(r.delta)} | "
            f"{pct(r.delta_i_to_c)} | {pct(r.delta_c_to_i)} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mgrpo-eval", description="Two-pass evaluation: Acc@t1, Acc@t2, Δ, Δi→c, Δc→i"
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="a save_pretrained directory (repeat to compare several); default: the bundled model",
    )
    p.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="JSONL/Parquet eval files (GSM8K/MATH style); default: the bundled task's test split",
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
    from transformers import AutoTokenizer

    from .model import load_policy
    from .rollout import HFGenerateBackend
    from .train_data import bundled_task_spec, default_max_new_tokens, default_model_path, load_eval_problems

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
        tokenizer = AutoTokenizer.from_pretrained(path)
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
