"""Choosing an implementation: :func:`choose_impl`, the one place that decides which code serves a
call of a public op (``impl="auto" | "torch" | "triton"``).

``torch`` is the chunked pure-PyTorch path (any device, any dtype; the CPU fallback, kept in the
product). ``triton`` is the fused kernel of ``mgrpo_fast.kernels.<module>``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch

from mgrpo_fast.kernels._common import interpreting
from mgrpo_fast.ops.validation import check_choice

IMPLS = ("auto", "torch", "triton")

# The kernel modules each op's Triton path runs.
KERNEL_MODULES = {
    "linear_logprobs": ("linear_logprobs",),
    "grpo_loss": ("grpo_loss",),
    "fused_linear_grpo_loss": ("linear_logprobs", "grpo_loss"),
    "group_advantages": ("advantages",),
}
# Operand dtypes the GEMM and loss kernels take (one dtype per call; they compute in fp32).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_op_status(module: str) -> str | None:
    """``None`` when ``mgrpo_fast.kernels.<module>`` imports, else why it does not (one line)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # CPU wheels of torch do not pull triton in
        return f"triton is not installed ({exc})"
    try:
        importlib.import_module(f"mgrpo_fast.kernels.{module}")
    except ImportError as exc:
        return f"mgrpo_fast.kernels.{module} is not available ({exc})"
    return None


def triton_gap(
    op: str, dtypes: Sequence[torch.dtype], importance_sampling_level: str, loss_type: str = "dapo"
) -> str | None:
    """``None`` when the Triton path of ``op`` serves this case, else what it does not serve."""
    if op in ("grpo_loss", "fused_linear_grpo_loss") and importance_sampling_level != "token":
        return (
            f"importance_sampling_level={importance_sampling_level!r} (the loss kernel is per token; "
            "the sequence ratio couples the rows of a sequence)"
        )
    if op == "fused_linear_grpo_loss" and loss_type == "vespo":
        return (
            "loss_type='vespo' in one pass (its weight needs the log-ratios of the whole sequence before "
            "any row's gradient)"
        )
    if op != "group_advantages" and (len(set(dtypes)) > 1 or not set(dtypes) <= set(TRITON_DTYPES)):
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"dtypes ({names}) (the kernels take one of fp32/fp16/bf16, one dtype per call)"
    return None


def choose_impl(
    op: str,
    impl: str,
    device: torch.device,
    *,
    dtypes: Sequence[torch.dtype] = (),
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
) -> str:
    """``"torch"`` or ``"triton"``: the path that serves this call of ``op``.

    Args:
        op: ``linear_logprobs | grpo_loss | fused_linear_grpo_loss | group_advantages``.
        impl: the user's ``"auto" | "torch" | "triton"``.
        device: where the call's tensors live.
        dtypes: the operand dtypes the kernel would read (``hidden`` and ``weight`` for the log-prob
            ops, ``logp`` for ``grpo_loss``; none for ``group_advantages``).
        importance_sampling_level, loss_type: of the loss options (the loss ops).

    Rules, in order:

    1. ``impl`` not one of ``IMPLS``: ``ValueError`` naming ``impl``. ``"torch"``: torch, always.
    2. What Triton serves (``triton_gap``): the loss kernels are per token, so sequence-level
       importance sampling (GSPO) is not served by ``grpo_loss`` or the one-pass
       ``fused_linear_grpo_loss``, nor ``vespo`` by the one-pass fused op (its per-sequence weight
       needs every row's log-prob first); the GEMM and loss kernels take one operand dtype among
       fp32/fp16/bf16 (fp64 and mixed dtypes stay on torch); ``group_advantages`` serves every
       float dtype.
    3. ``"auto"``: Triton when every kernel module of the op imports (``triton_op_status``), the
       tensors are on CUDA and the case is served; torch otherwise (CPU, fp64, GSPO's loss, ...).
    4. ``"triton"``: the kernel modules must import and the tensors be on CUDA (or
       ``TRITON_INTERPRET=1``, the interpreter that runs the kernels on CPU tensors for tests), else
       ``RuntimeError`` naming ``impl``. An unserved case is a ``ValueError`` naming ``impl``, except
       GSPO and vespo in ``fused_linear_grpo_loss``, which take its two-stage path instead (``"torch"``
       for the fused op: ``linear_logprobs`` under the same ``impl``, so Triton log-probs, then the
       torch loss).
    """
    check_choice("impl", impl, IMPLS)
    if impl == "torch":
        return "torch"
    status = next(filter(None, map(triton_op_status, KERNEL_MODULES[op])), None)
    gap = triton_gap(op, dtypes, importance_sampling_level, loss_type)
    if impl == "auto":
        return "triton" if status is None and device.type == "cuda" and gap is None else "torch"
    if status is not None:
        raise RuntimeError(f"impl='triton' for {op}: {status}; use impl='torch' or impl='auto'")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"impl='triton' for {op}: the Triton kernels need CUDA tensors (got {device}; "
            "TRITON_INTERPRET=1 runs them on CPU tensors for testing); use impl='torch' or impl='auto'"
        )
    if gap is None:
        return "triton"
    if op == "fused_linear_grpo_loss" and (importance_sampling_level != "token" or loss_type == "vespo"):
        return "torch"
    raise ValueError(f"impl: 'triton' for {op} does not serve {gap}; use impl='auto' or impl='torch'")
