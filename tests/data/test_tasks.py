"""The bundled arithmetic task: determinism, the disjoint split, correct worked solutions, levels,
argument errors and the JSONL round trip through ``mgrpo_fast.data.problems.load_problems``."""

from __future__ import annotations

import random
import re

import pytest

from mgrpo_fast.data import arithmetic
from mgrpo_fast.data import arithmetic_corrections as corrections
from mgrpo_fast.data.answers import answers_match, extract_answer
from mgrpo_fast.data.arithmetic import (
    DEFAULT_MAX_NUMBER,
    DEFAULT_MAX_VALUE,
    DEFAULT_SPLIT_SIZES,
    MAX_LEVEL,
    VOCABULARY_WORDS,
    bundled_problems,
    generate_problems,
    write_jsonl,
)
from mgrpo_fast.data.problems import Problem, load_problems

EQUATION = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
FLOOR = {**OPS, "/": lambda a, b: a // b}


def _check_solution(p, max_value: int = DEFAULT_MAX_VALUE) -> list[tuple[int, str, int, int]]:
    """Parse and verify ``p.solution``: each equation is right, follows its operation in
    ``meta["ops"]`` (a group operation is ``k*m=q`` then ``x+q``/``x-q``), chains from the previous
    value, and the boxed value is the last result."""
    parts = p.solution.split(". ")
    assert parts[-1] == f"\\boxed{{{p.answer}}}", p.solution
    eqs = []
    for part in parts[:-1]:
        m = EQUATION.match(part)
        assert m, f"not an equation: {part!r} in {p.solution!r}"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert OPS[op](a, b) == c, f"wrong arithmetic {part!r}"
        assert 1 <= c <= max_value
        eqs.append((a, op, b, c))
    value = int(re.search(r"\d+", p.question)[0])  # the start value is the first number
    it = iter(eqs)
    for kind in p.meta["ops"]:
        a, op, b, c = next(it)
        if kind.endswith("_groups"):
            assert op == "*" and 2 <= a <= 5, p.solution
            product = c
            a, op, b, c = next(it)
            assert b == product, p.solution
        assert op == SYMBOL[kind.removesuffix("_groups")], p.solution
        assert a == value, f"does not start from the running value {value}: {p.solution!r}"
        value = c
    assert next(it, None) is None, p.solution
    assert str(value) == p.answer
    return eqs


def test_deterministic_per_seed_and_seeds_differ():
    a = generate_problems(60, seed=7)
    assert a == generate_problems(60, seed=7)
    b = generate_problems(60, seed=8)
    assert [p.question for p in a] != [p.question for p in b]
    assert bundled_problems("train", 40, seed=1) == bundled_problems("train", 40, seed=1)
    assert bundled_problems("train", 40, seed=1) != bundled_problems("train", 40, seed=2)
    # a smaller n is a prefix of a larger one
    assert bundled_problems("test", 30, seed=3) == bundled_problems("test", 60, seed=3)[:30]


def test_questions_are_distinct_and_ids_unique():
    ps = generate_problems(500, seed=0)
    assert len({p.question for p in ps}) == 500
    assert len({p.id for p in ps}) == 500


def test_train_test_disjoint_across_seeds():
    train = bundled_problems("train", 3000, seed=0) + bundled_problems("train", 1000, seed=5)
    test = bundled_problems("test", 500, seed=0) + bundled_problems("test", 300, seed=9)
    assert {p.meta["split"] for p in train} == {"train"}
    assert {p.meta["split"] for p in test} == {"test"}
    assert not {p.question for p in train} & {p.question for p in test}
    # stronger: no test problem has the same arithmetic (solution) as a training problem
    assert not {p.solution for p in train} & {p.solution for p in test}
    # generate_problems labels both splits, in roughly TEST_FRACTION proportion
    share = sum(p.meta["split"] == "test" for p in generate_problems(2000, seed=0)) / 2000
    assert 0.05 < share < 0.15


def test_default_sizes():
    assert len(bundled_problems("test")) == DEFAULT_SPLIT_SIZES["test"]


@pytest.mark.parametrize("levels", [(1, 2, 3), (4, 5, 6), 2])
def test_solutions_are_correct(levels):
    for p in generate_problems(300, seed=11, levels=levels):
        eqs = _check_solution(p)
        assert answers_match(extract_answer(p.solution), p.answer)
        assert int(p.answer) >= 0
        groups = sum(op in ("add_groups", "sub_groups") for op in p.meta["ops"])
        assert len(eqs) == p.meta["level"] + groups


def test_levels_and_magnitudes_respected():
    for levels in ((1,), (2, 4), (MAX_LEVEL,)):
        ps = generate_problems(200, seed=2, levels=levels)
        assert {p.meta["level"] for p in ps} == set(levels)  # 200 draws hit every level
        for p in ps:
            # start sentence + one sentence per operation + the question
            assert len(re.findall(r"[.?]( |$)", p.question)) == p.meta["level"] + 2, p.question
            assert len(p.meta["ops"]) == p.meta["level"]
    for max_number, max_value in ((DEFAULT_MAX_NUMBER, DEFAULT_MAX_VALUE), (5, 10), (12, 30), (40, 200)):
        ps = generate_problems(300, seed=4, max_number=max_number, max_value=max_value)
        largest = max(int(n) for p in ps for n in re.findall(r"\d+", p.question))
        assert largest == max_number  # every question number is <= max_number, and it is reached
        for p in ps:
            _check_solution(p, max_value=max_value)


def test_small_vocabulary_and_short_solutions():
    words = set()
    for p in generate_problems(1000, seed=0):
        words |= {w.strip(".?").lower() for w in p.question.split() if not w.strip(".?").isdigit()}
        assert len(p.solution) <= 80
        assert p.question.isascii() and p.solution.isascii()
    assert words <= VOCABULARY_WORDS
    assert len(VOCABULARY_WORDS) < 120


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: generate_problems(0, seed=0), "n"),
        (lambda: generate_problems(2.5, seed=0), "n"),
        (lambda: generate_problems(5, seed="x"), "seed"),
        (lambda: generate_problems(5, seed=0, levels=[]), "levels"),
        (lambda: generate_problems(5, seed=0, levels=[0]), "levels"),
        (lambda: generate_problems(5, seed=0, levels=[MAX_LEVEL + 1]), "levels"),
        (lambda: generate_problems(5, seed=0, levels="12"), "levels"),
        (lambda: generate_problems(5, seed=0, levels=None), "levels"),
        (lambda: generate_problems(5, seed=0, max_number=2), "max_number"),
        (lambda: generate_problems(5, seed=0, max_value=15), "max_value"),
        (lambda: bundled_problems("dev"), "split"),
        (lambda: bundled_problems("train", -1), "n"),
        (lambda: bundled_problems("test", 5, seed=None), "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


def test_exhausted_distribution_raises(monkeypatch):
    # a level-1 test split with numbers up to 5 holds a few thousand distinct questions: asking for
    # more must end with an error (after _PATIENCE fruitless draws in a row), not spin forever
    monkeypatch.setattr(arithmetic, "_PATIENCE", 300)
    with pytest.raises(ValueError, match=r"^n: found only \d+ distinct problems"):
        bundled_problems("test", 10**6, levels=1, max_number=5, max_value=10)


def test_jsonl_round_trip(tmp_path):
    problems = bundled_problems("test", 50, seed=0) + generate_problems(50, seed=1, levels=(4, 5))
    path = write_jsonl(problems, tmp_path / "sub" / "arith.jsonl")
    loaded = load_problems(path)
    assert len(loaded) == len(problems)
    for i, (p, q) in enumerate(zip(problems, loaded)):
        assert (q.id, q.question, q.answer, q.solution) == (p.id, p.question, p.answer, p.solution)
        extra = {k: q.meta.pop(k) for k in ("data_file", "data_line", "data_format")}
        assert q.meta == p.meta
        assert extra == {"data_file": str(path), "data_line": i + 1, "data_format": "math"}


def test_write_jsonl_rejects_bad_rows(tmp_path):
    p = generate_problems(1, seed=0)[0]
    with pytest.raises(ValueError, match="problems"):
        write_jsonl([], tmp_path / "a.jsonl")
    p.meta["answer"] = "x"
    with pytest.raises(ValueError, match="collide"):
        write_jsonl([p], tmp_path / "a.jsonl")


# ------------------------------------------------------------------------------------------------
# Correction rounds (mgrpo_fast.data.arithmetic_corrections)
# ------------------------------------------------------------------------------------------------
def test_derivation_round_trips_the_worked_solution(tmp_path):
    problems = generate_problems(300, seed=5, levels=(1, 2, 3, 4, 5, 6))
    for p in problems:
        d = corrections.derivation(p)
        assert corrections.worked_solution(d) == p.solution
        assert [k for k, _ in d.steps] == p.meta["ops"]
        assert d.start == int(re.search(r"\d+", p.question)[0])
    # problems loaded back from JSONL keep what the derivation needs
    loaded = load_problems(write_jsonl(problems[:20], tmp_path / "a.jsonl"))
    assert [corrections.derivation(q) for q in loaded] == [corrections.derivation(p) for p in problems[:20]]


def test_checked_solution_quotes_each_sentence_before_its_equations():
    for p in generate_problems(300, seed=6, levels=(1, 2, 3, 4)):
        text = corrections.checked_solution(p)
        assert answers_match(extract_answer(text), p.answer)
        sentences = p.question.split(". ")[:-1]  # start + one per operation (the question left out)
        equations = p.solution.split(". ")[:-1]
        pos = 0
        for s in sentences:  # every sentence of the question, in order
            pos = text.index(s, pos) + len(s)
        assert [e for e in re.findall(r"\d+[-+*/]\d+=\d+", text)] == equations  # the same equations
        assert text.endswith(f"\\boxed{{{p.answer}}}")
    p = Problem(id="x", question="Mia has 7 apples. She buys 3 bags with 4 apples each. She gives away 5. "
                "How many apples does she have now?", answer="14", solution="3*4=12. 7+12=19. 19-5=14. "
                "\\boxed{14}", meta={"ops": ["add_groups", "sub"]})  # fmt: skip
    assert corrections.checked_solution(p) == (
        "Mia has 7 apples. She buys 3 bags with 4 apples each: 3*4=12. 7+12=19. She gives away 5: 19-5=14. "
        "\\boxed{14}"
    )


def test_checked_solution_span_style_quotes_each_sentence_span():
    p = Problem(id="x", question="Mia has 7 apples. She buys 3 bags with 4 apples each. He doubles his pens. "
                "How many apples does she have now?", answer="20", solution="3*4=12. 7+12=19. 19*2=38. "
                "\\boxed{38}", meta={"ops": ["add_groups", "mul"]})  # fmt: skip
    assert corrections.checked_solution(p, "span") == (
        "has 7. buys 3 bags with 4: 3*4=12. 7+12=19. doubles his pens: 19*2=38. \\boxed{38}"
    )
    for q in generate_problems(200, seed=8, levels=(1, 2, 3)):
        span, sentence = corrections.checked_solution(q, "span"), corrections.checked_solution(q)
        assert answers_match(extract_answer(span), q.answer) and len(span) < len(sentence)
    with pytest.raises(ValueError, match="style"):
        corrections.checked_solution(p, "words")


def test_plan_style_reads_the_question_back_as_operations_then_solves():
    p = Problem(id="x", question="Mia has 7 apples. She buys 3 bags with 4 apples each. She gives away 5. "
                "How many apples does she have now?", answer="14", solution="3*4=12. 7+12=19. 19-5=14. "
                "\\boxed{14}", meta={"ops": ["add_groups", "sub"]})  # fmt: skip
    assert corrections.plan(p) == "7 +3*4 -5"
    assert corrections.checked_solution(p, "plan") == "7 +3*4 -5: 3*4=12. 7+12=19. 19-5=14. \\boxed{14}"
    symbols = {"add": "+", "sub": "-", "mul": "*", "div": "/", "add_groups": "+", "sub_groups": "-"}
    for q in generate_problems(300, seed=9, levels=(1, 2, 3, 4)):
        head, _, rest = corrections.checked_solution(q, "plan").partition(": ")
        start, *ops = head.split(" ")
        assert int(start) == corrections.derivation(q).start and rest == q.solution
        assert [op[0] for op in ops] == [symbols[k] for k in q.meta["ops"]]  # one operation per sentence
        # the question's numbers in order ("doubles"/"triples" are *2/*3)
        spoken = q.question.replace("doubles", "2").replace("triples", "3")
        assert re.findall(r"\d+", head) == re.findall(r"\d+", spoken)


def test_guessed_and_restated_answers():
    rng = random.Random(0)
    for p in generate_problems(200, seed=10, levels=(1, 2, 3)):
        right, wrong = corrections.guessed_answer(p, rng, True), corrections.guessed_answer(p, rng, False)
        assert right == f"\\boxed{{{p.answer}}}"
        assert re.fullmatch(r"\\boxed\{\d+\}", wrong) and not answers_match(extract_answer(wrong), p.answer)
        flawed = corrections.flawed_solution(p, rng)
        assert corrections.restated_answer(flawed) == f"\\boxed{{{extract_answer(flawed)}}}"
        assert corrections.restated_answer(p.solution) == right
    with pytest.raises(ValueError, match="first_answer"):
        corrections.restated_answer("no answer here")


@pytest.mark.parametrize("mistake", [*corrections.MISTAKES, None])
def test_flawed_solution_has_one_carried_mistake_and_a_wrong_answer(mistake):
    rng = random.Random(0)
    for p in generate_problems(200, seed=7, levels=(1, 2, 3)):
        text = corrections.flawed_solution(p, rng, mistake)
        assert not answers_match(extract_answer(text), p.answer), (p.solution, text)
        eqs = [EQUATION.match(e) for e in text.split(". ")[:-1]]
        assert all(eqs) and len(eqs) == len(p.solution.split(". ")) - 1, text
        right = [FLOOR[m[2]](int(m[1]), int(m[3])) == int(m[4]) for m in eqs]
        if mistake == "slip":  # exactly one wrong result; the later steps compute on from it
            assert right.count(False) == 1, text
        elif mistake in ("number", "carry"):  # the arithmetic stays right (floor division)
            assert all(right), text
    with pytest.raises(ValueError, match="mistake"):
        corrections.flawed_solution(p, rng, "typo")


def test_derivation_rejects_a_problem_of_another_task():
    with pytest.raises(ValueError, match="arithmetic-task"):
        corrections.derivation(Problem(id="g", question="What is 2+2?", answer="4", solution="2+2=4"))
