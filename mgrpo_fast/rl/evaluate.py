"""Two-pass evaluation (docs/algorithm.md): Acc@t1, Acc@t2, Δ(t1,t2), Δi→c, Δc→i of a model on a dataset.

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

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mgrpo_fast.config.run import TrainConfig
from mgrpo_fast.data.answers import answers_match, extract_answer
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION
from mgrpo_fast.rl.layers import rollout_layer1, rollout_layer2
from mgrpo_fast.rl.rollout.base import RolloutBackend, SamplingParams

__all__ = [
    "TwoPassResult",
    "configured_two_pass_correctness",
    "evaluate_two_pass",
    "format_table",
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
    guiding_turn: str = "assistant",
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
        guiding_turn=guiding_turn,
    )
    c2 = torch.tensor(
        [answers_match(extract_answer(c.text), p.answer) for c, p in zip(r2.completions, problems)]
    )
    return c1, c2


def configured_two_pass_correctness(
    cfg: TrainConfig, problems: Sequence[Problem], tokenizer: Any, backend: RolloutBackend
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`two_pass_correctness` with a run's settings: the ``eval`` section (temperature, seed,
    guiding phrase, token cap), the rollout's top-p and stop strings, layer 2's separator and the
    prompt format of ``data``. The trainer's evaluation and the TRL anchor both use it, so their
    numbers come from the same protocol."""
    ev = cfg.eval
    return two_pass_correctness(
        problems,
        tokenizer,
        backend,
        max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens,
        correction_max_new_tokens=ev.max_new_tokens or cfg.layer2.max_new_tokens,
        temperature=ev.temperature,
        top_p=cfg.rollout.top_p,
        stop=cfg.rollout.stop,
        batch_size=cfg.rollout.batch_size,
        guiding_phrase=ev.guiding_phrase or cfg.layer2.guiding_phrases[0],
        separator=cfg.layer2.separator,
        guiding_turn=cfg.layer2.guiding_turn,
        seed=ev.seed,
        system_prompt=cfg.data.system_prompt,
        template=cfg.data.template,
        instruction=cfg.data.instruction,
    )


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
