"""Loading a ``TrainConfig``: YAML files plus ``--key.sub=value`` command-line overrides.

Errors name where a bad value came from (``file.yaml:LINE`` or ``command line --key=value``) and
the dotted field path; unknown keys get a "did you mean" and the valid keys of their section.
``python -m mgrpo_fast.config [--config F] [--k=v ...]`` prints the resolved config.

Keys that moved to another section (:data:`MOVED_KEYS`: ``optim.total_steps`` is now
``train.total_steps``, ...) are still read from files and overrides under their old name, with a
one-line warning naming the new key; a file that sets both the old and the new key is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from mgrpo_fast.config.fields import ConfigError, RawOverride, YamlLoader, field_types
from mgrpo_fast.config.run import TrainConfig

logger = logging.getLogger(__name__)

_CLI_ALIASES = {"resume": "checkpoint.resume", "overwrite": "logging.overwrite"}
MOVED_KEYS: dict[str, str] = {
    f"{f.name}.{old}": new
    for f in dataclasses.fields(TrainConfig)
    for old, new in getattr(field_types(TrainConfig)[f.name], "_moved", {}).items()
}
"""Former dotted key -> its current one (``"optim.total_steps": "train.total_steps"``)."""


def moved_key(dotted: str, where: str) -> str:
    """The current name of ``dotted``: itself, or for a key that moved its new name, with a one-line
    warning naming ``where`` it was written and the key to use."""
    new = MOVED_KEYS.get(dotted)
    if new is None:
        return dotted
    logger.warning(
        "%s: %s has moved to %s; please use that (the old key still works for now)", where, dotted, new
    )
    return new


def move_renamed_keys(data: dict[str, Any], lines: dict[str, int], path: str) -> None:
    """Rename the moved keys of a YAML file's ``data`` in place (their ``lines`` follow them)."""
    for old, new in MOVED_KEYS.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if not isinstance(data.get(section), dict) or key not in data[section]:
            continue
        if data.get(new_section) is None:
            data[new_section] = {}
        if not isinstance(data[new_section], dict):
            continue  # the section itself is wrong; TrainConfig.from_dict says so
        where = f"{path}:{lines[old]}" if old in lines else path
        if new_key in data[new_section]:
            raise ConfigError(f"{where}: {old} and {new} are both set; keep only {new}", new)
        moved_key(old, where)  # the warning
        data[new_section][new_key] = data[section].pop(key)
        if old in lines:
            lines[new] = lines[old]


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
        # imported here so that `python -m mgrpo_fast.config.describe` runs a module not yet imported
        from mgrpo_fast.config.describe import help_text

        print(help_text(), end="")
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
            _set(node, moved_key(f"{last}.{key}", "command line"), sub)
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
    if path is not None:
        move_renamed_keys(data, lines, path)
    pairs = _split_args(list(overrides))
    if any(key == "config" for key, _ in pairs):
        raise ConfigError("overrides: --config is not an override; pass the file as load_config's path")
    try:
        for key, raw in pairs:
            _set(data, moved_key(key, "command line"), _parse_value(raw))
        cfg = TrainConfig.from_dict(data)
        return cfg.resolved() if resolve else cfg
    except ConfigError as e:
        where = e.path or ""
        for key, raw in reversed(pairs):
            target = MOVED_KEYS.get(key, key)
            if where and (_within(where, target) or _within(target, where)):
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
