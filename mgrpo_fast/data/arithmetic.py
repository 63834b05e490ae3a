"""A procedural task: multi-step arithmetic word problems with short worked solutions.

Each problem is a start sentence, ``level`` operation sentences and a question::

    Mia has 7 apples. She buys 3 bags with 4 apples each. She gives away 5.
    How many apples does she have now?

and its solution is one equation per operation (two for a group operation) and the boxed answer::

    3*4=12. 7+12=19. 19-5=14. \\boxed{14}

Operations (``kind``: sentence -> equations): ``add`` (``x+n``), ``sub`` (``x-n``), ``add_groups``
(``k*m=p. x+p``), ``sub_groups`` (``k*m=p. x-p``), ``mul`` (``x*f``, "doubles"/"triples"/"f times as
many") and ``div`` (``x/k``, "k equal piles, keeps one"). Every number in the question is at most
``max_number`` (group counts are 2..5, group sizes 2..10, factors 2..4, divisors 2..5), and every
intermediate value and the answer lie in ``[1, max_value]``. By default question numbers are single
digits and answers at most two digits, so a character-level model can copy and compute them. Names,
objects, containers and verbs vary, but the word list is small (:data:`VOCABULARY_WORDS`), for the
same reason.

Difficulty: ``levels`` is the set of operation counts to draw from (uniformly, per problem);
``max_number``/``max_value`` set the number magnitudes.

Splits. A problem's *skeleton* is its numbers and operation kinds, without names, objects or verb
wording. ``sha256(skeleton)`` puts it in the test split with probability :data:`TEST_FRACTION`, else
in train (``meta["split"]``). The split is a function of the skeleton alone, independent of the seed,
so train and test never share a question, nor even two questions that differ only in wording, whatever
seeds they were generated with. Generation is deterministic per seed (Python's ``random.Random``
seeded with an int or a str, stable across runs and platforms) and never repeats a question text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from mgrpo_fast.data.problems import Problem

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_MAX_NUMBER",
    "DEFAULT_MAX_VALUE",
    "DEFAULT_SPLIT_SIZES",
    "MAX_LEVEL",
    "TEST_FRACTION",
    "VOCABULARY_WORDS",
    "bundled_problems",
    "generate_problems",
    "write_jsonl",
]

DEFAULT_LEVELS: tuple[int, ...] = (1, 2, 3)
"""Operation counts drawn from by default (the distribution the bundled tiny model was trained on)."""

DEFAULT_MAX_NUMBER = 9
"""Default largest number in a question (start value and operands): single digits, which a tiny
character-level model learns to copy far sooner than two-digit numbers."""

DEFAULT_MAX_VALUE = 99
"""Default largest intermediate value and answer."""

MAX_LEVEL = 6
"""The most operations a problem may have (longer solutions leave the ~80-character budget)."""

TEST_FRACTION = 0.1
"""Share of skeletons (see the module docstring) that belong to the test split."""

DEFAULT_SPLIT_SIZES = {"train": 10_000, "test": 500}
"""Problems returned by :func:`bundled_problems` when ``n`` is ``None``."""

# (name, subject pronoun, possessive)
_PEOPLE = (
    ("Mia", "she", "her"), ("Tom", "he", "his"), ("Ana", "she", "her"), ("Ben", "he", "his"),
    ("Zoe", "she", "her"), ("Leo", "he", "his"), ("Eva", "she", "her"), ("Sam", "he", "his"),
)  # fmt: skip
_OBJECTS = ("apples", "pens", "cards", "eggs", "books", "coins", "shells", "stamps", "marbles", "cookies")
_CONTAINERS = ("bags", "boxes", "packs", "jars")

_START = ("{N} has {a} {o}.", "{N} starts with {a} {o}.", "{N} owns {a} {o}.")
_SENTENCES = {
    "add": ("{P} buys {n} more.", "{P} finds {n} more {o}.", "{P} gets {n} more from a friend."),
    "sub": ("{P} gives away {n}.", "{P} loses {n} of them.", "{P} sells {n} {o}."),
    "add_groups": ("{P} buys {k} {c} with {m} {o} each.", "{P} gets {k} {c} of {m} {o}."),
    "sub_groups": ("{P} gives {k} friends {m} {o} each.", "{P} sells {k} {c} of {m} {o}."),
    "mul": ("{P} ends up with {f} times as many.",),  # f == 2, 3 also get "doubles"/"triples" below
    "div": ("{P} puts them into {k} equal piles and keeps one pile.",),
}
_MUL_WORDS = {2: "{P} doubles {H} {o}.", 3: "{P} triples {H} {o}."}
_QUESTIONS = ("How many {o} does {p} have now?", "How many {o} does {N} have in the end?")

VOCABULARY_WORDS: frozenset[str] = frozenset(
    w.strip(".?{}").lower()
    for text in (
        *_START, *(s for group in _SENTENCES.values() for s in group), *_MUL_WORDS.values(), *_QUESTIONS,
        *(" ".join(p) for p in _PEOPLE), *_OBJECTS, *_CONTAINERS,
    )
    for w in text.split()
    if not w.startswith("{")
)  # fmt: skip
"""Every word a question can contain besides numbers (lower case): the task's whole vocabulary."""


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def _check_levels(levels: int | Iterable[int]) -> tuple[int, ...]:
    raw = (levels,) if isinstance(levels, int) and not isinstance(levels, bool) else levels
    try:
        out = tuple(sorted(set(raw)))
    except TypeError:
        raise ValueError(f"levels: expected an int or a sequence of ints, got {levels!r}") from None
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LEVEL]
    if not out or bad:
        raise ValueError(f"levels: expected operation counts in 1..{MAX_LEVEL}, got {levels!r}")
    return out


