"""Rewards: final-answer extraction, answer equivalence and reward functions.

Pieces, from the bottom up:

* :func:`extract_answer` pulls the final answer out of a completion: the last ``\\boxed{...}``
  (balanced, nested braces), GSM8K's ``#### n``, or the last number in the text.
* :func:`answers_match` decides whether a predicted answer equals the gold one: exact rational
  comparison when both are numbers, then normalized string equality, then symbolic equivalence with
  math-verify (``pip install math-verify``; without it the first two are all there is).
* Reward functions follow the :class:`RewardFunction` protocol ``fn(completion, answer, **meta) ->
  float``. Built-ins: :func:`correctness_reward` (1/0) and :func:`format_reward` (1/0 for exactly one
  ``\\boxed{}`` at the end; its weight is the scorer weight). User functions are given as
  ``"module:function"`` (or ``"path/to/file.py:function"``) and loaded by :func:`load_reward_function`.
* :class:`mgrpo_fast.reward_scorer.RewardScorer` runs a weighted list of them over a batch in worker
  processes with a per-call timeout; a call that hangs, raises or returns NaN scores 0 and is counted.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import re
import sys
import threading
from fractions import Fraction
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MATH_VERIFY_TIMEOUT_S",
    "FLOAT_REL_TOL",
    "RewardFunction",
    "RewardFunctionError",
    "answers_match",
    "correctness_reward",
    "default_reward_fns",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "load_reward_function",
    "math_verify_available",
    "normalize_answer",
    "parse_number",
]

# ------------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------------
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
# A number as written in prose: "1,234" (thousands groups), "-3.5", ".5", "3/4", "\frac{3}{4}". A
# minus counts as a sign only where it cannot be a binary minus ("3-5" gives 5, not -5).
_INT_OR_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(
    r"\\[dt]?frac\{\s*(?P<fn>-?\d+)\s*\}\{\s*(?P<fd>\d+)\s*\}"
    rf"|(?P<num>(?<![\w.)\]}}])-?(?:{_INT_OR_DEC})(?:/(?:\d+))?)"
)


def _scan_braces(text: str, open_at: int) -> int | None:
    """Index just past the ``}`` matching the ``{`` at ``open_at``; ``None`` if unbalanced.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX, not structure."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """All complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5``: ``(start, end, content)``."""
    spans = []
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _scan_braces(text, i)
            if end is not None:
                spans.append((m.start(), end, text[i + 1 : end - 1].strip()))
        elif i > m.end():  # "\boxed 5": one token up to whitespace or "$"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                spans.append((m.start(), i + tok.end(), tok.group(0)))
    return spans


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (nested braces kept), else ``None``.

    A truncated final ``\\boxed{12`` is skipped in favour of the last complete one."""
    spans = _boxed_spans(text)
    return spans[-1][2] if spans else None


def _clean_number(s: str) -> str:
    """ "1,234" -> "1234", "+5" -> "5"; other text unchanged."""
    s = s.strip()
    if re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+)(?:\.\d+)?", s):
        s = s.replace(",", "")
    return s[1:] if s.startswith("+") else s


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m
    if last is None:
        return None
    if last.group("fn") is not None:
        return f"{last.group('fn')}/{last.group('fd')}"
    return _clean_number(last.group("num"))


def _gsm8k(text: str) -> str | None:
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    s = matches[-1].strip().rstrip(".").strip()
    s = s.lstrip("$").strip()
    return _clean_number(s) or None


def extract_answer(text: str, *, style: str = "auto") -> str | None:
    """The final answer in ``text`` as a string, or ``None`` when there is none.

    ``style``:

    * ``"boxed"``: content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces
      balanced, escaped ``\\{``/``\\}`` ignored, surrounding whitespace stripped; LaTeX kept as is.
    * ``"gsm8k"``: the rest of the line after the last ``####``, trailing period and a leading ``$``
      dropped, thousands separators removed (``"#### 1,234."`` -> ``"1234"``).
    * ``"last_number"``: the last number in the text: integers, ``1,234`` (thousands groups),
      decimals (``3.5``, ``.5``), fractions ``3/4`` and ``\\frac{3}{4}`` (returned as ``"3/4"``), a
      leading minus when it is a sign (``"x = -5"`` -> ``"-5"``; ``"3-5"`` -> ``"5"``); a sentence's
      trailing period is not part of the number.
    * ``"auto"`` (default): boxed if there is a complete ``\\boxed{}``, else gsm8k if there is a
      ``####``, else the last number.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer: expected a str, got {type(text).__name__}")
    if style == "boxed":
        return extract_boxed(text)
    if style == "gsm8k":
        return _gsm8k(text)
    if style == "last_number":
        return _last_number(text)
    if style != "auto":
        raise ValueError(
            f"extract_answer: style must be one of auto, boxed, gsm8k, last_number; got {style!r}"
        )
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        found = _gsm8k(text)
        if found:
            return found
    return _last_number(text)


# ------------------------------------------------------------------------------------------------
# Equivalence
# ------------------------------------------------------------------------------------------------
FLOAT_REL_TOL = Fraction(1, 10**6)
"""Relative tolerance used when an exact comparison fails and one side was written as a decimal with
a fractional part: ``|p - g| <= 1e-6 * max(|p|, |g|)``, computed exactly on rationals (so ``0.333333``
matches ``1/3`` and ``0.33333`` does not). Integers and fractions are compared exactly."""

DEFAULT_MATH_VERIFY_TIMEOUT_S = 5
"""math-verify's own per-parse/per-compare timeout (seconds, ``signal.alarm``), used only where signals
work (the main thread); elsewhere it is off and the scorer's process timeout is the bound."""

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_UNIT_TAIL_RE = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}\s*$")


