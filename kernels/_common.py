"""Helpers shared by the kernel files: where a kernel may run, and the ahead-of-time compile specs.

Every kernel file exposes ``aot_specs() -> list[AotSpec]``: one entry per (kernel, dtype, config)
that its launchers can pick. CI compiles each entry for sm_80 and sm_90 on a CPU machine
(``triton.compile`` with a ``GPUTarget``) and checks its shared memory fits the chip, which proves
every config builds for the GPU even though CI has none. A launcher must never pick a config that
is not in its file's ``aot_specs()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# torch dtype -> the pointer type string of a triton signature
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
    torch.uint8: "*u8",
}

# Dtypes the GEMM kernels accept for hidden/weight (fp64 stays on the torch path).
GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shared memory per block, bytes (opt-in maximum).
SHARED_MEMORY_LIMITS = {80: 163 * 1024 + 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class AotSpec:
    """One compile unit: ``kernel`` (a ``@triton.jit`` function defined in a .py file) with
    ``signature`` (arg name -> triton type, e.g. ``"*bf16"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``), the ``constexprs`` values, and launch options."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    tags: dict[str, str] = field(default_factory=dict)
    # Integer args that are multiples of 16 at real shapes (H, row strides, ...). Triton's launcher
    # specializes such values (and 16-byte-aligned pointers, which torch allocations are), so the
    # ahead-of-time compile gives them the same divisibility hints to build the code a GPU runs.
    aligned_args: tuple[str, ...] = ()

    def compile_attrs(self) -> dict[tuple[int, ...], list[list[object]]]:
        """``ASTSource(attrs=...)``: divisibility 16 for every pointer and every ``aligned_args``."""
        return {
            (i,): [["tt.divisibility", 16]]
            for i, (name, kind) in enumerate(self.signature.items())
            if kind.startswith("*") or name in self.aligned_args
        }


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (tests, small shapes)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    if t.is_cuda or (t.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"{name}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), "
        f"got a tensor on {t.device}"
    )


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) with an fp32 result (fp64 for fp64), never rounded to bf16/fp16.

    bf16/fp16 on CUDA: a tensor-core cuBLAS GEMM with fp32 output (``out_dtype``, CUDA only);
    elsewhere low-precision operands are upcast first.
    """
    if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and a.dtype == b.dtype:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    return a @ b


def pointer_type(dtype: torch.dtype) -> str:
    try:
        return POINTER_TYPES[dtype]
    except KeyError:
        raise ValueError(f"no Triton pointer type for dtype {dtype}") from None
