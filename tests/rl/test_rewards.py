"""Rewards: answer extraction, equivalence, reward functions, spec loading and the fault-tolerant scorer."""

from __future__ import annotations

import math
import os
import pickle
import textwrap
import time

import pytest
import torch

from mgrpo_fast.data.answers import (
    answers_match,
    extract_answer,
    math_verify_available,
    normalize_answer,
    parse_number,
)
from mgrpo_fast.rl.rewards import (
    RewardFunctionError,
    correctness_reward,
    default_reward_fns,
    format_reward,
    load_reward_function,
)
from mgrpo_fast.rl.scorer import RewardScorer, RewardWorkerError


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, style, expected",
    [
        ("The answer is \\boxed{42}.", "auto", "42"),
        ("so \\boxed{\\frac{1}{2}} done", "auto", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}}", "boxed", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "auto", "2"),
        ("set \\boxed{\\{1, 2\\}}", "boxed", "\\{1, 2\\}"),  # escaped braces are not structure
        ("spaced \\boxed {7}", "boxed", "7"),
        ("fbox \\fbox{9}", "boxed", "9"),
        ("no brace \\boxed 5$", "boxed", "5"),
        ("\\boxed{3} then truncated \\boxed{12", "boxed", "3"),  # last *complete* box
        ("\\boxed{ x^2 + 1 }", "boxed", "x^2 + 1"),
        ("no box here 5", "boxed", None),
        ("She has 18 eggs.\n#### 18", "auto", "18"),
        ("#### 1,234", "gsm8k", "1234"),
        ("#### $5.", "gsm8k", "5"),
        ("#### -7\nextra", "gsm8k", "-7"),
        ("no marker 3", "gsm8k", None),
        ("so 3 apples and 1,234 pears", "last_number", "1234"),
        ("the total is -5.", "last_number", "-5"),
        ("x = 3.25 meters", "last_number", "3.25"),
        ("about .5 of it", "last_number", ".5"),
        ("ratio 3/4.", "last_number", "3/4"),
        ("ratio -3/4", "last_number", "-3/4"),
        ("so \\frac{5}{8} it is", "last_number", "5/8"),
        ("\\dfrac{-1}{3}", "last_number", "-1/3"),
        ("compute 3-5", "last_number", "5"),  # a binary minus is not a sign
        ("cost $1,234.50 total", "last_number", "1234.50"),
        ("values 1,2,3", "last_number", "3"),
        ("50% of them", "last_number", "50"),
        ("no digits at all", "last_number", None),
        ("It is 7 or maybe 8.", "auto", "8"),
        ("", "auto", None),
    ],
)
def test_extract_answer(text, style, expected):
    assert extract_answer(text, style=style) == expected


def test_extract_answer_bad_style():
    with pytest.raises(ValueError, match="style must be one of"):
        extract_answer("x", style="boxes")
    with pytest.raises(TypeError, match="expected a str"):
        extract_answer(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "s, value, is_decimal",
    [
        ("42", 42, False),
        ("-3", -3, False),
        ("1,234", 1234, False),
        ("3.50", 3.5, True),
        (".5", 0.5, True),
        ("5.", 5, False),
        ("3/4", 0.75, False),
        ("\\frac{3}{4}", 0.75, False),
        ("\\dfrac{-1}{2}", -0.5, False),
        ("$18", 18, False),
        ("50\\%", 50, False),
        ("90^\\circ", 90, False),
        ("18 \\text{ dollars}", 18, False),
    ],
)
def test_parse_number(s, value, is_decimal):
    parsed = parse_number(s)
    assert parsed is not None and float(parsed[0]) == value and parsed[1] == is_decimal


@pytest.mark.parametrize("s", ["x+1", "1,2", "\\sqrt{2}", "3/0", "", "1e5", "two"])
def test_parse_number_rejects(s):
    assert parse_number(s) is None


def test_normalize_answer():
    assert normalize_answer(" \\left( 1, 2 \\right) ") == "(1,2)"
    assert normalize_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("x = \\text{yes}.") == "yes"
    assert normalize_answer("$1,000$") == "1000"


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("42", "42", True),
        ("42.0", "42", True),
        ("1,234", "1234", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\dfrac{1}{2}", True),
        ("-3/4", "-0.75", True),
        ("0.333333", "1/3", True),  # within the documented 1e-6 relative float tolerance
        ("0.33333", "1/3", False),
        ("0.3", "1/3", False),
        ("2/6", "1/3", True),  # exact rational comparison
        ("43", "42", False),
        ("x = 5", "5", True),
        ("$18", "18", True),
        ("18 \\text{ dollars}", "18", True),
        ("(1,2)", "\\left(1, 2\\right)", True),
        (None, "5", False),
        ("", "5", False),
        ("5", None, False),
    ],
)
def test_answers_match_numeric_and_string(pred, gold, expected):
    assert answers_match(pred, gold, use_math_verify=False) is expected


