"""Final answers: extraction from a completion and equivalence with the gold answer.

* :func:`extract_answer` pulls the final answer out of a completion: the last ``\\boxed{...}``
  (balanced, nested braces), GSM8K's ``#### n``, or the last number in the text.
* :func:`answers_match` decides whether a predicted answer equals the gold one: exact rational
  comparison when both are numbers, then normalized string equality, then symbolic equivalence with
  math-verify (``pip install math-verify``; without it the first two are all there is).

The reward functions built on them live in :mod:`mgrpo_fast.rl.rewards`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from fractions import Fraction

logger = logging.getLogger(__name__)

__all__ = [
    "BOXED_RE",
    "DEFAULT_MATH_VERIFY_TIMEOUT_S",
    "FLOAT_REL_TOL",
    "answers_match",
    "boxed_spans",
    "clean_number",
    "extract_answer",
    "extract_boxed",
    "gold_final_answer",
    "math_verify_available",
    "math_verify_timeouts",
    "normalize_answer",
    "parse_number",
]

# ------------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------------
BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
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


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """All complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5``: ``(start, end, content)``."""
    spans = []
    for m in BOXED_RE.finditer(text):
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
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None


def clean_number(s: str) -> str:
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
    return clean_number(last.group("num"))


def _gsm8k(text: str) -> str | None:
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    s = matches[-1].strip().rstrip(".").strip()
    s = s.lstrip("$").strip()
    return clean_number(s) or None


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
    s = clean_number(s)
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
    return clean_number(s)


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
    t = clean_number(t)
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


_MATH_VERIFY_ALARMS = [True]  # whether math-verify may set SIGALRM itself (see math_verify_timeouts)


@contextlib.contextmanager
def math_verify_timeouts(enabled: bool):
    """Within the block, math-verify may (``True``) or may not (``False``) bound its parse/verify with
    its own ``signal.alarm`` timeouts. The in-process reward scorer switches them off while its own
    SIGALRM timer bounds a whole reward call: the two would share the one process timer, and
    math-verify's ``alarm(0)`` would cancel the scorer's."""
    saved = _MATH_VERIFY_ALARMS[0]
    _MATH_VERIFY_ALARMS[0] = enabled
    try:
        yield
    finally:
        _MATH_VERIFY_ALARMS[0] = saved


def _math_verify_timeout() -> int | None:
    # math-verify bounds its parse/verify with signal.alarm, which only works in the main thread of
    # the main interpreter; elsewhere it raises. Off there: the scorer's process timeout bounds it.
    if _MATH_VERIFY_ALARMS[0] and threading.current_thread() is threading.main_thread():
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


def gold_final_answer(answer: str) -> str | None:
    """The gold final answer; a full GSM8K/MATH solution text is reduced to its final answer."""
    if "####" in answer or "\\boxed" in answer or "\\fbox" in answer:
        return extract_answer(answer)
    return answer