def normalize_answer(s: str) -> str:
    """A light, MATH-style canonical form of an answer string for string comparison.

    Drops ``$``, spaces, ``\\left``/``\\right``, spacing commands (``\\!``, ``\\,``, ``\\;``, ``\\:``),
    ``\\displaystyle``, degree signs, a trailing period and a leading ``x =``-style single-letter
    assignment; unwraps ``\\text{...}``-like commands; ``\\dfrac``/``\\tfrac`` -> ``\\frac``;
    thousands separators in plain numbers are removed."""
    s = s.strip()
    s = _clean_number(s)
    s = s.replace("\\$", "").replace("$", "")
    for cmd in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ "):
        s = s.replace(cmd, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = _TEXT_WRAP_RE.sub(r"\1", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    m = re.fullmatch(r"[A-Za-z]=(.+)", s)
    if m:
        s = m.group(1)
    return _clean_number(s)


def parse_number(s: str) -> tuple[Fraction, bool] | None:
    """``s`` as an exact rational ``(value, is_decimal)``, or ``None`` if it is not a plain number.

    Accepts ``-12``, ``1,234``, ``3.50``, ``.5``, ``3/4``, ``\\frac{3}{4}`` (and ``\\dfrac``),
    a leading ``$``, a trailing ``%``/``\\%``, ``^\\circ`` or a ``\\text{units}`` tail, and a trailing
    period. ``is_decimal`` is true when a decimal point with digits after it was written (then the
    float tolerance :data:`FLOAT_REL_TOL` applies)."""
    t = s.strip()
    t = _UNIT_TAIL_RE.sub("", t).strip()
    t = t.replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "").strip()
    t = t.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").rstrip("%").strip()
    t = t.rstrip(".").strip()
    m = re.fullmatch(r"\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*([-+]?\d+)\s*\}", t)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return (Fraction(num, den), False) if den != 0 else None
    m = re.fullmatch(r"\(?([-+]?\d+)\s*/\s*(\d+)\)?", t)
    if m:
        den = int(m.group(2))
        return (Fraction(int(m.group(1)), den), False) if den != 0 else None
    t = _clean_number(t)
    m = re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", t)
    if not m:
        return None
    return Fraction(t), bool(re.search(r"\.\d", t))


def _numbers_equal(p: tuple[Fraction, bool], g: tuple[Fraction, bool]) -> bool:
    (pv, pdec), (gv, gdec) = p, g
    if pv == gv:
        return True
    if pdec or gdec:
        return abs(pv - gv) <= FLOAT_REL_TOL * max(abs(pv), abs(gv))
    return False


@functools.lru_cache(maxsize=1)
def math_verify_available() -> bool:
    """Whether the optional ``math-verify`` package can be imported (imported once, then cached)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _math_verify_timeout() -> int | None:
    # math-verify bounds its parse/verify with signal.alarm, which only works in the main thread of
    # the main interpreter; elsewhere it raises. Off there: the scorer's process timeout bounds it.
    if threading.current_thread() is threading.main_thread():
        return DEFAULT_MATH_VERIFY_TIMEOUT_S
    return None


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    t = _math_verify_timeout()
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=t)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=t)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def answers_match(pred: str | None, gold: str | None, *, use_math_verify: bool | None = None) -> bool:
    """Whether the predicted final answer ``pred`` equals the gold final answer ``gold``.

    In order: (1) both parse as plain numbers (:func:`parse_number`) -> exact rational comparison, with
    the relative tolerance :data:`FLOAT_REL_TOL` only when a side was written as a decimal; a numeric
    mismatch is final. (2) Equal after :func:`normalize_answer` -> True. (3) math-verify's
    ``verify(parse(gold), parse(pred))`` when installed (``use_math_verify=None`` means "if installed";
    ``False`` skips it), which handles ``\\frac{\\sqrt3}{2}`` vs ``\\frac{\\sqrt{3}}{2}``, sets,
    intervals, ``2\\sqrt2`` vs ``\\sqrt8``, equations. ``None``/empty on either side -> False.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    pn = parse_number(pred) or parse_number(normalize_answer(pred))
    gn = parse_number(gold) or parse_number(normalize_answer(gold))
    if pn is not None and gn is not None:
        return _numbers_equal(pn, gn)
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    if use_math_verify is None:
        use_math_verify = math_verify_available()
    if use_math_verify:
        return _math_verify_equal(pred, gold)
    return False


def _gold_final(answer: str) -> str | None:
    """The gold final answer; a full GSM8K/MATH solution text is reduced to its final answer."""
    if "####" in answer or "\\boxed" in answer or "\\fbox" in answer:
        return extract_answer(answer)
    return answer


# ------------------------------------------------------------------------------------------------
# Reward functions
# ------------------------------------------------------------------------------------------------
class RewardFunction(Protocol):
    """``fn(completion, answer, **meta) -> float``: ``completion`` is the generated text, ``answer``
    the gold final answer, ``meta`` the problem's extra fields (ignore what you do not use). Must be
    a module-level function (or a ``functools.partial`` of one) to run in the scorer's workers."""

    def __call__(self, completion: str, answer: str, **meta: Any) -> float: ...


def correctness_reward(completion: str, answer: str, **meta: Any) -> float:
    """1.0 if the final answer of ``completion`` (:func:`extract_answer`, style auto) matches the gold
    ``answer`` (:func:`answers_match`), else 0.0."""
    gold = _gold_final(answer)
    return 1.0 if answers_match(extract_answer(completion), gold) else 0.0


_FORMAT_TAIL_RE = re.compile(r"(?:\s|\.|!|\$|\\\]|\\\))*")


def format_reward(completion: str, answer: str, **meta: Any) -> float:
    """1.0 if ``completion`` has exactly one ``\\boxed{...}`` and nothing after it but whitespace, a
    period/exclamation mark and closing math delimiters (``$``, ``\\]``, ``\\)``), else 0.0.

    Its weight is the scorer weight: ``RewardScorer([(correctness_reward, 1.0), (format_reward, 0.1)])``."""
    spans = _boxed_spans(completion)
    if len(spans) != 1 or len(_BOXED_RE.findall(completion)) != 1:
        return 0.0
    return 1.0 if _FORMAT_TAIL_RE.fullmatch(completion[spans[0][1] :]) else 0.0


def default_reward_fns(format_weight: float = 0.0) -> list[tuple[RewardFunction, float]]:
    """The default reward: correctness (weight 1) plus the format reward when ``format_weight != 0``."""
    fns: list[tuple[RewardFunction, float]] = [(correctness_reward, 1.0)]
    if format_weight:
        fns.append((format_reward, float(format_weight)))
    return fns


class RewardFunctionError(ValueError):
    """A reward function spec that cannot be loaded (bad spec, module, attribute, not callable)."""


_FILE_MODULES: dict[str, str] = {}  # synthetic module name of a "file.py:fn" spec -> the file path


def _import_spec_module(spec: str, mod_part: str):
    if mod_part.endswith(".py"):
        path = os.path.abspath(mod_part)
        if not os.path.isfile(path):
            raise RewardFunctionError(f"reward function {spec!r}: file {mod_part!r} not found")
        name = f"_mgrpo_reward_{abs(hash(path)):x}"
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        _FILE_MODULES[name] = path
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise RewardFunctionError(
                f"reward function {spec!r}: executing {mod_part!r} raised {type(e).__name__}: {e}"
            ) from e
        return module
    try:
        return importlib.import_module(mod_part)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == mod_part or mod_part.startswith(e.name + ".")):
            raise RewardFunctionError(
                f"reward function {spec!r}: module {mod_part!r} not found (is it installed or on "
                f"PYTHONPATH? current directory: {os.getcwd()})"
            ) from e
        raise RewardFunctionError(
            f"reward function {spec!r}: importing module {mod_part!r} failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise RewardFunctionError(
            f"reward function {spec!r}: importing module {mod_part!r} raised {type(e).__name__}: {e}"
        ) from e


