"""Triton kernels of mgrpo_fast, imported as ``mgrpo_fast.kernels``.

This folder is installed under the import name ``mgrpo_fast.kernels`` (``setup.py`` maps it with
``package_dir``; the bare name ``kernels`` is taken on PyPI). In a source checkout, ``mgrpo_fast``
makes the same name importable.

Rules:

- Triton kernels only: one op per file, named after the op (``linear_logprobs.py``, ``grpo_loss.py``,
  ``advantages.py``, ...). Each file holds its private ``@triton.jit`` kernels, the launchers that
  allocate outputs and pick the grid, and a docstring with the math.
- Every kernel has a pure-torch reference in ``mgrpo_fast.reference`` that the tests compare against.
- Imports flow one way: ``mgrpo_fast`` -> ``mgrpo_fast.kernels`` -> torch / triton. Kernels never
  import the trainer (or anything else from ``mgrpo_fast`` above them).
"""
