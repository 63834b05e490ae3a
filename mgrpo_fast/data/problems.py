"""Math problem loaders: JSONL and Parquet files of GSM8K-style, MATH-style or prompt/answer rows ->
:class:`Problem`.

:func:`load_problems` reads three row styles into :class:`Problem` objects; the style is detected per
file from its first row, or forced with ``format=``, and every column name is configurable
(``question_field``, ``answer_field``, ``solution_field``, ``id_field``; defaults in the table):

=================  ============  ===================================  ==================================
format             question      answer                               solution
=================  ============  ===================================  ==================================
``gsm8k``          ``question``  ``answer``: a solution ending in     (the ``answer`` text)
                                 ``#### n``, a ``\\boxed{}`` or the
                                 bare number
``math``           ``problem``   ``answer`` (optional): the final     ``solution``: its last
                                 answer; else from the solution       ``\\boxed{}`` is the answer
``prompt_answer``  ``prompt``    ``answer``: the final answer as it   ``solution`` (optional)
                                 is (a string or a number)
=================  ============  ===================================  ==================================

Detection (``format="auto"``) checks, in this order, the question and solution columns of ``math``,
the question and answer columns of ``gsm8k``, then those of ``prompt_answer``. Ids come from
``id_field``, else the first of ``id``/``unique_id``/``idx``/``problem_id`` present, else
``"{file stem}-{line}"``; the row's other columns are kept in :attr:`Problem.meta`.

A bad file gets a :class:`DataError` naming the file and the 1-based line (JSONL) or row (Parquet):
an empty file, bytes that are not UTF-8 (with the byte offset), invalid JSON, a row that is not an
object, a missing or empty field, an answer with no extractable final answer.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgrpo_fast.data.answers import clean_number, extract_answer, extract_boxed, parse_number

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "DataError", "Problem", "iter_problems", "load_problems"]

FORMATS = ("gsm8k", "math", "prompt_answer")
_ID_FIELDS = ("id", "unique_id", "idx", "problem_id")


# ------------------------------------------------------------------------------------------------
# Problems and errors
# ------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One math problem.

    ``id``: the row's ``id``-like field, else ``"{file stem}-{line or row}"``. ``question``: the text
    shown to the model. ``answer``: the gold *final* answer (``"18"``, ``"\\frac{1}{2}"``).
    ``solution``: the full reference solution when the file has one, else ``None``. ``meta``: the
    row's other fields plus ``data_file`` (path), ``data_line`` (1-based line, or row for Parquet) and
    ``data_format`` (``"gsm8k"`` or ``"math"``)."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class DataError(ValueError):
    """A data file that cannot be read; the message starts with ``file:line:`` (or ``file: row N:``)."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, unit: str = "line") -> None:
        self.path, self.line = str(path), line
        where = (
            f"{self.path}"
            if line is None
            else (f"{self.path}:{line}" if unit == "line" else f"{self.path}: row {line}")
        )
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: str | None  # gsm8k: required (text with "#### n"); math: optional; prompt_answer: required
    solution: str | None  # math: required (text with \boxed{}); gsm8k, prompt_answer: optional
    id: str | None


_DEFAULT_FIELDS = {  # format -> (question, answer, solution) column names
    "gsm8k": ("question", "answer", None),
    "math": ("problem", "answer", "solution"),
    "prompt_answer": ("prompt", "answer", None),
}


def _fields_for(fmt: str, question: str | None, answer: str | None, solution: str | None, id_: str | None):
    q, a, s = _DEFAULT_FIELDS[fmt]
    return _Fields(question or q, answer or a, solution or s, id_)


def _detect_format(row: dict, path, line: int, unit: str, q: str | None, a: str | None, s: str | None) -> str:
    found = {fmt: _fields_for(fmt, q, a, s, None) for fmt in FORMATS}
    needed = {fmt: (f.question, f.solution if fmt == "math" else f.answer) for fmt, f in found.items()}
    for fmt in FORMATS:
        if all(name in row for name in needed[fmt]):
            return fmt
    expected = " or ".join(f"{a!r} + {b!r} ({fmt})" for fmt, (a, b) in needed.items())
    raise DataError(
        path,
        line,
        f"cannot detect the format from the fields {sorted(row)}: expected {expected}; pass format= "
        "and/or the field names (question_field=, answer_field=, solution_field=)",
        unit,
    )


