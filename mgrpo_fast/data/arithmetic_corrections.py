"""Correction rounds for the arithmetic task (:mod:`mgrpo_fast.data.arithmetic`): what a tiny model made
with ``make_tiny_model`` is taught to write after a guiding phrase (the bundled model: half its
examples), and the first answers it sees there: flawed worked solutions, near-miss guesses
(:func:`guessed_answer`) and right ones. A correction round either restates the first answer
(:func:`restated_answer`) or re-derives it (:func:`checked_solution`).

A first answer is the task's compact worked solution, one equation per operation::

    3*4=12. 7+12=19. 19-5=14. \\boxed{14}

The correction round re-derives the answer *checking it against the question*, sentence by sentence:
it copies each sentence of the question, then writes that sentence's equations
(:func:`checked_solution`)::

    Mia has 7 apples. She buys 3 bags with 4 apples each: 3*4=12. 7+12=19. She gives away 5: 19-5=14.
    \\boxed{14}

Copying the sentence first is what makes checking easier than solving for a small model: most wrong
first answers read the wrong number or the wrong operation from the question, or lose their place in
it (measured on the bundled model: 45 of 114 greedy errors had the wrong operation, 52 a wrong operand,
12 only a wrong result), and the copied sentence puts the numbers of the step right before its
equation. The price is length: a check is about three times as long as a compact answer.

:func:`flawed_solution` makes a compact answer with one mistake of those kinds (a misread number, a
wrong running value, an arithmetic slip), carried through the later steps to a wrong final answer:
the wrong first answers of the supervised correction rounds (``mgrpo_fast.tools.make_tiny_model``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from mgrpo_fast.data.problems import Problem

__all__ = [
    "CHECK_STYLES",
    "MISTAKES",
    "Derivation",
    "checked_solution",
    "derivation",
    "flawed_solution",
    "guessed_answer",
    "plan",
    "restated_answer",
    "worked_solution",
]

MISTAKES = ("number", "carry", "slip")
"""The kinds of mistake :func:`flawed_solution` makes: ``number`` (a misread number of the question),
``carry`` (a wrong running value entering a step), ``slip`` (a wrong result of one equation)."""

_EQUATION = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_GROUP_KINDS = ("add_groups", "sub_groups")


@dataclass(frozen=True)
class Derivation:
    """A problem's arithmetic: the start value and one ``(kind, numbers)`` per operation, as
    :mod:`mgrpo_fast.data.arithmetic` draws them (``numbers`` is ``(k, m)`` for a group operation,
    else ``(n,)``)."""

    start: int
    steps: tuple[tuple[str, tuple[int, ...]], ...]


def derivation(problem: Problem) -> Derivation:
    """Recover the :class:`Derivation` of an arithmetic-task problem from its ``solution`` and
    ``meta["ops"]`` (so it works for generated problems and for ones loaded back from JSONL).

    Raises:
        ValueError: the problem has no solution or ``meta["ops"]``, or they do not fit together.
    """
    ops = problem.meta.get("ops")
    if not problem.solution or not isinstance(ops, list) or not ops:
        raise ValueError(
            f"problem {problem.id!r}: expected an arithmetic-task problem (solution and meta['ops'])"
        )
    parts = problem.solution.split(". ")[:-1]  # the last part is \boxed{...}
    eqs = []
    for part in parts:
        m = _EQUATION.match(part)
        if m is None:
            raise ValueError(f"problem {problem.id!r}: {part!r} is not an equation of the arithmetic task")
        eqs.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    it = iter(eqs)
    start: int | None = None
    steps = []
    try:
        for kind in ops:
            a, op, b, _ = next(it)
            if kind in _GROUP_KINDS:
                nums: tuple[int, ...] = (a, b)
                a, op, b, _ = next(it)
            else:
                nums = (b,)
            start = a if start is None else start
            steps.append((kind, nums))
    except StopIteration:
        raise ValueError(f"problem {problem.id!r}: fewer equations than meta['ops'] has operations") from None
    if start is None or next(it, None) is not None:
        raise ValueError(f"problem {problem.id!r}: the equations do not match meta['ops']")
    return Derivation(start, tuple(steps))


def _step_equations(kind: str, x: int, nums: tuple[int, ...], slip: int = 0) -> tuple[int, list[str]]:
    """``(new value, equations)`` of one operation on ``x``; ``slip`` is added to its final result."""
    if kind in _GROUP_KINDS:
        k, m = nums
        p = k * m
        y = (x + p if kind == "add_groups" else x - p) + slip
        return y, [f"{k}*{m}={p}", f"{x}{'+' if kind == 'add_groups' else '-'}{p}={y}"]
    n = nums[0]
    y = {"add": x + n, "sub": x - n, "mul": x * n, "div": x // n}[kind] + slip
    return y, [f"{x}{_SYMBOL[kind]}{n}={y}"]


def _solve(d: Derivation, carry: dict[int, int] | None = None, slip: dict[int, int] | None = None):
    """``(equations per step, answer)``; ``carry[i]`` is added to the value entering step ``i``, ``slip[i]``
    to the result of step ``i``."""
    x, per_step = d.start, []
    for i, (kind, nums) in enumerate(d.steps):
        x += (carry or {}).get(i, 0)
        x, eqs = _step_equations(kind, x, nums, (slip or {}).get(i, 0))
        per_step.append(eqs)
    return per_step, x


def worked_solution(d: Derivation) -> str:
    """The compact worked solution of ``d`` (the task's ``Problem.solution`` format)."""
    per_step, answer = _solve(d)
    return ". ".join([e for eqs in per_step for e in eqs] + [f"\\boxed{{{answer}}}"])


def _sentences(problem: Problem, level: int) -> list[str]:
    """The start sentence and the ``level`` operation sentences of the question (without the final
    period; the question sentence is left out)."""
    parts = problem.question.split(". ")
    if len(parts) != level + 2:
        raise ValueError(f"problem {problem.id!r}: expected {level + 2} sentences, got {len(parts)}")
    return parts[: level + 1]


CHECK_STYLES = ("sentence", "span", "plan")
"""How :func:`checked_solution` reads the question back: whole sentences, each sentence's span from the
word after its subject to its last number (``"Mia has 7 apples"`` -> ``"has 7"``, ``"She buys 3 bags
with 4 apples each"`` -> ``"buys 3 bags with 4"``, ``"He doubles his pens"`` -> ``"doubles his pens"``),
or a plan: the start value and one short operation per sentence (``"7 +3*4 -5"``, see
:func:`plan`), written before any equation."""

_PLAN_OP = {
    "add": "+{}",
    "sub": "-{}",
    "mul": "*{}",
    "div": "/{}",
    "add_groups": "+{}*{}",
    "sub_groups": "-{}*{}",
}


def plan(problem: Problem) -> str:
    """The question read back as operations, one per sentence after the start value: ``"7 +3*4 -5"``
    for "Mia has 7 apples. She buys 3 bags with 4 apples each. She gives away 5. ..." (``*2`` for
    "doubles", ``/3`` for "3 equal piles, keeps one")."""
    d = derivation(problem)
    return " ".join([str(d.start), *(_PLAN_OP[kind].format(*nums) for kind, nums in d.steps)])


def _span(sentence: str) -> str:
    rest = sentence.split(" ", 1)[1]  # without the subject (a name or a pronoun)
    last_digit = max((i for i, c in enumerate(rest) if c.isdigit()), default=len(rest) - 1)
    return rest[: last_digit + 1]


def checked_solution(problem: Problem, style: str = "sentence") -> str:
    """The correction round's re-derivation of ``problem`` (module docstring): the start sentence, then
    per operation its sentence, a colon and its equations, then the boxed answer; ``style="span"``
    quotes only each sentence's span (:data:`CHECK_STYLES`), about two thirds of the length."""
    if style not in CHECK_STYLES:
        raise ValueError(f"style: expected one of {CHECK_STYLES}, got {style!r}")
    if style == "plan":
        return f"{plan(problem)}: {problem.solution}"
    d = derivation(problem)
    per_step, answer = _solve(d)
    sentences = _sentences(problem, len(d.steps))
    if style == "span":
        sentences = [_span(s) for s in sentences]
    out = [f"{sentences[0]}."]
    for sentence, eqs in zip(sentences[1:], per_step):
        out.append(f"{sentence}: {'. '.join(eqs)}.")
    return " ".join([*out, f"\\boxed{{{answer}}}"])


def _misread(kind: str, nums: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """Another plausible reading of an operation's numbers (single digits, never the right ones)."""
    if kind in _GROUP_KINDS:
        k, m = nums
        options = [(m, k)] if m != k and m <= 5 else []
        options += [(k, v) for v in range(1, 10) if v != m] + [(v, m) for v in range(2, 6) if v != k]
        return rng.choice(options)
    n = nums[0]
    pool = {"mul": range(2, 5), "div": range(2, 6)}.get(kind, range(1, 10))
    return (rng.choice([v for v in pool if v != n]),)


def _offset(rng: random.Random) -> int:
    """A small nonzero error, most often by one or by ten (a wrong digit)."""
    return rng.choice((-10, -2, -1, 1, 1, 2, 10, rng.randint(-9, 9) or 3))


def flawed_solution(problem: Problem, rng: random.Random, mistake: str | None = None) -> str:
    """A compact worked solution of ``problem`` with one mistake at a random step, carried through the
    later steps, whose final answer is wrong (every value stays >= 0).

    Args:
        mistake: one of :data:`MISTAKES`, or None to draw one with ``rng``.
    """
    if mistake is not None and mistake not in MISTAKES:
        raise ValueError(f"mistake: expected one of {MISTAKES} or None, got {mistake!r}")
    d = derivation(problem)
    right = _solve(d)[1]
    for _ in range(100):
        kind_of = mistake or rng.choice(MISTAKES)
        i = rng.randrange(len(d.steps))
        steps, carry, slip = list(d.steps), {}, {}
        if kind_of == "number":
            steps[i] = (steps[i][0], _misread(*steps[i], rng))
        elif kind_of == "carry":
            carry[i] = _offset(rng)
        else:
            slip[i] = _offset(rng)
        wrong = Derivation(d.start, tuple(steps))
        per_step, answer = _solve(wrong, carry, slip)
        eqs = [e for step in per_step for e in step]
        if answer != right and not any(e.startswith("-") or "=-" in e for e in eqs):  # no negative value
            return ". ".join([*eqs, f"\\boxed{{{answer}}}"])
    raise ValueError(f"problem {problem.id!r}: found no flawed solution with non-negative values")


def guessed_answer(problem: Problem, rng: random.Random, right: bool) -> str:
    """A first answer without working, the boxed value alone (``"\\boxed{14}"``): the right one when
    ``right``, else a near miss (the answer off by a small nonzero amount, never below 0)."""
    value = int(problem.answer)
    if not right:
        value = next(v for v in (value + _offset(rng) for _ in range(100)) if v >= 0 and v != value)
    return f"\\boxed{{{value}}}"


def restated_answer(first_answer: str) -> str:
    """The correction round that keeps the first answer: its last boxed value restated, nothing
    re-derived (``"3*4=12. 7+12=19. \\boxed{19}"`` -> ``"\\boxed{19}"``)."""
    m = re.findall(r"\\boxed\{(\d+)\}", first_answer)
    if not m:
        raise ValueError(f"first_answer: expected a boxed integer answer, got {first_answer!r}")
    return f"\\boxed{{{m[-1]}}}"