def _check_magnitudes(max_number: int, max_value: int) -> None:
    _check_int("max_number", max_number, 5)
    _check_int("max_value", max_value, 10)
    if max_value < 2 * max_number:
        raise ValueError(f"max_value: must be >= 2 * max_number = {2 * max_number}, got {max_value}")


# ------------------------------------------------------------------------------------------------
# One problem
# ------------------------------------------------------------------------------------------------
def _operation(rng: random.Random, x: int, max_number: int, max_value: int) -> tuple[str, tuple[int, ...]]:
    """A random operation applicable to the current value ``x`` (result in ``[1, max_value]``):
    ``(kind, numbers)``. Kinds are drawn uniformly among the feasible ones, then their numbers."""
    groups = [(k, m) for k in range(2, 6) for m in range(2, min(10, max_number) + 1)]
    options: dict[str, list[tuple[int, ...]]] = {
        "add": [(n,) for n in range(1, min(max_number, max_value - x) + 1)],
        "sub": [(n,) for n in range(1, min(max_number, x - 1) + 1)],
        "add_groups": [g for g in groups if x + g[0] * g[1] <= max_value],
        "sub_groups": [g for g in groups if x - g[0] * g[1] >= 1],
        "mul": [(f,) for f in (2, 3, 4) if x * f <= max_value],
        "div": [(k,) for k in range(2, 6) if x % k == 0 and x // k >= 2],
    }
    kind = rng.choice([k for k, v in options.items() if v])  # "add" or "sub" is always feasible
    return kind, rng.choice(options[kind])


def _apply(kind: str, x: int, nums: tuple[int, ...]) -> tuple[int, list[str]]:
    """``(new value, equations)`` of one operation on ``x``."""
    if kind in ("add", "sub", "mul", "div"):
        n = nums[0]
        y = {"add": x + n, "sub": x - n, "mul": x * n, "div": x // n}[kind]
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}[kind]
        return y, [f"{x}{sym}{n}={y}"]
    k, m = nums
    p = k * m
    y = x + p if kind == "add_groups" else x - p
    return y, [f"{k}*{m}={p}", f"{x}{'+' if kind == 'add_groups' else '-'}{p}={y}"]


def _split_of(skeleton: str) -> str:
    digest = hashlib.sha256(skeleton.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


def _one_problem(rng: random.Random, level: int, max_number: int, max_value: int) -> tuple:
    """``(question, solution, answer, meta)`` of one random problem with ``level`` operations."""
    name, p, poss = rng.choice(_PEOPLE)
    obj, container = rng.choice(_OBJECTS), rng.choice(_CONTAINERS)
    x = rng.randint(2, max_number)
    fill = dict(N=name, p=p, P=p.capitalize(), H=poss, o=obj, c=container)
    sentences = [rng.choice(_START).format(a=x, **fill)]
    equations: list[str] = []
    skeleton = [str(x)]
    for _ in range(level):
        kind, nums = _operation(rng, x, max_number, max_value)
        templates = _SENTENCES[kind]
        if kind == "mul" and nums[0] in _MUL_WORDS:
            templates = (*templates, _MUL_WORDS[nums[0]])
        names = {"add": "n", "sub": "n", "mul": "f", "div": "k"}
        values = dict(zip(("k", "m"), nums)) if len(nums) == 2 else {names[kind]: nums[0]}
        sentences.append(rng.choice(templates).format(**values, **fill))
        x, eqs = _apply(kind, x, nums)
        equations += eqs
        skeleton.append(f"{kind}:{','.join(map(str, nums))}")
    sentences.append(rng.choice(_QUESTIONS).format(**fill))
    skel = "|".join(skeleton)
    meta = {"level": level, "ops": [s.split(":")[0] for s in skeleton[1:]], "split": _split_of(skel)}
    return " ".join(sentences), ". ".join([*equations, f"\\boxed{{{x}}}"]), str(x), meta


def _stream(rng: random.Random, levels: tuple[int, ...], max_number: int, max_value: int) -> Iterator[tuple]:
    while True:
        yield _one_problem(rng, rng.choice(levels), max_number, max_value)


_PATIENCE = 20_000


def _collect(stream: Iterator[tuple], n: int, id_prefix: str, keep, extra_meta: dict) -> list[Problem]:
    """The first ``n`` distinct questions of ``stream`` that ``keep(meta)`` accepts, as Problems."""
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0  # in a row: a distribution with fewer distinct questions than n would spin forever
    while len(out) < n:
        if misses == _PATIENCE:
            raise ValueError(
                f"n: found only {len(out)} distinct problems for n={n} ({_PATIENCE} draws in a row gave "
                "nothing new); ask for fewer, raise max_number or use more levels"
            )
        question, solution, answer, meta = next(stream)
        if question in seen or not keep(meta):
            misses += 1
            continue
        misses = 0
        seen.add(question)
        out.append(
            Problem(
                id=f"{id_prefix}-{len(out)}",
                question=question,
                answer=answer,
                solution=solution,
                meta={**meta, **extra_meta},
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def generate_problems(
    n: int,
    *,
    seed: int,
    levels: int | Sequence[int] = DEFAULT_LEVELS,
    max_number: int = DEFAULT_MAX_NUMBER,
    max_value: int = DEFAULT_MAX_VALUE,
) -> list[Problem]:
    """``n`` distinct random problems from both splits (``meta["split"]`` says which).

    Args:
        n: how many, ``>= 1``.
        seed: an int; the same arguments always give the same problems, in the same order.
        levels: operation counts (1..:data:`MAX_LEVEL`) to draw from uniformly; an int is one level.
        max_number: the largest number in a question (start value and operands), ``>= 5``.
        max_value: the largest intermediate value and answer, ``>= 2 * max_number``.

    Returns:
        Problems with ``id`` ``"arith-s{seed}-{i}"``, ``answer`` the final value as a decimal string,
        ``solution`` the worked solution ending in ``\\boxed{answer}``, and ``meta`` ``{"level": int,
        "ops": [kind, ...], "split": "train"|"test", "seed": seed}``.

    Raises:
        ValueError: a bad argument (the message names it), or fewer than ``n`` distinct problems exist.
    """
    _check_int("n", n, 1)
    _check_int("seed", seed, -(2**63))
    levels = _check_levels(levels)
    _check_magnitudes(max_number, max_value)
    stream = _stream(random.Random(seed), levels, max_number, max_value)
    return _collect(stream, n, f"arith-s{seed}", lambda meta: True, {"seed": seed})


def bundled_problems(
    split: str,
    n: int | None = None,
    *,
    seed: int = 0,
    levels: int | Sequence[int] = DEFAULT_LEVELS,
    max_number: int = DEFAULT_MAX_NUMBER,
    max_value: int = DEFAULT_MAX_VALUE,
) -> list[Problem]:
    """The bundled task's problems of one split: what training (``"train"``) and evaluation
    (``"test"``) use when no data files are configured.

    Problems of the two splits never share a skeleton (see the module docstring), for any seeds.
    A smaller ``n`` gives a prefix of a larger one (same seed and arguments).

    Args:
        split: ``"train"`` or ``"test"``.
        n: how many; ``None`` = :data:`DEFAULT_SPLIT_SIZES` ``[split]``.
        seed, levels, max_number, max_value: as in :func:`generate_problems`.

    Returns:
        Problems with ``id`` ``"arith-{split}-s{seed}-{i}"`` and ``meta`` as in
        :func:`generate_problems` (``meta["split"] == split``).
    """
    if split not in DEFAULT_SPLIT_SIZES:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    n = DEFAULT_SPLIT_SIZES[split] if n is None else _check_int("n", n, 1)
    _check_int("seed", seed, -(2**63))
    levels = _check_levels(levels)
    _check_magnitudes(max_number, max_value)
    # A str seed keeps the two splits' streams apart (the split filter alone already makes them disjoint)
    stream = _stream(random.Random(f"arith:{split}:{seed}"), levels, max_number, max_value)
    keep = lambda meta: meta["split"] == split
    return _collect(stream, n, f"arith-{split}-s{seed}", keep, {"seed": seed})


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> Path:
    """Write ``problems`` as a MATH-style JSONL file that ``load_problems`` reads back
    as the same problems (``id``, ``question``, ``answer``, ``solution``; ``meta`` gains only the
    loader's ``data_file``/``data_line``/``data_format``).

    One row per problem: ``{"id", "problem", "solution", "answer", **meta}`` (UTF-8, one JSON object a
    line). Parent folders are created. Returns the path.

    Raises:
        ValueError: a problem without a solution, or whose meta uses a row field name.
    """
    path = Path(path)
    reserved = {"id", "problem", "solution", "answer"}
    rows = []
    for i, p in enumerate(problems):
        if not p.solution:
            raise ValueError(f"problems[{i}]: MATH-style rows need a solution (id {p.id!r})")
        clash = reserved & set(p.meta)
        if clash:
            raise ValueError(f"problems[{i}]: meta keys {sorted(clash)} collide with the row's fields")
        row = {"id": p.id, "problem": p.question, "solution": p.solution, "answer": p.answer, **p.meta}
        rows.append(json.dumps(row, ensure_ascii=False))
    if not rows:
        raise ValueError("problems: nothing to write (an empty file cannot be loaded back)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path