def test_answers_match_without_math_verify_is_string_only():
    assert not answers_match("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", use_math_verify=False)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
        ("(x+1)^2", "x^2+2x+1", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("\\{2,1\\}", "\\{1,2\\}", True),
        ("\\frac{\\pi}{3}", "\\frac{\\pi}{4}", False),
        ("3.14159", "\\pi", False),
    ],
)
@pytest.mark.skipif(not math_verify_available(), reason="math-verify not installed (pip install math-verify)")
def test_answers_match_symbolic(pred, gold, expected):
    assert answers_match(pred, gold) is expected


# --------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------
def test_correctness_reward():
    assert correctness_reward("so the answer is \\boxed{18}.", "18") == 1.0
    assert correctness_reward("so the answer is \\boxed{17}.", "18") == 0.0
    assert correctness_reward("She has 18 eggs.\n#### 18", "18") == 1.0
    assert correctness_reward("I think it's 1,234", "1234") == 1.0
    assert correctness_reward("no idea", "18") == 0.0
    # a full reference solution as gold is reduced to its final answer
    assert correctness_reward("\\boxed{5}", "2 + 3 = 5\n#### 5") == 1.0
    assert correctness_reward("\\boxed{5}", "so \\boxed{5}", level="Level 1") == 1.0  # meta ignored


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("reasoning... \\boxed{5}", 1.0),
        ("reasoning... $\\boxed{5}$.", 1.0),
        ("reasoning... \\[\\boxed{5}\\]\n", 1.0),
        ("\\boxed{5} and then more text", 0.0),
        ("\\boxed{4} no \\boxed{5}", 0.0),
        ("no box 5", 0.0),
        ("\\boxed{5", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "5") == expected


def test_default_reward_fns():
    assert default_reward_fns() == [(correctness_reward, 1.0)]
    assert default_reward_fns(0.1) == [(correctness_reward, 1.0), (format_reward, 0.1)]


# --------------------------------------------------------------------------------------------
# Loading user reward functions
# --------------------------------------------------------------------------------------------
HELPERS = textwrap.dedent(
    """
    import math, os, time

    NOT_CALLABLE = 3

    def hang(completion, answer, **meta):
        time.sleep(60)
        return 1.0

    def maybe_hang(completion, answer, **meta):
        if "hang" in completion:
            time.sleep(60)
        return 1.0

    def boom(completion, answer, **meta):
        if "boom" in completion:
            raise ValueError("kaboom")
        return 0.5

    def nan(completion, answer, **meta):
        return math.nan if "nan" in completion else 1.0

    def not_a_number(completion, answer, **meta):
        return "high"

    def die(completion, answer, **meta):
        if "die" in completion:
            os._exit(3)
        return 1.0

    def length(completion, answer, **meta):
        return len(completion) / 10 + meta.get("bonus", 0)
    """
)


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "reward_helpers.py"
    path.write_text(HELPERS)
    return str(path)


def test_load_reward_function_module_and_file(helpers):
    assert load_reward_function("mgrpo_fast.rl.rewards:correctness_reward") is correctness_reward
    fn = load_reward_function(f"{helpers}:length")
    assert fn("abcd", "x", bonus=1) == pytest.approx(1.4)
    assert load_reward_function("os.path:join") is os.path.join  # dotted module


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon_here", "expected 'module:function'"),
        ("mod:", "expected 'module:function'"),
        ("surely_not_a_module_xyz:fn", "module 'surely_not_a_module_xyz' not found"),
        ("mgrpo_fast.rl.rewards:nope", "has no attribute 'nope'.*correctness_reward"),
        ("mgrpo_fast.data.answers:FLOAT_REL_TOL", "is a Fraction, not callable"),
        ("/nonexistent/dir/r.py:fn", "file '/nonexistent/dir/r.py' not found"),
    ],
)
def test_load_reward_function_errors(spec, match):
    with pytest.raises(RewardFunctionError, match=match):
        load_reward_function(spec)


def test_load_reward_function_import_errors(tmp_path, monkeypatch):
    (tmp_path / "broken_dep_mod.py").write_text("import surely_missing_dependency_xyz\n")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardFunctionError, match="importing module 'broken_dep_mod' failed.*surely_missing"):
        load_reward_function("broken_dep_mod:fn")
    with pytest.raises(RewardFunctionError, match="raised RuntimeError: bad module"):
        load_reward_function("raising_mod:fn")
    (tmp_path / "consts.py").write_text("NOT_CALLABLE = 1\n")
    with pytest.raises(RewardFunctionError, match="is a int, not callable"):
        load_reward_function(f"{tmp_path / 'consts.py'}:NOT_CALLABLE")
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    with pytest.raises(RewardFunctionError, match="raised SyntaxError"):
        load_reward_function(f"{tmp_path / 'bad_syntax.py'}:f")