# ------------------------------------------------------------------------------------------------
# Row readers: (1-based line or row, dict)
# ------------------------------------------------------------------------------------------------
def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    offset = 0
    rows = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                raw, start = raw[3:], start + 3
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    path,
                    lineno,
                    f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {start + e.start} of the "
                    f"file (byte {e.start + 1} of the line); re-encode the file as UTF-8",
                ) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip())
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, lineno, f"expected a JSON object per line, got {type(row).__name__}")
            rows += 1
            yield lineno, row
    if rows == 0:
        raise DataError(path, None, "file is empty (no JSON rows)")


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "reading Parquet files needs pyarrow, which is not installed: pip install 'mgrpo-fast[dev]' "
            "(or pip install pyarrow)"
        ) from e
    return pq


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    pq = _import_pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(path, None, f"not a readable Parquet file: {type(e).__name__}: {e}") from None
    if pf.metadata.num_rows == 0:
        raise DataError(path, None, "file is empty (no rows)")
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            for key, value in row.items():
                if isinstance(value, bytes):  # binary columns: decode here to report bad bytes precisely
                    try:
                        row[key] = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(
                            path,
                            index,
                            f"field {key!r} is not valid UTF-8: byte 0x{value[e.start]:02x} at byte offset "
                            f"{e.start} of the value",
                            unit="row",
                        ) from None
            yield index, row


def _file_type(path: Path, file_type: str) -> str:
    if file_type != "auto":
        if file_type not in ("jsonl", "parquet"):
            raise ValueError(f"file_type must be 'auto', 'jsonl' or 'parquet', got {file_type!r}")
        return file_type
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(
        path, None, "unknown file type: expected .jsonl/.json (JSON lines) or .parquet; or pass file_type="
    )


# ------------------------------------------------------------------------------------------------
# Rows -> problems
# ------------------------------------------------------------------------------------------------
def _text_field(
    row: dict, name: str, path, line: int, unit: str, fmt: str, *, allow_number: bool = False
) -> str:
    if name not in row:
        raise DataError(path, line, f"missing field {name!r} ({fmt}-style row; fields: {sorted(row)})", unit)
    value = row[name]
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, line, f"field {name!r} must be a string, got {type(value).__name__}", unit)
    if not value.strip():
        raise DataError(path, line, f"field {name!r} is empty", unit)
    return value


def _snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _row_to_problem(row: dict, path: Path, line: int, unit: str, fmt: str, f: _Fields) -> Problem:
    question = _text_field(row, f.question, path, line, unit, fmt)
    if fmt == "prompt_answer":
        final = _text_field(row, f.answer, path, line, unit, fmt, allow_number=True).strip()
        solution = None
        used = {f.question, f.answer}
        if f.solution is not None and isinstance(row.get(f.solution), str):
            solution = row[f.solution]
            used.add(f.solution)
    elif fmt == "gsm8k":
        text = _text_field(row, f.answer, path, line, unit, fmt, allow_number=True)
        solution = text
        if "####" in text:
            final = extract_answer(text, style="gsm8k")
        elif "\\boxed" in text or "\\fbox" in text:
            final = extract_boxed(text)
        elif parse_number(text.strip()) is not None:  # the field already holds the bare final answer
            final, solution = clean_number(text.strip()), None
        else:
            final = None
        if not final:
            raise DataError(
                path,
                line,
                f"no final answer in field {f.answer!r}: expected '#### <answer>', a \\boxed{{...}} or a "
                f"bare number; got {_snippet(text)}",
                unit,
            )
        used = {f.question, f.answer}
        if f.solution is not None and isinstance(row.get(f.solution), str):  # an explicit solution field
            solution = row[f.solution]
            used.add(f.solution)
    else:
        solution = _text_field(row, f.solution, path, line, unit, fmt)
        given = row.get(f.answer) if f.answer else None
        if isinstance(given, (int, float)) and not isinstance(given, bool):
            given = str(given)
        if isinstance(given, str) and given.strip():
            final = given.strip()
        else:
            final = extract_boxed(solution)
            if not final:
                raise DataError(
                    path,
                    line,
                    f"no final answer: field {f.solution!r} has no complete \\boxed{{...}}"
                    + (f" and field {f.answer!r} is absent or empty" if f.answer else "")
                    + f"; got {_snippet(solution)}",
                    unit,
                )
        used = {f.question, f.solution, f.answer}
    if f.id is not None:
        if f.id not in row:
            raise DataError(path, line, f"missing id field {f.id!r} (fields: {sorted(row)})", unit)
        pid = str(row[f.id])
        used.add(f.id)
    else:
        key = next((k for k in _ID_FIELDS if row.get(k) is not None), None)
        pid = str(row[key]) if key else f"{path.stem}-{line}"
        if key:
            used.add(key)
    meta = {k: v for k, v in row.items() if k not in used}
    meta.update(data_file=str(path), data_line=line, data_format=fmt)
    return Problem(id=pid, question=question, answer=final, solution=solution, meta=meta)


