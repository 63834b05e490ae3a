"""The problems a run trains and evaluates on, and the order it visits them in.

``data.train_files: []`` / ``data.eval_files: []`` and ``model.path: null`` mean the bundled default
(``mgrpo_fast.data.bundled``: a procedural arithmetic task and a tiny model made by the project), so a fresh
clone trains with nothing downloaded.

Data order is a pure function of the step: step ``k`` (1-based) takes the problems at stream positions
``[(k-1)·Q, k·Q)`` where ``Q = train.questions_per_step`` and the stream is epoch after epoch of the
training set, epoch ``e`` shuffled with ``random.Random(shuffle_seed + e)`` (or in file order). A run
resumed at step ``k`` therefore sees exactly the questions the uninterrupted run saw, with no sampler
state in the checkpoint. Under ``torchrun`` rank ``r`` of ``W`` takes questions ``r, r+W, ...`` of the
step (whole groups per rank).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mgrpo_fast.data.problems import Problem, load_problems
from mgrpo_fast.data.prompts import build_prompt_ids

logger = logging.getLogger(__name__)

__all__ = [
    "QuestionOrder",
    "bundled_task_spec",
    "default_max_new_tokens",
    "default_model_path",
    "drop_overlong_prompts",
    "load_eval_problems",
    "load_train_problems",
    "step_seed",
]

_FALLBACK_MAX_NEW_TOKENS = 512


def default_model_path() -> str:
    """The bundled demo model's directory (``model.path: null``)."""
    from mgrpo_fast.data.bundled import bundled_model_path

    path = bundled_model_path()
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: null means the bundled demo model, but {path} has no config.json; reinstall "
            "mgrpo_fast or make it with `python -m mgrpo_fast.tools.make_tiny_model --out DIR`"
        )
    return path


def bundled_task_spec() -> dict:
    """How the bundled model was made, from its ``task.json``: the task parameters it was trained on
    (``levels``, ``max_number``, ``max_value``), its prompt (``instruction``, null = none) and the
    completion cap to sample with (``max_new_tokens``). Empty when the file is absent."""
    path = Path(default_model_path()) / "task.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def default_max_new_tokens(files: Sequence[str] | None) -> int:
    """The bundled task's completion cap when no files are given, else 512."""
    if files:
        return _FALLBACK_MAX_NEW_TOKENS
    return int(bundled_task_spec().get("max_new_tokens", _FALLBACK_MAX_NEW_TOKENS))


def _load(files: Sequence[str], split: str, limit: int | None, **fields) -> list[Problem]:
    if files:
        return load_problems(list(files), limit=limit, **fields)
    from mgrpo_fast.data.arithmetic import bundled_problems

    spec = bundled_task_spec()
    task = {k: spec[k] for k in ("levels", "max_number", "max_value") if k in spec}
    return bundled_problems(split, limit, **task)


_FIELD_OPTIONS = ("format", "file_type", "question_field", "answer_field", "solution_field", "id_field")


def _field_options(data) -> dict:
    """The ``load_problems`` keywords of a ``DataConfig`` (none for None)."""
    return {} if data is None else {k: getattr(data, k) for k in _FIELD_OPTIONS}


def load_train_problems(data) -> list[Problem]:
    """The training problems of a ``DataConfig`` (file order; :class:`QuestionOrder` shuffles)."""
    problems = _load(data.train_files, "train", data.limit, dedupe=data.dedupe, **_field_options(data))
    if not problems:
        raise ValueError("data.train_files: no training problems (the files are empty or data.limit is 0)")
    return problems


def load_eval_problems(files: Sequence[str], limit: int | None = None, data=None) -> list[Problem]:
    """Evaluation problems: ``files`` (with the field options of ``data``, a ``DataConfig``), or the
    bundled test split when ``files`` is empty."""
    problems = _load(files, "test", limit, **_field_options(data))
    if not problems:
        raise ValueError("data.eval_files: no evaluation problems")
    return problems


def drop_overlong_prompts(
    problems: list[Problem],
    tokenizer: Any,
    *,
    limit: int | None,
    mode: str,
    source: str,
    prompt_options: dict[str, Any],
) -> list[Problem]:
    """``problems`` whose layer-1 prompt (``build_prompt_ids(problem, tokenizer, **prompt_options)``)
    has at most ``limit`` tokens, measured before training starts so that no step meets one that does
    not fit. ``mode="skip"``: the others are dropped and counted in one log line; ``"error"``: a
    ``ValueError`` names them (id, file and line). ``source`` names where they came from in messages."""
    if limit is None:
        return problems
    if limit < 1:
        raise ValueError(
            f"data.max_prompt_tokens: the model's context leaves {limit} tokens for a prompt after the "
            "completion lengths (rollout.max_new_tokens, layer2.max_new_tokens); lower those"
        )
    over = [(p, n) for p in problems if (n := len(build_prompt_ids(p, tokenizer, **prompt_options))) > limit]
    if not over:
        return problems
    rows = "; ".join(
        f"{p.id} ({n} tokens{_where(p)})" for p, n in over[:5]
    ) + (f"; and {len(over) - 5} more" if len(over) > 5 else "")
    if mode == "error":
        raise ValueError(
            f"data.overlong: error: {len(over)} of {len(problems)} prompts of {source} are longer than "
            f"{limit} tokens: {rows}. Shorten them, raise data.max_prompt_tokens / lower the completion "
            "lengths, or set data.overlong: skip"
        )
    logger.warning(
        "%s: skipping %d of %d problems whose prompt is longer than %d tokens (data.overlong: skip): %s",
        source,
        len(over),
        len(problems),
        limit,
        rows,
    )
    dropped = {id(p) for p, _ in over}
    kept = [p for p in problems if id(p) not in dropped]
    if not kept:
        raise ValueError(f"{source}: every prompt is longer than {limit} tokens (data.max_prompt_tokens)")
    return kept


def _where(problem: Problem) -> str:
    f, line = problem.meta.get("data_file"), problem.meta.get("data_line")
    return f", {f}:{line}" if f else ""


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct 63-bit seed per (run seed, step, stream): the sampling seeds of both layers, the
    selection and the guiding-phrase draws of a step (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 31)) * 0xD6E8FEB86659FD93) % 2**64
    return (x ^ (x >> 32)) % 2**63


class QuestionOrder:
    """Which problems step ``k`` trains on (module docstring).

    Args:
        num_problems: size of the training set.
        per_step: questions per step over all ranks.
        shuffle: shuffle each epoch; ``seed``: the base seed of the epoch permutations.
    """

    def __init__(self, num_problems: int, per_step: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if num_problems < 1:
            raise ValueError(f"num_problems: expected >= 1, got {num_problems}")
        if per_step < 1:
            raise ValueError(f"per_step: expected >= 1, got {per_step}")
        self.num_problems, self.per_step, self.shuffle, self.seed = num_problems, per_step, shuffle, seed
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            order = list(range(self.num_problems))
            if self.shuffle:
                random.Random(self.seed + e).shuffle(order)
            self._cache = {e: order}  # one epoch at a time is enough (steps move forward)
        return self._cache[e]

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Problem indices of 1-based ``step`` for ``rank`` (its share ``r::W`` of the step)."""
        if step < 1:
            raise ValueError(f"step: expected >= 1 (1-based), got {step}")
        start = (step - 1) * self.per_step
        out = []
        for pos in range(start, start + self.per_step):
            e, i = divmod(pos, self.num_problems)
            out.append(self._epoch(e)[i])
        return out[rank::world_size]

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` (fractional)."""
        return step * self.per_step / self.num_problems