# --------------------------------------------------------------------------------------------
# Scorer, in-process
# --------------------------------------------------------------------------------------------
def test_scorer_in_process_errors_are_counted(helpers, caplog):
    fns = [(correctness_reward, 1.0), (f"{helpers}:boom", 2.0), f"{helpers}:nan", f"{helpers}:not_a_number"]
    with RewardScorer(fns, timeout_s=None) as scorer:
        assert scorer.in_process and scorer.names == ["correctness_reward", "boom", "nan", "not_a_number"]
        with caplog.at_level("WARNING", logger="mgrpo_fast.data.answers"):
            r = scorer.score(["\\boxed{5}", "boom \\boxed{5}", "nan 4"], ["5", "5", "5"])
    # item 0: 1 + 2*0.5 + 1 + 0; item 1: 1 + 0 (raised) + 1 + 0; item 2: 0 + 2*0.5 + 0 (nan) + 0
    assert r.rewards.tolist() == [3.0, 2.0, 1.0]
    assert r.rewards.dtype == torch.float32
    assert r.components["boom"].tolist() == [0.5, 0.0, 0.5]
    assert r.num_errors == 1 + 1 + 3 and r.num_nonfinite == 1 and r.num_timeouts == 0
    assert r.errors_per_fn == {"correctness_reward": 0, "boom": 1, "nan": 1, "not_a_number": 3}
    assert r.failed.tolist() == [True, True, True]
    assert "ValueError: kaboom" in caplog.text and "non-finite" in caplog.text
    assert caplog.text.count("not_a_number") == 1  # rate-limited: one warning per (fn, kind)
    m = r.metrics()
    assert m["reward/errors"] == 5.0 and m["reward/mean"] == pytest.approx(2.0)