def iter_problems(
    path: str | os.PathLike,
    *,
    format: str = "auto",
    file_type: str = "auto",
    question_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    id_field: str | None = None,
) -> Iterator[Problem]:
    """Stream the problems of one JSONL/Parquet file, in file order.

    Args:
        format: ``"auto"`` (from the file's first row; module docstring), ``"gsm8k"``, ``"math"``
            or ``"prompt_answer"``.
        file_type: ``"auto"`` (by extension: ``.jsonl``/``.ndjson``/``.json`` = JSON lines,
            ``.parquet``/``.pq``), ``"jsonl"`` or ``"parquet"``.
        question_field, answer_field, solution_field, id_field: column names (None = the format's
            defaults, module docstring): GSM8K ``question``/``answer`` (the answer text holds
            ``#### n``, a ``\\boxed{}`` or is the bare number); MATH ``problem``/``solution``/``answer``
            (a non-empty ``answer`` is the final answer, else the last ``\\boxed{}`` of the
            solution); prompt/answer ``prompt``/``answer`` (the final answer as it is); ids from
            ``id``/``unique_id``/``idx``/``problem_id`` when present.

    Raises:
        DataError: a bad file, naming the file and line (see the module docstring).
        FileNotFoundError, ImportError (Parquet without pyarrow), ValueError (bad arguments).
    """
    path = Path(path)
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    kind = _file_type(path, file_type)
    unit = "line" if kind == "jsonl" else "row"
    rows = _iter_jsonl(path) if kind == "jsonl" else _iter_parquet(path)
    fmt = None if format == "auto" else format
    fields = None
    for line, row in rows:
        if fields is None:
            fmt = fmt or _detect_format(row, path, line, unit, question_field, answer_field, solution_field)
            fields = _fields_for(fmt, question_field, answer_field, solution_field, id_field)
        yield _row_to_problem(row, path, line, unit, fmt, fields)


def load_problems(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    dedupe: bool = False,
    shuffle_seed: int | None = None,
    limit: int | None = None,
    **read_options: str | None,
) -> list[Problem]:
    """Load problems from one or more JSONL/Parquet files (concatenated in the given order).

    Args:
        dedupe: drop problems whose whitespace-normalized question was seen before (first kept).
        shuffle_seed: shuffle with ``random.Random(shuffle_seed)`` (after dedupe); ``None``: file order.
        limit: keep the first ``limit`` problems (after dedupe and shuffle).
        read_options: how each file is read, the keywords of :func:`iter_problems`: ``format``
            (``"auto"`` per file, ``"gsm8k"``, ``"math"``, ``"prompt_answer"``), ``file_type``,
            ``question_field``, ``answer_field``, ``solution_field``, ``id_field``.

    Raises:
        DataError: a bad file, naming the file and line (see the module docstring).
        FileNotFoundError, ImportError (Parquet without pyarrow), ValueError (bad arguments),
        TypeError (a keyword that is not a read option).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    try:  # a keyword that is no read option fails here, even with no paths
        inspect.signature(iter_problems).bind(paths, **read_options)
    except TypeError as exc:
        raise TypeError(f"load_problems(): {exc}") from None
    early_stop = limit is not None and shuffle_seed is None
    out: list[Problem] = []
    seen: set[str] = set()
    dropped = 0
    for p in paths:
        for prob in iter_problems(p, **read_options):
            if dedupe:
                key = " ".join(prob.question.split())
                if key in seen:
                    dropped += 1
                    continue
                seen.add(key)
            out.append(prob)
            if early_stop and len(out) >= limit:
                break
        if early_stop and len(out) >= limit:
            break
    if dropped:
        logger.info("load_problems: dropped %d duplicate questions", dropped)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(out)
    return out if limit is None else out[:limit]
