"""The machinery under the config sections (``mgrpo_fast.config``): converting YAML/CLI values to
the annotated field types, per-field checks (``choices``, bounds), errors naming the dotted path, and
the YAML 1.2 float reading. Sections subclass :class:`Section` and declare fields with :func:`setting`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="),
           "lt": (operator.lt, "<")}  # fmt: skip
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}


class ConfigError(ValueError):
    """A bad configuration key or value; ``path`` is its dotted field path (``layer2.group_size``)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def fail(path: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {expected}, got {value!r}", path)


# --------------------------------------------------------------------------------------------
# Values -> annotated field types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawOverride:
    """An override: its YAML reading and its raw text (kept when a string field rejects a scalar or
    mapping reading: ``--data.system_prompt='Be: brief'``, ``--model.path=123``)."""

    text: str
    parsed: Any

    def __repr__(self) -> str:
        return repr(self.parsed)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType) or origin is Literal:
        return " or ".join(repr(a) if origin is Literal else _type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0]) if args[-1] is Ellipsis else f'{len(args)} numbers'}"
    if origin is dict:
        return f"a mapping of string to {_type_name(args[1])}"
    return f"a mapping (section {tp._section})" if dataclasses.is_dataclass(tp) else _NAMES[tp]


def _accepts_str(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return tp is str or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` as the annotation ``tp`` (ints -> floats, lists -> tuples, dicts -> sections)."""
    if isinstance(value, RawOverride):
        try:
            return _convert(value.parsed, tp, path)
        except ConfigError:
            if _accepts_str(tp) and not isinstance(value.parsed, (str, list)):
                return _convert(value.text, tp, path)
            raise
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if value is None and len(arms) < len(args):
            return None
        if len(arms) == 1:  # Optional[X]: X's own, more precise error
            return _convert(value, arms[0], path)
        for arm in arms:
            try:
                return _convert(value, arm, path)
            except ConfigError:
                pass
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    elif tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML's .inf / .nan and 1e999 (which reads as inf)
            fail(path, f"a finite {'number' if tp is float else 'integer'}", value)
        if tp is float or isinstance(value, int) or value.is_integer():
            return tp(value)
    elif origin is tuple:
        value = [value] if isinstance(value, str) and args[-1] is Ellipsis else value
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            types_ = [args[0]] * len(value) if args[-1] is Ellipsis else args
            return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, types_)))
    elif origin is dict:
        if isinstance(value, dict):
            return {_convert(k, args[0], path): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp) and isinstance(value, (tp, dict)):  # a section (or its mapping)
        return value if isinstance(value, tp) else from_dict(tp, value, path)
    fail(path, _type_name(tp), value)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, path: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        fail(path or "config", f"a mapping with keys {', '.join(names)}", data)
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            moved = getattr(cls, "_moved", {}).get(key)
            if moved is not None:
                raise ConfigError(f"{full}: this key has moved to {moved}; set {moved} instead", full)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f" of {path}" if path else ""
            raise ConfigError(f"{full}: unknown key{hint}; valid keys{where}: {', '.join(names)}", full)
    return cls(**data)


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what YAML writes."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return {k: to_plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def setting(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = dataclasses.MISSING,
            choices: Sequence | None = None, why: str | None = None, **bounds: float) -> Any:  # fmt: skip
    """A documented field with its checks. ``doc``: one line saying what the field means and what its
    special values do (``--help`` and docs/training.md show it); ``choices`` and bounds ``ge/gt/le/lt``
    are checked on load (null and ``auto`` skip them); ``why``: the reason for the bounds, added to the
    error a value outside them gets."""
    if not isinstance(doc, str) or not doc.strip():
        raise TypeError("setting: doc must be a non-empty string (the field's one-line documentation)")
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"setting: unknown bound(s) {sorted(unknown)}; expected ge, gt, le, lt")
    metadata = {"doc": " ".join(doc.split()), "choices": choices, "bounds": bounds, "why": why}
    return field(default=default, default_factory=factory, metadata=metadata)


def field_doc(f: dataclasses.Field) -> str:
    """The one-line documentation given to :func:`setting` (empty for a field declared without it)."""
    return f.metadata.get("doc", "")


def type_label(tp: Any) -> str:
    """A short name of an annotation, as YAML users write values: ``int | 'auto' | null``,
    ``list[str]``, ``[float, float]``, ``{str: float}``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        if args[-1] is Ellipsis:
            return f"list[{type_label(args[0])}]"
        return "[" + ", ".join(type_label(a) for a in args) + "]"
    if origin is dict:
        return f"{{{type_label(args[0])}: {type_label(args[1])}}}"
    return "null" if tp is type(None) else tp.__name__


def allowed_label(f: dataclasses.Field) -> str:
    """The checks of a :func:`setting` in words: ``cosine, linear, constant`` or ``>= 0, < 1``."""
    choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds", {})
    parts = [", ".join(str(c) for c in choices)] if choices is not None else []
    parts += [f"{_BOUNDS[op][1]} {b}" for op, b in bounds.items()]
    return ", ".join(parts)


class Section:
    """Base of the sections: converts each field to its annotation, checks it, then ``_validate()``."""

    _section = ""  # dotted path of the section in TrainConfig
    _moved: typing.ClassVar[dict[str, str]] = {}  # former keys of this section -> their new dotted path

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            path = self._path(f.name)
            value = _convert(getattr(self, f.name), field_types(type(self))[f.name], path)
            object.__setattr__(self, f.name, value)
            if value is None or value == "auto":
                continue
            choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds", {})
            if choices is not None and value not in choices:
                fail(path, f"one of {', '.join(map(repr, choices))}", value)
            for x in value if isinstance(value, tuple) else (value,):
                if not all(_BOUNDS[op][0](x, b) for op, b in bounds.items()):
                    limits = " and ".join(f"{_BOUNDS[op][1]} {b}" for op, b in bounds.items())
                    why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
                    fail(path, f"{'an integer' if isinstance(x, int) else 'a number'} {limits}{why}", value)
        self._validate()

    def _path(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def _validate(self) -> None:
        pass

    def _require(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            fail(self._path(name), expected, getattr(self, name))


# --------------------------------------------------------------------------------------------
# YAML reading and writing
# --------------------------------------------------------------------------------------------
class YamlLoader(yaml.SafeLoader):
    """SafeLoader reading ``1e-6`` / ``1e3`` as floats (YAML 1.2), not strings."""


class YamlDumper(yaml.SafeDumper):
    """SafeDumper quoting the strings ``YamlLoader`` would read as floats."""


_FLOAT_RE = re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
for _cls in (YamlLoader, YamlDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
YamlDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))  # fmt: skip
