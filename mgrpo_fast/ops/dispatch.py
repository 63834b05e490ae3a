"""Choosing an implementation: ``impl="auto" | "torch" | "triton"``.

``torch`` is the chunked pure-PyTorch path (any device, any dtype; the CPU fallback, kept in the
product). ``triton`` is the fused kernel of ``mgrpo_fast.kernels.<op>``. ``auto`` takes Triton when
the tensors live on CUDA and that op's kernel module imports, and torch otherwise.
"""

from __future__ import annotations

import functools
import importlib

import torch

from mgrpo_fast.kernels._common import interpreting
from mgrpo_fast.ops.validation import check_choice

IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_op_status(op: str) -> str | None:
    """``None`` when ``mgrpo_fast.kernels.<op>`` imports, else why it does not (one line)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # CPU wheels of torch do not pull triton in
        return f"triton is not installed ({exc})"
    try:
        importlib.import_module(f"mgrpo_fast.kernels.{op}")
    except ImportError as exc:
        return f"mgrpo_fast.kernels.{op} is not available ({exc})"
    return None


def resolve_impl(impl: str, op: str, device: torch.device) -> str:
    """Map the user's ``impl`` to ``"torch"`` or ``"triton"`` for tensors on ``device``."""
    check_choice("impl", impl, IMPLS)
    if impl == "torch":
        return "torch"
    status = triton_op_status(op)
    if impl == "triton":
        if status is not None:
            raise RuntimeError(f"impl='triton' for {op}: {status}; use impl='torch' or impl='auto'")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"impl='triton' for {op}: the Triton kernels need CUDA tensors (got {device}; "
                "TRITON_INTERPRET=1 runs them on CPU tensors for testing); use impl='torch' or impl='auto'"
            )
        return "triton"
    return "triton" if status is None and device.type == "cuda" else "torch"
