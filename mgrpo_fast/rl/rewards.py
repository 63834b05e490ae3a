"""Reward functions: the :class:`RewardFunction` protocol, the built-ins and loading user functions.

Reward functions follow ``fn(completion, answer, **meta) -> float``. Built-ins:
:func:`correctness_reward` (1/0, on :func:`mgrpo_fast.data.answers.answers_match`) and
:func:`format_reward` (1/0 for exactly one ``\\boxed{}`` at the end; its weight is the scorer weight).
User functions are given as ``"module:function"`` (or ``"path/to/file.py:function"``) and loaded by
:func:`load_reward_function`. :class:`mgrpo_fast.rl.scorer.RewardScorer` runs a weighted list of them
over a batch in worker processes with a per-call timeout; a call that hangs, raises or returns NaN
scores 0 and is counted.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Protocol

from mgrpo_fast.data.answers import BOXED_RE, answers_match, boxed_spans, extract_answer, gold_final_answer

__all__ = [
    "RewardFunction",
    "RewardFunctionError",
    "correctness_reward",
    "default_reward_fns",
    "format_reward",
    "load_reward_function",
    "reward_file_path",
]


class RewardFunction(Protocol):
    """``fn(completion, answer, **meta) -> float``: ``completion`` is the generated text, ``answer``
    the gold final answer, ``meta`` the problem's extra fields (ignore what you do not use). Must be
    a module-level function (or a ``functools.partial`` of one) to run in the scorer's workers."""

    def __call__(self, completion: str, answer: str, **meta: Any) -> float: ...


def correctness_reward(completion: str, answer: str, **meta: Any) -> float:
    """1.0 if the final answer of ``completion`` (:func:`extract_answer`, style auto) matches the gold
    ``answer`` (:func:`answers_match`), else 0.0."""
    gold = gold_final_answer(answer)
    return 1.0 if answers_match(extract_answer(completion), gold) else 0.0


_FORMAT_TAIL_RE = re.compile(r"(?:\s|\.|!|\$|\\\]|\\\))*")


def format_reward(completion: str, answer: str, **meta: Any) -> float:
    """1.0 if ``completion`` has exactly one ``\\boxed{...}`` and nothing after it but whitespace, a
    period/exclamation mark and closing math delimiters (``$``, ``\\]``, ``\\)``), else 0.0.

    Its weight is the scorer weight: ``RewardScorer([(correctness_reward, 1.0), (format_reward, 0.1)])``."""
    spans = boxed_spans(completion)
    if len(spans) != 1 or len(BOXED_RE.findall(completion)) != 1:
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


def reward_file_path(module_name: str | None) -> str | None:
    """The file behind the synthetic module of a ``\"file.py:fn\"`` spec (None for an importable module)."""
    return _FILE_MODULES.get(module_name or "")


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