def load_reward_function(spec: str) -> RewardFunction:
    """Load a reward function from ``"package.module:function"`` (a dotted attribute path such as
    ``"mod:Class.method"`` works too) or ``"path/to/file.py:function"``.

    Raises :class:`RewardFunctionError` (a ``ValueError``) with the spec in the message when the spec
    is malformed, the module is not found or fails to import, the attribute is missing (the
    module's public callables are listed) or the object is not callable."""
    if not isinstance(spec, str):
        raise RewardFunctionError(f"reward function spec: expected a 'module:function' string, got {spec!r}")
    mod_part, sep, attr_part = spec.rpartition(":")
    if not sep or not mod_part.strip() or not attr_part.strip():
        raise RewardFunctionError(
            f"reward function spec {spec!r}: expected 'module:function' (e.g. 'my_rewards:length_penalty')"
        )
    mod_part, attr_part = mod_part.strip(), attr_part.strip()
    module = _import_spec_module(spec, mod_part)
    obj: Any = module
    for i, name in enumerate(attr_part.split(".")):
        if not hasattr(obj, name):
            where = mod_part if i == 0 else f"{mod_part}:{'.'.join(attr_part.split('.')[:i])}"
            public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:20]
            raise RewardFunctionError(
                f"reward function {spec!r}: {where!r} has no attribute {name!r} "
                f"(callables in the module: {', '.join(public) or 'none'})"
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise RewardFunctionError(
            f"reward function {spec!r} is a {type(obj).__name__}, not callable; expected "
            "fn(completion, answer, **meta) -> float"
        )
    return obj
