"""Build script for mgrpo-fast (metadata and build requirements live in pyproject.toml).

What it adds to pyproject.toml:

- the packages: ``mgrpo_fast`` (+ its subpackages) and the top-level folder ``kernels/`` installed under
  the import name ``mgrpo_fast.kernels`` (the bare name ``kernels`` is taken on PyPI);
- the optional C++ extension ``mgrpo_fast._C`` from ``csrc/*.cpp``: a plain CPython extension (Python C
  API, C++17, no torch headers), so it builds in seconds and the build needs no torch. If it cannot be
  built (no compiler, no Python headers, a compile error) the install still succeeds and mgrpo_fast uses
  its pure-Python fallback. ``MGRPO_FAST_NO_EXT=1`` skips it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "mgrpo_fast._C"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _skip_message(reason: str) -> None:
    reason = " ".join(str(reason).split())  # one line, whatever the compiler said
    print(
        f"mgrpo_fast: optional C++ extension {EXT_NAME} not built ({reason}); using the pure-Python fallback",
        file=sys.stderr,
        flush=True,
    )


class OptionalBuildExt(build_ext):
    """build_ext whose failure is not fatal: the extension is an accelerator with a Python fallback."""

    def run(self) -> None:
        if _env_flag("MGRPO_FAST_NO_EXT"):
            _skip_message("MGRPO_FAST_NO_EXT is set")
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, missing Python.h, compile or link error, ...
            _skip_message(f"{type(exc).__name__}: {exc}")

    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/std:c++17", "/O2"]
        else:
            ext.extra_compile_args = ["-std=c++17", "-O3"]
        super().build_extension(ext)

    def get_outputs(self) -> list[str]:
        # Report only what was really built, so wheel/editable installs don't look for a missing .so.
        return [path for path in super().get_outputs() if os.path.exists(path)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        return {dst: src for dst, src in mapping.items() if os.path.exists(src)}


def _packages() -> tuple[list[str], dict[str, str]]:
    """``mgrpo_fast`` (+ subpackages), and ``kernels/`` (+ subpackages) as ``mgrpo_fast.kernels``."""
    packages = ["mgrpo_fast", *find_packages(HERE, include=["mgrpo_fast.*"])]
    # Data-only folder (no __init__.py): listed so its package data (pyproject.toml) ships without
    # setuptools' "Package would be ignored" warning.
    packages.append("mgrpo_fast.assets.tiny_model")
    package_dir = {"mgrpo_fast.kernels": "kernels"}
    packages.append("mgrpo_fast.kernels")
    for sub in find_packages(os.path.join(HERE, "kernels")):
        packages.append(f"mgrpo_fast.kernels.{sub}")
        package_dir[f"mgrpo_fast.kernels.{sub}"] = "kernels/" + sub.replace(".", "/")
    return packages, package_dir


def _extensions() -> list[Extension]:
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if not sources:
        return []
    depends = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.h")))
    return [Extension(EXT_NAME, sources=sources, depends=depends, language="c++")]


def _long_description() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    long_description=_long_description(),
    long_description_content_type="text/markdown",
)
