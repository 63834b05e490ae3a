"""Loading of the optional C++ extension ``mgrpo_fast._C``.

The extension is built from ``csrc/*.cpp`` by ``setup.py`` when a C++17 compiler is available (and
``MGRPO_FAST_NO_EXT=1`` is not set). When it is missing, every caller falls back to a pure-Python twin
that returns identical results, so nothing here ever raises: ask :func:`has_extension` or, for the
reason it is missing, :func:`load_error`.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

_EXTENSION_NAME = "mgrpo_fast._C"
_load_error: str | None = None


@functools.cache
def load_extension() -> ModuleType | None:
    """Return the ``mgrpo_fast._C`` module, or ``None`` if it was not built or fails to import.

    The result is cached: the import is attempted once per process.
    """
    global _load_error
    try:
        return importlib.import_module(_EXTENSION_NAME)
    except ImportError as exc:  # not built, or built against another Python / missing symbol
        _load_error = f"{type(exc).__name__}: {exc}"
        return None


def has_extension() -> bool:
    """Whether the C++ extension ``mgrpo_fast._C`` is importable."""
    return load_extension() is not None


def load_error() -> str | None:
    """Why the extension could not be imported (``None`` if it loaded, or was not tried yet)."""
    load_extension()
    return _load_error