def test_scorer_meta_and_validation(helpers):
    scorer = RewardScorer([f"{helpers}:length"], num_workers=0, timeout_s=None)
    r = scorer.score(["ab", "abcd"], ["x", "x"], [{"bonus": 1}, {}])
    assert r.rewards.tolist() == pytest.approx([1.2, 0.4])
    assert scorer.score([], []).rewards.shape == (0,)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        scorer.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match=r"metas\[0\] must be a dict"):
        scorer.score(["a"], ["x"], [None])
    with pytest.raises(ValueError, match="non-empty list"):
        RewardScorer([])
    with pytest.raises(ValueError, match="finite number"):
        RewardScorer([(correctness_reward, math.nan)])
    with pytest.raises(RewardFunctionError, match="not found"):
        RewardScorer(["surely_not_a_module_xyz:fn"])
    with pytest.raises(ValueError, match="cannot be sent to a worker"):
        RewardScorer([lambda c, a, **m: 1.0], timeout_s=1.0, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardScorer([correctness_reward], num_workers=-1)


# --------------------------------------------------------------------------------------------
# Scorer, worker processes (real timeouts)
# --------------------------------------------------------------------------------------------
def _triple(completion, answer, **meta):
    return 3.0 if "boxed" in completion else 0.0


class _Unloadable:
    """Pickles fine here, fails to unpickle in a worker."""

    def __call__(self, completion, answer, **meta):
        return 1.0

    def __reduce__(self):
        return (_fail_on_load, ())


def _fail_on_load():
    raise RuntimeError("cannot load in the worker")


TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pool_scorer(helpers):
    fns = [(correctness_reward, 1.0), (f"{helpers}:maybe_hang", 0.5), f"{helpers}:boom", f"{helpers}:nan"]
    fns += [f"{helpers}:die", (_triple, 0.25)]
    scorer = RewardScorer(fns, timeout_s=TIMEOUT_S, num_workers=2)
    scorer.score(["warm-up \\boxed{1}"] * 4, ["1"] * 4)  # starts the pool
    yield scorer
    scorer.close()


def _ok_batch(n: int) -> tuple[list[str], list[str]]:
    return [f"so \\boxed{{{i}}}" for i in range(n)], [str(i if i % 3 else i + 1) for i in range(n)]


def test_pool_hang_times_out_and_scorer_keeps_working(pool_scorer):
    old_pids = [w.proc.pid for w in pool_scorer._workers]
    completions = ["\\boxed{5}", "hang then \\boxed{5}", "\\boxed{4}"]
    t0 = time.monotonic()
    r = pool_scorer.score(completions, ["5", "5", "5"])
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < 30.0, elapsed  # really interrupted (the hang sleeps 60 s); slack for load
    assert r.num_timeouts == 1 and r.timeouts_per_fn["maybe_hang"] == 1 and r.num_errors == 0
    assert r.components["maybe_hang"].tolist() == [1.0, 0.0, 1.0]
    # the other functions of the hanging item still scored
    assert r.components["correctness_reward"].tolist() == [1.0, 1.0, 0.0]
    assert r.rewards.tolist() == pytest.approx(
        [1 + 0.5 + 0.5 + 1 + 1 + 0.75, 1 + 0 + 0.5 + 1 + 1 + 0.75, 0 + 0.5 + 0.5 + 1 + 1 + 0.75]
    )
    assert r.failed.tolist() == [False, True, False]
    # the stuck worker was killed and replaced
    new_pids = [w.proc.pid for w in pool_scorer._workers]
    killed = [p for p in old_pids if p not in new_pids]
    assert len(killed) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    # ... and the scorer keeps working
    comps, golds = _ok_batch(40)
    r2 = pool_scorer.score(comps, golds)
    assert r2.num_timeouts == 0 and r2.num_errors == 0
    assert r2.components["correctness_reward"].tolist() == [float(i % 3 != 0) for i in range(40)]


def test_pool_raise_nan_and_crash_are_counted(pool_scorer):
    completions = ["boom \\boxed{1}", "nan \\boxed{1}", "die \\boxed{1}", "\\boxed{1}"]
    r = pool_scorer.score(completions, ["1"] * 4)
    assert r.num_timeouts == 0
    assert r.errors_per_fn == {
        "correctness_reward": 0,
        "maybe_hang": 0,
        "boom": 1,
        "nan": 1,
        "die": 1,
        "_triple": 0,
    }
    assert r.num_errors == 3 and r.num_nonfinite == 1
    assert r.components["boom"].tolist() == [0.0, 0.5, 0.5, 0.5]
    assert r.components["nan"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert r.components["die"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert r.components["correctness_reward"].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_pool_is_deterministic_and_matches_in_process(pool_scorer, helpers):
    comps, golds = _ok_batch(64)
    comps[5], comps[17] = "boom " + comps[5], "nan " + comps[17]
    metas = [{"i": i} for i in range(64)]
    a = pool_scorer.score(comps, golds, metas)
    b = pool_scorer.score(comps, golds, metas)
    fns = [(correctness_reward, 1.0), (f"{helpers}:maybe_hang", 0.5), f"{helpers}:boom", f"{helpers}:nan"]
    fns += [f"{helpers}:die", (_triple, 0.25)]
    c = RewardScorer(fns, timeout_s=None).score(comps, golds, metas)
    for other in (b, c):
        assert torch.equal(a.rewards, other.rewards)
        assert all(torch.equal(a.components[k], other.components[k]) for k in a.components)
        assert a.num_errors == other.num_errors == 2


def test_pool_recovers_from_an_interrupted_score(pool_scorer, monkeypatch):
    import multiprocessing.connection

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    comps, golds = _ok_batch(16)
    monkeypatch.setattr(multiprocessing.connection, "wait", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pool_scorer.score(comps, golds)
    monkeypatch.undo()
    r = pool_scorer.score(comps[:4], golds[:4])  # stale results of the interrupted batch must not leak in
    assert r.num_errors == 0 and r.components["correctness_reward"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_pool_runs_functions_loaded_from_files(helpers):
    length = load_reward_function(f"{helpers}:length")  # a module only this process knows by name
    with RewardScorer([length], timeout_s=5.0, num_workers=1) as scorer:
        assert scorer.score(["abcd"], ["x"], [{"bonus": 1}]).rewards.tolist() == pytest.approx([1.4])


def test_pool_hang_only_function(helpers):
    """Every call hangs: each one is cut at the timeout, in parallel over the workers."""
    with RewardScorer([f"{helpers}:hang"], timeout_s=0.5, num_workers=2) as scorer:
        t0 = time.monotonic()
        r = scorer.score(["a", "b"], ["1", "1"])
        assert time.monotonic() - t0 < 10.0  # includes starting the pool
        assert r.num_timeouts == 2 and r.rewards.tolist() == [0.0, 0.0]


def test_pool_worker_load_failure_is_a_clear_error():
    pickle.dumps(_Unloadable())
    scorer = RewardScorer([_Unloadable()], timeout_s=1.0, num_workers=1)
    with pytest.raises(
        RewardWorkerError, match="could not load the reward functions.*cannot load in the worker"
    ):
        scorer.score(["x"], ["1"])
