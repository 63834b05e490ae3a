"""The supervised mixture the bundled tiny model is trained on (:mod:`mgrpo_fast.tools.make_tiny_model`).

Two kinds of examples, each ``(ids, num_prompt_tokens)`` with the loss on the part after the prompt:

* **first answers**: the plain prompt, then the boxed answer alone, without working (``\\boxed{14}``),
  or the worked solution (``3*4=12. 7+12=19. 19-5=14. \\boxed{14}``), then EOS;
* **correction rounds**: the layer-2 input exactly as the trainer builds it (prompt, a first answer
  drawn as above, right or wrong, a guiding phrase), then the first answer restated (``\\boxed{19}``)
  or a re-derivation, then EOS.

Every choice is a seeded draw with a share from the command line (``--direct-share``,
``--restate-share``, ``--restate-share-after-direct``, ``--keep-share``, ``--correction-share``): the
habits the supervised model learns are these shares, and RL starts from them.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

from mgrpo_fast.data.arithmetic_corrections import (
    checked_solution,
    flawed_solution,
    guessed_answer,
    restated_answer,
)
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, build_correction_prompt, build_prompt_ids


def encode_example(
    problem: Problem, tokenizer: Any, instruction: str | None = None, direct: bool = False
) -> tuple[list[int], int]:
    """``(ids, num_prompt_tokens)``: the plain prompt (with ``instruction``), ``" " + solution`` (or, when
    ``direct``, the boxed answer alone, without working), EOS."""
    prompt = build_prompt_ids(problem, tokenizer, instruction=instruction)
    text = f"\\boxed{{{problem.answer}}}" if direct else problem.solution
    target = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    return prompt + list(target) + [tokenizer.eos_token_id], len(prompt)


def encode_correction_example(
    problem: Problem,
    first_answer: str,
    phrase: str,
    tokenizer: Any,
    instruction: str | None = None,
    correction_format: str = "sentence",
    restate: bool = False,
) -> tuple[list[int], int]:
    """``(ids, num_prompt_tokens)`` of a correction round: the layer-2 input (prompt, ``" " +
    first_answer``, separator and ``phrase``, exactly as the trainer builds it), then ``" " +`` the
    re-derivation (or, when ``restate``, the first answer's boxed value restated) and EOS; that
    continuation is the only target."""
    cp = build_correction_prompt(problem, " " + first_answer, phrase, tokenizer, instruction=instruction)
    if restate:
        text = restated_answer(first_answer)
    elif correction_format == "worked":
        text = problem.solution
    else:
        text = checked_solution(problem, correction_format)
    target = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    return cp.prompt_ids + list(target) + [tokenizer.eos_token_id], cp.num_prompt_tokens


def draw_first_answer(problem: Problem, rng: random.Random, args: argparse.Namespace) -> tuple[str, bool]:
    """``(first_answer, direct)``: a first answer as the supervised first pass writes them, the boxed
    answer alone (``direct``) with probability ``args.direct_share``, else the worked solution; right
    with probability ``args.keep_share``, else a near-miss guess or a worked solution with one mistake
    (``flawed_solution``)."""
    right = rng.random() < args.keep_share
    if rng.random() < args.direct_share:
        return guessed_answer(problem, rng, right), True
    return (problem.solution if right else flawed_solution(problem, rng)), False


def restate_share(args: argparse.Namespace, direct: bool) -> float:
    """The probability that a correction round restates its first answer: ``args.restate_share``, or
    after a first answer without working ``args.restate_share_after_direct`` when that is set (a
    correction habit that depends on what the first answer shows)."""
    after_direct = args.restate_share_after_direct
    return after_direct if direct and after_direct is not None else args.restate_share


def encode_examples(
    problems: Sequence[Problem], tokenizer: Any, args: argparse.Namespace
) -> list[tuple[list[int], int]]:
    """The supervised examples, one per problem, every draw seeded with ``args.seed``: a share
    ``args.correction_share`` of the problems become correction rounds (a first answer from
    :func:`draw_first_answer`, a guiding phrase drawn from the defaults, then the first answer restated
    with probability :func:`restate_share`, else the re-derivation in ``args.correction_format``); the
    others are first answers, without working with probability ``args.direct_share``, else the worked
    solution."""
    rng = random.Random(f"corrections:{args.seed}")
    out = []
    for p in problems:
        if rng.random() < args.correction_share:
            first, direct = draw_first_answer(p, rng, args)
            phrase = rng.choice(DEFAULT_GUIDING_PHRASES)
            restate = rng.random() < restate_share(args, direct)
            out.append(
                encode_correction_example(
                    p, first, phrase, tokenizer, args.instruction, args.correction_format, restate
                )
            )
        else:
            out.append(
                encode_example(p, tokenizer, args.instruction, direct=rng.random() < args.direct_share)
            )
    return out
