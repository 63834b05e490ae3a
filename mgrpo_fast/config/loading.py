"""Loading a ``TrainConfig``: YAML files plus ``--key.sub=value`` command-line overrides.

Errors name where a bad value came from (``file.yaml:LINE`` or ``command line --key=value``) and
the dotted field path; unknown keys get a "did you mean" and the valid keys of their section.
``python -m mgrpo_fast.config.loading [--config F] [--k=v ...]`` prints the resolved config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from mgrpo_fast.config.fields import ConfigError, RawOverride, YamlLoader, field_types
from mgrpo_fast.config.sections import TrainConfig

_CLI_ALIASES = {"resume": "checkpoint.resume", "overwrite": "logging.overwrite"}


def _key_lines(node: Any, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line of the key in a composed YAML document."""
    out = {} if out is None else out
    for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
        out[f"{prefix}{key.value}"] = key.start_mark.line + 1
        _key_lines(value, f"{prefix}{key.value}.", out)
    return out


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data, lines = yaml.load(text, Loader=YamlLoader), _key_lines(yaml.compose(text, Loader=YamlLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data or {}, lines


def _split_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """``--a.b=v`` / ``--a.b v`` / ``a.b=v`` / a bare ``--flag`` (= true) -> ``[(key, raw value)]``."""
    out, i = [], 0
    while i < len(args):
        arg, i = args[i], i + 1
        key, eq, value = arg.removeprefix("--").partition("=")
        if not eq and not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; expected --key.sub=value")
        if not eq:
            value, i = (args[i], i + 1) if i < len(args) and not args[i].startswith("--") else ("true", i)
        key = key.replace("-", "_")
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(f"command line: {arg!r} is not --key.sub=value")
        out.append((_CLI_ALIASES.get(key, key), value))
    return out


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``argv`` -> ``(config_path, ["key.sub=value", ...])`` for :func:`load_config`: ``--config PATH``
    (``-c``), ``--key.sub=value``, ``--key.sub value``, a bare ``--flag`` (= true), ``--resume``
    (= ``checkpoint.resume``), ``--overwrite`` (= ``logging.overwrite``); ``-h``/``--help`` prints the
    keys and their defaults and exits."""
    if "-h" in argv or "--help" in argv:
        print("usage: [--config FILE.yaml] [--key.sub=value | --key.sub value ...]; keys and defaults:\n")
        print(TrainConfig().to_yaml(), end="")
        raise SystemExit(0)
    pairs = _split_args(["--config" if a == "-c" else a for a in argv])
    config = next((v for k, v in reversed(pairs) if k == "config"), None)
    return config, [f"{k}={v}" for k, v in pairs if k != "config"]


def _parse_value(text: str) -> Any:
    try:
        parsed = yaml.load(text, Loader=YamlLoader) if text.strip() else text
    except yaml.YAMLError:
        parsed = text
    return RawOverride(text, parsed)


def _field_type(dotted: str) -> Any:
    """The annotation at ``dotted`` (``"layer2"`` -> Layer2Config); None for an unknown key."""
    tp: Any = TrainConfig
    for key in dotted.split("."):
        tp = field_types(tp).get(key) if dataclasses.is_dataclass(tp) else None
    return tp


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b]... = value``; a mapping given for a whole section is merged into it."""
    *parents, last = dotted.split(".")
    node = data
    for i, key in enumerate(parents):
        prefix = ".".join(parents[: i + 1])
        node, tp = node.setdefault(key, {}), _field_type(prefix)
        if not isinstance(node, dict) or tp is not None and not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{prefix}: not a section, cannot set {dotted}", dotted)
    parsed = value.parsed if isinstance(value, RawOverride) else value
    if isinstance(parsed, dict) and dataclasses.is_dataclass(_field_type(dotted)):
        for key, sub in parsed.items():
            node.setdefault(last, {})
            _set(node, f"{last}.{key}", sub)
    else:
        node[last] = value


def _within(path: str, key: str) -> bool:
    return path == key or path.startswith((key + ".", key + "["))


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
                resolve: bool = True) -> TrainConfig:  # fmt: skip
    """Defaults, then the YAML file ``path`` (if not None), then ``overrides`` (``"key.sub=value"`` or argv
    items ``"--key.sub=value"`` / ``"--key.sub", "value"``). Returns ``.resolved()`` unless
    ``resolve=False``. Errors are :class:`ConfigError` prefixed by ``file:line`` or the override."""
    if isinstance(overrides, str):
        raise TypeError("load_config: overrides must be a list of strings, not a string")
    path = None if path is None else os.fspath(path)
    data, lines = _read_yaml(path) if path is not None else ({}, {})
    pairs = _split_args(list(overrides))
    if any(key == "config" for key, _ in pairs):
        raise ConfigError("overrides: --config is not an override; pass the file as load_config's path")
    try:
        for key, raw in pairs:
            _set(data, key, _parse_value(raw))
        cfg = TrainConfig.from_dict(data)
        return cfg.resolved() if resolve else cfg
    except ConfigError as e:
        where = e.path or ""
        for key, raw in reversed(pairs):
            if where and (_within(where, key) or _within(key, where)):
                raise ConfigError(f"command line --{key}={raw}: {e}", e.path) from None
        if path is None:
            raise
        key = next((k for k in sorted(lines, key=len, reverse=True) if _within(where, k)), None)
        raise ConfigError(f"{path}:{lines[key]}: {e}" if key else f"{path}: {e}", e.path) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the resolved configuration of ``--config FILE`` plus overrides (``--help``: every key)."""
    try:
        print(load_config(*parse_cli(sys.argv[1:] if argv is None else list(argv))).to_yaml(), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
